"""The --out folder of a batch job: Parquet parts, each written whole (temp name, fsync, rename),
the lock that keeps one job per folder, and what a rerun reads back to resume."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ..errors import one_line
from ..files import fsync_dir
from .payload import BatchError, ModelPayload

if TYPE_CHECKING:
    import pyarrow as pa

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TMP_PREFIX = ".tmp-"
LOCK_NAME = ".ct-edge-batch.lock"


def part_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob(f"{PART_PREFIX}*{PART_SUFFIX}") if p.is_file())


def read_done(out: Path, payload: ModelPayload) -> set[str]:
    """Paths that parts in `out` already hold a result for; refuses parts written with another
    model. An error row is not a result: the file may have been fixed, so a rerun retries it."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for part in part_files(out):
        try:
            table = pq.read_table(part, columns=["path", "error", "bundle_sha256",
                                                 "artifact_sha256"])
        except Exception as exc:  # a part is renamed into place whole, so this is outside damage
            raise BatchError(f"{part}: unreadable result part ({exc}); move it away and run "
                             "again to rescore its inputs") from None
        for column, mine in (("bundle_sha256", payload.manifest_sha256),
                             ("artifact_sha256", payload.artifact_sha256)):
            theirs = set(table.column(column).to_pylist()) - {mine}
            if theirs:
                raise BatchError(f"{out} holds results of another model ({column} "
                                 f"{sorted(theirs)[0][:12]}..., this run {mine[:12]}...); score "
                                 "into a new --out folder or use the same bundle and --artifact")
        done.update(path for path, error in zip(table.column("path").to_pylist(),
                                                table.column("error").to_pylist(), strict=True)
                    if error is None)
    return done


def count_rows(out: Path) -> int:
    """Rows in the parts of `out` (from the Parquet footers; no data is read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(part).metadata.num_rows for part in part_files(out))


def drop_error_rows(out: Path, paths: set[str]) -> int:
    """Remove the error rows of `paths` from the parts in `out` before they are scored again, so
    an input never has two rows. Each part is rewritten whole (temp file, then rename) or, left
    empty, deleted; a kill in between only means the input is retried once more. Returns the
    number of rows dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = pa.array(sorted(paths), pa.string())
    dropped = 0
    for part in part_files(out):
        table = pq.read_table(part)
        stale = pc.and_(pc.is_valid(table["error"]), pc.is_in(table["path"], value_set=wanted))
        count = pc.sum(pc.cast(stale, pa.int64())).as_py() or 0
        if not count:
            continue
        kept = table.filter(pc.invert(stale))
        if kept.num_rows == 0:
            part.unlink()
        else:
            write_part(kept, part)
        dropped += count
    return dropped


class PartWriter:
    """Writes result tables into `out` as part files, each atomically (temp name, then rename)."""

    def __init__(self, out: Path, run_id: str) -> None:
        self.out, self.run_id = out, run_id
        self.count = 0

    def write(self, table: pa.Table) -> Path:
        self.count += 1
        path = self.out / f"{PART_PREFIX}{self.run_id}-{self.count:06d}{PART_SUFFIX}"
        write_part(table, path)
        return path


def write_part(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` whole and durably (temp file, fsync, rename, folder fsync); a
    failed write (a full disk, a value Parquet cannot hold) is a BatchError naming the folder and
    leaves no temp file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:  # on disk before the name says it is complete
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, pa.ArrowException, UnicodeError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BatchError(f"cannot write results to {path.parent}: "
                         f"{getattr(exc, 'strerror', None) or one_line(exc)}") from None


@contextlib.contextmanager
def locked_out(out: Path) -> Iterator[None]:
    """Create `out`, take its lock (one job per folder) and drop temp parts a killed run left.

    A job that ends leaving `out` with nothing but the lock it created removes the lock, and the
    folders it created: a job that failed before writing anything leaves no trace.
    """
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    lock = out / LOCK_NAME
    new_lock = not lock.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(f"cannot write to {out}: {exc.strerror or exc}") from None
    with take_lock(lock):
        drop_temp_parts(out)
        try:
            yield
        finally:
            if new_lock:
                remove_if_unused(out, created)


def remove_if_unused(out: Path, created: list[Path]) -> None:
    """Delete the lock (while still held: see take_lock) and the folders `created`, innermost
    first, when `out` holds nothing else."""
    with contextlib.suppress(OSError):
        if [p.name for p in out.iterdir()] != [LOCK_NAME]:
            return
        (out / LOCK_NAME).unlink()
        for folder in created:  # stops at the first one not empty
            folder.rmdir()


@contextlib.contextmanager
def take_lock(lock: Path) -> Iterator[IO[str]]:
    """Hold an exclusive lock on the file `lock` (created if missing), or raise BatchError.

    A job that ends may delete its lock file while another job has it open; the other then
    locks a file no longer in the folder, so it checks it locked the file the name now holds.
    """
    import fcntl

    for _ in range(3):
        try:
            handle = open(lock, "a+")  # noqa: SIM115 - held for the whole job
        except OSError as exc:
            raise BatchError(f"cannot write to {lock.parent}: {exc.strerror or exc}") from None
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                break
            if same_file(handle, lock):
                yield handle
                return
    raise BatchError(f"another ct-edge batch job is writing to {lock.parent}; wait for it or "
                     "choose another --out")


def same_file(handle: IO[str], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def drop_temp_parts(out: Path) -> None:
    """Delete the temp parts a killed run left: only names write_part gives, never other files."""
    for stale in out.glob(f"{TMP_PREFIX}{PART_PREFIX}*{PART_SUFFIX}"):
        if stale.is_file():
            with contextlib.suppress(OSError):
                stale.unlink()


def read_results(out: str | Path) -> pa.Table:
    """Every part in `out` as one table (for tests, notebooks and the benchmark)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = part_files(Path(out))
    if not parts:
        return pa.table({})
    return pa.concat_tables([pq.read_table(p) for p in parts])
