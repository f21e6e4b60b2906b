"""Silence the converters' console chatter (TensorFlow, tf2onnx, onnxruntime)."""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import sys
import tempfile
from collections.abc import Iterator

TAIL_LINES = 30


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Capture fds 1 and 2 and Python's stdout/stderr; replay the tail on stderr if the block raises.

    Converters print from C++ (absl logging) and from Python (`print`, `logging`), so both the file
    descriptors and the Python streams are redirected.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = (os.dup(1), os.dup(2))
    except OSError:  # no real fds (embedded interpreter): nothing to silence at that level
        saved = None
    crash_handler = faulthandler.is_enabled()
    text = io.StringIO()
    with tempfile.TemporaryFile() as log:
        if saved:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            faulthandler.enable(file=saved[1])  # a converter that crashes still says where
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        except BaseException:
            _restore(saved, crash_handler)
            log.seek(0)
            captured = log.read().decode(errors="replace") + text.getvalue()
            tail = [line for line in captured.splitlines() if line.strip()][-TAIL_LINES:]
            if tail:
                print("\n".join(["  | " + line for line in tail]), file=sys.stderr)
            raise
        else:
            _restore(saved, crash_handler)


def _restore(saved: tuple[int, int] | None, crash_handler: bool) -> None:
    if saved is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in zip((1, 2), saved, strict=True):
        os.dup2(copy, fd)
    if crash_handler:
        faulthandler.enable(file=2)
    else:
        faulthandler.disable()
    for copy in saved:
        os.close(copy)
