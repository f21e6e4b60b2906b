"""The runtime alone: `pip install ./runtime` (no extras) into a fresh venv, then classify there.

Proves the device install needs neither TensorFlow nor Keras (nor pydicom/onnxruntime, which are
extras) and that `ct-edge classify scan.png` prints a label. Slow (creates a venv and downloads
the pinned wheels): run with `pytest -m slow tests/test_runtime_env.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ct_edge import DISCLAIMER, LABELS

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

pytestmark = pytest.mark.slow


def _run(*argv: object, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV",
                                                            "CT_EDGE_BUNDLE")}
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only `./runtime` and its pinned dependencies."""
    work = tmp_path_factory.mktemp("runtime-env")
    venv = work / "venv"
    result = _run(sys.executable, "-m", "venv", venv, cwd=work)
    assert result.returncode == 0, result.stderr
    # Build from a copy, so the build leaves no build/ or egg-info in the shared source tree.
    source = shutil.copytree(ROOT / "runtime", work / "runtime",
                             ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    result = _run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  "-c", ROOT / "requirements" / "runtime.txt", source, cwd=work)
    if result.returncode != 0 and "No matching distribution" in result.stderr + result.stdout:
        pytest.skip(f"package registry unreachable: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stderr
    return venv


@pytest.fixture(scope="module")
def runtime_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bundle_helpers import make_test_bundle

    return make_test_bundle(tmp_path_factory.mktemp("runtime-env-bundle") / "bundle")


def test_runtime_venv_has_no_tensorflow_or_keras(runtime_venv: Path) -> None:
    result = _run(runtime_venv / "bin" / "python", "-m", "pip", "list", "--format=json",
                  "--disable-pip-version-check", cwd=runtime_venv)
    names = {package["name"].lower() for package in json.loads(result.stdout)}
    assert "ct-edge" in names and "ai-edge-litert" in names
    assert not {name for name in names if "tensorflow" in name or "keras" in name}, names


def test_classify_prints_the_label(runtime_venv: Path, runtime_bundle: Path, tmp_path: Path) -> None:
    result = _run(runtime_venv / "bin" / "ct-edge", "classify", "--bundle", runtime_bundle,
                  FIXTURES / "gray8.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["FILE", "LABEL"]
    assert lines[1].startswith(str(FIXTURES / "gray8.png"))
    assert lines[1].split()[1].rstrip("?") in {label.split()[0] for label in LABELS}
    assert lines[-1] == DISCLAIMER
    assert result.stderr == ""


def test_json_on_a_folder_without_the_dicom_extra(runtime_venv: Path, runtime_bundle: Path,
                                                  tmp_path: Path) -> None:
    result = _run(runtime_venv / "bin" / "ct-edge", "classify", "--json", "--bundle", runtime_bundle,
                  FIXTURES, cwd=tmp_path)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    images = sorted(p for p in FIXTURES.iterdir() if p.suffix in (".png", ".jpg", ".dcm"))
    assert [row["path"] for row in rows] == [str(p) for p in images]
    for row in rows:
        if row["path"].endswith(".dcm"):  # pydicom is the [dicom] extra, not installed here
            assert row["error"] == "DICOM support needs pydicom 3: pip install 'ct-edge[dicom]'"
        else:
            assert row["error"] is None and row["label"] in LABELS
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {FIXTURES / 'ct_small.dcm'}: DICOM support needs pydicom 3: "
        "pip install 'ct-edge[dicom]'"]


def test_version_in_the_runtime_venv(runtime_venv: Path, tmp_path: Path) -> None:
    from ct_edge import __version__

    result = _run(runtime_venv / "bin" / "ct-edge", "--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"ct-edge {__version__}"
