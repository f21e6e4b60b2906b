"""A series result as a DICOM Basic Text SR: what `ct-edge listen` saves and can forward.

The document carries the label, the probabilities, the slice counts and the bundle's identity as
TEXT items under a container (and the parity warning of an artifact that missed its parity
check), references every instance it was computed from, is UNVERIFIED, and says in its series
description and its first item that it is not for diagnostic use.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import DISCLAIMER, __version__
from ..errors import one_line
from ..files import fsync_dir

if TYPE_CHECKING:
    from ..bundle import Artifact

log = logging.getLogger("ct_edge.listen")

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SERIES_DESCRIPTION = "ct-edge research result - not for diagnostic use"
_SCHEME = "99CTEDGE"  # private coding scheme: no standard code says "research classifier output"


def _code(value: str, meaning: str):
    from pydicom.dataset import Dataset

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, _SCHEME, meaning
    return code


def _text(value: str, meaning: str, text: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = [_code(value, meaning)]
    item.TextValue = text[:1024]
    return item


def build_report(series: dict[str, Any], instances: Sequence[tuple[str, str]],
                 bundle_sha256: str | None, artifact: Artifact | None):
    """The SR dataset for a stored series (a `Store.get_dicom_series` dict) and its instances
    as (SOP class UID, SOP instance UID); `artifact` is the one that answered. When it did not
    pass its parity check, an item after the disclaimer says so in `parity_warning`'s words."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    now = dt.datetime.now(dt.timezone.utc)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, sop_uid
    ds.StudyInstanceUID = series["study_uid"]
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesNumber, ds.InstanceNumber = 9901, 1
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.PatientID = series.get("patient_id") or ""
    ds.PatientName = ""
    ds.PatientBirthDate = ds.PatientSex = ds.ReferringPhysicianName = ds.AccessionNumber = ""
    ds.StudyID = ""
    ds.StudyDate = ds.StudyTime = ""
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.Manufacturer = "ct-edge"
    ds.SoftwareVersions = __version__
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = [_code("CTE001", "ct-edge research classification")]
    counts = series.get("counts") or {}
    probabilities = series.get("probabilities") or {}
    warning = artifact.parity_warning if artifact is not None else None
    items = [_text("CTE002", "Disclaimer", DISCLAIMER),
             # Before the label it qualifies: a reader of the report sees nothing else of the run.
             *([_text("CTE010", "Parity warning", warning)] if warning else []),
             _text("CTE003", "Series label", series.get("label") or "none"),
             _text("CTE004", "Status", f"{series.get('status')}"
                   + (f": {series['reason']}" if series.get("reason") else "")),
             _text("CTE005", "Probabilities",
                   "; ".join(f"{label} {p:.3f}" for label, p in probabilities.items()) or "none"),
             _text("CTE006", "Aggregation", f"{series.get('aggregate')}, k={counts.get('k', 0)}"),
             _text("CTE007", "Slices", ", ".join(f"{key} {value}" for key, value in counts.items()
                                                 if key != "k")),
             _text("CTE008", "Bundle", f"manifest sha256 {bundle_sha256 or 'unknown'}, "
                                       f"artifact {artifact.name if artifact else 'unknown'}"),
             _text("CTE009", "Source series", series["series_uid"])]
    ds.ContentSequence = items
    referenced = Dataset()
    referenced.StudyInstanceUID = series["study_uid"]
    series_item = Dataset()
    series_item.SeriesInstanceUID = series["series_uid"]
    sops = []
    for class_uid, instance_uid in instances:
        sop = Dataset()
        sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = class_uid, instance_uid
        sops.append(sop)
    series_item.ReferencedSOPSequence = sops
    referenced.ReferencedSeriesSequence = [series_item]
    ds.CurrentRequestedProcedureEvidenceSequence = [referenced]
    return ds


def save_report(ds, folder: Path) -> Path:
    """Write the SR atomically and durably as `<folder>/<SOPInstanceUID>.dcm` (the store names
    it); a failed write leaves no temporary file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    tmp = folder / f".{path.name}.tmp"
    try:
        ds.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return path


def remove_report(path: Path) -> None:
    """Delete the report of a completion that was abandoned (no series refers to it)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, one_line(exc))


def forward_report(path: Path, target: Any, ae_title: str) -> None:
    """C-STORE the report to `target` (host, port, ae_title); a failure is logged, not raised:
    a network error must not stop the node."""
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
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
    except Exception as exc:
        log.error("forward to %s: %s", target.ae_title, one_line(exc))
