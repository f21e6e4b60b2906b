"""What the node reads of a received dataset before keeping it: its identifiers, after the
decompression bomb guard for a deflated one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..dicom import check_inflated_size
from ..errors import InputError, one_line

_HEADER_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                "Modality", "PatientID", "SeriesDescription", "InstanceNumber", "SliceLocation",
                "ImagePositionPatient")
# What the store's INTEGER column holds (SQLite: signed 64 bits).
_INTEGERS = range(-(2**63), 2**63)


def _number(kind: type, value: Any) -> Any:
    """An optional attribute's value as `kind`; None when absent, malformed, not finite or (an
    integer) beyond 64 bits: it only orders slices, so a bad value must not refuse the dataset."""
    try:
        number = kind(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    if isinstance(number, float) and not math.isfinite(number):
        return None  # inf or nan would make every JSON answer about its series fail
    if isinstance(number, int) and number not in _INTEGERS:
        return None
    return number


def read_header(path: Path, deflated: bool = False, affected_class: str = "",
                affected_instance: str = "") -> dict[str, Any]:
    """The identifiers of a received dataset; the C-STORE request's affected SOP class and
    instance stand in for missing ones. InputError when it cannot be parsed or has no UIDs."""
    import pydicom
    from pydicom.multival import MultiValue

    try:
        if deflated:
            with open(path, "rb") as handle:
                check_inflated_size(handle, str(path))
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
        header: dict[str, Any] = {}
        for tag in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                    "Modality", "PatientID", "SeriesDescription"):
            value = ds.get(tag)
            header[tag] = str(value).strip() if value is not None else ""
        header["SOPClassUID"] = header["SOPClassUID"] or affected_class
        header["SOPInstanceUID"] = header["SOPInstanceUID"] or affected_instance
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
