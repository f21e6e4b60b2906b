"""What every `ct-edge` command shares: exit codes, argument types, error lines, progress.

Only the standard library at module level: start-up time matters on a device.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

EXIT_OK, EXIT_INPUT, EXIT_USAGE = 0, 1, 2
PROGRESS_MIN_FILES = 20
BUNDLE_HELP = "model bundle folder (default: $CT_EDGE_BUNDLE, then ./artifacts/bundle)"
RAW = argparse.RawDescriptionHelpFormatter
DOMAIN_CHECK_OFF = ("warning: --no-domain-check: inputs unlike the training images get a label "
                    "too; research use only")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number of at least `minimum` (argparse names the flag in its
    message; also used by the training/convert CLIs)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    return parse


positive_int = int_at_least(1)


def number_up_to(maximum: float) -> Callable[[str], float]:
    """argparse type: a number above 0 and at most `maximum` (seconds, megabytes)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not 0 < value <= maximum:
            raise argparse.ArgumentTypeError(f"must be more than 0 and at most {maximum:,.0f}, "
                                             f"got {text}")
        return value

    return parse


positive_float = number_up_to(1e6)


def port(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535 (0: any free port), got {value}")
    return value


def window_arg(text: str) -> tuple[float, float]:
    from ..preprocess import parse_window

    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def printable(text: str) -> str:
    """`text` as a terminal shows it safely: each character that is not printable (ESC, a
    newline, a bidi override) as its escape (`\\x1b`, `\\n`, `\\u202e`), and each byte of a
    name that was not UTF-8 (a lone surrogate, as Python decodes it) as `\\xfe`.

    The one display form of file names and stored text in human-readable output and error lines.
    """
    return "".join(char if char.isprintable() else escaped(char) for char in text)


def escaped(char: str) -> str:
    """One character as a backslash escape; a surrogate-escaped byte as that byte (`\\xfe`)."""
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return char.encode("unicode_escape").decode("ascii")


def json_line(value: object) -> str:
    """`value` as one line of JSON, readable (UTF-8, not `\\u` everywhere) yet safe on a terminal:
    every character Python does not call printable (C1 controls, bidi overrides, U+2028) as its
    `\\u` escape, which any JSON reader turns back into the same text."""
    import json

    text = json.dumps(value, ensure_ascii=False)
    if text.isprintable():  # nearly every line: one C-level scan, no per-character loop
        return text
    return "".join(char if char.isprintable() else json.dumps(char)[1:-1] for char in text)


def error(message: str) -> None:
    """One `error: ...` line on stderr: whitespace folded, so a message is always one line, and
    the rest made `printable` (pass paths through `printable` first, so a newline in a name is
    shown, not folded)."""
    print(f"error: {printable(' '.join(message.split()))}", file=sys.stderr, flush=True)


def warn(message: str | None) -> None:
    """One `warning: ...` line on stderr; nothing when there is nothing to warn about (None)."""
    if message is not None:
        print(f"warning: {printable(' '.join(message.split()))}", file=sys.stderr, flush=True)


@contextmanager
def native_info_silenced() -> Iterator[None]:
    """Drop the INFO lines native engines print on fd 2 while loading, keep anything else.

    LiteRT's C++ logger writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." straight
    to the process's stderr; from the CLI, stderr is reserved for errors and warnings.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # stderr is not a real file
        yield
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines()
                    if line.strip() and not line.startswith("INFO: ")]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


class Progress:
    """A one-line progress bar on a terminal's stderr (the runtime does not depend on tqdm)."""

    def __init__(self, total: int, stream: IO[str], enabled: bool = True,
                 interval: float = 0.1) -> None:
        self.total, self.stream, self.enabled, self.interval = total, stream, enabled, interval
        self.done = 0
        self.start = self.last = time.monotonic()
        self.width = 0  # characters currently drawn

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            self.draw(now)

    def draw(self, now: float | None = None) -> None:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        fraction = self.done / self.total if self.total else 1.0
        bar = "#" * int(fraction * 24)
        text = f"[{bar:<24}] {self.done}/{self.total}  {self.done / elapsed:.1f} files/s"
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)

    def clear(self) -> None:
        """Erase the bar before other output shares the terminal; the next update redraws it."""
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0

    def close(self) -> None:
        self.clear()
