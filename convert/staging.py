"""Write the bundle beside its destination, then swap it in (`training.folders`): never a half
bundle at `out`. Only a folder convert itself wrote is ever replaced (`is_earlier_bundle`)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from ct_edge.bundle import MANIFEST, MAX_MANIFEST_BYTES
from ct_edge.domain import DOMAIN_FILE
from training.folders import check_replaceable, install, recover, staging_beside

from .errors import ConvertError

PARITY_JSON = "parity.json"
PARITY_MD = "parity.md"
# Every name convert writes into a bundle: these files and the model files (ARTIFACT_PREFIX...).
BUNDLE_FILES = frozenset({MANIFEST, PARITY_JSON, PARITY_MD, DOMAIN_FILE})
ARTIFACT_PREFIX = "model_"
# Keys every bundle manifest holds (ct_edge.bundle.Bundle.load reads each of them).
MANIFEST_KEYS = ("schema_version", "labels", "input", "preprocess", "artifacts")
EARLIER = (f"a ct-edge bundle (a bundle {MANIFEST} and only files convert writes: "
           f"{', '.join(sorted(BUNDLE_FILES))}, {ARTIFACT_PREFIX}*)")
REJECTED_SUFFIX = ".rejected"
REJECTED_NOTE = " (convert keeps a bundle whose every artifact failed parity there)"


def is_bundle_file(name: str) -> bool:
    """True for a name convert writes into a bundle."""
    return name in BUNDLE_FILES or name.startswith(ARTIFACT_PREFIX)


def check_artifact_file(name: str) -> None:
    """ConvertError unless a format's file is named as `is_earlier_bundle` expects."""
    if not name.startswith(ARTIFACT_PREFIX) or Path(name).name != name:
        raise ConvertError(f"format file name {name!r} must be {ARTIFACT_PREFIX}<something>, "
                           "with no folder")


def is_bundle_entry(path: Path) -> bool:
    """True for a file convert may have written into a bundle folder."""
    return is_bundle_file(path.name) and path.is_file()


def is_earlier_bundle(folder: Path) -> bool:
    """True when `folder` holds only files convert writes and its manifest is a bundle's."""
    return (all(is_bundle_entry(path) for path in folder.iterdir())
            and bundle_manifest(folder / MANIFEST) is not None)


def bundle_manifest(path: Path) -> dict | None:
    """The manifest at `path` when it is a readable bundle manifest, else None."""
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(manifest, dict) and all(key in manifest for key in MANIFEST_KEYS):
        return manifest
    return None


def check_bundle_replaceable(out: Path, note: str = "") -> None:
    """Only a missing or empty folder, or an earlier bundle, may be replaced."""
    try:
        check_replaceable(out, is_earlier_bundle, EARLIER, usual=is_bundle_entry)
    except FileExistsError as exc:
        raise ConvertError(f"{exc}{note}") from None


def rejected_beside(out: Path) -> Path:
    """Where a bundle with no passing artifact is kept instead of replacing `out`."""
    return out.with_name(out.name + REJECTED_SUFFIX)


def check_destinations(out: Path) -> None:
    """Both folders a run may replace: `out` and the rejected bundle's folder beside it."""
    check_bundle_replaceable(out)
    check_bundle_replaceable(rejected_beside(out), REJECTED_NOTE)


def prepare(out: Path) -> Path:
    """A fresh staging folder beside `out` for a bundle (see `training.folders.staging_beside`)."""
    check_bundle_replaceable(out)
    return staging_beside(out)


def keep_rejected(staged: Path, out: Path) -> Path:
    """Swap the finished `staged` bundle into `<out>.rejected` instead of `out` (replacing only an
    earlier bundle there); returns that folder. `out` is not touched."""
    rejected = rejected_beside(out)
    recover(rejected)
    check_bundle_replaceable(rejected, REJECTED_NOTE)
    install(staged, rejected)
    return rejected


def drop_rejected(out: Path) -> str | None:
    """Remove `<out>.rejected` once a bundle was installed at `out`: a rejected bundle left from
    an earlier run would be taken for this run's. Only a rejected bundle convert wrote (no
    default) goes, renamed out of the way first so a failed or killed removal leaves no half
    bundle under that name (`recover` finishes it). Returns the line to log, if any."""
    rejected = rejected_beside(out)
    try:
        recover(rejected)
        if not (rejected.is_dir() and not rejected.is_symlink() and is_earlier_bundle(rejected)
                and (bundle_manifest(rejected / MANIFEST) or {"default": "?"})["default"] is None):
            return None
        # Named as a staging folder, which `recover` deletes (a backup, `.old-`, it would restore).
        doomed = rejected.with_name(f".{rejected.name}.convert-{os.getpid()}-"
                                    f"{secrets.token_hex(4)}-dropped")
        os.rename(rejected, doomed)
    except OSError as exc:
        return f"warning: could not remove the stale {rejected} ({exc.strerror or exc})"
    shutil.rmtree(doomed, ignore_errors=True)
    if doomed.exists():
        return f"warning: could not remove all of the stale {rejected} (left as {doomed})"
    return f"removed {rejected}: an earlier run's rejected bundle"


def write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
