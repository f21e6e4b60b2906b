"""Watching numpy's .npy header parser for threads inside it at once (python/cpython#106905)."""

from __future__ import annotations

import ast
import threading
import time
from collections.abc import Callable

import pytest


def watch_header_parses(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Patch ast.literal_eval (what np.load parses headers with) to count the threads inside it;
    returns a function giving the most seen at once."""
    inside, most = 0, 0
    count_lock = threading.Lock()
    literal_eval = ast.literal_eval

    def watched(text: str) -> object:
        nonlocal inside, most
        with count_lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.005)  # widen the window two unserialised loads would share
        try:
            return literal_eval(text)
        finally:
            with count_lock:
                inside -= 1

    monkeypatch.setattr(ast, "literal_eval", watched)
    return lambda: most
