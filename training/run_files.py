"""What a training run leaves on disk: the model saved whole or not at all, the history, and
the backup a killed run resumes from."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ct_edge.files import create_temp


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
