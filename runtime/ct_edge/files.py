"""Writing a file atomically (temp file beside it, then rename) with the mode a plain open gives.

`tempfile.mkstemp` creates its file 0600, and the rename keeps that: heatmaps, models and reports
written that way were unreadable to anyone else. Here the temp file is created 0666 less the
process umask, like any file `open(path, "w")` creates. Also the one lock numpy loads take.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
from pathlib import Path

# np.load parses each .npy header with ast.literal_eval, and CPython before 3.11.8 keeps the AST
# constructor's recursion depth per interpreter, not per thread: two threads loading at once can
# fail with "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905; it
# failed CI here, Classifiers built in several threads). Every np.load of the runtime and of
# training holds this lock; the files are small, so one at a time costs little.
NUMPY_LOAD_LOCK = threading.Lock()


def create_temp(folder: str | Path, prefix: str = ".", suffix: str = ".tmp") -> tuple[int, Path]:
    """(open descriptor, path) of a new, empty file in `folder`, mode 0666 less the umask."""
    folder = Path(folder)
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries durable (a file just renamed into it). A file system that cannot
    sync a folder at all (EINVAL, ENOTSUP: some network and FUSE mounts) is not an error, as
    SQLite treats it; any other OSError (EIO) is raised."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
