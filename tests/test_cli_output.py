"""What `ct-edge` prints: control characters escaped for terminals, JSON kept pure with stderr
closed, linked folders followed, `results` only reading its store, and the shapes of `explain`
and `info` output."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_helpers import set_default_status
from cli_helpers import FIXTURES, GOOD, console_script, error_lines, records, run, stored_results

from ct_edge import DISCLAIMER
from ct_edge.classifier import Prediction
from ct_edge.cli import common
from ct_edge.cli import explain as explain_command
from ct_edge.cli.explain import folder_names
from ct_edge.cli.output import TableWriter
from ct_edge.inputs import expand_inputs
from ct_edge.store import MIGRATIONS
from ct_edge.store.schema import schema_version, stored_version, utc_now

ESC_NAME = "red\x1b[31m.png"


def _closed_stderr() -> None:
    os.close(2)  # as `ct-edge ... 2>&-`


def _no_raw_controls(*texts: str) -> None:
    for text in texts:
        assert not any(char in text for char in "\x1b\x07\x9b\u202e"), repr(text)


# --- stderr closed -------------------------------------------------------------------------


def test_closed_stderr_keeps_json_output_pure(bundle: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    result = subprocess.run([console_script(), "classify", "--json", "--bundle", str(bundle),
                             str(GOOD[0]), str(missing)], stdout=subprocess.PIPE, text=True,
                            timeout=120, preexec_fn=_closed_stderr)
    assert result.returncode == 1
    first, second = records(result.stdout)  # no error line, no disclaimer among the rows
    assert first["error"] is None and second["error"] == "no such file"
    result = subprocess.run([console_script(), "results", "--json", "--data-dir",
                             str(stored_results(tmp_path / "data"))], stdout=subprocess.PIPE,
                            text=True, timeout=120, preexec_fn=_closed_stderr)
    assert result.returncode == 0 and [row["source"] for row in records(result.stdout)] == ["scan.png"]


def test_closed_stderr_is_reopened_on_dev_null(tmp_path: Path) -> None:
    """fd 2 is held by /dev/null, so no file opened later (here the store) becomes fd 2."""
    code = ("import os, sys\nfrom ct_edge import cli\n"
            f"code = cli.main(['results', '--data-dir', {str(stored_results(tmp_path))!r}])\n"
            "print(code, os.readlink('/proc/self/fd/2'), sys.stderr.fileno())\n")
    result = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            timeout=60, preexec_fn=_closed_stderr)
    assert result.stdout.splitlines()[-1] == f"0 {os.devnull} 2"


# --- control characters and undecodable names -------------------------------------------------


def test_printable_escapes_what_a_terminal_would_act_on() -> None:
    assert common.printable("a\x1b[2Jb\nc\rd\x9b\u202ee\udcfe\x7f") == \
        "a\\x1b[2Jb\\nc\\rd\\x9b\\u202ee\\xfe\\x7f"
    assert common.printable("scan é 1.png") == "scan é 1.png"


def test_json_lines_escape_what_a_terminal_would_act_on_and_read_back_the_same() -> None:
    value = {"path": "a\x1b[2Jb\x9bc\u202ed\u2028e é.png", "n": [1, 2.5, None]}
    line = common.json_line(value)
    assert line.isprintable() and json.loads(line) == value
    assert "\\u202e" in line and "\\u009b" in line and "é" in line  # readable, not all \\u


def test_classify_escapes_control_characters_in_names(capsys, bundle: Path,
                                                      tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "gray8.png", tmp_path / ESC_NAME)
    named, missing = tmp_path / ESC_NAME, tmp_path / "gone\n\x07.png"
    code, out, err = run(capsys, "classify", "--bundle", bundle, named, missing)
    assert code == 1
    _no_raw_controls(out, err)
    assert out.splitlines()[1].startswith(f"{tmp_path}/red\\x1b[31m.png ")
    assert error_lines(err) == [f"error: {tmp_path}/gone\\n\\x07.png: no such file"]
    # JSON escapes them its own way and keeps the real name.
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, named, missing)
    assert [row["path"] for row in records(out)] == [str(named), str(missing)]
    _no_raw_controls(out, err)


def test_an_undecodable_name_is_spelled_alike_on_stdout_and_stderr(capsys, bundle: Path,
                                                                    tmp_path: Path) -> None:
    missing = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"x\xfe.png"))
    shown = f"{tmp_path}/x\\xfe.png"
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, missing)
    assert code == 1 and records(out)[0]["path"] == shown
    assert error_lines(err) == [f"error: {shown}: no such file"]


def test_table_writer_escapes_names() -> None:
    stream = io.StringIO()
    path = f"dir/{ESC_NAME}"
    writer = TableWriter(stream, [path], ("COVID-19", "Normal"), 2, quiet=True)
    writer.row(Prediction(path=path, label="Normal", status="ok",
                          probabilities={"COVID-19": 0.2, "Normal": 0.8}))
    assert stream.getvalue().startswith("dir/red\\x1b[31m.png  Normal")


def test_error_and_warning_lines_escape_control_characters(capsys) -> None:
    common.error("bad \x1b]0;title\x07 name\nsecond line")
    common.warn("\x1b[2J")
    assert capsys.readouterr().err.splitlines() == [
        "error: bad \\x1b]0;title\\x07 name second line", "warning: \\x1b[2J"]


def test_explain_escapes_names_and_its_error_records_have_classifys_keys(
        capsys, bundle: Path, tmp_path: Path) -> None:
    missing = tmp_path / "gone\x1b\n.png"
    code, out, err = run(capsys, "explain", "--json", "--bundle", bundle, missing)
    assert code == 1
    _no_raw_controls(err)
    assert error_lines(err) == [f"error: {tmp_path}/gone\\x1b\\n.png: no such file"]
    _, classified, _ = run(capsys, "classify", "--json", "--bundle", bundle, missing)
    (explained,) = records(out)
    assert explained == {**records(classified)[0], "output": None}


def test_results_tables_escape_stored_text(capsys, tmp_path: Path) -> None:
    data = stored_results(tmp_path, source=f"upload {ESC_NAME}",
                          description="Chest\x1b]0;owned\x07 CT\u202e")
    code, out, err = run(capsys, "results", "--data-dir", data)
    assert code == 0 and "upload red\\x1b[31m.png" in out
    code, out, err = run(capsys, "results", "--series", "--data-dir", data)
    assert code == 0 and "Chest\\x1b]0;owned\\x07 CT\\u202e" in out
    _no_raw_controls(out, err)
    code, out, _ = run(capsys, "results", "--json", "--data-dir", data)
    assert records(out)[0]["source"] == f"upload {ESC_NAME}"  # JSON escapes it itself
    _no_raw_controls(out)
    code, out, _ = run(capsys, "results", "--series", "--json", "--data-dir", data)
    assert "Chest\x1b]0;owned\x07 CT\u202e" in records(out)[0].values()  # C1, bidi: escaped too
    _no_raw_controls(out)


# --- folders -------------------------------------------------------------------------------


def test_linked_folders_are_searched_once_and_loops_end(tmp_path: Path) -> None:
    real, top = tmp_path / "real", tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    real.mkdir()
    shutil.copy(FIXTURES / "gray8.png", real / "a.png")
    shutil.copy(FIXTURES / "gray8.png", top / "sub" / "b.png")
    (top / "linked").symlink_to(real)
    (top / "sub" / "again").symlink_to(real)  # a second link to the same folder
    (top / "sub" / "up").symlink_to(top)  # a loop
    assert expand_inputs([str(top)]) == [(str(top / "linked" / "a.png"), None),
                                         (str(top / "sub" / "b.png"), None)]


# --- results only reads ----------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def _old_store(folder: Path) -> Path:
    """A store at schema version 1 (before the DICOM tables), as an older ct-edge left it."""
    import sqlite3

    folder.mkdir()
    db = sqlite3.connect(folder / "results.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    schema_version(db)
    MIGRATIONS[0](db)
    db.execute("INSERT INTO schema_version VALUES (1, ?)", (utc_now(),))
    db.close()
    return folder


@pytest.mark.parametrize("case", ["empty", "corrupt", "old"])
def test_results_refuses_a_store_it_cannot_read_and_writes_nothing(capsys, tmp_path: Path,
                                                                   case: str) -> None:
    data = tmp_path / case
    if case == "old":
        _old_store(data)
    else:
        data.mkdir()
        (data / "results.sqlite3").write_bytes(b"" if case == "empty" else b"not sqlite" * 500)
    before = _snapshot(data)
    code, out, err = run(capsys, "results", "--data-dir", data)
    assert code == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("error: ") and {"empty": "not a results store",
                                           "corrupt": "not a usable results store",
                                           "old": "schema version 1, older"}[case] in line
    after = _snapshot(data)
    # SQLite's lock files for reading a WAL database may appear, empty: nothing else changes.
    assert {name: data for name, data in after.items()
            if name not in ("results.sqlite3-wal", "results.sqlite3-shm")} == before
    assert after.get("results.sqlite3-wal", b"") == b""
    if case == "old":
        import sqlite3

        assert stored_version(sqlite3.connect(data / "results.sqlite3")) == 1


def test_results_creates_no_heatmap_folder(capsys, tmp_path: Path) -> None:
    data = stored_results(tmp_path)
    shutil.rmtree(data / "heatmaps")
    code, _, _ = run(capsys, "results", "--data-dir", data)
    assert code == 0 and not (data / "heatmaps").exists()


# --- explain and info ----------------------------------------------------------------------


def test_folder_names_are_unique_however_often_a_name_repeats(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """n equal names take O(n) look-ups of the names used, not n^2 / 2 (counted, not timed)."""
    lookups = [0]

    class CountingSet(set):
        def __contains__(self, item: object) -> bool:
            lookups[0] += 1
            return super().__contains__(item)

    monkeypatch.setattr(explain_command, "set", CountingSet, raising=False)
    paths = [f"scans/{i // 2}/{i}.png" for i in range(4_000)] + ["p/a.png"] * 3000 + ["p/a_2.png"]
    names = folder_names(paths, "out")
    assert names[:2] == ["out/0.png", "out/1.png"] and len(set(names)) == len(paths)
    assert names[4_000:4_003] == ["out/p_a.png", "out/p_a_2.png", "out/p_a_3.png"]
    assert names[-2:] == ["out/p_a_3000.png", "out/a_2.png"]
    assert 0 < lookups[0] <= 2 * len(paths)  # the quadratic search made 4.5 million here


def test_info_json_is_one_line_and_info_has_the_disclaimer(capsys, bundle: Path) -> None:
    code, out, err = run(capsys, "info", "--json", "--bundle", bundle)
    (line,) = out.splitlines()
    assert code == 0 and json.loads(line)["problems"] == {}
    assert err.splitlines() == [DISCLAIMER]
    code, out, err = run(capsys, "info", "--bundle", bundle)
    assert code == 0 and out.splitlines()[-1] == DISCLAIMER and err == ""


def test_info_json_spells_a_non_utf8_bundle_path_as_classify_does(capsys, bundle: Path,
                                                                   tmp_path: Path) -> None:
    odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"bund\xfe"))
    shutil.copytree(bundle, odd)
    code, out, _ = run(capsys, "info", "--json", "--bundle", odd)
    assert code == 0 and json.loads(out)["path"] == f"{tmp_path}/bund\\xfe"


def test_info_shows_a_lone_surrogate_of_the_manifest_escaped(bundle_copy: Path) -> None:
    """A valid JSON escape (\\ud800) no UTF-8 terminal can take: a traceback before."""
    set_default_status(bundle_copy, "failed\ud800")
    result = subprocess.run([console_script(), "info", "--bundle", str(bundle_copy)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "failed\\ud800" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["classify", "explain", "info", "results"])
def test_help_is_printable_text(capsys, command: str) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and all(line.isprintable() for line in out.splitlines())
