"""The DICOM half of the store (`ct-edge listen`): received instances, their series and the series
results. A mixin of `Store`: it writes through the same connection, under the same lock, in
the same explicit transactions; the tables are migration v2 in `schema`.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .schema import (
    INSERT_RESULT,
    MAX_PAGE,
    TextSafeConnection,
    decode_json,
    read,
    require_unicode,
    result_values,
    transaction,
    utc_now,
    utc_text,
)

SERIES_COLUMNS = ("id", "study_uid", "series_uid", "patient_id", "modality", "description",
                  "calling_ae", "first_received_at", "last_received_at", "instances", "state",
                  "completed_at", "status", "reason", "label", "confidence", "probabilities",
                  "aggregate", "counts", "bundle_sha256", "report")


def _series_dict(row: tuple, path: Path) -> dict[str, Any]:
    series = dict(zip(SERIES_COLUMNS, row, strict=True))
    for key in ("probabilities", "counts"):
        series[key] = decode_json(series[key], path)
    return series


def _moved(db: TextSafeConnection, left: int, joined: int) -> None:
    """An instance moved from series `left` to `joined`: both counted again; `left` goes back to
    'receiving' (its result counted the instance) and is dropped when no instance is left in it
    (a series of no slices has no result to give)."""
    db.execute("UPDATE dicom_series SET instances = (SELECT COUNT(*) FROM dicom_instances i "
               "WHERE i.series_id = dicom_series.id) WHERE id IN (?, ?)", (left, joined))
    db.execute("UPDATE dicom_series SET state = 'receiving' WHERE id = ?", (left,))
    db.execute("DELETE FROM dicom_series WHERE id = ? AND NOT EXISTS (SELECT 1 FROM "
               "dicom_instances i WHERE i.series_id = ?)", (left, left))


class DicomSeriesStore:
    """DICOM instances and series; `Store` provides the connection, its lock and its path."""

    path: Path
    _db: sqlite3.Connection
    _lock: threading.Lock

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Every row of one query; StoreError for a damaged or unreadable store (every read of
        the store goes through here)."""
        return read(self._db, self._lock, self.path, sql, params)

    def add_dicom_instance(self, *, sop_instance_uid: str, study_uid: str, series_uid: str,
                           spool_path: str, nbytes: int, sop_class_uid: str | None = None,
                           sha256: str | None = None, modality: str | None = None,
                           patient_id: str | None = None, description: str | None = None,
                           instance_number: int | None = None,
                           slice_location: float | None = None, calling_ae: str | None = None,
                           peer: str | None = None) -> int:
        """Record a received instance and its series, committed; the instance id. An instance
        sent again replaces the earlier copy (it is classified again, counted once) and a
        completed series it belongs to goes back to 'receiving'; sent again under another series,
        it moves there, and a series it leaves empty is dropped. Free text that is not valid
        Unicode is stored with U+FFFD in its place; a UID that is not is a StoreError."""
        require_unicode(self.path, SOPInstanceUID=sop_instance_uid, StudyInstanceUID=study_uid,
                        SeriesInstanceUID=series_uid)
        now = utc_now()
        with transaction(self._db, self._lock, self.path) as db:
            # Select first: an upsert would use up an AUTOINCREMENT id per instance.
            row = db.execute("SELECT id FROM dicom_series WHERE series_uid = ?",
                             (series_uid,)).fetchone()
            if row:
                series_id = int(row[0])
                db.execute("UPDATE dicom_series SET last_received_at = ?, "
                           "state = 'receiving' WHERE id = ?", (now, series_id))
            else:
                series_id = int(db.execute(
                    "INSERT INTO dicom_series (study_uid, series_uid, patient_id, "
                    "modality, description, calling_ae, first_received_at, "
                    "last_received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (study_uid, series_uid, patient_id, modality, description, calling_ae,
                     now, now)).lastrowid)
            fields = (sop_class_uid, series_id, instance_number, slice_location,
                      spool_path, int(nbytes), sha256, now, calling_ae, peer)
            old = db.execute("SELECT id, series_id FROM dicom_instances WHERE "
                             "sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
            if old:
                db.execute(
                    "UPDATE dicom_instances SET sop_class_uid = ?, series_id = ?, "
                    "instance_number = ?, slice_location = ?, spool_path = ?, bytes = ?, "
                    "sha256 = ?, received_at = ?, calling_ae = ?, peer = ?, "
                    "state = 'received', result_id = NULL WHERE id = ?", (*fields, old[0]))
                instance_id = int(old[0])
                if int(old[1]) != series_id:
                    _moved(db, int(old[1]), series_id)
            else:
                instance_id = int(db.execute(
                    "INSERT INTO dicom_instances (sop_class_uid, series_id, instance_number, "
                    "slice_location, spool_path, bytes, sha256, received_at, calling_ae, "
                    "peer, sop_instance_uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*fields, sop_instance_uid)).lastrowid)
                db.execute("UPDATE dicom_series SET instances = instances + 1 "
                           "WHERE id = ?", (series_id,))
        return instance_id

    def pending_dicom_instances(self) -> list[dict[str, Any]]:
        """Instances received but not classified yet, oldest first (what a restart resumes)."""
        rows = self._read(
            "SELECT i.id, i.spool_path, i.sop_instance_uid, i.sop_class_uid, i.series_id, "
            "s.modality, s.series_uid FROM dicom_instances i "
            "JOIN dicom_series s ON s.id = i.series_id "
            "WHERE i.state = 'received' ORDER BY i.id")
        keys = ("id", "spool_path", "sop_instance_uid", "sop_class_uid", "series_id", "modality",
                "series_uid")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def add_dicom_result(self, instance_id: int, *, spool_path: str | None = None,
                         **result: Any) -> int | None:
        """`add` (origin 'dicom') and mark the instance classified, in one transaction; the
        result id. With `spool_path` (the copy the result was computed from) only while the
        instance still holds that copy: None, and nothing stored, once it was received again."""
        values = result_values(
            source=result["source"], origin="dicom", status=result.get("status"),
            label=result.get("label"), probabilities=result.get("probabilities"),
            reason=result.get("reason"), timings_ms=result.get("timings_ms"),
            error=result.get("error"), sha256=result.get("sha256"),
            bundle_sha256=result.get("bundle_sha256"), artifact=result.get("artifact"),
            artifact_sha256=result.get("artifact_sha256"),
            artifact_parity=result.get("artifact_parity"), heatmap=None)
        with transaction(self._db, self._lock, self.path) as db:
            if spool_path is not None and not db.execute(
                    "SELECT 1 FROM dicom_instances WHERE id = ? AND spool_path = ?",
                    (int(instance_id), spool_path)).fetchone():
                return None
            result_id = int(db.execute(INSERT_RESULT, values).lastrowid)
            db.execute("UPDATE dicom_instances SET state = 'classified', result_id = ? "
                       "WHERE id = ?", (result_id, int(instance_id)))
        return result_id

    def stable_dicom_series(self, received_before: datetime) -> list[int]:
        """Series still 'receiving' whose last instance came before the given time and whose
        instances, one at least, are all classified."""
        cutoff = utc_text(received_before)
        rows = self._read(
            "SELECT s.id FROM dicom_series s WHERE s.state = 'receiving' AND "
            "s.last_received_at <= ? AND NOT EXISTS (SELECT 1 FROM dicom_instances i WHERE "
            "i.series_id = s.id AND i.state = 'received') AND EXISTS (SELECT 1 FROM "
            "dicom_instances i WHERE i.series_id = s.id) ORDER BY s.id", (cutoff,))
        return [int(row[0]) for row in rows]

    def dicom_series_slices(self, series_id: int) -> list[dict[str, Any]]:
        """A series' instances in slice order with their results (status, label, probabilities...)."""
        rows = self._read(
            "SELECT i.id, i.sop_instance_uid, i.sop_class_uid, i.instance_number, "
            "i.slice_location, i.state, "
            "r.id, r.status, r.reason, r.label, r.confidence, r.probabilities, r.error "
            "FROM dicom_instances i LEFT JOIN results r ON r.id = i.result_id "
            "WHERE i.series_id = ? ORDER BY i.slice_location IS NULL, i.slice_location DESC, "
            "i.instance_number, i.id", (int(series_id),))
        keys = ("instance_id", "sop_instance_uid", "sop_class_uid", "instance_number",
                "slice_location", "state",
                "result_id", "status", "reason", "label", "confidence", "probabilities", "error")
        slices = [dict(zip(keys, row, strict=True)) for row in rows]
        for item in slices:
            item["probabilities"] = decode_json(item["probabilities"], self.path)
            if not math.isfinite(item["slice_location"] or 0.0):
                item["slice_location"] = None  # stored before the header check refused infinity
        return slices

    def complete_dicom_series(self, series_id: int, *, status: str | None, label: str | None,
                              probabilities: Mapping[str, float], reason: str | None,
                              aggregate: str, counts: Mapping[str, int],
                              bundle_sha256: str | None = None, report: str | None = None,
                              slices: Mapping[int, int | None] | None = None) -> bool:
        """Store a series result and mark the series 'complete' (committed); True when done.
        With `slices` (instance id -> result id: what the result was computed from) only while
        the series is 'receiving' and holds exactly those, all classified: False, and nothing
        stored, once an instance came, came again or left meanwhile (it completes later)."""
        probabilities = dict(probabilities)
        where = "id = ?" if slices is None else "id = ? AND state = 'receiving'"
        with transaction(self._db, self._lock, self.path) as db:
            if slices is not None and (None in slices.values() or dict(db.execute(
                    "SELECT id, result_id FROM dicom_instances WHERE series_id = ?",
                    (int(series_id),)).fetchall()) != dict(slices)):
                return False
            changed = db.execute(
                "UPDATE dicom_series SET state = 'complete', completed_at = ?, status = ?, "
                "reason = ?, label = ?, confidence = ?, probabilities = ?, aggregate = ?, "
                f"counts = ?, bundle_sha256 = ?, report = ? WHERE {where}",
                (utc_now(), status, reason, label, probabilities.get(label) if label else None,
                 json.dumps(probabilities), aggregate, json.dumps(dict(counts)), bundle_sha256,
                 report, int(series_id))).rowcount
        return bool(changed)

    def get_dicom_series(self, series_id: int | None = None,
                         series_uid: str | None = None) -> dict[str, Any] | None:
        """One series by id or SeriesInstanceUID."""
        column, value = ("id", series_id) if series_uid is None else ("series_uid", series_uid)
        rows = self._read(f"SELECT {', '.join(SERIES_COLUMNS)} FROM dicom_series "
                          f"WHERE {column} = ?", (value,))
        return _series_dict(rows[0], self.path) if rows else None

    def list_dicom_series(self, limit: int = 50, offset: int = 0, status: str | None = None,
                          label: str | None = None) -> list[dict[str, Any]]:
        """Series, the most recently received first; `status`/`label` filter on the series
        result exactly (a series still receiving has neither)."""
        clauses, params = [], []
        for column, value in (("status", status), ("label", label)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        limit = max(0, min(int(limit), MAX_PAGE))
        rows = self._read(f"SELECT {', '.join(SERIES_COLUMNS)} FROM dicom_series{where} "
                          "ORDER BY last_received_at DESC, id DESC LIMIT ? OFFSET ?",
                          [*params, limit, max(0, int(offset))])
        return [_series_dict(row, self.path) for row in rows]

    def dicom_series_progress(self, series_ids: list[int]) -> dict[int, dict[str, int]]:
        """Live slice counts per series, read from its instances and their results (the stored
        `counts` appear only when a series completes): slices, waiting (not classified yet),
        ok, uncertain, out_of_domain, unreadable."""
        ids = [int(i) for i in series_ids]
        if not ids:
            return {}
        rows = self._read(
            "SELECT i.series_id, COUNT(*), SUM(i.state = 'received'), "
            "SUM(r.status = 'ok'), SUM(r.status = 'uncertain'), "
            "SUM(r.status = 'out_of_domain'), SUM(i.state = 'classified' AND r.status IS NULL) "
            "FROM dicom_instances i LEFT JOIN results r ON r.id = i.result_id "
            f"WHERE i.series_id IN ({', '.join('?' * len(ids))}) GROUP BY i.series_id", ids)
        keys = ("slices", "waiting", "ok", "uncertain", "out_of_domain", "unreadable")
        progress = {i: dict.fromkeys(keys, 0) for i in ids}
        for series_id, *values in rows:
            progress[int(series_id)] = {k: int(v or 0) for k, v in zip(keys, values, strict=True)}
        return progress

    def count_dicom_series(self) -> int:
        """How many series the store holds."""
        return int(self._read("SELECT COUNT(*) FROM dicom_series")[0][0])

    def dicom_spool_path(self, sop_instance_uid: str) -> str | None:
        """The spool file of an instance's latest copy (None: never received, or removed)."""
        rows = self._read("SELECT spool_path FROM dicom_instances WHERE sop_instance_uid = ?",
                          (sop_instance_uid,))
        return rows[0][0] if rows else None

    def dicom_spool_paths(self) -> set[str]:
        """Every spool file an instance refers to."""
        rows = self._read("SELECT spool_path FROM dicom_instances WHERE spool_path IS NOT NULL")
        return {row[0] for row in rows}

    def reattach_dicom_spool(self, instance_id: int, spool_path: str) -> bool:
        """Point a received instance that has no spool file recorded at `spool_path` (committed);
        False when it has one or is classified already."""
        with transaction(self._db, self._lock, self.path) as db:
            changed = db.execute("UPDATE dicom_instances SET spool_path = ? WHERE id = ? AND "
                                 "spool_path IS NULL AND state = 'received'",
                                 (spool_path, instance_id)).rowcount
        return bool(changed)

    def claim_dicom_spool_over(self, max_bytes: int) -> list[str]:
        """Detach from their instances the spool files of classified instances, oldest received
        first (an instance received again counts from its latest copy),
        that take the spool past `max_bytes`, and return them for the caller to delete
        (committed; their results stay). One transaction: an instance received again meanwhile
        either comes before (not classified, kept) or after (its new copy is not claimed)."""
        with transaction(self._db, self._lock, self.path) as db:
            rows = db.execute("SELECT id, spool_path, bytes, state FROM dicom_instances "
                              "WHERE spool_path IS NOT NULL "
                              "ORDER BY received_at DESC, id DESC").fetchall()
            total, over = 0, []
            for instance_id, path, nbytes, state in rows:
                total += int(nbytes or 0)
                if total > max_bytes and state == "classified":
                    over.append((int(instance_id), path))
            db.executemany("UPDATE dicom_instances SET spool_path = NULL WHERE id = ?",
                           [(instance_id,) for instance_id, _ in over])
        return [path for _, path in reversed(over)]
