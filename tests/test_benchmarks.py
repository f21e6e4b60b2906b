"""Smoke test of the benchmark harness: its quickest mode on a tiny bundle fills every field.

No test here asserts a time: the figures depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Dotted paths; "*" means every key of that mapping.
ARTIFACT_FIELDS = [
    "file", "format", "precision", "status", "size_bytes", "load_ms", "memory.peak_rss_mb",
    "memory.input",
    *(f"latency.{t}.{k}" for t in ("1_thread", "all_cores")
      for k in ("runs", "p50_ms", "p95_ms", "p99_ms", "load_ms", "first_inference_ms")),
    "vs_keras.size_ratio_x", "vs_keras.rss_ratio_x", "vs_keras.speedup_1_thread_x",
    "vs_keras.speedup_all_cores_x", "vs_keras.speedup_vs_predict_1_thread_x",
]
KERAS_FIELDS = ["import_s", "load_ms", "size_bytes", "memory.peak_rss_mb",
                *(f"{api}.latency.{t}.{k}" for api in ("call", "predict")
                  for t in ("1_thread", "all_cores") for k in ("runs", "p50_ms", "p95_ms", "p99_ms"))]
SPLIT_FIELDS = ["estimate_ms", "decode_ms", "preprocess_ms", "inference_ms", "total_ms",
                "naive.decode_resize_ms", "naive.inference_ms", "naive.total_ms", "speedup_x"]
PROFILE_FIELDS = ["python_start_ms", "total_s", "peak_rss_mb", "stages"]
COLD_FIELDS = ["median_s", "median_to_first_output_s", "peak_rss_mb", "runs", "command"]
FIELDS = [
    "schema", "created", "mode", "plan.runs", "wall_s", "units",
    *(f"machine.{k}" for k in ("cpu_model", "cores", "cores_available", "memory_total_mb", "python",
                               "packages.numpy", "load_average_start", "load_average_end")),
    "bundle.path", "bundle.default", "keras_model.path", "keras_model.sha256",
    *(f"artifacts.*.{k}" for k in ARTIFACT_FIELDS),
    "artifacts.*.throughput",
    *(f"memory_limits.{k}" for k in ("artifact", "bound_mb", "max_pixels", "worst",
                                     "worst_peak_rss_mb", "inputs.*.peak_rss_mb", "inputs.*.input")),
    *(f"keras.{k}" for k in KERAS_FIELDS),
    *(f"end_to_end.per_image.*.{k}" for k in SPLIT_FIELDS),
    *(f"end_to_end.cold_start_profile.{k}" for k in PROFILE_FIELDS),
    "pi_profile.note", "pi_profile.cpus",
    "pi_profile.artifacts.*.latency.1_thread.p50_ms", "pi_profile.artifacts.*.vs_keras.speedup_1_thread_x",
    "pi_profile.keras.call.latency.1_thread.p50_ms", "pi_profile.keras.predict.latency.1_thread.p50_ms",
    *(f"pi_profile.end_to_end.per_image.*.{k}" for k in SPLIT_FIELDS),
    *(f"pi_profile.end_to_end.cold_start_profile.{k}" for k in PROFILE_FIELDS),
]
CLI_FIELDS = [
    *(f"end_to_end.cold_start.{k}" for k in COLD_FIELDS),
    *(f"pi_profile.end_to_end.cold_start.{k}" for k in COLD_FIELDS),
    *(f"folder.{run}.{k}" for run in ("all_cores", "one_core")
      for k in ("images", "answers", "wall_s", "images_per_s")),
    "folder.speedup_x",
]
INPUTS = ("jpeg-1000", "jpeg-2000", "jpeg-4000", "png16-2048", "dicom-ct-512")


@pytest.fixture(scope="module")
def bench_bundle(tiny_bundle: Path, tiny_model: Path) -> tuple[Path, Path]:
    """(bundle, model.keras): conftest's converted `tiny_bundle` and its source model."""
    # No fallback to a stand-in bundle: tiny_bundle already tolerates a missed parity gate, so if it
    # fails, training or the converter is broken; that must show as an error here, not as a passing
    # benchmark of a smaller stand-in (one fp32 artifact, no int8 or ONNX).
    model = tiny_model / "model.keras"
    assert (tiny_bundle / "manifest.json").is_file(), f"tiny_bundle wrote no manifest in {tiny_bundle}"
    assert model.is_file(), f"tiny_model wrote no {model}"
    return tiny_bundle, model


@pytest.fixture(scope="module")
def bench_run(bench_bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`python -m benchmarks.run --smoke --json` as a user would run it (a fresh process)."""
    bundle, model = bench_bundle
    out = tmp_path_factory.mktemp("results")
    cmd = [sys.executable, "-m", "benchmarks.run", "--bundle", str(bundle), "--model", str(model),
           "--out", str(out), "--inputs", str(tmp_path_factory.mktemp("inputs")), "--smoke", "--json"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": out, "stdout": done.stdout, "stderr": done.stderr,
            "results": json.loads((out / "latest.json").read_text())}


def lookup(data: object, path: str) -> list[tuple[str, object]]:
    """Every (concrete path, value) a dotted path with "*" names; fails on a missing key."""
    found = [("", data)]
    for part in path.split("."):
        step = []
        for where, value in found:
            assert isinstance(value, dict), f"{where or '<root>'} is not an object: {value!r}"
            if part == "*":
                assert value, f"{where} is empty"
                step += [(f"{where}.{key}", item) for key, item in value.items()]
            else:
                assert part in value, f"{where}.{part} is missing (have {sorted(value)})"
                step.append((f"{where}.{part}", value[part]))
        found = step
    return found


def test_every_field_is_present(bench_run: dict) -> None:
    results = bench_run["results"]
    cli = importlib.util.find_spec("ct_edge.cli") is not None
    for path in FIELDS + (CLI_FIELDS if cli else []):
        for where, value in lookup(results, path):
            assert value is not None, f"{where} is null"
            if where.endswith(("_ms", "_s", "_mb", "_x", "_bytes", "images_per_s")):
                assert isinstance(value, (int, float)) and value >= 0, f"{where} = {value!r}"
    if not cli:
        assert "error" in results["end_to_end"]["cold_start"]
    assert results["errors"] == []
    assert results["mode"] == "smoke"


def test_inputs_and_artifacts_are_all_measured(bench_run: dict, bench_bundle: tuple[Path, Path]) -> None:
    from ct_edge.bundle import Bundle

    results = bench_run["results"]
    assert set(results["artifacts"]) == set(Bundle.load(bench_bundle[0]).artifacts)
    assert set(results["pi_profile"]["artifacts"]) == set(results["artifacts"])
    per_image = results["end_to_end"]["per_image"]
    assert set(INPUTS) <= set(per_image)
    for name in per_image:
        assert per_image[name]["naive"].get("total_ms") is not None, name
    for entry in results["artifacts"].values():
        assert {t["batch"] for t in entry["throughput"]} == {16, 32}
        assert entry["memory"]["tensorflow_imported"] is False  # the runtime's own footprint
    assert results["keras_model"]["path"] == str(bench_bundle[1])


def test_goals_are_reported(bench_run: dict) -> None:
    goals = bench_run["results"]["goals"]
    assert [g["id"] for g in goals] == ["int8_p50", "cold_start", "rss", "rss_limits", "e2e_2000",
                                       "speedup_2000"]
    for goal in goals:
        assert goal["status"] in ("met", "missed", "not measured")
        assert goal["unit"] and goal["target"] > 0


def test_report_files(bench_run: dict) -> None:
    from PIL import Image

    out = bench_run["out"]
    text = (out / "latest.md").read_text()
    for heading in ("## Goals", "## Artifacts", "## End to end", "## Folder throughput",
                    "## Pi-class profile"):
        assert heading in text
    assert "not a Raspberry Pi" in text
    assert "| Header estimate | Decode |" in text  # what classify reads before it decodes
    runs = bench_run["results"]["plan"]["runs"]  # a smoke run: too few runs for a p99
    assert f"(p50 / p95 / max over {runs} runs)" in text and "/ p99" not in text
    with Image.open(out / "latency_size.png") as chart:
        assert chart.width > 400
    assert json.loads(bench_run["stdout"])["schema"] == bench_run["results"]["schema"]
    assert "[bench" in bench_run["stderr"]  # progress is visible


def test_architectures_table_from_a_hand_made_result() -> None:
    """benchmarks.architectures renders its table and report without training anything."""
    from benchmarks.architectures import render_markdown, render_table

    def row(arch: str, int8: dict, latency: dict, reasons: list[str]) -> dict:
        return {"arch": arch, "params": 103123, "keras_test_accuracy": 0.9189, "test_images": 37,
                "test_source": "carved", "artifacts": {"tflite-int8": int8}, "latency": latency,
                "gate": {"passed": not reasons, "reasons": reasons}}

    passed = {"bytes": 117384, "accuracy": 0.9189, "agreement": 1.0, "status": "passed"}
    failed = {"bytes": 3321192, "accuracy": 0.8919, "agreement": 0.973, "status": "failed"}
    results = {"data": "d", "runs": 1000, "warmup": 50, "train_config": {"seed": 0},
               "machine": {"load_average_start": [1.0, 1.0, 1.0]}, "architectures": [
                   row("edge-gap", passed, {"tflite-int8": {"p50_ms": 1.234},
                                            "onnx-fp32": {"p50_ms": 2.5}}, []),
                   row("reference", failed, {"tflite-int8": {"error": "boom"}},
                       ["tflite-int8 cannot be the default: agreement"])]}
    lines = render_table(results).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| architecture | parameters |")
    assert lines[2] == ("| edge-gap | 103,123 | 91.9% | 117,384 | 91.9% | 100.0% | passed | 1.23 "
                        "| 2.50 |")
    assert lines[3] == ("| reference | 103,123 | 91.9% | 3,321,192 | 89.2% | 97.3% | failed | - "
                        "| - |")
    text = render_markdown(results)
    assert "- reference: tflite-int8 cannot be the default" in text and "37 images" in text


def test_machine_record_names_thread_counts_set_from_outside(monkeypatch) -> None:
    """Op-deterministic training repeats only at the same thread count, so runs record it."""
    from training import machine

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    assert machine.describe()["thread_settings"] == {"TF_NUM_INTRAOP_THREADS": "1"}
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS")
    assert machine.describe()["thread_settings"] == {}


def test_server_throughput_and_latency_count_successful_requests_only() -> None:
    """A server shedding load answers 503 fast: those must not count as throughput or latency."""
    import time

    from benchmarks.server import run_clients

    def call(i: int) -> bool:
        if i % 2:
            return False  # a refusal, at once
        time.sleep(0.01)
        return True

    result = run_clients(call, concurrency=2, seconds=0.3)
    assert result["errors"] > 0 and result["requests"] > 0
    assert result["min_ms"] >= 10.0  # no refusal's near-zero time among the latencies
    with pytest.raises(RuntimeError, match="calls failed"):
        run_clients(lambda i: False, concurrency=1, seconds=0.05)


@pytest.mark.parametrize("argv", [
    ["benchmarks.ray_batch", "--bundle", "/nonexistent-bundle"],
    ["benchmarks.ray_batch", "--counts", "abc"],
    ["benchmarks.ray_batch", "--actors", "-1"],
    ["benchmarks.domain", "--bundle", "/nonexistent-bundle"],
    ["benchmarks.listen", "--bundle", "/nonexistent-bundle"],
    ["benchmarks.server", "--seconds", "0"],
    ["benchmarks.run", "--model", "/nonexistent-model.keras"],
])
def test_benchmark_scripts_refuse_bad_arguments_with_an_error_not_a_traceback(
        argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert argv[-1] in done.stderr.strip().splitlines()[-1]  # the last line names what is wrong
