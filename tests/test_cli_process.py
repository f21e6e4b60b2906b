"""`ct-edge` as a real process, where the process boundary is the point: the console script end to
end, no TensorFlow (nor numpy for --help) imported, and output that cannot be written (a full disk,
stdout closed) or a Pillow warning: one error line, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import (
    FIXTURES,
    GOOD,
    console_script,
    error_lines,
    without_warnings,
)

from ct_edge import DISCLAIMER

# --- the real process ----------------------------------------------------------------------


def test_console_script_end_to_end(bundle: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    result = subprocess.run([console_script(), "classify", "--bundle", str(bundle),
                             str(GOOD[0]), str(empty)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert without_warnings(result.stderr) == [f"error: {empty}: empty file"]  # no engine INFO
    assert result.stdout.splitlines()[-1] == DISCLAIMER
    result = subprocess.run([console_script(), "classify", "--bundle", str(tmp_path), str(GOOD[0])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_classification_never_imports_tensorflow(bundle: Path) -> None:
    code = (
        "import sys\n"
        "from ct_edge.classifier import Classifier\n"
        f"c = Classifier.from_bundle({str(bundle)!r})\n"
        f"p = c.predict({str(GOOD[0])!r})\n"
        "assert p.label\n"
        "from ct_edge import cli\n"
        f"assert cli.main(['classify', '-q', '--bundle', {str(bundle)!r}, {str(FIXTURES)!r}]) == 0\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False False"


def test_help_starts_without_numpy() -> None:
    code = ("import sys\nfrom ct_edge import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('numpy', 'PIL', 'ai_edge_litert', 'onnxruntime') "
            "if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[-1] == "[]"


# --- output that cannot be written ---------------------------------------------------------


def test_full_disk_on_stdout_is_one_line(bundle: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        result = subprocess.run([console_script(), "classify", "--json", "--bundle", str(bundle),
                                 str(GOOD[0])], stdout=full, stderr=subprocess.PIPE, text=True,
                                timeout=120)
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: cannot write output: No space left on device"]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_closed_stdout_is_one_line(bundle: Path) -> None:
    result = subprocess.run([console_script(), "classify", "--bundle", str(bundle), str(GOOD[0])],
                            stderr=subprocess.PIPE, text=True, timeout=120,
                            preexec_fn=lambda: os.close(1))  # as `ct-edge classify x.png >&-`
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: cannot write output: Bad file descriptor"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["classify", "explain"])
def test_an_image_past_pillows_warning_size_is_one_error_line(bundle: Path, tmp_path: Path,
                                                              command: str) -> None:
    """Over Pillow's warning threshold (89.5 M pixels) but under its hard limit: ct-edge refuses it
    by its own limit, and Pillow's two-line DecompressionBombWarning must not come with it."""
    from tools.fuzz.images import png_image

    big = tmp_path / "big.png"
    big.write_bytes(png_image(10_098, 10_098))  # 102 M pixels, a header and no data
    result = subprocess.run([console_script(), command, "--quiet", "--json", "--bundle",
                             str(bundle), str(big)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {big}: ") and "pixel limit" in line


def test_serve_with_stdout_closed_stops_cleanly(bundle: Path, tmp_path: Path) -> None:
    """Its first line cannot be written: one error line, and the server and store are closed."""
    result = subprocess.run([console_script(), "serve", "--bundle", str(bundle), "--port", "0",
                             "--data-dir", str(tmp_path / "data")], stderr=subprocess.PIPE,
                            text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: cannot write output: Bad file descriptor"]
    assert "ct-edge serve: stopping" in result.stderr and "Traceback" not in result.stderr
