"""Output folders replaced whole: written beside their destination, then swapped in.

The swap is two renames (old -> backup, new -> out); a run killed between them leaves the old
folder as a backup, which the next run puts back before it starts. Used by `convert` (bundles),
`training.ensemble` and `training.synthetic_series`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ct_edge.files import fsync_dir

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>convert|old)-(?P<pid>\d+)-[^/]*$")


def check_replaceable(out: Path, is_earlier: Callable[[Path], bool], earlier: str,
                      usual: Callable[[Path], bool] | None = None) -> None:
    """FileExistsError unless `out` is missing, an empty folder, or a folder `is_earlier`
    recognises as an earlier run's output (`earlier` says what that is, for the message, which
    also lists what `out` holds: first the entries `usual` does not expect there)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"--out {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_earlier(out):
        raise FileExistsError(f"refusing to replace {out}: it is not empty and not {earlier}; "
                              f"it holds {describe_contents(out, usual)}; choose another --out")


def describe_contents(folder: Path, usual: Callable[[Path], bool] | None = None,
                      shown: int = 5) -> str:
    """The first few entries of `folder` (sub-folders end in '/'), those `usual` does not expect
    first, for a one-line message."""
    paths = sorted(folder.iterdir(), key=lambda path: (bool(usual and usual(path)), path.name))
    names = [_shown_name(path) for path in paths]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _shown_name(path: Path) -> str:
    name = path.name if path.name.isprintable() else repr(path.name)  # one line, whatever it is
    return name + "/" if path.is_dir() and not path.is_symlink() else name


def replace_folder(out: Path, fill: Callable[[Path], None]) -> None:
    """Let `fill` write a new folder beside `out`, then swap it in: a failed or interrupted run
    leaves `out` as it was and no staging folder behind."""
    staged = staging_beside(out)  # a killed run's leftovers are removed or put back first
    try:
        fill(staged)
        install(staged, out)
    except BaseException:
        discard(staged)
        raise


def staging_beside(out: Path) -> Path:
    """A fresh staging folder beside `out` (same file system, so the swap is a rename), named so
    that `recover` removes it if this process is killed before `install`; first puts back what
    an earlier killed swap left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-{os.getpid()}-", dir=out.parent))
    os.chmod(staged, 0o755)  # mkdtemp makes it private; the output is not
    return staged


def install(staged: Path, out: Path) -> None:
    """Swap the finished staging folder into `out`; the previous folder goes only after. The
    swap is made durable (an EIO from that is raised: the new folder may not survive a power
    cut)."""
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
    fsync_dir(out.parent)
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
