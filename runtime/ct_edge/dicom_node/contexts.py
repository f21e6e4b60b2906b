"""What the node accepts at association negotiation: storage SOP classes and transfer syntaxes.

The storage classes come from ct_edge.domain's tables, the one statement of what a bundle of
each modality accepts; whether a received dataset is in the domain is the classifier's call.

Only transfer syntaxes that an installed pydicom decoder can decode are offered, so a sender
transcodes (or refuses) at negotiation instead of failing after the transfer: the uncompressed
and deflated syntaxes and RLE always; JPEG and JPEG 2000 when a decoder plugin is importable
(Pillow, which the runtime already has, decodes JPEG baseline/extended and JPEG 2000; JPEG-LS
needs pylibjpeg or another plugin).
"""

from __future__ import annotations

from ..domain import SECONDARY_CAPTURE_CLASSES, domain_rule

VERIFICATION = "1.2.840.10008.1.1"
UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
                "1.2.840.10008.1.2.2")


def accepted_modalities(bundle_modality: str | None) -> tuple[str, ...]:
    """The DICOM Modality values the bundle's domain names (what the node says it accepts)."""
    return tuple(domain_rule(bundle_modality)["modalities"])


def storage_classes(bundle_modality: str | None) -> dict[str, str]:
    """SOP class UID -> name of the storage classes the node offers: those ct_edge.domain accepts
    for the bundle's modality, and Secondary Capture (the classifier judges each dataset).

    Any other class would be out_of_domain by its SOP class alone, so it is refused at
    negotiation and the sender knows before it sends. A bundle that records no modality is
    offered the classes of every modality ct-edge knows, and the classifier holds it to the joined
    rule (ct_edge.domain.domain_rule).
    """
    from pydicom.uid import UID

    uids = domain_rule(bundle_modality)["sop_classes"]
    return {uid: UID(uid).name for uid in dict.fromkeys([*uids, *SECONDARY_CAPTURE_CLASSES])}


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
