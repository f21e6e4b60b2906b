"""`ct-edge explain`: where its figures go. It never replaces an input or anything but a regular
file, makes no output folder on a usage error, and goes on when one figure cannot be written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cli_helpers import (
    FIXTURES,
    GOOD,
    error_lines,
    records,
    run,
)

# --- explain: where figures go -------------------------------------------------------------


def test_explain_refuses_an_output_that_would_replace_an_input(capsys, bundle: Path,
                                                                tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = scans / "gray8.png"
    shutil.copy(FIXTURES / "gray8.png", scan)
    original = scan.read_bytes()
    (tmp_path / "link.png").symlink_to(scan)
    for argv in ([scans, "-o", f"{scans}/"], [scan, "-o", scan], [scan, "-o", tmp_path / "link.png"]):
        code, out, err = run(capsys, "explain", "--json", "--bundle", bundle, *argv)
        assert code == 2 and out == "" and "Traceback" not in err
        (line,) = error_lines(err)
        assert f"would replace the input {scan}" in line and "choose another -o" in line
    assert scan.read_bytes() == original and sorted(p.name for p in scans.iterdir()) == [scan.name]


def test_explain_never_replaces_anything_but_a_regular_file(capsys, bundle: Path,
                                                           tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.png"  # stands in for a device: both are special files
    os.mkfifo(fifo)
    code, out, err = run(capsys, "explain", "--json", "--bundle", bundle, GOOD[0], "-o", fifo)
    assert code == 2 and out == ""
    assert error_lines(err) == [f"error: -o {fifo} exists and is not a regular file; "
                                "choose another -o"]
    assert fifo.is_fifo()


def test_explain_usage_errors_create_no_output_folder(capsys, bundle: Path, tmp_path: Path) -> None:
    new = tmp_path / "heatmaps"
    for options in (["--target", "Flu", "--bundle", bundle], ["--bundle", tmp_path / "none"]):
        code, _, err = run(capsys, "explain", *options, GOOD[0], GOOD[1], "-o", f"{new}/")
        assert code == 2 and len(error_lines(err)) == 1
        assert not new.exists()


def test_explain_goes_on_when_one_figure_cannot_be_written(capsys, bundle: Path,
                                                           tmp_path: Path) -> None:
    scans, out_dir = tmp_path / "in", tmp_path / "out"
    scans.mkdir()
    (out_dir / "a.png").mkdir(parents=True)  # where a.png's figure should go
    os.mkfifo(out_dir / "c.png")
    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(FIXTURES / "gray8.png", scans / name)
    code, out, err = run(capsys, "explain", "--json", "--bundle", bundle, scans, "-o", f"{out_dir}/")
    assert code == 1 and "Traceback" not in err
    assert error_lines(err) == [f"error: {scans / name}: cannot write {out_dir / name}: it exists "
                                "and is not a regular file" for name in ("a.png", "c.png")]
    a, b, c = records(out)
    assert a["output"] is None and a["error"] and c["output"] is None and c["error"]
    assert b["output"] == str(out_dir / "b.png") and b["error"] is None
    assert (out_dir / "b.png").is_file() and (out_dir / "a.png").is_dir() and (out_dir / "c.png").is_fifo()
    # Text: a line for the written figure only, and the exit code `explain --help` gives for it.
    code, out, err = run(capsys, "explain", "-q", "--bundle", bundle, scans, "-o", f"{out_dir}/")
    assert code == 1 and len(error_lines(err)) == 2
    (line,) = out.splitlines()
    assert line.startswith(f"{out_dir / 'b.png'}: ")
    _, out, _ = run(capsys, "explain", "--help")
    assert "1 some inputs failed: unreadable, or their figure could not be" in out
