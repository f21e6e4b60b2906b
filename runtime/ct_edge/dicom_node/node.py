"""The Storage SCP: receive, record, acknowledge; classify from a queue; complete stable series.

Order of work for each C-STORE (so that an acknowledged instance is never lost):
pynetdicom streams the dataset to a file in `<data>/spool/.incoming` (never the whole dataset in
memory) -> the handler fsyncs it and renames it into `<data>/spool/<series>/<instance>.dcm` ->
records it in the store (committed, synchronous=FULL) -> answers 0x0000. A worker thread takes
instances from a queue and classifies them; a monitor thread completes a series once no instance
came for `stable_seconds` and every instance is classified. A restart puts what was received but
not classified back on the queue.

pynetdicom's chunked receiving is a process-wide setting, and its temporary files go to the
process's temporary folder, so the node sets both: one node per process.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..errors import InputError, one_line
from ..limits import MAX_FILE_BYTES
from ..store import Store, StoreError, bundle_identity
from .config import NodeConfig
from .contexts import (
    NEUTRAL_MODALITIES,
    VERIFICATION,
    bundle_modalities,
    decodable_transfer_syntaxes,
    storage_classes,
)
from .report import BASIC_TEXT_SR, build_report, save_report
from .series import aggregate

log = logging.getLogger("ct_edge.listen")

SPOOL = "spool"
INCOMING = ".incoming"
REPORTS = "reports"
DEFLATED = "1.2.840.10008.1.2.1.99"
# DIMSE status codes (PS3.4 Annex B.2.3, PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_HEADER_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                "Modality", "PatientID", "SeriesDescription", "InstanceNumber", "SliceLocation",
                "ImagePositionPatient")


def _safe_name(uid: str) -> str:
    """A UID as a file name; anything but a well-formed UID is hashed (names come off the wire)."""
    return uid if _UID.match(uid) and len(uid) <= 64 else hashlib.sha256(uid.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _number(kind: type, value: Any) -> Any:
    """An optional attribute's value as `kind`; None when absent or malformed (it only orders
    slices, so a bad value must not refuse the dataset)."""
    try:
        return kind(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None


def _check_inflated_size(path: Path, limit: int = MAX_FILE_BYTES) -> None:
    """A deflated dataset must not inflate past `limit` (pydicom would inflate it in memory)."""
    with open(path, "rb") as handle:
        head = handle.read(144)
        if len(head) < 144 or head[128:132] != b"DICM":
            return
        # pynetdicom writes the file meta group starting with its group length (UL, 12 bytes).
        handle.seek(144 + int.from_bytes(head[140:144], "little"))
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while chunk := handle.read(1 << 20):
            pending = inflater.decompress(chunk, 1 << 20)
            while pending:
                total += len(pending)
                if total > limit:
                    raise InputError(str(path), f"deflated dataset inflates to over {limit} bytes")
                pending = inflater.decompress(inflater.unconsumed_tail, 1 << 20)


class Node:
    """A DICOM Storage SCP that classifies what it receives (one per process)."""

    def __init__(self, config: NodeConfig, classifier: Any, store: Store) -> None:
        self.config = config
        self.classifier = classifier
        self.store = store
        self.spool = config.data_dir / SPOOL
        self.incoming = self.spool / INCOMING
        self.modalities = bundle_modalities(classifier.bundle.manifest)
        self.sop_classes = storage_classes(self.modalities)
        self.transfer_syntaxes = decodable_transfer_syntaxes()
        self.bundle_sha256 = bundle_identity(classifier.bundle.root)
        self._queue: queue.Queue[dict | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._associations: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self.address: tuple[str, int] = (config.host, config.port)

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a previous run left, start the worker and the listener (non-blocking)."""
        from pynetdicom import AE, _config, evt

        self.incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.incoming.iterdir():  # never acknowledged: the sender resends them
            leftover.unlink(missing_ok=True)
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.incoming)  # same file system as the spool: rename, not copy
        pending = self.store.pending_dicom_instances()
        for item in pending:
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
        for target, name in ((self._work, "classify"), (self._monitor, "series")):
            thread = threading.Thread(target=target, name=f"ct-edge-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._server = ae.start_server((self.config.host, self.config.port), block=False,
                                       evt_handlers=handlers, ssl_context=self.config.ssl_context)
        self.address = self._server.server_address[:2]

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

    # --- associations ----------------------------------------------------------------------------

    def _reject(self, event: Any, why: str, result: int, source: int, diagnostic: int) -> None:
        peer = event.assoc.requestor
        log.warning("association from %s@%s:%s rejected: %s", peer.primitive.calling_ae_title,
                    peer.address, peer.port, why)
        event.assoc.acse.send_reject(result, source, diagnostic)
        event.assoc.kill()  # as pynetdicom's own rejections do: waits until the A-ASSOCIATE-RJ is out

    def _on_requested(self, event: Any) -> None:
        primitive = event.assoc.requestor.primitive
        calling, called = primitive.calling_ae_title.strip(), primitive.called_ae_title.strip()
        address = event.assoc.requestor.address
        if called != self.config.ae_title:
            return self._reject(event, f"called AE title {called!r} is not {self.config.ae_title!r}",
                                0x01, 0x01, 0x07)
        if self.config.allow_ae and calling not in self.config.allow_ae:
            return self._reject(event, f"calling AE title {calling!r} is not allowed", 0x01, 0x01, 0x03)
        if self.config.networks and not any(ipaddress.ip_address(address) in network
                                            for network in self.config.networks):
            return self._reject(event, f"address {address} is not allowed", 0x01, 0x01, 0x01)
        if shutil.disk_usage(self.spool).free < self.config.min_free_bytes:
            return self._reject(event, "low disk space", 0x02, 0x03, 0x02)
        return None

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
        """Spool, record, then acknowledge. Runs in the association's thread."""
        received = Path(event.dataset_path)
        peer = event.assoc.requestor
        calling = peer.primitive.calling_ae_title.strip()
        try:
            nbytes = received.stat().st_size
            if shutil.disk_usage(self.spool).free - nbytes < self.config.min_free_bytes:
                log.warning("out of disk space: refusing an instance from %s (0xA700)", calling)
                self._count(event, "failed")
                return OUT_OF_RESOURCES
            header = self._read_header(received, event)
        except InputError as exc:
            log.warning("unusable dataset from %s: %s", calling, exc.problem)
            self._record_failure(f"{calling}@{peer.address}", exc.problem)
            self._count(event, "failed")
            return CANNOT_UNDERSTAND
        except OSError as exc:  # the received file or the spool's disk cannot be read
            log.error("cannot keep an instance from %s (0xA700): %s", calling, one_line(exc))
            self._count(event, "failed")
            return OUT_OF_RESOURCES
        final = self.spool / _safe_name(header["SeriesInstanceUID"]) / \
            f"{_safe_name(header['SOPInstanceUID'])}.dcm"
        try:
            self._install(received, final)
            item = {"spool_path": str(final.relative_to(self.config.data_dir)),
                    "sop_instance_uid": header["SOPInstanceUID"],
                    "sop_class_uid": header["SOPClassUID"], "modality": header["Modality"]}
            item["id"] = self.store.add_dicom_instance(
                sop_instance_uid=header["SOPInstanceUID"], sop_class_uid=header["SOPClassUID"],
                study_uid=header["StudyInstanceUID"], series_uid=header["SeriesInstanceUID"],
                spool_path=item["spool_path"], nbytes=nbytes, modality=header["Modality"],
                patient_id=header["PatientID"], description=header["SeriesDescription"],
                instance_number=header["InstanceNumber"], slice_location=header["SliceLocation"],
                calling_ae=calling, peer=f"{peer.address}:{peer.port}")
        except (OSError, StoreError) as exc:
            log.error("cannot keep an instance from %s (0xA700): %s", calling, one_line(exc))
            self._count(event, "failed")
            return OUT_OF_RESOURCES
        self._queue.put(item)
        self._count(event, "stored")
        self._count(event, "bytes", nbytes)
        return SUCCESS

    def _read_header(self, path: Path, event: Any) -> dict[str, Any]:
        """The identifiers of a received dataset; InputError when it cannot be parsed."""
        import pydicom
        from pydicom.multival import MultiValue

        try:
            if str(event.context.transfer_syntax) == DEFLATED:
                _check_inflated_size(path)
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
            header: dict[str, Any] = {}
            for tag in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                        "Modality", "PatientID", "SeriesDescription"):
                value = ds.get(tag)
                header[tag] = str(value).strip() if value is not None else ""
            header["SOPClassUID"] = header["SOPClassUID"] or str(event.request.AffectedSOPClassUID)
            header["SOPInstanceUID"] = (header["SOPInstanceUID"]
                                        or str(event.request.AffectedSOPInstanceUID))
            header["InstanceNumber"] = _number(int, ds.get("InstanceNumber"))
            position = ds.get("ImagePositionPatient")
            header["SliceLocation"] = _number(float, ds.get("SliceLocation"))
            if header["SliceLocation"] is None and isinstance(position, MultiValue) \
                    and len(position) == 3:
                header["SliceLocation"] = _number(float, position[2])
        except InputError:
            raise
        except Exception as exc:  # pydicom raises many unrelated types for damaged data
            raise InputError(str(path), f"cannot parse the dataset ({one_line(exc)})") from None
        for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if not header[tag]:
                raise InputError(str(path), f"the dataset has no {tag}")
        header["Modality"] = header["Modality"].upper()
        return header

    def _install(self, received: Path, final: Path) -> None:
        """Make the received file durable under its final name (atomic)."""
        new_folder = not final.parent.exists()
        final.parent.mkdir(parents=True, exist_ok=True)
        if new_folder:
            _fsync_dir(self.spool)
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
        _fsync_dir(final.parent)

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
                self._classify(item)

    def _classify(self, item: dict[str, Any]) -> None:
        """Classify one spooled instance and store its result (never raises)."""
        path = self.config.data_dir / item["spool_path"]
        result: dict[str, Any] = {"source": f"dicom {item['sop_instance_uid']}",
                                  "bundle_sha256": self.bundle_sha256,
                                  "artifact": self.classifier.artifact.name,
                                  "artifact_sha256": self.classifier.artifact.sha256}
        modality = item.get("modality") or ""
        try:
            data = path.read_bytes()
            result["sha256"] = hashlib.sha256(data).hexdigest()
            if modality not in self.modalities and modality not in NEUTRAL_MODALITIES:
                result.update(status="out_of_domain", reason=f"modality {modality or 'missing'}; "
                              f"this bundle accepts {', '.join(self.modalities)}")
            else:
                prediction = self.classifier.predict(data)
                result.update(status=prediction.status, label=prediction.label,
                              probabilities=prediction.probabilities, reason=prediction.reason,
                              timings_ms=prediction.timings_ms)
        except InputError as exc:
            result.update(status=None, error=exc.problem)
        except OSError as exc:
            result.update(status=None, error=f"spool file unreadable ({one_line(exc)})")
        except Exception as exc:  # a bug must not leave the series waiting forever
            log.exception("classifying %s failed", path)
            result.update(status=None, error=f"internal error ({one_line(exc)})")
        try:
            self.store.add_dicom_result(item["id"], **result)
        except StoreError as exc:
            log.error("%s", exc)

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
        """Aggregate a series' slices, write its report, store the result and forward it."""
        series = self.store.get_dicom_series(series_id)
        if series is None:
            return None
        slices = self.store.dicom_series_slices(series_id)
        result = aggregate(slices, self.classifier.labels, self.config.aggregate,
                           self.classifier.bundle.uncertain_below)
        series.update(status=result.status, label=result.label, reason=result.reason,
                      probabilities=result.probabilities, aggregate=result.aggregate,
                      counts=result.counts)
        report = self._report(series, slices) if self.config.reports else None
        self.store.complete_dicom_series(
            series_id, status=result.status, label=result.label,
            probabilities=result.probabilities, reason=result.reason, aggregate=result.aggregate,
            counts=result.counts, bundle_sha256=self.bundle_sha256,
            report=report.name if report else None)
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
            ds = build_report(series, instances, self.bundle_sha256, self.classifier.artifact.name)
            return save_report(ds, self.config.data_dir / REPORTS)
        except Exception as exc:  # the series result is stored anyway; the report is extra
            log.error("cannot write the report of series %s: %s", series["series_uid"],
                      one_line(exc))
            return None

    def _forward(self, path: Path) -> None:
        from pynetdicom import AE

        target = self.config.forward
        ae = AE(ae_title=self.config.ae_title)
        ae.add_requested_context(BASIC_TEXT_SR, "1.2.840.10008.1.2.1")
        try:
            assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
            if not assoc.is_established:
                log.error("forward to %s@%s:%d: association not established", target.ae_title,
                          target.host, target.port)
                return
            status = assoc.send_c_store(path)
            assoc.release()
            code = getattr(status, "Status", None)
            log.info("report %s forwarded to %s@%s:%d: status 0x%04X", path.name, target.ae_title,
                     target.host, target.port, code if code is not None else 0xFFFF)
        except Exception as exc:  # a network error must not stop the node
            log.error("forward to %s: %s", target.ae_title, one_line(exc))

    def _housekeeping(self) -> None:
        """Spool retention, and temporary files of transfers that were aborted."""
        if self.config.spool_max_bytes is not None:
            over = self.store.dicom_spool_over(self.config.spool_max_bytes)
            for _, relative in over:
                (self.config.data_dir / relative).unlink(missing_ok=True)
            if over:
                self.store.forget_dicom_spool([instance_id for instance_id, _ in over])
                log.info("retention: removed %d spool files", len(over))
        horizon = time.time() - 600
        for leftover in self.incoming.iterdir():
            try:
                if leftover.stat().st_mtime < horizon:
                    leftover.unlink()
            except OSError:
                pass

