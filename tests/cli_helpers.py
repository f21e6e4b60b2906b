"""What the `ct-edge` CLI tests share: the format fixtures, `ct-edge` run in-process and readers
of its output, the installed console script, and a results store with one row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ct_edge import cli
from ct_edge.store import Store

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD = sorted(p for p in FIXTURES.iterdir() if p.suffix in (".png", ".jpg", ".dcm"))


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """`ct-edge ARGV` in-process -> (exit code, stdout, stderr)."""
    code = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def without_warnings(err: str) -> list[str]:
    """stderr lines, less `warning:` ones (a bundle whose artifact missed parity adds one)."""
    return [line for line in err.splitlines() if not line.startswith("warning: ")]


def console_script() -> str:
    script = Path(sys.executable).with_name("ct-edge")
    if not script.exists():
        pytest.skip("ct-edge console script not installed next to this interpreter")
    return str(script)


def stored_results(data_dir: Path, source: str = "scan.png", description: str = "") -> Path:
    """A results store in `data_dir`: one answered row and, with `description`, one DICOM series."""
    with Store(data_dir) as store:
        store.add(source=source, origin="test", status="ok", label="Normal",
                  probabilities={"COVID-19": 0.1, "Normal": 0.8, "Viral Pneumonia": 0.1})
        if description:
            store.add_dicom_instance(sop_instance_uid="1.2.3.1", study_uid="1.2", series_uid="1.2.3",
                                     spool_path="x.dcm", nbytes=1, modality="CT",
                                     description=description)
    return data_dir
