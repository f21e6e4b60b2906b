"""The results store: the one writer of classification results (SQLite, standard library only).

Every front end (`ct-edge serve`, `ct-edge listen`, `ct-edge results`) goes through `Store`. A row
is committed (WAL, synchronous=FULL) before `add` returns, so a caller that answers after `add`
never reports a result the store could lose to a crash.

The data folder is `--data-dir`, else $CT_EDGE_DATA, else $XDG_DATA_HOME/ct-edge, else
~/.local/share/ct-edge. It holds `results.sqlite3` and `heatmaps/`, whose file names the store
generates (a client's file name is only ever stored as text).

The schema and its migrations are in `store.schema`; the DICOM instances and series that
`ct-edge listen` records are in `store.series` (a mixin of `Store`: one connection, one lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import fsync_dir
from .schema import (
    INSERT_RESULT,
    MAX_PAGE,
    MIGRATIONS,
    RESULT_COLUMNS,
    StoreError,
    busy_error,
    decode_json,
    is_busy,
    migrate,
    require_current,
    result_values,
    schema_version,
    transaction,
)
from .series import SERIES_COLUMNS, DicomSeriesStore

__all__ = ["DB_NAME", "ENV_DATA", "HEATMAP_DIR", "HEATMAP_NAME", "MAX_PAGE", "MIGRATIONS",
           "RESULT_COLUMNS", "SERIES_COLUMNS", "Store", "StoreError",
           "default_data_dir", "migrate", "schema_version", "sha256_bytes"]

ENV_DATA = "CT_EDGE_DATA"
DB_NAME = "results.sqlite3"
HEATMAP_DIR = "heatmaps"
HEATMAP_NAME = re.compile(r"^[0-9a-f]{32}\.png$")
BUSY_TIMEOUT_MS = 10_000
# A heatmap file no row names is an orphan once older than this (a request takes seconds).
ORPHAN_AFTER_S = 3600.0


def default_data_dir() -> Path:
    """$CT_EDGE_DATA, else $XDG_DATA_HOME/ct-edge, else ~/.local/share/ct-edge."""
    if os.environ.get(ENV_DATA):
        return Path(os.environ[ENV_DATA])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "ct-edge"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _row_dict(row: tuple, path: Path) -> dict[str, Any]:
    result = dict(zip(RESULT_COLUMNS, row, strict=True))
    for key in ("probabilities", "timings_ms"):
        result[key] = decode_json(result[key], path)
    result["heatmap"] = bool(result["heatmap"])
    return result


def prediction_fields(prediction: Any, source: str | None = None) -> dict[str, Any]:
    """The `results` fields of a `ct_edge.classifier.Prediction`, as its JSON contract shows them."""
    record = prediction.to_dict()
    return {"source": source if source is not None else prediction.path,
            "status": prediction.status, "label": prediction.label,
            "probabilities": record["probabilities"], "reason": prediction.reason,
            "timings_ms": record["timings_ms"], "error": prediction.error}


def error_code(exc: sqlite3.Error) -> int:
    """The primary SQLite result code of an error (SQLITE_BUSY, SQLITE_CANTOPEN, ...)."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF


def connect(path: Path, query: str = "") -> sqlite3.Connection:
    """A connection in autocommit mode (every transaction is an explicit BEGIN ... COMMIT), for
    any thread; `query` adds SQLite URI parameters (`mode=ro`)."""
    target: str | Path = f"{path.resolve().as_uri()}?{query}" if query else path
    return sqlite3.connect(target, uri=bool(query), timeout=BUSY_TIMEOUT_MS / 1000,
                           isolation_level=None, check_same_thread=False)


def wal_holds_data(path: Path) -> bool:
    """Whether the database's write-ahead log holds pages not yet copied into it."""
    try:
        return path.with_name(path.name + "-wal").stat().st_size > 0
    except OSError:
        return False


class Store(DicomSeriesStore):
    """A results database in a data folder. One instance may be shared by threads."""

    def __init__(self, data_dir: str | Path | None = None, *, read_only: bool = False) -> None:
        """Open the store in `data_dir`, creating or migrating it; with `read_only` (what
        `ct-edge results` uses) it only reads: nothing is created or migrated, and a store that
        is not this ct-edge's schema is refused."""
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.path = self.data_dir / DB_NAME
        self.heatmaps = self.data_dir / HEATMAP_DIR
        self.read_only = read_only
        self._lock = threading.Lock()
        try:
            if read_only:
                self._db = connect(self.path, "mode=ro")
            else:
                self.heatmaps.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._db = connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the results store in {self.data_dir}: {exc}") from None
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.version = self._check_schema() if read_only else self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise self._unusable(exc) from None
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> int:
        """WAL mode, durable commits, the schema brought up to date; its version."""
        self._db.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed row survives a power cut too, not only a crash of the process.
        self._db.execute("PRAGMA synchronous = FULL")
        return migrate(self._db)

    def _check_schema(self) -> int:
        """The schema version of a store opened read-only (StoreError unless it is current)."""
        try:
            return require_current(self._db, self.path)
        except sqlite3.OperationalError as exc:
            # Reading a WAL database needs its -shm index, which a read-only folder cannot get.
            if error_code(exc) != sqlite3.SQLITE_CANTOPEN or wal_holds_data(self.path):
                raise
        # No log to read: the database file holds every committed row, and no writer can be
        # using a folder where the index cannot be created; read it as a file that never changes.
        self._db.close()
        self._db = connect(self.path, "mode=ro&immutable=1")
        return require_current(self._db, self.path)

    def _unusable(self, exc: sqlite3.DatabaseError) -> StoreError:
        """The StoreError for a database that opened but cannot be used as a store."""
        if is_busy(exc):
            return busy_error(self.path, exc)
        if error_code(exc) == sqlite3.SQLITE_READONLY:
            # WAL mode writes beside the database even to read it.
            return StoreError(f"cannot open the results store {self.path}: it is read-only here "
                              f"({exc}); the folder {self.data_dir} and the database must be "
                              "writable to record results")
        if self.read_only and error_code(exc) == sqlite3.SQLITE_CANTOPEN:
            return StoreError(f"cannot read the results store {self.path} here: its write-ahead "
                              f"log holds results, and SQLite cannot create {self.path.name}-shm "
                              f"in {self.data_dir} to read it; copy the folder somewhere "
                              "writable, or start `ct-edge serve` on it once")
        return StoreError(f"{self.path}: not a usable results store ({exc})")

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, *, source: str, origin: str, status: str | None, label: str | None = None,
            probabilities: Mapping[str, float] | None = None, reason: str | None = None,
            timings_ms: Mapping[str, float] | None = None, error: str | None = None,
            sha256: str | None = None, bundle_sha256: str | None = None,
            artifact: str | None = None, artifact_sha256: str | None = None,
            artifact_parity: str | None = None, heatmap_png: bytes | None = None) -> int:
        """Write one result (and its heatmap file) and commit; the new row's id."""
        heatmap = self._write_heatmap(heatmap_png) if heatmap_png is not None else None
        try:
            values = result_values(source=source, origin=origin, status=status, label=label,
                                   probabilities=probabilities, reason=reason,
                                   timings_ms=timings_ms, error=error, sha256=sha256,
                                   bundle_sha256=bundle_sha256, artifact=artifact,
                                   artifact_sha256=artifact_sha256,
                                   artifact_parity=artifact_parity, heatmap=heatmap)
            with transaction(self._db, self._lock, self.path) as db:
                return int(db.execute(INSERT_RESULT, values).lastrowid)
        except BaseException:
            # No row refers to the file (the transaction rolled back): it would be an orphan.
            if heatmap:
                (self.heatmaps / heatmap).unlink(missing_ok=True)
            raise

    def add_prediction(self, prediction: Any, *, origin: str, source: str | None = None,
                       sha256: str | None = None, bundle_sha256: str | None = None,
                       artifact: str | None = None, artifact_sha256: str | None = None,
                       artifact_parity: str | None = None,
                       heatmap_png: bytes | None = None) -> int:
        """`add` for a `ct_edge.classifier.Prediction`, with the figures its JSON contract shows."""
        return self.add(**prediction_fields(prediction, source), origin=origin, sha256=sha256,
                        bundle_sha256=bundle_sha256, artifact=artifact,
                        artifact_sha256=artifact_sha256, artifact_parity=artifact_parity,
                        heatmap_png=heatmap_png)

    def add_predictions(self, predictions: Sequence[tuple[Any, str]], *, origin: str,
                        bundle_sha256: str | None = None, artifact: str | None = None,
                        artifact_sha256: str | None = None,
                        artifact_parity: str | None = None) -> list[int]:
        """(prediction, sha256 of its input) pairs, without heatmaps, in one transaction: all are
        stored or none is (StoreError); their ids in order."""
        rows = [result_values(**prediction_fields(prediction), origin=origin, sha256=sha256,
                              bundle_sha256=bundle_sha256, artifact=artifact,
                              artifact_sha256=artifact_sha256, artifact_parity=artifact_parity,
                              heatmap=None)
                for prediction, sha256 in predictions]
        with transaction(self._db, self._lock, self.path) as db:
            return [int(db.execute(INSERT_RESULT, values).lastrowid) for values in rows]

    def _write_heatmap(self, png: bytes) -> str:
        """A durable heatmap file (its data and its name) in heatmaps/; the name."""
        name = f"{uuid.uuid4().hex}.png"
        tmp, final = self.heatmaps / f".{name}.tmp", self.heatmaps / name
        try:
            with open(tmp, "wb") as handle:
                handle.write(png)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            # The row that names the file is committed with synchronous=FULL: the name must
            # survive a power cut as surely as the row.
            fsync_dir(self.heatmaps)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StoreError(f"cannot write a heatmap to {self.heatmaps}: {exc}") from None
            raise
        return name

    def remove_orphan_heatmaps(self, older_than_s: float = ORPHAN_AFTER_S) -> int:
        """Delete heatmap files (and temporary ones) that no row names and that are older than
        `older_than_s`, what a kill between the file and its row's commit leaves; the number
        removed. The age keeps a file another process is about to commit."""
        horizon = time.time() - older_than_s
        named = {row[0] for row in self._read(
            "SELECT heatmap FROM results WHERE heatmap IS NOT NULL")}
        removed = 0
        try:
            paths = list(self.heatmaps.iterdir())
        except OSError:  # an unreadable folder: heatmap writes will say so; serving goes on
            return 0
        for path in paths:
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
                if path.name not in named and path.is_file() and path.stat().st_mtime < horizon:
                    path.unlink()
                    removed += 1
        return removed

    def get(self, result_id: int) -> dict[str, Any] | None:
        rows = self._read(f"SELECT {', '.join(RESULT_COLUMNS)} FROM results WHERE id = ?",
                          (int(result_id),))
        return _row_dict(rows[0], self.path) if rows else None

    def heatmap_path(self, result_id: int) -> Path | None:
        """The heatmap PNG of a row, when it has one and the file is there."""
        rows = self._read("SELECT heatmap FROM results WHERE id = ?", (int(result_id),))
        if not rows or not isinstance(rows[0][0], str) or not HEATMAP_NAME.match(rows[0][0]):
            return None
        path = self.heatmaps / rows[0][0]
        return path if path.is_file() else None

    def _where(self, status: str | None, label: str | None) -> tuple[str, list]:
        clauses, params = [], []
        if status is not None:
            clauses.append("status IS ?" if status else "status IS NULL")
            if status:
                params.append(status)
        if label is not None:
            clauses.append("label = ?")
            params.append(label)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def list(self, limit: int = 50, offset: int = 0, status: str | None = None,
             label: str | None = None) -> list[dict[str, Any]]:
        """Rows newest first; `status`/`label` filter exactly (status '' = unreadable inputs)."""
        where, params = self._where(status, label)
        limit = max(0, min(int(limit), MAX_PAGE))
        rows = self._read(f"SELECT {', '.join(RESULT_COLUMNS)} FROM results{where} "
                          "ORDER BY id DESC LIMIT ? OFFSET ?",
                          [*params, limit, max(0, int(offset))])
        return [_row_dict(row, self.path) for row in rows]

    def count(self, status: str | None = None, label: str | None = None) -> int:
        where, params = self._where(status, label)
        return int(self._read(f"SELECT COUNT(*) FROM results{where}", params)[0][0])
