"""`ct-edge classify` output: JSON lines, the table, CSV, --top-k, --quiet, uncertain results, the
ONNX backend and --artifact, --window; and the progress bar.

The tests call `cli.main(argv)` in-process and read conftest's small real `bundle`.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from cli_helpers import (
    FIXTURES,
    GOOD,
    records,
    run,
    without_warnings,
)

from ct_edge import DISCLAIMER, LABELS
from ct_edge.cli import classify as classify_command
from ct_edge.cli import common

JSON_KEYS = {"path", "label", "confidence", "status", "reason", "probabilities", "timings_ms",
             "error"}


# --- classify: output contracts ------------------------------------------------------------


def test_json_lines_contract(capsys, bundle: Path, manifest: dict) -> None:
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, *GOOD)
    assert code == 0, err
    rows = records(out)
    assert [row["path"] for row in rows] == [str(p) for p in GOOD]
    for row in rows:
        assert set(row) == JSON_KEYS
        assert row["error"] is None
        assert set(row["probabilities"]) == set(manifest["labels"])
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
        assert row["confidence"] == row["probabilities"][row["label"]]
        assert row["status"] in ("ok", "uncertain", "out_of_domain")
        # Label order, whatever the probabilities (scripts can zip them with the labels).
        assert list(row["probabilities"]) == manifest["labels"]
    assert DISCLAIMER in err  # stdout stays pure JSON


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_every_format_fixture_classifies(capsys, bundle: Path, path: Path) -> None:
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, path)
    assert code == 0 and without_warnings(err) == [DISCLAIMER]
    (row,) = records(out)
    assert row["error"] is None and row["label"] in LABELS


def test_human_table(capsys, bundle: Path) -> None:
    code, out, err = run(capsys, "classify", "--bundle", bundle, *GOOD)
    assert code == 0 and without_warnings(err) == []
    lines = out.splitlines()
    assert lines[0].split() == ["FILE", "LABEL", "CONF", "STATUS", "OTHERS", "/", "REASON"]
    assert lines[-1] == DISCLAIMER
    rows = lines[1:1 + len(GOOD)]
    for path, line in zip(GOOD, rows, strict=True):
        assert line.startswith(str(path))
        assert line.split()[1].rstrip("?") in LABELS or line.split()[2].rstrip("?") in LABELS
        assert "%" in line
    # Aligned: the confidence column ends at the same place on every row.
    ends = {line.index("%") for line in rows}
    assert len(ends) == 1


def test_top_k(capsys, bundle: Path) -> None:
    code, out, _ = run(capsys, "classify", "--json", "--top-k", "1", "--bundle", bundle, GOOD[0])
    (row,) = records(out)
    assert code == 0 and list(row["probabilities"]) == [row["label"]]
    code, out, _ = run(capsys, "classify", "--json", "--top-k", "2", "--bundle", bundle, GOOD[0])
    (row,) = records(out)
    assert len(row["probabilities"]) == 2 and row["label"] in row["probabilities"]
    assert list(row["probabilities"]) == [label for label in LABELS if label in row["probabilities"]]
    _, out, _ = run(capsys, "classify", "--json", "--bundle", bundle, GOOD[0])
    (everything,) = records(out)
    top_two = sorted(everything["probabilities"], key=everything["probabilities"].get)[-2:]
    assert set(row["probabilities"]) == set(top_two)
    # Table: the label plus K-1 others; K larger than the number of classes means all of them.
    _, out, _ = run(capsys, "classify", "--top-k", "2", "--bundle", bundle, GOOD[0])
    assert out.splitlines()[1].count("%") == 2
    _, out, _ = run(capsys, "classify", "--top-k", "99", "--bundle", bundle, GOOD[0])
    assert out.splitlines()[1].count("%") == len(LABELS)
    _, out, _ = run(capsys, "classify", "--top-k", "1", "--bundle", bundle, GOOD[0])
    assert out.splitlines()[0].split()[:4] == ["FILE", "LABEL", "CONF", "STATUS"]


def test_csv(capsys, bundle: Path, manifest: dict, tmp_path: Path) -> None:
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    code, out, _ = run(capsys, "classify", "--csv", "--bundle", bundle, GOOD[0], bad)
    assert code == 1
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == ["path", "label", "confidence", "status", "reason", *manifest["labels"],
                        "error"]
    ok, failed = (dict(zip(table[0], row, strict=True)) for row in table[1:])
    assert ok["path"] == str(GOOD[0]) and ok["label"] in LABELS and ok["error"] == ""
    assert float(ok["confidence"]) == pytest.approx(max(float(ok[label]) for label in LABELS))
    assert ok["status"] in ("ok", "uncertain", "out_of_domain")
    assert failed["label"] == "" and failed["error"] == "empty file"
    # --top-k leaves the other classes' cells empty, the columns stay the same.
    _, out, _ = run(capsys, "classify", "--csv", "--top-k", "1", "--bundle", bundle, GOOD[0])
    header, row = list(csv.reader(io.StringIO(out)))
    assert header == table[0] and sum(cell != "" for cell in row[5:-1]) == 1


def test_quiet(capsys, bundle: Path) -> None:
    code, out, err = run(capsys, "classify", "--quiet", "--bundle", bundle, *GOOD[:2])
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 2 and DISCLAIMER not in out
    code, out, err = run(capsys, "classify", "-q", "--json", "--bundle", bundle, GOOD[0])
    assert code == 0 and err == "" and len(records(out)) == 1


def test_uncertain_results_are_marked(capsys, bundle_copy: Path) -> None:
    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["calibration"]["uncertain_below"] = 1.0  # nothing is ever that sure
    manifest_path.write_text(json.dumps(manifest))
    _, out, _ = run(capsys, "classify", "--json", "--bundle", bundle_copy, GOOD[0])
    (row,) = records(out)
    assert row["status"] == "uncertain" and row["label"] in LABELS
    assert row["reason"].split("; ")[0] == "confidence below 100%"
    _, out, _ = run(capsys, "classify", "--bundle", bundle_copy, GOOD[0])
    lines = out.splitlines()
    assert "uncertain" in lines[1].split()
    assert lines[-2].startswith("uncertain: a label is given but confidence below 100%")


def test_onnx_backend_and_artifact_choice(capsys, bundle: Path, manifest: dict) -> None:
    formats = {a["format"]: a["name"] for a in manifest["artifacts"]}
    if "onnx" not in formats:
        pytest.skip("bundle has no ONNX artifact (onnx not installed)")
    code, out, err = run(capsys, "classify", "--json", "--backend", "onnx", "--threads", "1",
                         "--bundle", bundle, *GOOD)
    assert code == 0, err
    assert all(row["error"] is None for row in records(out))
    code, out, _ = run(capsys, "classify", "--json", "--artifact", formats["onnx"],
                       "--bundle", bundle, GOOD[0])
    assert code == 0 and records(out)[0]["label"] in LABELS
    code, _, err = run(capsys, "classify", "--artifact", formats["tflite"], "--backend", "onnx",
                       "--bundle", bundle, GOOD[0])
    assert code == 2 and len(err.splitlines()) == 1 and "drop --backend" in err


def test_window_option_reaches_dicom(capsys, bundle: Path) -> None:
    dicom = FIXTURES / "ct_small.dcm"
    outputs = {}
    for window in ("lung", "mediastinum", "400,40"):
        code, out, err = run(capsys, "classify", "--json", "--window", window, "--bundle", bundle,
                             dicom)
        assert code == 0, err
        outputs[window] = records(out)[0]["probabilities"]
    assert outputs["lung"] != outputs["mediastinum"]


# --- the progress bar ----------------------------------------------------------------------


def test_progress_bar_draws_and_clears() -> None:
    stream = io.StringIO()
    bar = common.Progress(40, stream, enabled=True, interval=0.0)
    for _ in range(20):
        bar.update()
    assert "20/40" in stream.getvalue() and "#" * 12 in stream.getvalue()
    bar.clear()
    assert stream.getvalue().endswith("\r")
    bar.update(20)
    bar.close()
    assert "40/40" in stream.getvalue() and stream.getvalue().endswith("\r")
    quiet = io.StringIO()
    off = common.Progress(40, quiet, enabled=False)
    off.update(40)
    off.close()
    assert quiet.getvalue() == ""


def test_progress_only_on_a_terminal_with_many_files(capsys, bundle: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(common.PROGRESS_MIN_FILES + 1):
        shutil.copy(FIXTURES / "gray8.png", tmp_path / f"{i:03}.png")
    drawn = []
    monkeypatch.setattr(common.Progress, "draw", lambda self, now=None: drawn.append(self.done))
    monkeypatch.setattr(classify_command, "isatty", lambda stream: stream is sys.stderr)
    code, _, _ = run(capsys, "classify", "--json", "--bundle", bundle, tmp_path)
    assert code == 0 and drawn and drawn[-1] == common.PROGRESS_MIN_FILES + 1
    drawn.clear()
    run(capsys, "classify", "--json", "--quiet", "--bundle", bundle, tmp_path)
    run(capsys, "classify", "--json", "--bundle", bundle, *GOOD)  # too few files
    assert drawn == []
