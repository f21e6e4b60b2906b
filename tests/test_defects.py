"""Regression tests for defects found walking through ct-edge as a new user (one section each)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import GOOD, bundle  # noqa: F401  (the session bundle fixture)

from ct_edge import cli
from ct_edge.preprocess import PreprocessSpec, check_window, parse_window

# --- --window: one validator for the CLI, parse_window and PreprocessSpec ---------------------

BAD_WINDOWS = ["inf,0", "400,inf", "1e400,0", "nan,0", "400,nan", "-inf,0", "0,40", "0.5,40",
               "1e9,0", "400,1e9"]


@pytest.mark.parametrize("text", BAD_WINDOWS)
def test_window_not_finite_or_out_of_range_is_refused_by_both(text: str) -> None:
    with pytest.raises(ValueError, match="window") as parsed:
        parse_window(text)
    width, level = (float(part) for part in text.split(","))
    with pytest.raises(ValueError, match="window") as built:
        PreprocessSpec(window=(width, level))
    assert str(parsed.value) == str(built.value)  # the same validator said it


def test_window_limits_are_inclusive_and_sane() -> None:
    assert check_window(1.0, 0.0) == (1.0, 0.0)
    assert parse_window("4000,-1024") == (4000.0, -1024.0)
    assert PreprocessSpec(window=(1500.0, -600.0)).window == (1500.0, -600.0)


@pytest.mark.parametrize("command", ["classify", "explain", "batch"])
@pytest.mark.parametrize("window", ["inf,0", "400,inf", "1e400,0"])
def test_cli_window_infinite_is_a_usage_error(capsys, bundle: Path, tmp_path: Path,  # noqa: F811
                                              command: str, window: str) -> None:
    extra = {"classify": [], "explain": ["--json"], "batch": ["--out", str(tmp_path / "out")]}
    code = cli.main([command, f"--window={window}", "--bundle", str(bundle), *extra[command],
                     str(GOOD[0])])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    assert "window" in err.splitlines()[-1] and len(err.splitlines()) <= 2
