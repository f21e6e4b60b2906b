"""The Storage SCP: receive, record, acknowledge; classify from a queue; complete stable series.

Order of work for each C-STORE (so that an acknowledged instance is never lost):
pynetdicom streams the dataset to a file in `<data>/spool/.incoming` (never the whole dataset in
memory) -> the handler fsyncs it and renames it into `<data>/spool/<series>/<instance>.<copy>.dcm`
(a name of its own for every copy received) -> records it in the store (committed,
synchronous=FULL) -> answers 0x0000. A worker thread takes copies from a queue and classifies
them; a monitor thread completes a series once no instance came for `stable_seconds` and every
instance is classified. A restart puts what was received but not classified back on the queue.

A spool file is deleted only once no instance refers to it: the earlier copy of an instance
received again, or a copy that retention has first detached from its instance in the store. A
result is stored only for the copy its instance holds, so a superseded copy's result never stands
for a newer one. A crash between those steps leaves a file no instance refers to; housekeeping
removes it once it is older than ABANDONED_AFTER.

pynetdicom's chunked receiving is a process-wide setting, and its temporary files go to the
process's temporary folder (pynetdicom has no per-association way to choose either), so the node
sets both while it runs and restores them when it stops: one node per process at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..errors import InputError, one_line
from ..files import fsync_dir
from ..store import Store, StoreError
from .admission import refusal
from .config import NodeConfig
from .contexts import (
    VERIFICATION,
    accepted_modalities,
    decodable_transfer_syntaxes,
    storage_classes,
)
from .header import read_header
from .report import build_report, forward_report, remove_report, save_report
from .series import aggregate

log = logging.getLogger("ct_edge.listen")

SPOOL = "spool"
INCOMING = ".incoming"
REPORTS = "reports"
DEFLATED = "1.2.840.10008.1.2.1.99"
# A file this old that nothing refers to was abandoned (a transfer or a crash cut it off); younger
# ones may belong to a transfer in progress.
ABANDONED_AFTER = 600.0
# DIMSE status codes (PS3.4 Annex B.2.3, PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _safe_name(uid: str) -> str:
    """A UID as a file name; anything but a well-formed UID is hashed (names come off the wire)."""
    return uid if _UID.match(uid) and len(uid) <= 64 else hashlib.sha256(uid.encode()).hexdigest()


class Node:
    """A DICOM Storage SCP that classifies what it receives (one per process)."""

    def __init__(self, config: NodeConfig, classifier: Any, store: Store) -> None:
        self.config = config
        self.classifier = classifier
        self.store = store
        self.spool = config.data_dir / SPOOL
        self.incoming = self.spool / INCOMING
        self.modalities = accepted_modalities(classifier.bundle.modality)
        self.sop_classes = storage_classes(classifier.bundle.modality)
        self.transfer_syntaxes = decodable_transfer_syntaxes()
        self.bundle_sha256 = classifier.bundle.manifest_sha256  # the manifest that was loaded
        self._queue: queue.Queue[dict | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._associations: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        # Finding an instance's earlier copy and recording its new one are one step: two
        # associations delivering the same instance at once must not both take the same
        # earlier copy for theirs.
        self._recording = threading.Lock()
        self._server: Any = None
        self._saved_globals: tuple[bool, str | None] | None = None
        self.address: tuple[str, int] = (config.host, config.port)

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a previous run left, start the listener and the worker (non-blocking).
        OSError when the spool cannot be used (its `filename` set) or the port cannot be bound."""
        self.incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.incoming.iterdir():  # never acknowledged: the sender resends them
            leftover.unlink(missing_ok=True)
        self._set_globals()
        try:
            self._start()
        except BaseException:
            self._restore_globals()
            raise

    def _set_globals(self) -> None:
        """Stream received datasets to files in the spool's `.incoming` (remembering what was set)."""
        from pynetdicom import _config

        if self._saved_globals is None:
            self._saved_globals = (_config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir)
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.incoming)  # same file system as the spool: rename, not copy

    def _restore_globals(self) -> None:
        """Put back the process-wide settings `_set_globals` changed."""
        from pynetdicom import _config

        if self._saved_globals is not None:
            _config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir = self._saved_globals
            self._saved_globals = None

    def _start(self) -> None:
        from pynetdicom import AE, evt

        pending = self.store.pending_dicom_instances()
        self._reattach_unnamed_copies(pending)
        self._remove_unreferenced()
        for item in pending:
            if item["spool_path"] is None:  # an older version's retention removed its file
                self.classify(item)  # recorded unreadable now, before any copy can come again
            else:
                self._queue.put(item)
        if pending:
            log.info("resuming: %d received instances not classified yet", len(pending))
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = 16
        ae.maximum_pdu_size = 0  # no limit: a sender may use its largest PDUs
        ae.add_supported_context(VERIFICATION)
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class, self.transfer_syntaxes)
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_RELEASED, self._on_closed), (evt.EVT_ABORTED, self._on_closed),
                    (evt.EVT_C_ECHO, lambda event: SUCCESS), (evt.EVT_C_STORE, self._on_store)]
        # Bound before the threads start: a port in use leaves nothing running.
        self._server = ae.start_server((self.config.host, self.config.port), block=False,
                                       evt_handlers=handlers, ssl_context=self.config.ssl_context)
        self.address = self._server.server_address[:2]
        for target, name in ((self._work, "classify"), (self._monitor, "series")):
            thread = threading.Thread(target=target, name=f"ct-edge-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop listening (open associations are closed), finish the slice being classified; what
        is still queued stays 'received' in the store for the next start."""
        if self._server is not None:
            # Closing the server waits for every association thread: end them first (a sender
            # resends what was not acknowledged).
            for assoc in self._server.ae.active_associations:
                assoc.abort()
            self._server.shutdown()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._restore_globals()

    # --- associations ----------------------------------------------------------------------------

    def _on_requested(self, event: Any) -> None:
        peer = event.assoc.requestor
        why = refusal(self.config, peer.primitive.calling_ae_title.strip(),
                      peer.primitive.called_ae_title.strip(), peer.address, self.spool)
        if why is None:
            return
        log.warning("association from %s@%s:%s rejected: %s", peer.primitive.calling_ae_title,
                    peer.address, peer.port, why.why)
        event.assoc.acse.send_reject(why.result, why.source, why.diagnostic)
        event.assoc.kill()  # as pynetdicom's own rejections do: waits until the A-ASSOCIATE-RJ is out

    def _on_accepted(self, event: Any) -> None:
        peer = event.assoc.requestor
        with self._lock:
            self._associations[id(event.assoc)] = {"start": time.monotonic(), "stored": 0,
                                                   "failed": 0, "bytes": 0}
        accepted = len(event.assoc.accepted_contexts)
        log.info("association from %s@%s:%s accepted (%d presentation contexts, %d refused)%s",
                 peer.primitive.calling_ae_title.strip(), peer.address, peer.port, accepted,
                 len(event.assoc.rejected_contexts), " over TLS" if self.config.ssl_context else "")

    def _on_closed(self, event: Any) -> None:
        with self._lock:
            counts = self._associations.pop(id(event.assoc), None)
        if counts is None:
            return
        peer = event.assoc.requestor
        how = "released" if event.event.name == "EVT_RELEASED" else "aborted"
        log.info("association from %s@%s:%s %s after %.1f s: %d stored (%.1f MB), %d failed",
                 peer.primitive.calling_ae_title.strip(), peer.address, peer.port, how,
                 time.monotonic() - counts["start"], counts["stored"], counts["bytes"] / 1e6,
                 counts["failed"])

    def _count(self, event: Any, key: str, amount: int = 1) -> None:
        with self._lock:
            counts = self._associations.get(id(event.assoc))
            if counts is not None:
                counts[key] += amount

    # --- C-STORE ---------------------------------------------------------------------------------

    def _on_store(self, event: Any) -> int:
        """Spool, record, then acknowledge (0x0000 only once the instance is on disk and recorded);
        a failure status, never an exception, for anything else. Runs in the association's thread."""
        peer = event.assoc.requestor
        calling = peer.primitive.calling_ae_title.strip()
        try:
            return self._store(event, calling)
        except Exception as exc:  # a bug: the sender gets a failure (and resends), not a dropped PDU
            log.exception("C-STORE from %s failed (0x%04X)", calling, CANNOT_UNDERSTAND)
            self._record_failure(f"{calling}@{peer.address}", f"internal error ({one_line(exc)})")
            self._count(event, "failed")
            return CANNOT_UNDERSTAND

    def _store(self, event: Any, calling: str) -> int:
        """`_on_store` for the failures it expects: their status codes."""
        received = Path(event.dataset_path)
        peer = event.assoc.requestor
        try:
            nbytes = received.stat().st_size
            if shutil.disk_usage(self.spool).free - nbytes < self.config.min_free_bytes:
                log.warning("out of disk space: refusing an instance from %s (0xA700)", calling)
                self._count(event, "failed")
                return OUT_OF_RESOURCES
            header = read_header(received, str(event.context.transfer_syntax) == DEFLATED,
                                 str(event.request.AffectedSOPClassUID),
                                 str(event.request.AffectedSOPInstanceUID))
        except InputError as exc:
            log.warning("unusable dataset from %s: %s", calling, exc.problem)
            self._record_failure(f"{calling}@{peer.address}", exc.problem)
            self._count(event, "failed")
            return CANNOT_UNDERSTAND
        except OSError as exc:  # the received file or the spool's disk cannot be read
            log.error("cannot keep an instance from %s (0xA700): %s", calling, one_line(exc))
            self._count(event, "failed")
            return OUT_OF_RESOURCES
        try:
            item = self.keep(received, header, calling=calling, peer=f"{peer.address}:{peer.port}")
        except (OSError, StoreError) as exc:
            log.error("cannot keep an instance from %s (0xA700): %s", calling, one_line(exc))
            self._count(event, "failed")
            return OUT_OF_RESOURCES
        self._queue.put(item)
        self._count(event, "stored")
        self._count(event, "bytes", nbytes)
        return SUCCESS

    def keep(self, received: Path, header: dict[str, Any], calling: str, peer: str) -> dict[str, Any]:
        """Make a received file durable in the spool and record it (committed); its queue item.
        The copy an earlier receipt of the instance left is removed once this one is recorded.
        OSError or StoreError when it cannot be kept: then nothing of it is."""
        # A name of its own for every copy: a copy received again never lands on a file that
        # retention or the removal of a superseded copy is about to delete.
        final = self.spool / _safe_name(header["SeriesInstanceUID"]) / \
            f"{_safe_name(header['SOPInstanceUID'])}.{uuid.uuid4().hex}.dcm"
        item = {"spool_path": str(final.relative_to(self.config.data_dir)),
                "sop_instance_uid": header["SOPInstanceUID"],
                "sop_class_uid": header["SOPClassUID"], "modality": header["Modality"]}
        try:
            nbytes = received.stat().st_size
            self._install(received, final)
            with self._recording:
                earlier = self.store.dicom_spool_path(header["SOPInstanceUID"])
                item["id"] = self.store.add_dicom_instance(
                    sop_instance_uid=header["SOPInstanceUID"], sop_class_uid=header["SOPClassUID"],
                    study_uid=header["StudyInstanceUID"], series_uid=header["SeriesInstanceUID"],
                    spool_path=item["spool_path"], nbytes=nbytes, modality=header["Modality"],
                    patient_id=header["PatientID"], description=header["SeriesDescription"],
                    instance_number=header["InstanceNumber"],
                    slice_location=header["SliceLocation"], calling_ae=calling, peer=peer)
        except BaseException:  # whatever failed, nothing refers to the file and nothing is answered
            with contextlib.suppress(OSError):
                final.unlink(missing_ok=True)
            raise
        if earlier is not None:
            self._remove_spool_file(earlier)
        return item

    def _install(self, received: Path, final: Path) -> None:
        """Make the received file durable under its final name (atomic)."""
        new_folder = not final.parent.exists()
        final.parent.mkdir(parents=True, exist_ok=True)
        if new_folder:
            fsync_dir(self.spool)
        with open(received, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.replace(received, final)
        except OSError:  # another file system (the temporary folder was moved): copy
            tmp = final.with_name(f".{final.name}.tmp")
            shutil.copyfile(received, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        fsync_dir(final.parent)

    def _record_failure(self, source: str, problem: str) -> None:
        try:
            self.store.add(source=source, origin="dicom", status=None, error=problem,
                           bundle_sha256=self.bundle_sha256)
        except StoreError as exc:
            log.error("%s", exc)

    # --- classification --------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is not None:
                self.classify(item)

    def classify(self, item: dict[str, Any]) -> None:
        """Classify one spooled copy and store its result, unless the instance was received again
        meanwhile: then the newer copy's own item stores its result (never raises)."""
        result = self._classification(item)
        try:
            stored = self.store.add_dicom_result(item["id"], spool_path=item["spool_path"],
                                                 **result)
        except StoreError as exc:
            log.error("%s", exc)
            return
        if stored is None:
            log.info("instance %s was received again: the newer copy is classified instead",
                     item["sop_instance_uid"])

    def _classification(self, item: dict[str, Any]) -> dict[str, Any]:
        """The results row of one spooled copy: the classifier's answer (its header check and
        domain gate decide what is out of domain), or why there is none."""
        artifact = self.classifier.artifact
        result: dict[str, Any] = {"source": f"dicom {item['sop_instance_uid']}",
                                  "bundle_sha256": self.bundle_sha256, "artifact": artifact.name,
                                  "artifact_sha256": artifact.sha256, "artifact_parity": artifact.status}
        try:
            if item["spool_path"] is None:
                raise FileNotFoundError("no spool file recorded")
            data = (self.config.data_dir / item["spool_path"]).read_bytes()
            result["sha256"] = hashlib.sha256(data).hexdigest()
            prediction = self.classifier.predict(data)
            result.update(status=prediction.status, label=prediction.label,
                          probabilities=prediction.probabilities, reason=prediction.reason,
                          timings_ms=prediction.timings_ms)
        except InputError as exc:
            result.update(status=None, error=exc.problem)
        except OSError as exc:
            result.update(status=None, error=f"spool file unreadable ({one_line(exc)})")
        except Exception as exc:  # a bug must not leave the series waiting forever
            log.exception("classifying %s failed", item["spool_path"])
            result.update(status=None, error=f"internal error ({one_line(exc)})")
        return result

    # --- series ----------------------------------------------------------------------------------

    def _monitor(self) -> None:
        poll = min(1.0, max(0.05, self.config.stable_seconds / 10))
        last_housekeeping = 0.0
        housekeeping_every = max(1.0, min(10.0, self.config.stable_seconds))
        while not self._stop.wait(poll):
            try:
                cutoff = datetime.now(timezone.utc) - timedelta(seconds=self.config.stable_seconds)
                for series_id in self.store.stable_dicom_series(cutoff):
                    self.complete_series(series_id)
                if time.monotonic() - last_housekeeping > housekeeping_every:
                    last_housekeeping = time.monotonic()
                    self._housekeeping()
            except Exception:  # keep the node alive; the next poll retries
                log.exception("series monitor")

    def complete_series(self, series_id: int) -> dict[str, Any] | None:
        """Aggregate a series' slices, write its report, store the result and forward it; None,
        with nothing kept, when the series is gone or an instance came meanwhile (its next
        completion includes it)."""
        series = self.store.get_dicom_series(series_id)
        slices = self.store.dicom_series_slices(series_id)
        if series is None or not slices or any(s["result_id"] is None for s in slices):
            return None
        result = aggregate(slices, self.classifier.labels, self.config.aggregate,
                           self.classifier.bundle.uncertain_below, self.classifier.no_gate_reason)
        series.update(status=result.status, label=result.label, reason=result.reason,
                      probabilities=result.probabilities, aggregate=result.aggregate,
                      counts=result.counts)
        report = self._report(series, slices) if self.config.reports else None
        completed = self.store.complete_dicom_series(
            series_id, status=result.status, label=result.label,
            probabilities=result.probabilities, reason=result.reason, aggregate=result.aggregate,
            counts=result.counts, bundle_sha256=self.bundle_sha256,
            report=report.name if report else None,
            slices={s["instance_id"]: s["result_id"] for s in slices})
        if not completed:
            if report is not None:
                remove_report(report)
            log.info("series %s changed while it was completed: it completes later",
                     series["series_uid"])
            return None
        shown = f"{result.label} {result.probabilities[result.label]:.2f}" if result.label else "-"
        log.info("series %s complete: %s (%s) from %d slices: %s", series["series_uid"], shown,
                 result.status or "unreadable", result.counts["slices"],
                 ", ".join(f"{k} {v}" for k, v in result.counts.items() if k != "slices"))
        if report is not None and self.config.forward is not None:
            self._forward(report)
        return self.store.get_dicom_series(series_id)

    def _report(self, series: dict[str, Any], slices: list[dict[str, Any]]) -> Path | None:
        """The series' Basic Text SR in `<data>/reports/`, or None when it cannot be written."""
        try:
            instances = [(s["sop_class_uid"] or "", s["sop_instance_uid"]) for s in slices]
            ds = build_report(series, instances, self.bundle_sha256, self.classifier.artifact)
            return save_report(ds, self.config.data_dir / REPORTS)
        except Exception as exc:  # the series result is stored anyway; the report is extra
            log.error("cannot write the report of series %s: %s", series["series_uid"],
                      one_line(exc))
            return None

    def _forward(self, path: Path) -> None:
        forward_report(path, self.config.forward, self.config.ae_title)

    def _housekeeping(self) -> None:
        """Spool retention, and temporary files of transfers that were aborted."""
        self.retain_spool()
        self._remove_unreferenced()
        horizon = time.time() - ABANDONED_AFTER
        for leftover in self.incoming.iterdir():
            try:
                if leftover.stat().st_mtime < horizon:
                    leftover.unlink()
            except OSError:
                pass

    def retain_spool(self) -> None:
        """Remove the oldest classified copies past `spool_max_bytes` (their results stay)."""
        if self.config.spool_max_bytes is None:
            return
        # Detached from their instances first (committed): a copy received meanwhile has a
        # file of its own, and a crash before the removal leaves only a file nothing refers to.
        claimed = self.store.claim_dicom_spool_over(self.config.spool_max_bytes)
        for relative in claimed:
            self._remove_spool_file(relative)
        if claimed:
            log.info("retention: removed %d spool files", len(claimed))

    def _remove_spool_file(self, relative: str) -> None:
        """Delete a spool file that no instance refers to any more (already gone is fine)."""
        try:
            (self.config.data_dir / relative).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", relative, one_line(exc))

    def _reattach_unnamed_copies(self, pending: list[dict[str, Any]]) -> None:
        """Received instances with no spool file recorded whose copy is still on disk under the
        name an older version gave it (`<series>/<instance>.dcm`): its retention deleted a file
        and then forgot it, and a copy received in between took that name. Kept, not lost; the
        items of `pending` are updated to match the store."""
        for item in pending:
            if item["spool_path"] is not None:
                continue
            copy = self.spool / _safe_name(item["series_uid"]) / \
                f"{_safe_name(item['sop_instance_uid'])}.dcm"
            relative = str(copy.relative_to(self.config.data_dir))
            if copy.is_file() and self.store.reattach_dicom_spool(item["id"], relative):
                item["spool_path"] = relative
                log.info("instance %s: its copy %s is kept", item["sop_instance_uid"], copy.name)

    def _remove_unreferenced(self) -> None:
        """Remove spool files no instance refers to, left by a crash between spooling a copy and
        recording it, or between detaching a copy and deleting it (at start and in housekeeping)."""
        referenced = self.store.dicom_spool_paths()
        # A younger file may be a copy this node is between spooling and recording.
        horizon = time.time() - ABANDONED_AFTER
        removed = 0
        for path in self.spool.glob("*/*"):
            if path.parent == self.incoming or \
                    str(path.relative_to(self.config.data_dir)) in referenced:
                continue
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < horizon:
                    path.unlink()
                    removed += 1
        if removed:
            log.info("removed %d spool files no instance refers to", removed)
