"""What `ct-edge` does with the bundle it is given: a missing, unknown, tampered or malformed bundle
is one line and exit 2 before any model runs, an artifact that missed parity is warned about, the
bundle is found from the environment; and `ct-edge info`, which shows and checks it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bundle_helpers import set_default_status
from cli_helpers import (
    GOOD,
    error_lines,
    records,
    run,
)

from ct_edge import LABELS

# --- bundle errors: exit 2, one line, the model never runs ----------------------------------


def _no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from ct_edge import classifier

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an engine was opened on a bundle that should have been refused")

    monkeypatch.setattr(classifier, "open_backend", refuse)


def test_missing_bundle(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CT_EDGE_BUNDLE", raising=False)
    code, out, err = run(capsys, "classify", GOOD[0])
    assert code == 2 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith("error: no model bundle at")
    assert "--bundle" in err and "CT_EDGE_BUNDLE" in err
    code, _, err = run(capsys, "info", "--bundle", tmp_path / "nowhere")
    assert code == 2 and err.startswith("error: no model bundle at")


def test_unknown_schema_version(capsys, bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_engine(monkeypatch)
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    for command in ("classify", "info"):
        code, out, err = run(capsys, command, "--bundle", bundle_copy,
                             *([GOOD[0]] if command == "classify" else []))
        assert code == 2 and out == ""
        assert len(err.splitlines()) == 1 and "unknown schema_version 99" in err
        assert "upgrade ct-edge or rebuild" in err


def test_tampered_model_is_never_run(capsys, bundle_copy: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from ct_edge.bundle import Bundle

    default = Bundle.load(bundle_copy).select()  # what `classify` would run
    _no_engine(monkeypatch)
    model = default.path
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    model.write_bytes(bytes(data))
    code, out, err = run(capsys, "classify", "--bundle", bundle_copy, GOOD[0])
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert "does not match its sha256" in err and "will not be run" in err and "re-copy" in err
    # info shows which file is bad, and fails too.
    code, out, err = run(capsys, "info", "--bundle", bundle_copy)
    assert code == 2 and "sha256 mismatch" in out
    assert error_lines(err) == [err.strip()] and default.name in err


@pytest.mark.parametrize("change", [{"bytes": float("inf")}, {"file": "domain\x00.npz"}],
                         ids=["bytes 1e999", "NUL in file"])
def test_a_malformed_domain_section_is_one_line_and_exit_2(capsys, bundle_copy: Path,
                                                          change: dict) -> None:
    """Both were a traceback and exit 1 (OverflowError; ValueError from os.open)."""
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["domain"] = {"modality": "xray", "method": "max_logit", "threshold": 3.0,
                          "file": "domain.npz", "sha256": "0" * 64, "bytes": 100, **change}
    path.write_text(json.dumps(manifest))
    for argv in (["classify", GOOD[0]], ["info"]):
        code, _, err = run(capsys, *argv, "--bundle", bundle_copy)
        assert code == 2, argv
        assert error_lines(err) == [err.strip()] and str(path) in err and "\x00" not in err


def test_each_command_that_runs_an_artifact_warns_when_it_missed_parity(
        capsys, bundle_copy: Path) -> None:
    """classify warned; explain ran such an artifact silently (so did listen and serve)."""
    name = set_default_status(bundle_copy)
    warning = (f"warning: artifact {name!r} has parity status 'failed'; its answers "
               "may differ from the reference model")
    for command in (["classify"], ["explain", "--json", "--method", "occlusion"]):
        code, _, err = run(capsys, *command, "--bundle", bundle_copy, GOOD[0])
        assert code == 0 and warning in err.splitlines(), command
        code, _, err = run(capsys, *command, "--quiet", "--bundle", bundle_copy, GOOD[0])
        assert code == 0 and warning not in err, command


def test_bundle_from_environment_then_default_folder(capsys, bundle: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CT_EDGE_BUNDLE", str(bundle))
    code, out, _ = run(capsys, "classify", "--json", GOOD[0])
    assert code == 0 and records(out)[0]["label"] in LABELS
    monkeypatch.delenv("CT_EDGE_BUNDLE")
    shutil.copytree(bundle, tmp_path / "artifacts" / "bundle")
    code, out, _ = run(capsys, "classify", "--json", GOOD[0])
    assert code == 0 and records(out)[0]["label"] in LABELS


# --- info ----------------------------------------------------------------------------------


def test_info_text(capsys, bundle: Path, manifest: dict) -> None:
    code, out, err = run(capsys, "info", "--bundle", bundle)
    assert code == 0 and err == ""
    assert ", ".join(manifest["labels"]) in out
    assert "128x128" in out and "float32" in out and "NHWC" in out
    assert "1500,-600" in out and "lung" in out
    assert f"default       {manifest['default'] or '(none'}" in out
    explain = "cam from the" if manifest.get("explain") else "not recorded (explain uses class"
    assert f"explain       {explain}" in out
    for artifact in manifest["artifacts"]:
        (line,) = [row for row in out.splitlines() if row.startswith(artifact["name"] + " ")]
        assert artifact["format"] in line and artifact["status"] in line and " ok " in line
        assert any(unit in line for unit in (" B ", "KiB", "MiB"))
        assert f"(on {artifact['parity']['test_images']} test images)" in line
    assert "provenance" in out
    for value in manifest.get("provenance", {}).values():
        if isinstance(value, str):
            assert value in out


def test_info_json(capsys, bundle: Path, manifest: dict) -> None:
    code, out, _ = run(capsys, "info", "--json", "--bundle", bundle)
    data = json.loads(out)
    assert code == 0 and data["manifest"] == manifest
    assert data["checks"] == {a["name"]: "ok" for a in manifest["artifacts"]}
    assert data["domain_gate"] == ("ok" if "method" in manifest.get("domain", {}) else None)
    assert data["problems"] == {}


def test_info_checks_the_domain_gate_file_as_classify_does(capsys, tiny_bundle: Path,
                                                           tmp_path: Path) -> None:
    """A damaged domain.npz made classify refuse the bundle while info said every file was ok."""
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    gate = copy / json.loads((copy / "manifest.json").read_text())["domain"]["file"]
    data = bytearray(gate.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gate.write_bytes(bytes(data))
    code, out, err = run(capsys, "info", "--bundle", copy)
    assert code == 2 and "does not match its sha256" in err and len(err.splitlines()) == 1
    assert f"{gate.name}: sha256 mismatch" in out
    code, out, _ = run(capsys, "info", "--json", "--bundle", copy)
    data = json.loads(out)
    assert code == 2 and data["domain_gate"] == "sha256 mismatch"
    assert "does not match its sha256" in data["problems"][gate.name]
