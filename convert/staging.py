"""Write the bundle beside its destination, then swap it in (`training.folders`): never a half
bundle at `out`."""

from __future__ import annotations

import os
from pathlib import Path

from ct_edge.bundle import MANIFEST
from training.folders import check_replaceable, staging_beside

from .errors import ConvertError


def check_bundle_replaceable(out: Path) -> None:
    """Only a missing or empty folder, or an earlier bundle, may be replaced."""
    try:
        check_replaceable(out, lambda folder: (folder / MANIFEST).is_file(),
                          f"a ct-edge bundle (no {MANIFEST})")
    except FileExistsError as exc:
        raise ConvertError(str(exc)) from None


def prepare(out: Path) -> Path:
    """A fresh staging folder beside `out` for a bundle (see `training.folders.staging_beside`)."""
    check_bundle_replaceable(out)
    return staging_beside(out)


def write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
