"""DICOM: a small hand-built writer, the base dataset it fuzzes, and the DICOM generators."""

from __future__ import annotations

import io
import struct

import numpy as np

from .cases import SPEC_ARGS, Case, input_options, mutate_bytes
from .images import deflate_raw_bomb, jpeg_with_size

# --------------------------------------------------------------------------------------------
# DICOM: a small writer, so any field can take any value (pydicom would refuse to write some)
# --------------------------------------------------------------------------------------------

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}
TS = {"explicit": "1.2.840.10008.1.2.1", "implicit": "1.2.840.10008.1.2",
      "big": "1.2.840.10008.1.2.2", "deflate": "1.2.840.10008.1.2.1.99",
      "jpeg": "1.2.840.10008.1.2.4.50", "jpeg-lossless": "1.2.840.10008.1.2.4.70",
      "jpeg-ls": "1.2.840.10008.1.2.4.80", "j2k": "1.2.840.10008.1.2.4.90",
      "rle": "1.2.840.10008.1.2.5", "bogus": "1.2.3.4.5.6.7.8.9"}
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _value_bytes(vr: str, value, big: bool) -> bytes:
    e = ">" if big else "<"
    if isinstance(value, bytes):
        raw = value
    elif vr in ("US", "SS", "UL", "SL", "FL", "FD", "AT"):
        code = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "AT": "I"}[vr]
        values = value if isinstance(value, list) else [value]
        raw = b"".join(struct.pack(e + code, v) for v in values)
    elif vr == "SQ":
        raw = b"".join(_item(item, big) for item in value)
    else:
        text = "\\".join(str(v) for v in value) if isinstance(value, list) else str(value)
        raw = text.encode("latin-1", "replace")
    if len(raw) % 2:
        raw += b"\x00" if vr in ("UI", "OB", "OW", "UN") else b" "
    return raw


def _element(tag: int, vr: str, value, *, implicit: bool = False, big: bool = False,
             length: int | None = None) -> bytes:
    e = ">" if big else "<"
    raw = value if vr == "RAW" else _value_bytes(vr, value, big)
    n = len(raw) if length is None else length
    head = struct.pack(e + "HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack(e + "I", n) + raw
    if vr in LONG_VRS or vr == "RAW":
        return head + (vr if vr != "RAW" else "OB").encode() + b"\x00\x00" + struct.pack(e + "I", n) + raw
    return head + vr.encode() + struct.pack(e + "H", n & 0xFFFF) + raw


def _item(elements: dict, big: bool) -> bytes:
    body = b"".join(_element(tag, vr, v, big=big) for tag, (vr, v) in sorted(elements.items()))
    e = ">" if big else "<"
    return struct.pack(e + "HHI", 0xFFFE, 0xE000, len(body)) + body


def encapsulate(frames: list[bytes]) -> bytes:
    """Encapsulated pixel data: an empty basic offset table, one fragment per frame."""
    items = [struct.pack("<HHI", 0xFFFE, 0xE000, 0)]
    for frame in frames:
        frame = frame + b"\x00" * (len(frame) % 2)
        items.append(struct.pack("<HHI", 0xFFFE, 0xE000, len(frame)) + frame)
    items.append(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return b"".join(items)


def dicom_file(elements: dict, ts: str = "explicit", *, preamble: bool = True,
               meta: bool = True, lengths: dict[int, int] | None = None,
               deflate_zeros: int = 0) -> bytes:
    """elements: {tag: (vr, value)}; PixelData as (vr, bytes) or ("ENCAPS", bytes)."""
    uid = TS.get(ts, ts)
    implicit, big = ts == "implicit", ts == "big"
    body = bytearray()
    for tag, (vr, value) in sorted(elements.items()):
        length = (lengths or {}).get(tag)
        if vr == "ENCAPS":
            e = ">" if big else "<"
            body += struct.pack(e + "HH", tag >> 16, tag & 0xFFFF) + b"OB\x00\x00" + \
                struct.pack(e + "I", 0xFFFFFFFF) + value
        else:
            body += _element(tag, vr, value, implicit=implicit, big=big, length=length)
    if ts == "deflate":
        if deflate_zeros:  # one more element: `deflate_zeros` bytes of zeros, never sent as such
            body += struct.pack("<HH", 0x0009, 0x1010) + b"OB\x00\x00" + struct.pack("<I", deflate_zeros)
        payload = deflate_raw_bomb(bytes(body), deflate_zeros)
    else:
        payload = bytes(body)
    head = b""
    if meta:
        group = b"".join([
            _element(0x00020001, "OB", b"\x00\x01"), _element(0x00020002, "UI", CT_IMAGE),
            _element(0x00020003, "UI", "1.2.826.0.1.3680043.8.498.1"),
            _element(0x00020010, "UI", uid), _element(0x00020012, "UI", "1.2.826.0.1.3680043.8.498")])
        head = _element(0x00020000, "UL", len(group)) + group
    return (b"\x00" * 128 + b"DICM" if preamble else b"") + head + payload


class DicomBase:
    """The fields of ct_small.dcm that decoding reads, plus its pixel data."""

    def __init__(self, ct_small: bytes) -> None:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(ct_small))
        self.pixels = bytes(ds.PixelData)
        self.elements = {
            0x00080016: ("UI", CT_IMAGE), 0x00080060: ("CS", "CT"),
            0x00280002: ("US", 1), 0x00280004: ("CS", "MONOCHROME2"),
            0x00280010: ("US", int(ds.Rows)), 0x00280011: ("US", int(ds.Columns)),
            0x00280100: ("US", 16), 0x00280101: ("US", 16), 0x00280102: ("US", 15),
            0x00280103: ("US", 1), 0x00281052: ("DS", "-1024"), 0x00281053: ("DS", "1"),
            0x7FE00010: ("OW", self.pixels)}


DICOM_FIELDS: dict[int, tuple[str, list]] = {
    0x00080060: ("CS", ["CT", "MR", "CR", "DX", "", "OT", "ct ", "\x00"]),
    0x00280002: ("US", [0, 1, 2, 3, 4, 0xFFFF]),
    0x00280004: ("CS", ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422",
                        "PALETTE COLOR", "ARGB", "CMYK", "HSV", "", "garbage", "YBR_ICT"]),
    0x00280006: ("US", [0, 1, 2, 0xFFFF]),
    0x00280008: ("IS", ["0", "1", "2", "3", "-1", "1000000000", "2147483648", "abc", "1.5", ""]),
    0x00280010: ("US", [0, 1, 2, 3, 127, 255, 256, 8000, 8001, 0xFFFF]),
    0x00280011: ("US", [0, 1, 2, 3, 127, 255, 256, 8000, 8001, 0xFFFF]),
    0x00280100: ("US", [0, 1, 7, 8, 12, 16, 24, 32, 64, 0xFFFF]),
    0x00280101: ("US", [0, 1, 8, 12, 16, 17, 32, 64, 0xFFFF]),
    0x00280102: ("US", [0, 7, 11, 15, 31, 63, 0xFFFF]),
    0x00280103: ("US", [0, 1, 2, 0xFFFF]),
    0x00281050: ("DS", ["40", "0", "-1", "nan", "inf", "1e308", "40\\-600", "", "x"]),
    0x00281051: ("DS", ["400", "0", "-1", "nan", "inf", "1e-300", "400\\1500", "", "x"]),
    0x00281052: ("DS", ["-1024", "0", "nan", "inf", "-inf", "1e308", "-1e308", "", "x"]),
    0x00281053: ("DS", ["1", "0", "-1", "nan", "inf", "1e308", "1e-300", "", "x"]),
    0x00281101: ("US", [[256, 0, 8], [0, 0, 16], [65535, 0, 8], [4, 65535, 16], [1, 0, 0], [3, 0]]),
    0x00281102: ("US", [[256, 0, 8], [0, 0, 16], [65535, 0, 8], [1, 0, 0]]),
    0x00281103: ("US", [[256, 0, 8], [0, 0, 16], [65535, 0, 8], [1, 0, 0]]),
    0x00281201: ("OW", [b"", b"\x00\x01" * 256, b"\xff" * 7, bytes(131072)]),
    0x00281202: ("OW", [b"", b"\x00\x01" * 256, b"\xff" * 7]),
    0x00281203: ("OW", [b"", b"\x00\x01" * 256, b"\xff" * 7]),
    0x00283010: ("SQ", [[{0x00283002: ("US", [4096, 0, 16]), 0x00283006: ("OW", bytes(8192))}],
                        [{0x00283002: ("US", [0, 0, 16]), 0x00283006: ("OW", b"")}],
                        [{0x00283002: ("US", [16, 65535, 64]), 0x00283006: ("OW", b"\xff" * 3)}],
                        [{}], []]),
    0x00283000: ("SQ", [[{0x00283002: ("US", [4096, 0, 16]), 0x00283006: ("OW", bytes(8192)),
                          0x00283004: ("LO", "HU")}],
                        [{0x00283002: ("US", [0, 0, 0]), 0x00283006: ("OW", b"\x01")}], [{}]]),
    0x7FE00008: ("OF", [b"", struct.pack("<4f", 0.0, float("nan"), float("inf"), 1.0)]),
    0x7FE00009: ("OD", [b"", struct.pack("<2d", float("nan"), -1e308)]),
}


def _pixel_bytes(rng: np.random.Generator, elements: dict, base: DicomBase) -> bytes:
    """Pixel data about the size the header asks for (capped), sometimes a bit off."""
    def number(tag: int, default: int) -> int:
        try:
            value = elements.get(tag, ("", default))[1]
            return max(0, int(float(value[0] if isinstance(value, list) else value)))
        except (TypeError, ValueError, OverflowError):
            return default

    rows, cols = number(0x00280010, 0), number(0x00280011, 0)
    frames = min(number(0x00280008, 1) or 1, 8)
    spp, bits = number(0x00280002, 1) or 1, number(0x00280100, 16) or 1
    want = rows * cols * min(spp, 4) * frames * bits // 8
    want = min(want, 4 << 20)
    choice = rng.random()
    if choice < 0.5:
        size = want
    elif choice < 0.7:
        size = max(0, want + int(rng.choice([-2, -1, 1, 2, 100])))
    elif choice < 0.85:
        size = int(rng.integers(0, max(1, want) + 1))
    else:
        return base.pixels
    return rng.bytes(size) if rng.random() < 0.7 else bytes(size)


def gen_dicom(rng: np.random.Generator, seeds: dict[str, bytes], base: DicomBase) -> Case:
    """Field values: any of DICOM_FIELDS set to a hostile value, in any encoding."""
    elements = dict(base.elements)
    for tag in rng.choice(list(DICOM_FIELDS), size=int(rng.integers(1, 5)), replace=False):
        vr, values = DICOM_FIELDS[int(tag)]
        elements[int(tag)] = (vr, values[int(rng.integers(len(values)))])
    if rng.random() < 0.6:
        elements[0x7FE00010] = ("OW" if rng.random() < 0.7 else "OB", _pixel_bytes(rng, elements, base))
    elif rng.random() < 0.2:
        del elements[0x7FE00010]
    ts = str(rng.choice(["explicit"] * 5 + ["implicit", "big", "deflate", "rle", "bogus"]))
    preamble = rng.random() < 0.85
    meta = preamble or rng.random() < 0.5
    data = dicom_file(elements, ts if meta else "implicit", preamble=preamble, meta=meta)
    if rng.random() < 0.2:
        data = mutate_bytes(rng, data, [], rounds=int(rng.integers(1, 4)))
    return Case("input", "dicom", data, ".dcm" if not preamble or rng.random() < 0.5 else "",
                int(rng.integers(len(SPEC_ARGS))))


def gen_dicom_lengths(rng: np.random.Generator, seeds: dict[str, bytes], base: DicomBase) -> Case:
    """Element length fields that lie: huge, undefined, odd, past the end of the file."""
    elements = dict(base.elements)
    tag = int(rng.choice(list(elements) + [0x7FE00010] * 4))
    length = int(rng.choice([0, 1, 3, 0xFFFE, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF,
                             0x80000000, len(base.pixels) + 2, len(base.pixels) - 2, 1 << 30]))
    ts = str(rng.choice(["explicit", "implicit", "big"]))
    data = dicom_file(elements, ts, lengths={tag: length})
    if rng.random() < 0.3:
        data = data[:int(rng.integers(132, len(data) + 1))]
    return Case("input", "dicom-length", data, *input_options(rng, ".dcm"))


def gen_dicom_encapsulated(rng: np.random.Generator, seeds: dict[str, bytes], base: DicomBase) -> Case:
    """Compressed transfer syntaxes: the embedded JPEG/RLE frame may claim any size."""
    elements = dict(base.elements)
    kind = str(rng.choice(["jpeg", "jpeg", "rle", "j2k", "jpeg-lossless", "jpeg-ls"]))
    elements[0x00280100] = ("US", 8 if kind == "jpeg" else 16)
    elements[0x00280101] = ("US", 8 if kind == "jpeg" else 16)
    elements[0x00280102] = ("US", 7 if kind == "jpeg" else 15)
    elements[0x00280103] = ("US", 0)
    if kind == "jpeg":
        frame = seeds["gray.jpg"]
        if rng.random() < 0.5:
            frame = jpeg_with_size(frame, int(rng.choice([64, 80, 8000, 13000, 30000, 65535])),
                                   int(rng.choice([64, 8000, 13000, 30000, 65535])))
        if rng.random() < 0.3:
            frame = mutate_bytes(rng, frame, [])
    elif kind == "rle":
        segments = int(rng.choice([0, 1, 2, 3, 15, 16]))
        offsets = [64 + 32 * k for k in range(segments)] + [0] * (15 - segments)
        frame = struct.pack("<16I", segments, *offsets[:15]) + rng.bytes(int(rng.integers(0, 512)))
    else:
        frame = rng.bytes(int(rng.integers(0, 2048)))
    elements[0x7FE00010] = ("ENCAPS", encapsulate([frame] * int(rng.choice([1, 1, 2]))))
    if rng.random() < 0.5:
        elements[0x00280008] = ("IS", str(rng.choice(["1", "2", "3", "1000"])))
    return Case("input", "dicom-encapsulated", dicom_file(elements, kind), *input_options(rng, ".dcm"))
