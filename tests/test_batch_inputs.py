"""`ct-edge batch`'s inputs and command line: folders, globs and list files, a name that is not
UTF-8 (an error row, the rest scored), exit 1 with a line per input that could not be read, and Ray
imported only by `batch` (which says how to install it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from batch_helpers import rows_by_path

from ct_edge import batch, cli

pytest.importorskip("pyarrow", reason="ct-edge batch needs the [ray] extra")
# In this process Ray runs without token auth (conftest's `ray_auth_disabled`).
pytestmark = pytest.mark.usefixtures("ray_auth_disabled")

REPO = Path(__file__).resolve().parents[1]


# --- without a cluster -------------------------------------------------------------------


def test_inputs_folders_globs_and_list_files(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    for name in ("x.png", "y.png"):
        (tmp_path / "a" / name).write_bytes(b"")
    Path("list.lst").write_text("# comment\na/x.png\n\n/abs/z.dcm\n  a/y.png  \n")
    items = batch.expand_batch_inputs(["a", "list.lst", "a/*.png", "none-*.png"])
    assert [path for path, _ in items] == [str(tmp_path / "a" / "x.png"), str(tmp_path / "a" / "y.png"),
                                           "/abs/z.dcm", str(tmp_path / "none-*.png")]
    assert [error for _, error in items] == [None, None, None, "no files match this pattern"]


def test_a_name_that_is_not_utf8_is_an_error_row_and_the_rest_is_scored(
        bundle_artifact, scans, ray_free, tmp_path, capsys) -> None:
    """One such name aborted the whole batch with a UnicodeEncodeError traceback."""
    bundle, artifact = bundle_artifact
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(scans.good[0], folder / "good.png")
    bad = os.path.join(os.fsencode(folder), b"bad\xff.png")
    shutil.copyfile(scans.good[0], bad)
    out = tmp_path / "results"
    shown = f"{folder}/bad\\xff.png"  # as classify prints it
    for _ in range(2):  # a rerun retries the error row without tripping over it
        code = cli.main(["batch", str(folder), "--out", str(out), "--bundle", str(bundle),
                         "--artifact", artifact])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        assert f"error: {shown}: {batch.NOT_UTF8}" in err.splitlines()
    rows = rows_by_path(out)
    assert set(rows) == {str(folder / "good.png"), shown}
    assert rows[shown]["error"] == batch.NOT_UTF8
    assert rows[str(folder / "good.png")]["error"] is None


@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_inputs_that_could_not_be_read_exit_1_with_their_lines(bundle_artifact, tmp_path, capsys,
                                                               quiet) -> None:
    """The package's contract, as classify: exit 1 and one `error:` line each, -q or not."""
    bundle, artifact = bundle_artifact
    pattern = str(tmp_path / "none-*.png")
    code = cli.main(["batch", pattern, "--out", str(tmp_path / "out"), "--bundle", str(bundle),
                     "--artifact", artifact, *quiet])
    captured = capsys.readouterr()
    assert code == 1
    assert f"error: {pattern}: no files match this pattern" in captured.err.splitlines()
    assert captured.out.startswith("batch: 1 row, 1 error, ")
    assert "no actor started (no input could be read)" in captured.out


def test_classify_and_help_never_import_ray(bundle_artifact) -> None:
    bundle, artifact = bundle_artifact
    image = REPO / "tests" / "fixtures" / "gray8.png"
    code = (
        "import sys\nfrom ct_edge import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"assert cli.main(['classify', '-q', '--bundle', {str(bundle)!r}, '--artifact', "
        f"{artifact!r}, {str(image)!r}]) == 0\n"
        "print(sorted(m for m in ('ray', 'pyarrow', 'pandas') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_batch_without_ray_says_how_to_install_it(bundle_artifact, tmp_path) -> None:
    bundle, artifact = bundle_artifact
    code = (
        "import sys\nsys.modules['ray'] = None\nfrom ct_edge import cli\n"
        f"sys.exit(cli.main(['batch', {str(REPO / 'tests' / 'fixtures')!r}, '--out', "
        f"{str(tmp_path / 'out')!r}, '--bundle', {str(bundle)!r}, '--artifact', {artifact!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: ct-edge batch needs Ray: pip install 'ct-edge[ray]' "
                                     "(ray[data] and pyarrow)")
