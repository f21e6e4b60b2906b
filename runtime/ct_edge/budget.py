"""Bytes that work in flight may hold at once, shared between threads (limits.MEMORY_BOUND_MB).

`ct-edge classify` takes a decode's estimated cost before it starts; `ct-edge serve` takes each
upload's size before reading it and each decode's cost before running it. Anything fits when
nothing is held, so one item larger than the limit runs alone rather than never.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class ByteBudget:
    """A counter of bytes held against `limit`, safe to use from any thread. Waiters are let in
    first come, first served, so a large item is not passed over for ever by small ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def held(self) -> int:
        return self._held

    @property
    def waiting(self) -> int:
        """Takers waiting for room."""
        return len(self._waiting)

    def _fits(self, nbytes: int) -> bool:
        return self._held == 0 or self._held + nbytes <= self.limit

    def try_take(self, nbytes: int) -> bool:
        """Take `nbytes` if they fit now and nobody waits; False (nothing taken) if not."""
        with self._changed:
            if self._waiting or not self._fits(nbytes):
                return False
            self._held += nbytes
            return True

    def take(self, nbytes: int) -> None:
        """Take `nbytes`, waiting until they fit and every earlier waiter has gone in."""
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                self._changed.wait_for(lambda: self._waiting[0] is ticket and self._fits(nbytes))
                self._held += nbytes
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()  # the next in line may fit too

    def give(self, nbytes: int) -> None:
        """Give back bytes taken earlier."""
        with self._changed:
            self._held -= nbytes
            self._changed.notify_all()

    @contextmanager
    def holding(self, nbytes: int) -> Iterator[None]:
        """`take(nbytes)` for the duration of a with block."""
        self.take(nbytes)
        try:
            yield
        finally:
            self.give(nbytes)


class Hold:
    """Bytes taken for one object several threads keep alive (an upload: the handler that read
    it and the worker it was queued for); given back when the last of them lets go."""

    def __init__(self, budget: ByteBudget, nbytes: int) -> None:
        self._budget, self._nbytes = budget, nbytes
        self._owners = 1
        self._lock = threading.Lock()

    def share(self) -> Hold:
        """One more owner, who must call `release`."""
        with self._lock:
            if self._owners == 0:
                raise RuntimeError("a released hold cannot be shared")
            self._owners += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._owners -= 1
            last = self._owners == 0
        if last:
            self._budget.give(self._nbytes)


def try_hold(budget: ByteBudget, nbytes: int) -> Hold | None:
    """A Hold of `nbytes` if they fit in `budget` now, else None."""
    return Hold(budget, nbytes) if budget.try_take(nbytes) else None
