"""`ct-edge`: classify chest scans with a model bundle, serve them, describe a bundle.

Not a diagnostic device. Each command is a module of this package with `add_parser(commands)`
and `run(args) -> int`; shared pieces live in `common` (arguments, errors, progress) and
`output` (the classify writers). Exit codes: 0 every input processed, 1 some inputs could not be
read (one `error: <path>: <problem>` line each on stderr; the others are still processed), 2
usage or bundle error (one line saying what to do), or stdout cannot be written. Start-up time
matters on a device, so command modules import only the standard library at module level;
numpy, Pillow and the engine are imported by the command that runs.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings
from typing import IO, Any

from .. import DISCLAIMER, __version__
from .common import EXIT_INPUT, EXIT_USAGE, Parser, error, silence_stdout

# Command modules, in the order `ct-edge --help` lists them.
COMMANDS: tuple[str, ...] = ("classify", "explain", "info", "batch", "serve", "listen", "results")

EXAMPLES = """\
examples:
  ct-edge classify scan.png
  ct-edge classify --json scans/
  ct-edge info --bundle artifacts/bundle
  ct-edge explain scan.png -o heatmap.png
  ct-edge batch archive/ --out results/     (Parquet, on Ray: needs ct-edge[ray])
  ct-edge serve --port 8080                 (web page and HTTP API on 127.0.0.1)
  ct-edge listen --ae-title CTEDGE          (a DICOM node for a scanner or PACS)
  ct-edge results --limit 20                (what serve and listen stored)
  ct-edge classify --help                   (every command has --help with examples)

The bundle is found at --bundle DIR, else $CT_EDGE_BUNDLE, else ./artifacts/bundle.
""" + DISCLAIMER


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `ct-edge` argument parser (every option's help states its default).

    With `command` (one of COMMANDS) only that command's module is imported and its parser built:
    a device pays for `classify`'s start-up, not for every command's.
    """
    parser = Parser(prog="ct-edge", formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=EXAMPLES,
                    description="Offline chest-scan classifier (COVID-19 / Normal / Viral Pneumonia).")
    parser.add_argument("--version", action="version", version=f"ct-edge {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name in COMMANDS if command not in COMMANDS else (command,):
        importlib.import_module(f"{__name__}.{name}").add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ct-edge` console script; returns the exit code."""
    hold_closed_standard_streams()
    words = sys.argv[1:] if argv is None else argv
    # Top-level options take no value, so the first word that is not an option names the command.
    parser = build_parser(next((word for word in words if not word.startswith("-")), None))
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        error(f"choose a command: {', '.join(COMMANDS)} (see 'ct-edge --help')")
        return EXIT_USAGE
    from ..errors import CtEdgeError

    # Every command refuses images over ct-edge's own pixel limit (far below Pillow's warning
    # threshold) with a one-line error; Pillow's two-line warning for those would only be noise.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    # pydicom warns, naming its own source files, about odd values it reads; what matters about a
    # file reaches the user as its result or error. Set once here, for the process, because
    # warnings.catch_warnings is not thread-safe and inputs are decoded in parallel threads.
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    stdout, sys.stdout = sys.stdout, GuardedStdout(sys.stdout)  # type: ignore[assignment]
    try:
        return args.handler(args)
    except CtEdgeError as exc:  # BundleError, and anything else raised on purpose
        error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `ct-edge classify --json scans/ | head -1`
        silence_stdout()
        return EXIT_INPUT
    except OutputError as exc:  # e.g. a full disk, or stdout closed (`>&-`)
        silence_stdout()  # the unwritten rest would fail again when the interpreter exits
        error(f"cannot write output: {exc}")
        return EXIT_USAGE
    finally:
        sys.stdout = stdout


def hold_closed_standard_streams() -> None:
    """Put /dev/null on fds 0-2 where they are closed (`2>&-`), and sys.stderr on it.

    Python sets sys.stderr to None then, and print(file=None) writes to stdout: error lines and
    the disclaimer would land in --json output. A free fd 2 would also be the next file opened
    (the store, a figure), where a native library's log lines would then be written.
    """
    for fd in (0, 1, 2):  # in order: each open takes the lowest free fd, the closed one
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    if sys.stderr is None:  # kept open for the rest of the process, as Python's own would be
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace",  # noqa: SIM115
                          closefd=False)


class OutputError(Exception):
    """Writing to stdout failed; the message is the system's reason."""


class GuardedStdout:
    """sys.stdout while a command runs: a failed write raises OutputError, told apart from the
    OSErrors of reading inputs; BrokenPipeError passes as it is."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.guarded("write", text)

    def flush(self) -> None:
        self.guarded("flush")

    def guarded(self, method: str, *args: Any) -> Any:
        if self.stream is None:  # Python sets sys.stdout to None when fd 1 was closed at start
            raise OutputError(os.strerror(errno.EBADF))
        try:
            return getattr(self.stream, method)(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc)) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
