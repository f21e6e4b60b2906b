"""The aarch64 check (make arm64-check, tools/arm64/): its comparison rules, and (slow, when the
emulation is set up) the check itself on the test bundle."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("arm64_check", REPO / "tools" / "arm64" / "check.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def _run(machine: str, raw: list[float], probabilities: dict[str, float], label: str = "Normal",
         step: float | None = None, reference: list | None = None) -> dict:
    artifact = {"engine": "litert", "sha256": "ab", "output_step": step,
                "results": [{"path": "a.png", "label": label, "probabilities": probabilities,
                             "raw": raw}]}
    if reference is not None:
        artifact["reference_raw"] = reference
    return {"machine": machine, "artifacts": {"model": artifact}}


P = {"COVID-19": 0.1, "Normal": 0.7, "Viral Pneumonia": 0.2}


def _shift(probabilities: dict[str, float], by: float) -> dict[str, float]:
    moved = copy.deepcopy(probabilities)
    moved["Normal"] += by
    return moved


def test_float_outputs_must_agree_within_the_tolerance() -> None:
    host = _run("x86_64", [0.1, 0.7, 0.2], P)
    assert check.compare(host, _run("aarch64", [0.1, 0.7, 0.2], _shift(P, 5e-6)), 1e-5)[0] == []
    problems, summary = check.compare(host, _run("aarch64", [0.1, 0.7, 0.2], _shift(P, 2e-5)), 1e-5)
    assert len(problems) == 1 and "differ" in problems[0]
    assert summary["model"]["within_tolerance"] == 0


def test_labels_must_be_the_same() -> None:
    problems, _ = check.compare(_run("x86_64", [0, 1, 0], P),
                                _run("aarch64", [0, 1, 0], P, label="COVID-19"), 1e-5)
    assert any("x86 says" in p for p in problems)


def test_int8_output_one_quantization_step_apart_fails_and_says_so() -> None:
    """The issue asks for 1e-5 on the default (full-int8) artifact too: one output step (1/256)
    is a failure; the report names the steps and whether the reference kernels agree."""
    step = 1 / 256
    host = _run("x86_64", [-109 * step, -50 * step, 30 * step], P, step=step, reference=[[-109, -50, 30]])
    same = _run("aarch64", [-109 * step, -50 * step, 30 * step], P, step=step,
                reference=[[-109, -50, 30]])
    problems, summary = check.compare(host, same, 1e-5)
    assert problems == [] and summary["model"]["max_raw_diff_steps"] == 0.0
    one_step = _run("aarch64", [-109 * step, -49 * step, 30 * step], _shift(P, 0.003), step=step,
                    reference=[[-109, -50, 30]])
    problems, summary = check.compare(host, one_step, 1e-5)
    assert len(problems) == 1 and "1 step(s) apart" in problems[0]
    assert summary["model"]["max_raw_diff_steps"] == 1.0
    assert summary["model"]["reference_kernels_identical"] is True


def test_the_emulated_run_must_really_be_aarch64() -> None:
    problems, _ = check.compare(_run("x86_64", [0, 1, 0], P), _run("x86_64", [0, 1, 0], P), 1e-5)
    assert any("not aarch64" in p for p in problems)


def test_classify_script_runs_on_the_host(tiny_bundle: Path) -> None:
    """The script the emulated interpreter runs, run here: one JSON document, all inputs."""
    images = [str(REPO / "tests" / "fixtures" / name) for name in ("gray8.png", "ct_small.dcm")]
    out = subprocess.run([sys.executable, str(REPO / "tools" / "arm64" / "classify.py"),
                          str(tiny_bundle), "--artifacts", "tflite-int8,onnx-fp32", "--reference",
                          *images], capture_output=True, text=True, timeout=300, check=True)
    import json

    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(doc["artifacts"]) == {"tflite-int8", "onnx-fp32"}
    int8 = doc["artifacts"]["tflite-int8"]
    assert int8["output_step"] and len(int8["reference_raw"]) == 2
    assert doc["artifacts"]["onnx-fp32"]["output_step"] is None
    assert [r["path"] for r in int8["results"]] == images


@pytest.mark.slow
def test_arm64_check_passes_on_the_test_bundle(tiny_bundle: Path) -> None:
    rootfs = REPO / "artifacts" / "arm64" / "rootfs" / "usr" / "bin" / "python3.11"
    if shutil.which("qemu-aarch64") is None or not rootfs.exists():
        pytest.skip("aarch64 emulation not set up (bash tools/arm64/setup.sh)")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "arm64" / "check.py"), "--bundle",
                             str(tiny_bundle), "--report", str(tiny_bundle.parent / "arm64.json")],
                            capture_output=True, text=True, timeout=3600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_a_nan_probability_is_a_failure() -> None:
    nan = _shift(P, float("nan"))
    problems, _ = check.compare(_run("x86_64", [0.1, 0.7, 0.2], P),
                                _run("aarch64", [0.1, 0.7, 0.2], nan), 1e-5)
    assert any("differ" in p for p in problems)


def test_extra_images_are_spread_evenly_and_a_missing_path_is_refused(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    picked = check.inputs(extra=[tmp_path], limit_extra=4)
    names = [p.name for p in picked if p.parent == tmp_path]
    assert names[0] == "0.png" and names[-1] == "9.png" and len(names) == 4
    with pytest.raises(SystemExit, match="no such file"):
        check.inputs(extra=[tmp_path / "nowhere"])
