"""Write the bundle beside its destination, then swap it in: never a half bundle at `out`.

The swap is two renames (old -> backup, new -> out); a run killed between them leaves the old
bundle as a backup, which the next run puts back before it starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from ct_edge.bundle import MANIFEST
from ct_edge.files import fsync_dir

from .errors import ConvertError

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>convert|old)-(?P<pid>\d+)-[^/]*$")


def check_replaceable(out: Path) -> None:
    """Only a missing or empty folder, or an earlier bundle, may be replaced."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConvertError(f"--out {out} exists and is not a folder; choose another --out")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ConvertError(f"refusing to replace {out}: it is not empty and not a ct-edge bundle "
                           f"(no {MANIFEST}); choose another --out")


def prepare(out: Path) -> Path:
    """A fresh staging folder beside `out` for a bundle (see `staging_beside`)."""
    check_replaceable(out)
    return staging_beside(out)


def staging_beside(out: Path) -> Path:
    """A fresh staging folder beside `out` (same file system, so the swap is a rename), named so
    that `recover` removes it if this process is killed before `install`; first puts back what
    an earlier killed swap left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-{os.getpid()}-", dir=out.parent))
    os.chmod(staged, 0o755)  # mkdtemp makes it private; the output is not
    return staged


def write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def install(staged: Path, out: Path) -> None:
    """Swap the finished staging folder into `out`; the previous bundle goes only after."""
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(out, backup)
    try:
        os.rename(staged, out)
    except BaseException:
        if backup is not None:
            os.rename(backup, out)
        raise
    _fsync_dir(out.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def discard(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)


def recover(out: Path) -> None:
    """Clean up after runs that died: drop their staging folders, restore an orphaned backup."""
    for path in sorted(out.parent.glob(f".{out.name}.*")):
        match = _LEFTOVER.match(path.name)
        if not match or match["name"] != out.name or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not out.exists():
            os.rename(path, out)  # killed between the two renames of install()
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # durability where the file system allows it
        fsync_dir(path)
