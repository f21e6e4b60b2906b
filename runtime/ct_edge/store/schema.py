"""The store's schema: the one list of migrations, applied in order, and the names they define.

Schema changes are migrations: append a function to `MIGRATIONS`; version N is `MIGRATIONS[N-1]`.
Each runs once, in its own transaction, and the table `schema_version` records it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from ..errors import CtEdgeError

T = TypeVar("T")

MAX_PAGE = 1000
RESULT_COLUMNS = ("id", "created_at", "source", "sha256", "bundle_sha256", "artifact",
                  "artifact_sha256", "artifact_parity", "status", "reason", "label", "confidence",
                  "probabilities", "timings_ms", "heatmap", "error", "origin")
# Every column but the id, in RESULT_COLUMNS order: the one INSERT both writers of results use.
INSERT_RESULT = (f"INSERT INTO results ({', '.join(RESULT_COLUMNS[1:])}) "
                 f"VALUES ({', '.join('?' * (len(RESULT_COLUMNS) - 1))})")


class StoreError(CtEdgeError):
    """The store cannot be opened or written (unwritable folder, a newer schema, a corrupt file)."""


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether an sqlite error is another connection's lock (SQLITE_BUSY or SQLITE_LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def busy_error(path: Path, exc: sqlite3.Error) -> StoreError:
    """The StoreError for a store another process holds locked past the busy timeout."""
    return StoreError(f"the results store {path} is busy in another process ({exc}); "
                      "try again")


class TextSafeConnection:
    """What a transaction yields: `execute`/`executemany` pass every parameter through
    `db_text`, so no write can store, or fail on, a string that is not valid Unicode."""

    __slots__ = ("_db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, db_params(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self._db.executemany(sql, (db_params(row) for row in rows))


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, lock: threading.Lock | threading.RLock,
                path: Path) -> Iterator[TextSafeConnection]:
    """Under the store's lock, one committed transaction (rolled back on any error); an sqlite
    error becomes one StoreError naming the store."""
    try:
        with lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield TextSafeConnection(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
    except sqlite3.Error as exc:
        if is_busy(exc):
            raise busy_error(path, exc) from None
        raise StoreError(f"cannot write to the results store {path}: {exc}") from None


def read(db: sqlite3.Connection, lock: threading.Lock | threading.RLock, path: Path, sql: str,
         params: Sequence[Any] = ()) -> list[tuple]:
    """Every row of one query, under the store's lock; an sqlite error (a damaged file, a disk
    error) becomes one StoreError naming the store."""
    try:
        with lock:
            return db.execute(sql, db_params(params)).fetchall()
    except sqlite3.Error as exc:
        if is_busy(exc):
            raise busy_error(path, exc) from None
        raise StoreError(f"cannot read the results store {path}: {exc}") from None


def decode_json(text: str | None, path: Path) -> Any:
    """A JSON column's value; StoreError when a damaged row holds something else. NaN and
    infinity (in rows written before they were refused) read as None: JSON cannot send them."""
    try:
        return json.loads(text or "{}", parse_constant=lambda _: None)
    except (ValueError, RecursionError):
        raise StoreError(f"cannot read the results store {path}: a damaged row") from None


def db_text(value: T) -> T:
    """`value`, with any lone surrogate in a string (a client's name decoded with
    surrogateescape, say) replaced by U+FFFD: SQLite stores only valid UTF-8."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in value)
    return value


def db_params(params: Sequence[Any]) -> tuple:
    """Query parameters with every string passed through `db_text`."""
    return tuple(db_text(value) for value in params)


def require_unicode(path: Path, **identities: str) -> None:
    """StoreError unless every identity (a UID, say) is valid Unicode: unlike display text, an
    identity with a replacement character would name something else."""
    for name, value in identities.items():
        if db_text(value) is not value:
            raise StoreError(f"cannot write to the results store {path}: the {name} is not "
                             "valid Unicode")


def result_values(*, source: str, origin: str, status: str | None, label: str | None,
                  probabilities: Mapping[str, float] | None, reason: str | None,
                  timings_ms: Mapping[str, float] | None, error: str | None, sha256: str | None,
                  bundle_sha256: str | None, artifact: str | None, artifact_sha256: str | None,
                  artifact_parity: str | None, heatmap: str | None) -> tuple:
    """One `results` row in INSERT_RESULT's column order; StoreError for a number that is not
    finite (NaN or infinity), which no reader of the row could send as JSON. `artifact_parity`:
    the artifact's parity status as its bundle's manifest records it ("passed", "failed: ...")."""
    probabilities = dict(probabilities or {})
    confidence = probabilities.get(label) if label is not None else None
    try:
        encoded = [json.dumps(value, allow_nan=False)
                   for value in (probabilities, dict(timings_ms or {}))]
    except ValueError:
        raise StoreError(f"refused the result for {source}: a number in it is not finite "
                         "(NaN or infinity)") from None
    return (utc_now(), str(source), sha256, bundle_sha256, artifact, artifact_sha256,
            artifact_parity, status, reason, label, confidence, *encoded, heatmap, error, origin)


def utc_now() -> str:
    """The current UTC time as the store writes it (ISO 8601, milliseconds, 'Z')."""
    return utc_text(datetime.now(timezone.utc))


def utc_text(moment: datetime) -> str:
    """A time as the store writes it; stored times compare correctly as text."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def v1_results(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE results (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            created_at TEXT NOT NULL,
            source TEXT NOT NULL,
            sha256 TEXT,
            bundle_sha256 TEXT,
            artifact TEXT,
            artifact_sha256 TEXT,
            status TEXT,
            reason TEXT,
            label TEXT,
            confidence REAL,
            probabilities TEXT NOT NULL DEFAULT '{}',
            timings_ms TEXT NOT NULL DEFAULT '{}',
            heatmap TEXT,
            error TEXT,
            origin TEXT NOT NULL
        )""")
    db.execute("CREATE INDEX results_status ON results (status, id)")
    db.execute("CREATE INDEX results_label ON results (label, id)")
    db.execute("CREATE INDEX results_sha256 ON results (sha256)")


def v2_dicom(db: sqlite3.Connection) -> None:
    """`ct-edge listen`: received DICOM instances (the spool index) and their series. A slice's
    classification is a `results` row (origin 'dicom') that its instance row points to."""
    db.execute("""
        CREATE TABLE dicom_series (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            study_uid TEXT NOT NULL,
            series_uid TEXT NOT NULL UNIQUE,
            patient_id TEXT,
            modality TEXT,
            description TEXT,
            calling_ae TEXT,
            first_received_at TEXT NOT NULL,
            last_received_at TEXT NOT NULL,
            instances INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL DEFAULT 'receiving',
            completed_at TEXT,
            status TEXT,
            reason TEXT,
            label TEXT,
            confidence REAL,
            probabilities TEXT NOT NULL DEFAULT '{}',
            aggregate TEXT,
            counts TEXT NOT NULL DEFAULT '{}',
            bundle_sha256 TEXT,
            report TEXT
        )""")
    db.execute("""
        CREATE TABLE dicom_instances (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            sop_instance_uid TEXT NOT NULL UNIQUE,
            sop_class_uid TEXT,
            series_id INTEGER NOT NULL REFERENCES dicom_series (id),
            instance_number INTEGER,
            slice_location REAL,
            spool_path TEXT,
            bytes INTEGER,
            sha256 TEXT,
            received_at TEXT NOT NULL,
            calling_ae TEXT,
            peer TEXT,
            state TEXT NOT NULL DEFAULT 'received',
            result_id INTEGER REFERENCES results (id)
        )""")
    db.execute("CREATE INDEX dicom_instances_state ON dicom_instances (state, id)")
    db.execute("CREATE INDEX dicom_instances_series ON dicom_instances (series_id)")
    db.execute("CREATE INDEX dicom_series_state ON dicom_series (state, last_received_at)")


def v3_artifact_parity(db: sqlite3.Connection) -> None:
    """The parity status of the artifact that answered, on every result: an artifact that missed
    parity may still run (chosen by name, or as the default). NULL in rows written before it."""
    db.execute("ALTER TABLE results ADD COLUMN artifact_parity TEXT")


# Append only: never edit or reorder a released migration.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    v1_results,
    v2_dicom,
    v3_artifact_parity,
]


def schema_version(db: sqlite3.Connection) -> int:
    """The highest migration applied (0 for an empty database), creating the version table."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version "
               "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    return stored_version(db)


def stored_version(db: sqlite3.Connection) -> int:
    """The highest migration applied, without writing (0: no version table, e.g. an empty file)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                  "AND name = 'schema_version'").fetchone() is None:
        return 0
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def require_known(version: int) -> None:
    """StoreError when a store's schema is newer than this ct-edge knows."""
    if version > len(MIGRATIONS):
        raise StoreError(f"the results store has schema version {version}, newer than this "
                         f"ct-edge knows ({len(MIGRATIONS)}); upgrade ct-edge")


def require_current(db: sqlite3.Connection, path: Path) -> int:
    """The schema version of a store opened read-only; StoreError unless it is this ct-edge's
    (a read-only reader cannot migrate: `serve` or `listen` do, on opening it)."""
    version = stored_version(db)
    require_known(version)
    if version == 0:
        raise StoreError(f"{path}: not a results store (an empty database, or one made by "
                         "something else)")
    if version < len(MIGRATIONS):
        raise StoreError(f"{path}: the results store has schema version {version}, older than "
                         f"this ct-edge's ({len(MIGRATIONS)}); start `ct-edge serve` or "
                         "`ct-edge listen` on it once to upgrade it")
    return version


def migrate(db: sqlite3.Connection) -> int:
    """Apply every migration the database lacks, each in its own transaction; the new version."""
    current = schema_version(db)
    require_known(current)
    for version in range(current + 1, len(MIGRATIONS) + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while this one waited for the lock.
            if schema_version(db) >= version:
                db.execute("ROLLBACK")
                continue
            MIGRATIONS[version - 1](db)
            db.execute("INSERT INTO schema_version VALUES (?, ?)", (version, utc_now()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)
