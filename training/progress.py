"""Progress lines on stderr for long training work: a Keras callback that prints each epoch,
and a watcher that prints the epochs `fit_model` logs to history.csv (for recipes that take no
callback). Both only print: training runs exactly as without them."""

from __future__ import annotations

import csv
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


def clock(started: float) -> str:
    seconds = int(time.time() - started)
    return f"{seconds // 60}:{seconds % 60:02d} elapsed"


def progress_callback(label: str, epochs: int) -> Any:
    """A Keras callback that only prints one line per epoch to stderr (loss, elapsed time)."""
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            self.started = time.time()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            figures = ", ".join(f"{k} {float(v):.3f}" for k, v in (logs or {}).items()
                                if k.endswith("loss"))
            print(f"  {label}: epoch {epoch + 1}/{epochs}, {figures}, {clock(self.started)}",
                  file=sys.stderr, flush=True)

    return EpochProgress()


def epoch_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows of a Keras CSVLogger file being written (a torn last line left out)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]
    return list(csv.DictReader(complete)) if len(complete) > 1 else []


@contextmanager
def watch_training(label: str, folder: Path, every: float = 30.0,
                   quiet: float = 300.0) -> Iterator[None]:
    """Print each epoch `fit_model` appends to a history.csv under `folder` (its CSVLogger;
    a mixture writes one per member), polled from a thread every `every` s, and a line after
    `quiet` s without one. It only reads those files: training runs exactly as without it."""
    started = time.time()
    stop = threading.Event()
    seen: dict[Path, int] = {}

    def poll() -> bool:
        printed = False
        logs = sorted(folder.rglob("history.csv"))
        if len(logs) > 1:  # a mixture: the root file is a copy of its first member's
            logs = [path for path in logs if path.parent != folder]
        for path in logs:
            rows = epoch_rows(path)
            where = f" {path.parent.name}" if path.parent != folder else ""
            for row in rows[seen.get(path, 0):]:
                figures = ", ".join(f"{k} {float(v):.3f}" for k, v in row.items()
                                    if k and k.endswith("loss") and v)
                print(f"  {label}{where}: epoch {int(row.get('epoch') or 0) + 1}, {figures}, "
                      f"{clock(started)}", file=sys.stderr, flush=True)
                printed = True
            seen[path] = max(seen.get(path, 0), len(rows))
        return printed

    def loop() -> None:
        last = time.time()
        while not stop.wait(every):
            with suppress(Exception):  # progress is a courtesy: never end the run
                if poll():
                    last = time.time()
                elif time.time() - last >= quiet:
                    print(f"  {label}: still training, {clock(started)}", file=sys.stderr,
                          flush=True)
                    last = time.time()

    thread = threading.Thread(target=loop, name=f"progress-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with suppress(Exception):  # e.g. a damaged row (csv.Error): the training is done
            poll()
