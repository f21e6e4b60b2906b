"""The results store: the one writer of classification results (SQLite, standard library only).

Every front end (`ct-edge serve`, `ct-edge listen`, `ct-edge results`) goes through `Store`. A row
is committed (WAL, synchronous=FULL) before `add` returns, so a caller that answers after `add`
never reports a result the store could lose to a crash.

The data folder is `--data-dir`, else $CT_EDGE_DATA, else $XDG_DATA_HOME/ct-edge, else
~/.local/share/ct-edge. It holds `results.sqlite3` and `heatmaps/`, whose file names the store
generates (a client's file name is only ever stored as text).

Schema changes are migrations: append a function to `MIGRATIONS`; version N is `MIGRATIONS[N-1]`.
Each runs once, in its own transaction, and the table `schema_version` records it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import CtEdgeError

ENV_DATA = "CT_EDGE_DATA"
DB_NAME = "results.sqlite3"
HEATMAP_DIR = "heatmaps"
HEATMAP_NAME = re.compile(r"^[0-9a-f]{32}\.png$")
BUSY_TIMEOUT_MS = 10_000
MAX_PAGE = 1000


class StoreError(CtEdgeError):
    """The store cannot be opened or written (unwritable folder, a newer schema, a corrupt file)."""


def default_data_dir() -> Path:
    """$CT_EDGE_DATA, else $XDG_DATA_HOME/ct-edge, else ~/.local/share/ct-edge."""
    if os.environ.get(ENV_DATA):
        return Path(os.environ[ENV_DATA])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "ct-edge"


# --- migrations ------------------------------------------------------------------------------------


def _v1_results(db: sqlite3.Connection) -> None:
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


def _v2_dicom(db: sqlite3.Connection) -> None:
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


# Append only: never edit or reorder a released migration.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _v1_results,
    _v2_dicom,
]


def schema_version(db: sqlite3.Connection) -> int:
    """The highest migration applied (0 for an empty database)."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version "
               "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(db: sqlite3.Connection) -> int:
    """Apply every migration the database lacks, each in its own transaction; the new version."""
    current = schema_version(db)
    if current > len(MIGRATIONS):
        raise StoreError(f"the results store has schema version {current}, newer than this "
                         f"ct-edge knows ({len(MIGRATIONS)}); upgrade ct-edge")
    for version in range(current + 1, len(MIGRATIONS) + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while this one waited for the lock.
            if schema_version(db) >= version:
                db.execute("ROLLBACK")
                continue
            MIGRATIONS[version - 1](db)
            db.execute("INSERT INTO schema_version VALUES (?, ?)", (version, _now()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


# --- the store --------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_identity(bundle_root: Path) -> str:
    """sha256 of a bundle's manifest.json: it names every model file by its own sha256."""
    return sha256_bytes((Path(bundle_root) / "manifest.json").read_bytes())


_COLUMNS = ("id", "created_at", "source", "sha256", "bundle_sha256", "artifact", "artifact_sha256",
            "status", "reason", "label", "confidence", "probabilities", "timings_ms", "heatmap",
            "error", "origin")


def _row_dict(row: tuple) -> dict[str, Any]:
    result = dict(zip(_COLUMNS, row, strict=True))
    for key in ("probabilities", "timings_ms"):
        result[key] = json.loads(result[key] or "{}")
    result["heatmap"] = bool(result["heatmap"])
    return result


class Store:
    """A results database in a data folder. One instance may be shared by threads."""

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.path = self.data_dir / DB_NAME
        self.heatmaps = self.data_dir / HEATMAP_DIR
        self._lock = threading.Lock()
        try:
            self.heatmaps.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Autocommit mode: every transaction below is explicit (BEGIN ... COMMIT).
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                       isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the results store in {self.data_dir}: {exc}") from None
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed row survives a power cut too, not only a crash of the process.
            self._db.execute("PRAGMA synchronous = FULL")
            self.version = migrate(self._db)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"{self.path}: not a usable results store ({exc})") from None
        except BaseException:
            self._db.close()
            raise

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
            heatmap_png: bytes | None = None) -> int:
        """Write one result (and its heatmap file) and commit; the new row's id."""
        probabilities = dict(probabilities or {})
        confidence = probabilities.get(label) if label is not None else None
        heatmap = self._write_heatmap(heatmap_png) if heatmap_png is not None else None
        values = (_now(), str(source), sha256, bundle_sha256, artifact, artifact_sha256, status,
                  reason, label, confidence, json.dumps(probabilities),
                  json.dumps(dict(timings_ms or {})), heatmap, error, origin)
        try:
            with self._lock:
                cursor = self._db.execute(
                    f"INSERT INTO results ({', '.join(_COLUMNS[1:])}) "
                    f"VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})", values)
                return int(cursor.lastrowid)
        except sqlite3.Error as exc:
            if heatmap:
                (self.heatmaps / heatmap).unlink(missing_ok=True)
            raise StoreError(f"cannot write to the results store {self.path}: {exc}") from None

    def add_prediction(self, prediction: Any, *, origin: str, source: str | None = None,
                       sha256: str | None = None, bundle_sha256: str | None = None,
                       artifact: str | None = None, artifact_sha256: str | None = None,
                       heatmap_png: bytes | None = None) -> int:
        """`add` for a `ct_edge.classifier.Prediction`, with the figures its JSON contract shows."""
        record = prediction.to_dict()
        return self.add(source=source if source is not None else prediction.path, origin=origin,
                        status=prediction.status, label=prediction.label,
                        probabilities=record["probabilities"], reason=prediction.reason,
                        timings_ms=record["timings_ms"], error=prediction.error, sha256=sha256,
                        bundle_sha256=bundle_sha256, artifact=artifact,
                        artifact_sha256=artifact_sha256, heatmap_png=heatmap_png)

    def _write_heatmap(self, png: bytes) -> str:
        name = f"{uuid.uuid4().hex}.png"
        tmp = self.heatmaps / f".{name}.tmp"
        try:
            with open(tmp, "wb") as handle:
                handle.write(png)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.heatmaps / name)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write a heatmap to {self.heatmaps}: {exc}") from None
        return name

    def get(self, result_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM results WHERE id = ?",
                                   (int(result_id),)).fetchone()
        return _row_dict(row) if row else None

    def heatmap_path(self, result_id: int) -> Path | None:
        """The heatmap PNG of a row, when it has one and the file is there."""
        with self._lock:
            row = self._db.execute("SELECT heatmap FROM results WHERE id = ?",
                                   (int(result_id),)).fetchone()
        if not row or not row[0] or not HEATMAP_NAME.match(row[0]):
            return None
        path = self.heatmaps / row[0]
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
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM results{where} ORDER BY id DESC "
                "LIMIT ? OFFSET ?", [*params, limit, max(0, int(offset))]).fetchall()
        return [_row_dict(row) for row in rows]

    def count(self, status: str | None = None, label: str | None = None) -> int:
        where, params = self._where(status, label)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM results{where}", params).fetchone()[0])


    # --- DICOM instances and series (`ct-edge listen`) ---------------------------------------------

    def add_dicom_instance(self, *, sop_instance_uid: str, study_uid: str, series_uid: str,
                           spool_path: str, nbytes: int, sop_class_uid: str | None = None,
                           sha256: str | None = None, modality: str | None = None,
                           patient_id: str | None = None, description: str | None = None,
                           instance_number: int | None = None,
                           slice_location: float | None = None, calling_ae: str | None = None,
                           peer: str | None = None) -> int:
        """Record a received instance and its series, committed; the instance id. An instance
        sent again replaces the earlier copy (it is classified again, counted once) and a
        completed series it belongs to goes back to 'receiving'."""
        now = _now()
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    # Select first: an upsert would use up an AUTOINCREMENT id per instance.
                    row = self._db.execute("SELECT id FROM dicom_series WHERE series_uid = ?",
                                           (series_uid,)).fetchone()
                    if row:
                        series_id = int(row[0])
                        self._db.execute("UPDATE dicom_series SET last_received_at = ?, "
                                         "state = 'receiving' WHERE id = ?", (now, series_id))
                    else:
                        series_id = int(self._db.execute(
                            "INSERT INTO dicom_series (study_uid, series_uid, patient_id, "
                            "modality, description, calling_ae, first_received_at, "
                            "last_received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (study_uid, series_uid, patient_id, modality, description, calling_ae,
                             now, now)).lastrowid)
                    fields = (sop_class_uid, series_id, instance_number, slice_location,
                              spool_path, int(nbytes), sha256, now, calling_ae, peer)
                    old = self._db.execute("SELECT id FROM dicom_instances WHERE "
                                           "sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
                    if old:
                        self._db.execute(
                            "UPDATE dicom_instances SET sop_class_uid = ?, series_id = ?, "
                            "instance_number = ?, slice_location = ?, spool_path = ?, bytes = ?, "
                            "sha256 = ?, received_at = ?, calling_ae = ?, peer = ?, "
                            "state = 'received', result_id = NULL WHERE id = ?", (*fields, old[0]))
                        instance_id = int(old[0])
                    else:
                        instance_id = int(self._db.execute(
                            "INSERT INTO dicom_instances (sop_class_uid, series_id, instance_number, "
                            "slice_location, spool_path, bytes, sha256, received_at, calling_ae, "
                            "peer, sop_instance_uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (*fields, sop_instance_uid)).lastrowid)
                        self._db.execute("UPDATE dicom_series SET instances = instances + 1 "
                                         "WHERE id = ?", (series_id,))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to the results store {self.path}: {exc}") from None
        return instance_id

    def pending_dicom_instances(self) -> list[dict[str, Any]]:
        """Instances received but not classified yet, oldest first (what a restart resumes)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.id, i.spool_path, i.sop_instance_uid, i.sop_class_uid, i.series_id, "
                "s.modality FROM dicom_instances i JOIN dicom_series s ON s.id = i.series_id "
                "WHERE i.state = 'received' ORDER BY i.id").fetchall()
        keys = ("id", "spool_path", "sop_instance_uid", "sop_class_uid", "series_id", "modality")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def add_dicom_result(self, instance_id: int, **result: Any) -> int:
        """`add` (origin 'dicom') and mark the instance classified, in one transaction."""
        probabilities = dict(result.get("probabilities") or {})
        label = result.get("label")
        values = (_now(), str(result["source"]), result.get("sha256"), result.get("bundle_sha256"),
                  result.get("artifact"), result.get("artifact_sha256"), result.get("status"),
                  result.get("reason"), label, probabilities.get(label) if label else None,
                  json.dumps(probabilities), json.dumps(dict(result.get("timings_ms") or {})),
                  None, result.get("error"), "dicom")
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result_id = int(self._db.execute(
                        f"INSERT INTO results ({', '.join(_COLUMNS[1:])}) "
                        f"VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})", values).lastrowid)
                    self._db.execute("UPDATE dicom_instances SET state = 'classified', "
                                     "result_id = ? WHERE id = ?", (result_id, int(instance_id)))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to the results store {self.path}: {exc}") from None
        return result_id

    def stable_dicom_series(self, received_before: datetime) -> list[int]:
        """Series still 'receiving' whose last instance came before the given time and whose
        instances are all classified."""
        cutoff = received_before.astimezone(timezone.utc).isoformat(timespec="milliseconds") \
            .replace("+00:00", "Z")
        with self._lock:
            rows = self._db.execute(
                "SELECT s.id FROM dicom_series s WHERE s.state = 'receiving' AND "
                "s.last_received_at <= ? AND NOT EXISTS (SELECT 1 FROM dicom_instances i WHERE "
                "i.series_id = s.id AND i.state = 'received') ORDER BY s.id", (cutoff,)).fetchall()
        return [int(row[0]) for row in rows]

    def dicom_series_slices(self, series_id: int) -> list[dict[str, Any]]:
        """A series' instances in slice order with their results (status, label, probabilities...)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.id, i.sop_instance_uid, i.sop_class_uid, i.instance_number, "
                "i.slice_location, i.state, "
                "r.id, r.status, r.reason, r.label, r.confidence, r.probabilities, r.error "
                "FROM dicom_instances i LEFT JOIN results r ON r.id = i.result_id "
                "WHERE i.series_id = ? ORDER BY i.slice_location IS NULL, i.slice_location DESC, "
                "i.instance_number, i.id", (int(series_id),)).fetchall()
        keys = ("instance_id", "sop_instance_uid", "sop_class_uid", "instance_number",
                "slice_location", "state",
                "result_id", "status", "reason", "label", "confidence", "probabilities", "error")
        slices = [dict(zip(keys, row, strict=True)) for row in rows]
        for item in slices:
            item["probabilities"] = json.loads(item["probabilities"] or "{}")
        return slices

    def complete_dicom_series(self, series_id: int, *, status: str | None, label: str | None,
                              probabilities: Mapping[str, float], reason: str | None,
                              aggregate: str, counts: Mapping[str, int],
                              bundle_sha256: str | None = None, report: str | None = None) -> None:
        """Store a series result and mark the series 'complete' (committed)."""
        probabilities = dict(probabilities)
        try:
            with self._lock:
                self._db.execute(
                    "UPDATE dicom_series SET state = 'complete', completed_at = ?, status = ?, "
                    "reason = ?, label = ?, confidence = ?, probabilities = ?, aggregate = ?, "
                    "counts = ?, bundle_sha256 = ?, report = ? WHERE id = ?",
                    (_now(), status, reason, label, probabilities.get(label) if label else None,
                     json.dumps(probabilities), aggregate, json.dumps(dict(counts)),
                     bundle_sha256, report, int(series_id)))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to the results store {self.path}: {exc}") from None

    _SERIES_COLUMNS = ("id", "study_uid", "series_uid", "patient_id", "modality", "description",
                       "calling_ae", "first_received_at", "last_received_at", "instances", "state",
                       "completed_at", "status", "reason", "label", "confidence", "probabilities",
                       "aggregate", "counts", "bundle_sha256", "report")

    def _series_dict(self, row: tuple) -> dict[str, Any]:
        series = dict(zip(self._SERIES_COLUMNS, row, strict=True))
        for key in ("probabilities", "counts"):
            series[key] = json.loads(series[key] or "{}")
        return series

    def get_dicom_series(self, series_id: int | None = None,
                         series_uid: str | None = None) -> dict[str, Any] | None:
        """One series by id or SeriesInstanceUID."""
        column, value = ("id", series_id) if series_uid is None else ("series_uid", series_uid)
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(self._SERIES_COLUMNS)} FROM dicom_series "
                                   f"WHERE {column} = ?", (value,)).fetchone()
        return self._series_dict(row) if row else None

    def list_dicom_series(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Series, the most recently received first."""
        limit = max(0, min(int(limit), MAX_PAGE))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(self._SERIES_COLUMNS)} FROM dicom_series "
                "ORDER BY last_received_at DESC, id DESC LIMIT ? OFFSET ?",
                (limit, max(0, int(offset)))).fetchall()
        return [self._series_dict(row) for row in rows]

    def dicom_spool_over(self, max_bytes: int) -> list[tuple[int, str]]:
        """(instance id, spool path) of classified instances, oldest first, whose files take the
        spool past `max_bytes`: what a retention limit removes."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, spool_path, bytes, state FROM dicom_instances "
                "WHERE spool_path IS NOT NULL ORDER BY id DESC").fetchall()
        total, over = 0, []
        for instance_id, path, nbytes, state in rows:
            total += int(nbytes or 0)
            if total > max_bytes and state == "classified":
                over.append((int(instance_id), path))
        return over[::-1]

    def forget_dicom_spool(self, instance_ids: list[int]) -> None:
        """The spool files of these instances were removed (retention); their results stay."""
        with self._lock:
            self._db.executemany("UPDATE dicom_instances SET spool_path = NULL WHERE id = ?",
                                 [(int(i),) for i in instance_ids])
