"""What `ct-edge classify` takes: folders searched recursively, globs, duplicates, empty folders,
DICOM without pixels, bad inputs and unreadable files (one line each, the rest still classified),
and file names that are not valid UTF-8."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from cli_helpers import (
    FIXTURES,
    GOOD,
    error_lines,
    records,
    run,
)

from ct_edge import LABELS

# --- classify: inputs ----------------------------------------------------------------------


def _tree(root: Path) -> dict[str, Path]:
    """A folder with nested images, a hidden file, a non-image and an extensionless DICOM."""
    (root / "a" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = {
        "png": root / "a" / "scan.png",
        "jpg": root / "a" / "deep" / "scan.JPG",
        "dcm": root / "a" / "deep" / "IM0001",
    }
    shutil.copy(FIXTURES / "gray8.png", files["png"])
    shutil.copy(FIXTURES / "rgb.jpg", files["jpg"])
    shutil.copy(FIXTURES / "ct_small.dcm", files["dcm"])
    shutil.copy(FIXTURES / "gray8.png", root / ".hidden" / "skip.png")
    (root / "a" / "._scan.png").write_bytes(b"\0\5\26\7 mac resource fork")
    (root / "a" / "notes.txt").write_text("not an image")
    os.mkfifo(root / "a" / "fifo")  # no suffix: sniffed for DICOM, and must not block the walk
    return files


def test_folders_are_searched_recursively(capsys, bundle: Path, tmp_path: Path) -> None:
    files = _tree(tmp_path / "scans")
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, tmp_path / "scans")
    assert code == 0, err
    assert sorted(row["path"] for row in records(out)) == sorted(map(str, files.values()))


def test_globs_are_expanded(capsys, bundle: Path, tmp_path: Path) -> None:
    files = _tree(tmp_path / "scans")
    code, out, _ = run(capsys, "classify", "--json", "--bundle", bundle,
                       f"{tmp_path}/scans/**/*.png", f"{tmp_path}/scans/a/deep/*.JPG")
    assert code == 0
    assert [row["path"] for row in records(out)] == [str(files["png"]), str(files["jpg"])]
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, f"{tmp_path}/*.nothing")
    assert code == 1 and error_lines(err) == [f"error: {tmp_path}/*.nothing: no files match this pattern"]


def test_duplicates_are_classified_once(capsys, bundle: Path) -> None:
    _, out, _ = run(capsys, "classify", "--json", "--bundle", bundle, GOOD[0], GOOD[0], FIXTURES)
    paths = [row["path"] for row in records(out)]
    assert len(paths) == len(set(paths)) == len(GOOD)


def test_empty_folder_is_an_input_error_and_others_still_run(capsys, bundle: Path,
                                                             tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, empty, GOOD[0])
    assert code == 1
    assert error_lines(err) == [f"error: {empty}: folder contains no PNG, JPEG or DICOM images"]
    bad, good = records(out)
    assert bad == {"path": str(empty), "label": None, "confidence": None, "status": None,
                   "reason": None, "probabilities": {}, "timings_ms": {},
                   "error": "folder contains no PNG, JPEG or DICOM images"}
    assert good["label"] in LABELS


def test_dicom_without_an_image_is_out_of_domain_not_an_error(capsys, bundle: Path,
                                                               tmp_path: Path) -> None:
    """A well-formed DICOM object with no pixels (a report, a plan) is refused, with a reason."""
    from test_preprocess import BAD_INPUTS

    make, _ = BAD_INPUTS["dicom without pixel data"]
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, make(tmp_path))
    (row,) = records(out)
    assert code == 0 and error_lines(err) == []
    assert row["status"] == "out_of_domain" and row["label"] is None and row["reason"]


@pytest.mark.parametrize("case", ["empty file", "truncated png", "truncated jpeg", "text named .png",
                                  "png bomb 50000x50000",
                                  "png over own limit", "missing path", "fifo", "gif"])
def test_bad_input_is_one_line_and_exit_1(capsys, bundle: Path, tmp_path: Path, case: str) -> None:
    from test_preprocess import BAD_INPUTS

    make, fragment = BAD_INPUTS[case]
    bad = make(tmp_path)
    for fmt in ("--json", "--csv", None):
        argv = ["classify", "--bundle", bundle, GOOD[0], bad, GOOD[1]]
        code, out, err = run(capsys, *argv, *([fmt] if fmt else []))
        assert code == 1
        (line,) = error_lines(err)
        assert line.startswith(f"error: {bad}: ") and fragment in line
        assert "Traceback" not in err
        if fmt == "--json":
            good1, failed, good2 = records(out)
            assert good1["label"] in LABELS and good2["label"] in LABELS
            assert failed["error"] and failed["label"] is None
        elif fmt is None:  # the table still lists both good files, and says one failed
            assert str(GOOD[0]) in out and str(GOOD[1]) in out
            assert "1 of 3 inputs could not be classified" in out


def test_permission_denied_is_one_line(capsys, bundle: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked.png"
    shutil.copy(FIXTURES / "gray8.png", locked)
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads any file: make the read fail the way chmod 000 would
        real = Path.read_bytes

        def read_bytes(self: Path) -> bytes:
            if self.name == "locked.png":
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, locked, GOOD[0])
    assert code == 1 and error_lines(err) == [f"error: {locked}: permission denied"]
    assert records(out)[1]["label"] in LABELS


def test_unexpected_exception_for_one_file_does_not_stop_the_batch(
        capsys, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ct_edge import classifier as module

    real = module.decode

    def decode(source, spec):
        if str(source).endswith("gray8.png"):
            raise RuntimeError("a bug")
        return real(source, spec)

    monkeypatch.setattr(module, "decode", decode)
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, *GOOD)
    assert code == 1
    (line,) = error_lines(err)
    assert "gray8.png: unexpected RuntimeError: a bug" in line
    assert sum(row["error"] is None for row in records(out)) == len(GOOD) - 1


# --- paths that are not valid UTF-8 -----------------------------------------------------------


def _undecodable_copy(folder: Path) -> str:
    """A copy of gray8.png whose name holds a byte that is not UTF-8 (b'bad\\xff.png')."""
    path = os.fsdecode(os.path.join(os.fsencode(folder), b"bad\xff.png"))
    try:
        shutil.copy(FIXTURES / "gray8.png", path)
    except (OSError, UnicodeError):
        pytest.skip("this file system only takes UTF-8 names")
    return path


def test_undecodable_file_names_are_escaped_in_every_format(capsys, bundle: Path,
                                                            tmp_path: Path) -> None:
    bad = _undecodable_copy(tmp_path)
    shown = f"{tmp_path}/bad\\xff.png"
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, bad, GOOD[0])
    assert code == 0, err
    first, second = (json.loads(line) for line in out.encode("utf-8").splitlines())
    assert first["path"] == shown and first["error"] is None and second["path"] == str(GOOD[0])
    code, out, _ = run(capsys, "classify", "--csv", "--bundle", bundle, bad, GOOD[0])
    rows = list(csv.reader(io.StringIO(out)))
    assert code == 0 and [row[0] for row in rows[1:]] == [shown, str(GOOD[0])]
    code, out, _ = run(capsys, "classify", "--bundle", bundle, bad, GOOD[0])
    lines = out.splitlines()
    assert code == 0 and lines[1].startswith(shown) and lines[2].startswith(str(GOOD[0]))
    code, out, _ = run(capsys, "explain", "--json", "--bundle", bundle, bad)
    assert code == 0 and records(out)[0]["path"] == shown
