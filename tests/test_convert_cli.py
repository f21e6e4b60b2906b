"""`python -m convert` (make convert): one-line errors and their exit codes (a missing, corrupt or
unusable model, an unknown format, int8 failing, every artifact failing), help, the parity table,
a corrupt decode cache, and an unexpected error keeping its traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from convert_helpers import dim_noise, junk_table, snapshot

from ct_edge.bundle import Bundle

# --- the CLI ------------------------------------------------------------------------------------


def test_cli_missing_model_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    from convert.__main__ import main

    assert main(["--model", str(tmp_path / "none.keras"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: no model at {tmp_path / 'none.keras'}; run make train first"
    assert not (tmp_path / "b").exists()


def test_cli_unknown_format_is_exit_2(easy_model: Path, tmp_path: Path, capsys) -> None:
    from convert.__main__ import main

    assert main(["--model", str(easy_model), "--out", str(tmp_path / "b"),
                 "--formats", "tflite-int8,coreml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown format(s) coreml") and err.count("\n") == 1


def test_cli_help_shows_every_default(capsys) -> None:
    from convert.__main__ import build_parser

    text = build_parser().format_help()
    for flag in ("--model", "--out", "--data", "--formats", "--calibration-images", "--threads"):
        assert flag in text
    assert text.count("(default:") == 6


def test_cli_prints_the_table_and_exits_0(easy_model: Path, tmp_path: Path, capsys) -> None:
    from convert.__main__ import main

    out = tmp_path / "b"
    assert main(["--model", str(easy_model), "--out", str(out), "--formats", "onnx-fp32"]) == 0
    captured = capsys.readouterr()
    assert "| onnx-fp32 " in captured.out and f"wrote {out}" in captured.out
    assert "[1/1] onnx-fp32" in captured.err and "Traceback" not in captured.err


def test_cli_exits_1_naming_the_threshold_when_int8_fails(easy_model: Path, tmp_path: Path,
                                                          capsys, monkeypatch) -> None:
    from convert import dataset
    from convert.__main__ import main

    monkeypatch.setattr(dataset, "calibration_arrays", lambda *args: dim_noise())
    out = tmp_path / "b"
    assert main(["--model", str(easy_model), "--out", str(out),
                 "--formats", "tflite-int8,onnx-fp32"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert any("tflite-int8" in line and "min_agreement" in line for line in errors)
    assert "FAILED" in captured.out and (out / "parity.md").is_file()
    assert Bundle.load(out).select().name == "onnx-fp32", "installed with the passing artifact"


def _model_folder(tmp_path: Path, config: dict, model: bytes | None = None) -> Path:
    """model.keras (a zip, or the bytes given) and config.json; no data needed to fail early."""
    import zipfile

    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.keras"
    if model is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", "{}")
    else:
        path.write_bytes(model)
    (folder / "config.json").write_text(json.dumps({"data": str(tmp_path), **config}))
    return path


@pytest.mark.parametrize(("config", "problem"), [
    ({"test_fraction": 1}, "each must be in [0, 1)"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "their sum below 1"),
    ({"seed": float("inf")}, "seed inf is not a whole number"),
    ({"seed": -3}, "seed -3 is not a whole number"),
])
def test_cli_unusable_split_settings_are_one_line_and_exit_2(config: dict, problem: str,
                                                             tmp_path: Path, capsys) -> None:
    from convert.__main__ import main

    model = _model_folder(tmp_path, config)
    assert main(["--model", str(model), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model.parent / 'config.json'}: unreadable training config")
    assert problem in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_cli_corrupt_model_is_named_as_such(tmp_path: Path, capsys) -> None:
    from convert.__main__ import main

    model = _model_folder(tmp_path, {}, model=b"\x00" * 64)
    assert main(["--model", str(model), "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == (f"error: {model}: not a Keras .keras archive (corrupt or "
                                       "another format)\n")


def test_cli_every_artifact_failing_exits_1_and_keeps_the_old_bundle(
        converted, easy_model: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from convert import pipeline
    from convert.__main__ import main

    out = tmp_path / "b"
    shutil.copytree(converted[0], out)
    before = snapshot(out)
    monkeypatch.setattr(pipeline, "select", lambda names, table: junk_table())
    assert main(["--model", str(easy_model), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    rejected = tmp_path / "b.rejected"
    assert f"wrote {rejected}/" in captured.out and "FAILED" in captured.out
    assert f"error: nothing installed: {out} was left as it was" in captured.err
    assert "Traceback" not in captured.err
    assert snapshot(out) == before and (rejected / "parity.md").is_file()


def test_cli_a_corrupt_decode_cache_is_decoded_again(easy_model: Path, tmp_path: Path,
                                                     capsys) -> None:
    from convert.__main__ import main

    model = tmp_path / "model"
    shutil.copytree(easy_model.parent, model, ignore=shutil.ignore_patterns("cache"))
    config = json.loads((model / "config.json").read_text())
    shutil.copytree(config["cache"], tmp_path / "cache")
    (model / "config.json").write_text(json.dumps({**config, "cache": str(tmp_path / "cache")}))
    entries = sorted((tmp_path / "cache").rglob("*.npy"))
    assert entries
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:90])  # as a disk-full or killed write leaves them
    assert main(["--model", str(model / "model.keras"), "--out", str(tmp_path / "b"),
                 "--formats", "onnx-fp32"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_cli_an_unexpected_error_keeps_its_traceback_and_is_not_exit_1(tmp_path: Path, capsys,
                                                                      monkeypatch) -> None:
    import convert.__main__ as cli

    def bug(*args, **kwargs) -> dict:
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "convert_model", bug)
    assert cli.main(["--out", str(tmp_path / "b")]) == cli.EXIT_BUG != 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: a bug" in err
    assert err.rstrip().splitlines()[-1].startswith("error: convert failed unexpectedly (a bug")
