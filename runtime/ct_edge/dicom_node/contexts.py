"""What the node accepts at association negotiation: storage SOP classes and transfer syntaxes.

Only transfer syntaxes that an installed pydicom decoder can decode are offered, so a sender
transcodes (or refuses) at negotiation instead of failing after the transfer: the uncompressed
and deflated syntaxes and RLE always; JPEG and JPEG 2000 when a decoder plugin is importable
(Pillow, which the runtime already has, decodes JPEG baseline/extended and JPEG 2000; JPEG-LS
needs pylibjpeg or another plugin).
"""

from __future__ import annotations

from collections.abc import Iterable

VERIFICATION = "1.2.840.10008.1.1"

# Storage SOP classes by the modality of the images they carry.
STORAGE_CLASSES: dict[str, dict[str, str]] = {
    "CT": {"1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
           "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage"},
    "CR": {"1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage"},
    "DX": {"1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
           "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing"},
}
SECONDARY_CAPTURE = {"1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage"}
# A bundle whose manifest does not say its modality is taken to accept chest CT and projection
# X-rays; the classifier's own domain gate decides between them when the bundle has one.
DEFAULT_MODALITIES: tuple[str, ...] = ("CT", "CR", "DX")
# Modality values that say nothing about what was imaged (other, secondary capture): such an
# object is classified and the classifier's own domain gate judges its pixels.
NEUTRAL_MODALITIES: tuple[str, ...] = ("", "OT", "SC")
UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
                "1.2.840.10008.1.2.2")


def bundle_modalities(manifest: dict) -> tuple[str, ...]:
    """The DICOM modalities a bundle's manifest records (`domain.modality`, 'ct' or 'xray' as
    ct_edge.domain writes it, or a `domain.modalities` list; 'xray' means CR and DX), else
    DEFAULT_MODALITIES."""
    domain = manifest.get("domain") if isinstance(manifest.get("domain"), dict) else {}
    recorded = domain.get("modalities", domain.get("modality"))
    if isinstance(recorded, str):
        recorded = [recorded]
    if not isinstance(recorded, list) or not recorded:
        return DEFAULT_MODALITIES
    found: list[str] = []
    for item in recorded:
        name = str(item).strip().upper()
        for modality in (("CR", "DX") if name in ("XR", "X-RAY", "XRAY", "CXR") else (name,)):
            if modality not in found:
                found.append(modality)
    return tuple(found)


def storage_classes(modalities: Iterable[str]) -> dict[str, str]:
    """SOP class UID -> name for the modalities, plus Secondary Capture (modality checked per
    dataset)."""
    classes: dict[str, str] = {}
    for modality in modalities:
        classes.update(STORAGE_CLASSES.get(modality, {}))
    classes.update(SECONDARY_CAPTURE)
    return classes


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntax UIDs whose pixel data an installed decoder handles, uncompressed first."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    found = list(UNCOMPRESSED)
    for syntax in uid.AllTransferSyntaxes:
        if syntax in found or not uid.UID(syntax).is_compressed:
            continue
        try:
            available = get_decoder(syntax).is_available
        except (NotImplementedError, ValueError, KeyError):
            available = False  # no pixel decoder exists for it at all (video, JPIP, ...)
        if available:
            found.append(str(syntax))
    return found
