"""The benchmark and tool scripts' `--help` teaches: every option says what it does and its default.

Each script builds its parser in `build_parser()`, which its `main()` uses; importing them is cheap
(no TensorFlow, no Ray: those are imported inside the functions that need them).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# module -> the `python -m` name its usage line shows
SCRIPTS = {
    "benchmarks.domain": "benchmarks.domain",
    "benchmarks.listen": "benchmarks.listen",
    "benchmarks.server": "benchmarks.server",
    "benchmarks.ray_batch": "benchmarks.ray_batch",
    "tools.arm64.check": "tools.arm64.check",
    "tools.foreign": "tools.foreign",
    "tools.fuzz.__main__": "tools.fuzz",
}


def _parser(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).build_parser()


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_option_states_its_default(module: str) -> None:
    parser = _parser(module)
    assert parser.prog == f"python -m {SCRIPTS[module]}"
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        assert "default" in action.help, action.option_strings


@pytest.mark.parametrize("module", SCRIPTS)
def test_main_help_is_build_parsers(module: str, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == _parser(module).format_help()
    assert out.startswith(f"usage: python -m {SCRIPTS[module]} ")
    assert "%(" not in out and "(default: None)" not in out


@pytest.mark.parametrize(("module", "argv"), [
    ("benchmarks.listen", ["--runs", "0"]),
    ("benchmarks.listen", ["--slices", "-1"]),
    ("benchmarks.server", ["--concurrency", "0"]),
    ("benchmarks.server", ["--workers", "0"]),
])
def test_counts_must_be_positive(module: str, argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser(module).parse_args(argv)
    assert exit_info.value.code == 2
    assert "must be 1 or more" in capsys.readouterr().err
