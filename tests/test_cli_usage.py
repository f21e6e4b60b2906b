"""`ct-edge` usage: bad arguments are one line and exit 2, --version, --help with examples and
every default; and the `results` command's table, JSON and filters."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from cli_helpers import (
    GOOD,
    records,
    run,
    stored_results,
)

from ct_edge import DISCLAIMER, __version__, cli

# --- usage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    [], ["classify"], ["classify", "--top-k", "0", "x.png"], ["classify", "--threads", "two", "x.png"],
    ["classify", "--window", "bone", "x.png"], ["classify", "--json", "--csv", "x.png"],
    ["classify", "--backend", "tensorrt", "x.png"], ["frobnicate"], ["info", "extra"],
])
def test_usage_errors_exit_2_with_one_line(capsys, argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert "error:" in err.splitlines()[-1] and "Traceback" not in err
    assert len(err.splitlines()) <= 2  # `ct-edge` alone also prints the usage line


def test_unknown_artifact(capsys, bundle: Path) -> None:
    code, _, err = run(capsys, "classify", "--artifact", "nope", "--bundle", bundle, GOOD[0])
    assert code == 2 and len(err.splitlines()) == 1 and "choose one of" in err


def test_version(capsys) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"ct-edge {__version__}"


@pytest.mark.parametrize("command", [[], ["classify"], ["explain"], ["info"], ["batch"],
                                     ["serve"], ["listen"], ["results"]])
def test_help_has_examples_and_every_default(capsys, command: list[str]) -> None:
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0 and "examples:" in out and "ct-edge " in out
    parser = cli.build_parser()
    if command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)) \
            .choices[command[0]]
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "version") \
                and not action.required:
            assert "default" in action.help, action.option_strings


# --- results -------------------------------------------------------------------------------


def test_results_table_is_followed_by_the_disclaimer(capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "results", "--data-dir", stored_results(tmp_path))
    assert code == 0 and "Normal 80.0%" in out
    assert out.splitlines()[-2:] == ["1 of 1 shown, newest first", DISCLAIMER] and not err


def test_results_json_stays_one_row_per_line_with_the_disclaimer_on_stderr(
        capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "results", "--data-dir", stored_results(tmp_path), "--json")
    (row,) = records(out)
    assert code == 0 and row["label"] == "Normal" and "disclaimer" not in row
    assert err.splitlines() == [DISCLAIMER]


def test_results_filters_default_to_everything() -> None:
    results = cli.build_parser().parse_args(["results"])
    assert (results.status, results.label, results.series) == (None, None, False)
