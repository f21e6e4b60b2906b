"""What a training run leaves on disk: the model saved whole or not at all, the history, the
backup a killed run resumes from, and output files replaced together or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ct_edge.files import create_temp, fsync_dir

STAGING_PREFIX = ".staged-"  # a run's finished files inside its output folder, before publish()


def save_model_atomically(model: Any, path: Path) -> None:
    """model.save to a temporary name, then a rename: a kill never leaves half a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path.parent, suffix=".keras")  # 0666 less the umask, not 0600
    os.close(fd)
    model.save(tmp)
    os.replace(tmp, path)


def read_history(path: Path) -> dict[str, list[float]]:
    """history.csv (all epochs, also those before a resume) as columns."""
    import csv

    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    latest: dict[int, dict] = {int(row["epoch"]): row for row in rows}  # a resume may repeat one
    ordered = [latest[e] for e in sorted(latest)]
    return {key: [float(r[key]) for r in ordered] for key in ordered[0] if key != "epoch"}


def usable_backup(backup: Path) -> bool:
    """True when a resumable backup exists; a backup killed mid-write is repaired or dropped.

    Keras falls back to the previous weights itself (double_checkpoint) but not to the previous
    epoch counter, so a half-written training_metadata.json is handled here.
    """
    if not backup.is_dir():
        return False
    metadata = backup / "training_metadata.json"

    def parses(path: Path) -> bool:
        try:
            return isinstance(json.loads(path.read_text())["epoch"], int)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    if not metadata.exists() or parses(metadata):
        return True
    previous = metadata.with_name(metadata.name + ".bkp")
    if parses(previous):
        os.replace(previous, metadata)
        return True
    print(f"warning: {backup} was cut off mid-write; starting this run over", file=sys.stderr)
    shutil.rmtree(backup, ignore_errors=True)
    return False


def describe_os_error(exc: OSError, writing: Path | None = None) -> str:
    """An OSError as one line naming the file: "path: No such file or directory"; with
    `writing`, the output it was for too when that is another path."""
    if exc.filename is None:
        return str(exc)  # raised here with its own message
    where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
    line = f"{where}: {exc.strerror or exc}"
    return line if writing is None or str(writing) == where else f"cannot write {writing}: {line}"


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside the block takes effect when it ends: for renames that belong together."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread, which gets the signal
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


def staging_folder(out: Path) -> Path:
    """A new private folder inside `out` for a run's finished files (see publish); what runs
    killed before their publish() left there is removed first."""
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))


def publish(staged: Path, out: Path, names: Sequence[str]) -> None:
    """Move the files `names` from `staged` (inside `out`) into `out` as one step: each one is
    replaced, or removed when this run made none (an older run's would not match the new model).

    Other files in `out` stay. Ctrl-C waits until every rename is done (KeyboardInterrupt then
    means: published), so a model is never paired with another run's config.json; only a kill
    or power cut in those microseconds can.
    """
    with interrupts_deferred():  # raised after the last rename: the results are all in place
        for name in names:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                raise IsADirectoryError(21, "is a folder, not replacing it", str(target))
        for name in names:
            if (staged / name).exists():
                os.replace(staged / name, out / name)
            else:
                (out / name).unlink(missing_ok=True)
        shutil.rmtree(staged, ignore_errors=True)
        fsync_dir(out)  # an EIO is raised: the published files may not survive a power cut

