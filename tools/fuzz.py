"""Fuzz what ct-edge reads from outside: image/DICOM files and the bundle manifest.

    python -m tools.fuzz                          # the long campaign (`make fuzz`)
    python -m tools.fuzz --cases 300 --quick      # a short one (tests/test_fuzz.py runs this)
    python -m tools.fuzz --replay tests/fixtures/fuzz

Targets and the rule every case must keep:
- input: `ct_edge.preprocess.preprocess(file or bytes, spec)` returns a finite float32
  (size, size, channels) array in [0, 1], or raises `ct_edge.errors.InputError`.
- manifest: `Bundle.load(folder)`, then `select()` and `read_verified()` of every artifact, succeed
  or raise `ct_edge.errors.BundleError`; an artifact that resolves outside the bundle is never read.

Anything else is a failure: another exception (crash), the worker process dying (a segfault or
abort in a decoder), a case running past the time limit (hang), a case raising the worker's
resident memory by more than the memory bound, or a MemoryError turned into an error message
(the guards should have refused the file before). Cases run one at a time in a separate worker
process (spawned, so a hang or a segfault cannot take the campaign down): the parent kills and
replaces a worker that overruns the time limit. The peak RSS of a case is measured by resetting
the kernel's high-water mark (/proc/self/clear_refs) before it and reading VmHWM after it.

Inputs come from generators (random bytes; generic byte mutation of real fixture files and of
derived BMP/TIFF/GIF/WebP seeds; structure-aware PNG, JPEG, TIFF, BMP and DICOM mutation with
valid checksums; headers claiming enormous dimensions; complete decompression bombs; deflated
DICOM bombs) and from deterministic sweeps (every truncation of small files). A campaign is
reproducible from its seed. With --save DIR every failing input is written there, named by
target, generator and hash; --replay runs such files again (tests/test_fuzz.py does, for
tests/fixtures/fuzz/).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ct_edge.limits import MAX_PIXELS, MEMORY_BOUND_MB

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
REGRESSIONS = FIXTURES / "fuzz"

TIME_LIMIT = 10.0  # seconds per case; the slowest legitimate case (a bomb at MAX_PIXELS) takes ~2 s
# MEMORY_BOUND_MB (imported): the peak RSS of the worker (its baseline plus one case) allowed,
# the runtime's own bound, which MAX_PIXELS, MAX_FILE_BYTES and strip-wise decoding are chosen to meet.
ADDRESS_SPACE_HEADROOM = 6 << 30  # RLIMIT_AS of the worker above its start: a safety net only

# The preprocessing variants a case runs with (a bundle's spec decides this on a device).
SPEC_ARGS = [{}, {"aspect": "letterbox", "size": 64, "channels": 1},
             {"aspect": "stretch", "contrast": "stretch", "size": 32}]

FAILURES = ("crash", "died", "hang", "memory", "invalid")


@dataclass
class Case:
    target: str  # "input" or "manifest"
    generator: str
    data: bytes
    suffix: str = ""  # input: "" -> passed as bytes; ".dcm", ".png", ... -> as a file named so
    spec: int = 0  # input: index into SPEC_ARGS
    fs: str = "plain"  # manifest: how the bundle folder around it is laid out

    def label(self) -> str:
        extra = f" spec={self.spec} suffix={self.suffix or 'bytes'}" if self.target == "input" \
            else f" fs={self.fs}"
        return f"{self.target}/{self.generator} ({len(self.data)} bytes{extra})"

    def digest(self) -> str:
        return hashlib.sha256(self.data + f"{self.suffix}|{self.spec}|{self.fs}".encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Seeds: the real fixture files plus seeds derived from them in memory
# --------------------------------------------------------------------------------------------

def _pillow_bytes(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def load_seeds() -> dict[str, bytes]:
    """name -> bytes. Derived seeds cover every format decode() accepts or must refuse."""
    from PIL import Image

    seeds = {p.name: p.read_bytes() for p in sorted(FIXTURES.glob("*"))
             if p.suffix in (".png", ".jpg", ".dcm")}
    gray = Image.open(FIXTURES / "gray8.png").convert("L")
    small = gray.resize((24, 20))
    seeds["gray.bmp"] = _pillow_bytes(gray, "BMP")
    seeds["rgb.bmp"] = _pillow_bytes(gray.convert("RGB"), "BMP")
    seeds["raw.tif"] = _pillow_bytes(gray, "TIFF")
    seeds["lzw.tif"] = _pillow_bytes(gray, "TIFF", compression="tiff_lzw")
    seeds["packbits.tif"] = _pillow_bytes(gray, "TIFF", compression="packbits")
    seeds["deflate.tif"] = _pillow_bytes(gray, "TIFF", compression="tiff_adobe_deflate")
    seeds["i16.tif"] = _pillow_bytes(Image.open(FIXTURES / "gray16.png"), "TIFF")
    floats = np.asarray(small, np.float32) / 255.0
    seeds["float.tif"] = _pillow_bytes(Image.fromarray(floats), "TIFF")
    seeds["rgb.tif"] = _pillow_bytes(small.convert("RGB"), "TIFF", compression="tiff_lzw")
    seeds["progressive.jpg"] = _pillow_bytes(gray, "JPEG", progressive=True, quality=80)
    seeds["small.gif"] = _pillow_bytes(small, "GIF")  # refused: not a supported format
    seeds["small.webp"] = _pillow_bytes(small, "WEBP")
    seeds["tiny.png"] = _pillow_bytes(Image.new("L", (1, 1)), "PNG")
    seeds["ct_nopreamble.dcm"] = seeds["ct_small.dcm"][132:]  # dataset from the file meta on
    return seeds


# --------------------------------------------------------------------------------------------
# Generic byte mutation
# --------------------------------------------------------------------------------------------

INTERESTING_16 = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF, 8000, 8001]
INTERESTING_32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE, 0x10000, 0xFFFF,
                  64_000_000, 64_000_001, 8000, 1 << 24]
MAX_CASE_BYTES = 2 << 20


def mutate_bytes(rng: np.random.Generator, data: bytes, donors: list[bytes], rounds: int = 0) -> bytes:
    """1-8 random edits; half of them aimed at the first 512 bytes, where headers live."""
    buf = bytearray(data)
    for _ in range(rounds or int(rng.integers(1, 9))):
        if not buf:
            buf += rng.bytes(int(rng.integers(1, 64)))
        span = len(buf) if rng.random() < 0.5 else min(len(buf), 512)
        pos = int(rng.integers(span))
        op = int(rng.integers(9))
        if op == 0:
            buf[pos] ^= 1 << int(rng.integers(8))
        elif op == 1:
            buf[pos] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF])) if rng.random() < 0.5 \
                else int(rng.integers(256))
        elif op == 2:
            value = int(rng.choice(INTERESTING_16))
            buf[pos:pos + 2] = struct.pack("<H" if rng.random() < 0.5 else ">H", value)
        elif op == 3:
            value = int(rng.choice(INTERESTING_32))
            buf[pos:pos + 4] = struct.pack("<I" if rng.random() < 0.5 else ">I", value)
        elif op == 4:
            del buf[pos:pos + int(rng.integers(1, 256))]
        elif op == 5:
            buf[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
        elif op == 6:
            start = int(rng.integers(len(buf)))
            buf[pos:pos] = buf[start:start + int(rng.integers(1, 512))]
        elif op == 7 and donors:
            donor = donors[int(rng.integers(len(donors)))]
            cut = int(rng.integers(len(donor)))
            buf[pos:] = donor[cut:]
        else:
            buf[pos:pos + 1] = bytes([buf[pos]]) * int(rng.integers(2, 1024))
    return bytes(buf[:MAX_CASE_BYTES])


# --------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_build(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(png_chunk(kind, body) for kind, body in chunks)


def png_image(width: int, height: int, depth: int = 8, color: int = 0, rows: bytes = b"",
              extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return png_build([(b"IHDR", ihdr), *(extra or []), (b"IDAT", zlib.compress(rows)), (b"IEND", b"")])


def exif_orientation(value: int, big_endian: bool = True) -> bytes:
    """A minimal EXIF (TIFF) block holding one Orientation tag."""
    e = ">" if big_endian else "<"
    head = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8)
    return head + struct.pack(e + "H", 1) + struct.pack(e + "HHIHH", 0x0112, 3, 1, value, 0) + \
        struct.pack(e + "I", 0)


def zlib_bomb(size: int) -> bytes:
    """zlib stream of `size` zero bytes, made in O(size / 1 MiB) steps (deflate tops ~1000:1)."""
    block = 1 << 20
    count, rest = divmod(size, block)
    if count < 2:
        return zlib.compress(bytes(size), 9)
    comp = zlib.compressobj(9)
    head = comp.compress(bytes(block)) + comp.flush(zlib.Z_FULL_FLUSH)
    body = comp.compress(bytes(block)) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = (comp.compress(bytes(rest)) + comp.flush())[:-4]  # its Adler-32 covers too little
    adler, zeros = 1, bytes(block)
    for _ in range(count):
        adler = zlib.adler32(zeros, adler)
    adler = zlib.adler32(bytes(rest), adler)
    return head + body * (count - 1) + tail + struct.pack(">I", adler)


def deflate_raw_bomb(prefix: bytes, zeros: int) -> bytes:
    """Raw deflate (no zlib header) of prefix + `zeros` zero bytes, for a deflated DICOM."""
    block = 1 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [comp.compress(prefix), comp.flush(zlib.Z_FULL_FLUSH)]
    count, rest = divmod(zeros, block)
    if count:
        first = comp.compress(bytes(block)) + comp.flush(zlib.Z_FULL_FLUSH)
        steady = comp.compress(bytes(block)) + comp.flush(zlib.Z_FULL_FLUSH) if count > 1 else b""
        out += [first, steady * (count - 1)]
    out += [comp.compress(bytes(rest)), comp.flush()]
    return b"".join(out)


def gen_png(rng: np.random.Generator, seeds: dict[str, bytes]) -> Case:
    """Structure-aware: chunks keep valid CRCs, so the mutation reaches the decoder proper."""
    name = str(rng.choice([n for n in seeds if n.endswith(".png")]))
    chunks = png_chunks(seeds[name])
    op = int(rng.integers(7))
    if op == 0 and chunks and chunks[0][0] == b"IHDR":  # header fields
        width, height, depth, color, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
        field_ = int(rng.integers(7))
        if field_ < 2:
            value = int(rng.choice([*INTERESTING_32, width * 2, height * 3, 7999]))
            width, height = (value, height) if field_ == 0 else (width, value)
        elif field_ == 2:
            depth = int(rng.choice([0, 1, 2, 4, 8, 16, 3, 32, 255]))
        elif field_ == 3:
            color = int(rng.choice([0, 2, 3, 4, 6, 1, 5, 7, 255]))
        elif field_ == 4:
            comp = int(rng.integers(3))
        elif field_ == 5:
            filt = int(rng.integers(3))
        else:
            inter = int(rng.integers(3))
        chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", width & 0xFFFFFFFF, height & 0xFFFFFFFF,
                                          depth, color, comp, filt, inter))
    elif op == 1:  # the decompressed scanlines, recompressed
        idat = b"".join(body for kind, body in chunks if kind == b"IDAT")
        try:
            raw = zlib.decompress(idat)
        except zlib.error:
            raw = idat
        raw = mutate_bytes(rng, raw, [])
        if rng.random() < 0.3:
            raw = raw[:int(rng.integers(len(raw) + 1))]
        chunks = [c for c in chunks if c[0] != b"IDAT"]
        chunks.insert(max(1, len(chunks) - 1), (b"IDAT", zlib.compress(raw)))
    elif op == 2:  # an ancillary chunk with hostile content
        kind = bytes(rng.choice([b"PLTE", b"tRNS", b"iCCP", b"zTXt", b"iTXt", b"eXIf", b"tEXt",
                                 b"sBIT", b"acTL", b"fcTL", b"gAMA", b"pHYs"]))
        if kind == b"eXIf":
            body = exif_orientation(int(rng.choice([1, 3, 6, 8, 0, 9, 0xFFFF])), bool(rng.random() < .5))
            if rng.random() < 0.4:
                body = mutate_bytes(rng, body, [])
        elif kind in (b"iCCP", b"zTXt"):
            body = b"name\x00\x00" + zlib_bomb(int(rng.choice([1 << 10, 1 << 20, 8 << 20])))
        elif kind == b"acTL":
            body = struct.pack(">II", int(rng.choice(INTERESTING_32)), int(rng.integers(3)))
        elif kind == b"fcTL":
            body = struct.pack(">IIIIIHHBB", 0, *(int(rng.choice(INTERESTING_32)) for _ in range(4)),
                               1, 1, 0, 0)
        else:
            body = rng.bytes(int(rng.choice([0, 1, 3, 6, 255, 256 * 3, 4096])))
        chunks.insert(int(rng.integers(1, max(2, len(chunks)))), (kind, body))
    elif op == 3 and len(chunks) > 1:  # drop, duplicate or swap chunks
        i, j = (int(x) for x in rng.integers(len(chunks), size=2))
        action = int(rng.integers(3))
        if action == 0:
            del chunks[i]
        elif action == 1:
            chunks.insert(j, chunks[i])
        else:
            chunks[i], chunks[j] = chunks[j], chunks[i]
    elif op == 4 and chunks:  # a chunk's body, CRC kept valid
        i = int(rng.integers(len(chunks)))
        chunks[i] = (chunks[i][0], mutate_bytes(rng, chunks[i][1], []))
    elif op == 5:  # IDAT split into many small chunks, then one truncated
        idat = b"".join(body for kind, body in chunks if kind == b"IDAT")
        pieces = [idat[k:k + 37] for k in range(0, len(idat), 37)]
        if pieces and rng.random() < 0.5:
            pieces = pieces[:int(rng.integers(len(pieces)))]
        chunks = [c for c in chunks if c[0] != b"IDAT"]
        chunks[1:1] = [(b"IDAT", p) for p in pieces]
    data = png_build(chunks)
    if op == 6:  # no CRC fix-up: a lying chunk length or a bad checksum
        data = mutate_bytes(rng, data, [], rounds=int(rng.integers(1, 3)))
    return Case("input", "png", data, *_input_options(rng, ".png"))


# --------------------------------------------------------------------------------------------
# JPEG
# --------------------------------------------------------------------------------------------

def jpeg_segments(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Marker segments up to the first SOS (inclusive), and the entropy-coded rest."""
    segments, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        segments.append((marker, data[pos + 4:pos + 2 + length]))
        pos += 2 + length
        if marker == 0xDA:
            break
    return segments, data[pos:]


def jpeg_build(segments: list[tuple[int, bytes]], rest: bytes) -> bytes:
    out = bytearray(b"\xff\xd8")
    for marker, body in segments:
        out += bytes([0xFF, marker]) + struct.pack(">H", min(len(body) + 2, 0xFFFF)) + body
    return bytes(out + rest)


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    segments, rest = jpeg_segments(data)
    for i, (marker, body) in enumerate(segments):
        if marker in (0xC0, 0xC1, 0xC2) and len(body) >= 5:
            segments[i] = (marker, body[:1] + struct.pack(">HH", height, width) + body[5:])
    return jpeg_build(segments, rest)


def gen_jpeg(rng: np.random.Generator, seeds: dict[str, bytes]) -> Case:
    name = str(rng.choice([n for n in seeds if n.endswith(".jpg")]))
    segments, rest = jpeg_segments(seeds[name])
    op = int(rng.integers(6))
    sof = [i for i, (m, _) in enumerate(segments) if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC)]
    if op == 0 and sof:  # frame header: precision, size, components, sampling factors
        i = sof[0]
        marker, body = segments[i]
        body = bytearray(body)
        what = int(rng.integers(5))
        if what == 0:
            body[0] = int(rng.choice([8, 12, 16, 0, 255]))
        elif what in (1, 2):
            off = 1 if what == 1 else 3
            body[off:off + 2] = struct.pack(">H", int(rng.choice([*INTERESTING_16, 65535, 65500])))
        elif what == 3 and len(body) > 5:
            body[5] = int(rng.choice([0, 1, 2, 3, 4, 5, 255]))
        elif len(body) > 7:
            body[7] = int(rng.integers(256))  # sampling factors of the first component
        if rng.random() < 0.3:
            marker = int(rng.choice([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC9, 0xCB]))
        segments[i] = (marker, bytes(body))
    elif op == 1:  # EXIF orientation (exif_transpose), sometimes damaged
        body = b"Exif\x00\x00" + exif_orientation(int(rng.choice([1, 2, 3, 5, 6, 7, 8, 0, 9])),
                                                  bool(rng.random() < 0.5))
        if rng.random() < 0.5:
            body = mutate_bytes(rng, body, [])
        segments.insert(0, (0xE1, body))
    elif op == 2 and segments:  # any table's body (DQT, DHT, SOS, APP...)
        i = int(rng.integers(len(segments)))
        segments[i] = (segments[i][0], mutate_bytes(rng, segments[i][1], [])[:0xFFFD])
    elif op == 3:  # restart interval, or an unknown/duplicated marker
        if rng.random() < 0.5:
            segments.insert(int(rng.integers(len(segments) + 1)),
                            (0xDD, struct.pack(">H", int(rng.choice(INTERESTING_16)))))
        elif segments:
            segments.insert(int(rng.integers(len(segments))), segments[int(rng.integers(len(segments)))])
    elif op == 4:  # the entropy-coded data
        rest = mutate_bytes(rng, rest, [])
    else:  # cut in the scan
        rest = rest[:int(rng.integers(len(rest) + 1))]
    return Case("input", "jpeg", jpeg_build(segments, rest), *_input_options(rng, ".jpg"))


# --------------------------------------------------------------------------------------------
# TIFF and BMP (refused by decode(); fuzzed to show the refusal is always a clean InputError)
# --------------------------------------------------------------------------------------------

TIFF_TAGS = [256, 257, 258, 259, 262, 273, 274, 277, 278, 279, 284, 317, 322, 323, 324, 325,
             338, 339, 320]


def gen_tiff(rng: np.random.Generator, seeds: dict[str, bytes]) -> Case:
    name = str(rng.choice([n for n in seeds if n.endswith(".tif")]))
    buf = bytearray(seeds[name])
    e = "<" if buf[:2] == b"II" else ">"
    (ifd,) = struct.unpack(e + "I", buf[4:8])
    (count,) = struct.unpack(e + "H", buf[ifd:ifd + 2])
    entries = [ifd + 2 + 12 * k for k in range(count)]
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(5))
        if op <= 2 and entries:  # an entry's value, type or count
            at = entries[int(rng.integers(len(entries)))]
            if op == 0:
                buf[at + 8:at + 12] = struct.pack(e + "I", int(rng.choice(INTERESTING_32)))
            elif op == 1:
                buf[at + 8:at + 10] = struct.pack(e + "H", int(rng.choice(INTERESTING_16)))
            else:
                buf[at + 2:at + 4] = struct.pack(e + "H", int(rng.integers(0, 19)))
                if rng.random() < 0.5:
                    buf[at + 4:at + 8] = struct.pack(e + "I", int(rng.choice(INTERESTING_32)))
        elif op == 3 and entries:  # retag an entry (adds tiles, sample formats, predictors...)
            at = entries[int(rng.integers(len(entries)))]
            buf[at:at + 2] = struct.pack(e + "H", int(rng.choice(TIFF_TAGS)))
        else:
            buf = bytearray(mutate_bytes(rng, bytes(buf), []))
    return Case("input", "tiff", bytes(buf), *_input_options(rng, ".tif"))


def gen_bmp(rng: np.random.Generator, seeds: dict[str, bytes]) -> Case:
    buf = bytearray(seeds[str(rng.choice(["gray.bmp", "rgb.bmp"]))])
    for _ in range(int(rng.integers(1, 4))):
        where = int(rng.choice([10, 14, 18, 22, 26, 28, 30, 34, 46, 50, 54]))
        width = 2 if where in (26, 28) else 4
        if width == 2:
            value = int(rng.choice([0, 1, 4, 8, 16, 24, 32, 64, 0xFFFF]))
            buf[where:where + 2] = struct.pack("<H", value)
        else:
            value = int(rng.choice([*INTERESTING_32, -1 & 0xFFFFFFFF, -8000 & 0xFFFFFFFF, 3, 4, 6]))
            buf[where:where + 4] = struct.pack("<I", value)
    if rng.random() < 0.3:
        buf = bytearray(mutate_bytes(rng, bytes(buf), []))
    return Case("input", "bmp", bytes(buf), *_input_options(rng, ".bmp"))


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
    return Case("input", "dicom-length", data, *_input_options(rng, ".dcm"))


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
    return Case("input", "dicom-encapsulated", dicom_file(elements, kind), *_input_options(rng, ".dcm"))


# --------------------------------------------------------------------------------------------
# Input generators
# --------------------------------------------------------------------------------------------

MAGICS = [b"", PNG_SIGNATURE, b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"BM",
          b"II*\x00", b"MM\x00*", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", b"\x00" * 128 + b"DICM",
          b"\x00\x00\x01\x00", b"8BPS", b"P5\n", b"%!PS-Adobe", b"\x00\x00\x00\x0cjP  \r\n\x87\n"]


def _input_options(rng: np.random.Generator, suffix: str) -> tuple[str, int]:
    spec = int(rng.choice(len(SPEC_ARGS), p=[0.7, 0.15, 0.15]))
    return (suffix if rng.random() < 0.3 else ""), spec


def gen_random(rng: np.random.Generator, seeds: dict[str, bytes]) -> Case:
    size = int(np.exp(rng.uniform(0, np.log(65536))))
    magic = MAGICS[int(rng.integers(len(MAGICS)))]
    suffix = str(rng.choice(["", "", ".png", ".jpg", ".dcm", ".dicom"]))
    return Case("input", "random", magic + rng.bytes(size), suffix, int(rng.integers(len(SPEC_ARGS))))


def gen_mutate(rng: np.random.Generator, seeds: dict[str, bytes]) -> Case:
    names = list(seeds)
    name = names[int(rng.integers(len(names)))]
    donors = [seeds[n] for n in names]
    suffix = "." + name.rsplit(".", 1)[1]
    return Case("input", f"mutate:{name}", mutate_bytes(rng, seeds[name], donors),
                *_input_options(rng, suffix))


ENORMOUS = [(0x7FFFFFFF, 0x7FFFFFFF), (65535, 65535), (8000, 8000), (8001, 8000), (1, 64_000_000),
            (64_000_000, 1), (1, 64_000_001), (100_000, 1), (0, 5), (5, 0), (0xFFFFFFFF, 1),
            (46341, 46341), (7999, 8001), (16_384, 3_906), (3_906, 16_384), (16_385, 1), (1, 16_384)]


def gen_enormous(rng: np.random.Generator, seeds: dict[str, bytes], base: DicomBase) -> Case:
    """Headers that claim enormous (or zero) dimensions over a few bytes of real data."""
    width, height = ENORMOUS[int(rng.integers(len(ENORMOUS)))]
    kind = str(rng.choice(["png", "jpeg", "bmp", "tiff", "dicom", "gif"]))
    if kind == "png":
        depth, color = [(8, 0), (16, 0), (8, 2), (8, 6), (16, 6), (1, 0), (8, 3)][int(rng.integers(7))]
        extra = [(b"PLTE", bytes(range(256)) * 3)] if color == 3 else []
        data = png_image(width, height, depth, color, bytes(int(rng.integers(0, 4096))), extra)
    elif kind == "jpeg":
        data = jpeg_with_size(seeds[str(rng.choice(["gray.jpg", "rgb.jpg", "progressive.jpg"]))],
                              min(width, 65535), min(height, 65535))
    elif kind == "bmp":
        buf = bytearray(seeds["gray.bmp"])
        buf[18:26] = struct.pack("<ii", min(width, 0x7FFFFFFF),
                                 min(height, 0x7FFFFFFF) * (-1 if rng.random() < 0.3 else 1))
        data = bytes(buf)
    elif kind == "tiff":
        buf = bytearray(seeds[str(rng.choice(["raw.tif", "lzw.tif", "i16.tif"]))])
        (ifd,) = struct.unpack("<I", buf[4:8])
        (count,) = struct.unpack("<H", buf[ifd:ifd + 2])
        for k in range(count):
            at = ifd + 2 + 12 * k
            (tag,) = struct.unpack("<H", buf[at:at + 2])
            if tag in (256, 257):
                buf[at + 2:at + 4] = struct.pack("<H", 4)  # LONG, so any size fits
                buf[at + 8:at + 12] = struct.pack("<I", (width if tag == 256 else height) & 0xFFFFFFFF)
        data = bytes(buf)
    elif kind == "dicom":
        elements = dict(base.elements)
        elements[0x00280010] = ("US", min(height, 0xFFFF))
        elements[0x00280011] = ("US", min(width, 0xFFFF))
        if rng.random() < 0.5:
            elements[0x00280008] = ("IS", str(rng.choice(["1000000000", "65536", "2"])))
        data = dicom_file(elements, str(rng.choice(["explicit", "implicit"])))
    else:
        data = b"GIF89a" + struct.pack("<HH", min(width, 0xFFFF), min(height, 0xFFFF)) + \
            seeds["small.gif"][10:]
    return Case("input", f"enormous-{kind}", data, *_input_options(rng, ""))


_BOMBS: dict[str, Case] = {}


def bomb_cases(quick: bool, base: DicomBase) -> list[Case]:
    """Complete files that decode to the most pixels the guards allow, or just over."""
    if not _BOMBS:
        side = math.isqrt(MAX_PIXELS)  # a square at the pixel limit
        _BOMBS["png-8bit-max"] = Case("input", "bomb", png_image(
            side, side, 8, 0, bytes((side + 1) * side)))
        _BOMBS["png-8bit-over"] = Case("input", "bomb", png_image(
            side + 1, side, 8, 0, bytes((side + 2) * side)))
        _BOMBS["png-16bit-max"] = Case("input", "bomb", png_image(
            side, side, 16, 0, bytes((2 * side + 1) * side)))
        _BOMBS["png-zlib-overlong"] = Case("input", "bomb", PNG_SIGNATURE + png_chunk(
            b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0)) + png_chunk(
            b"IDAT", zlib_bomb(256 << 20)) + png_chunk(b"IEND", b""))
        elements = dict(base.elements)
        for name, zeros in (("dicom-deflate-64M", 64 << 20), ("dicom-deflate-1G", 1 << 30)):
            _BOMBS[name] = Case("input", "bomb", dicom_file(elements, "deflate",
                                                            deflate_zeros=zeros))
        from PIL import Image

        if not quick:
            _BOMBS["png-rgba-max"] = Case("input", "bomb", png_image(
                side, side, 8, 6, bytes((4 * side + 1) * side)))
            _BOMBS["jpeg-max"] = Case("input", "bomb", _pillow_bytes(
                Image.new("L", (side, side), 128), "JPEG", quality=50))
            _BOMBS["dicom-deflate-3G"] = Case("input", "bomb", dicom_file(
                elements, "deflate", deflate_zeros=3 << 30))
    names = ["png-8bit-max", "png-8bit-over", "png-zlib-overlong", "dicom-deflate-64M",
             "dicom-deflate-1G"] if quick else list(_BOMBS)
    cases = []
    for name in names:
        case = _BOMBS[name]
        cases.append(Case("input", f"bomb:{name}", case.data, ".dcm" if "dicom" in name else ""))
    return cases


def truncations(seeds: dict[str, bytes], stride: int) -> Iterator[Case]:
    """Every prefix of the small files (every `stride`-th one when stride > 1)."""
    for name in ("gray8.png", "gray.jpg", "ct_small.dcm"):
        data = seeds[name]
        suffix = ".dcm" if name.endswith(".dcm") else ""
        # DICOM: every offset of the header; the pixel data (the last 32 KiB) in steps.
        header = len(data) - 32768 if name.endswith(".dcm") else len(data)
        offsets = list(range(0, header, stride)) + \
            list(range(header, len(data), 97 if stride == 1 else 1021))
        for cut in offsets:
            yield Case("input", f"truncate:{name}", data[:cut], suffix)


# --------------------------------------------------------------------------------------------
# Manifest cases
# --------------------------------------------------------------------------------------------

FUZZED_ARTIFACTS = ("tflite-int8", "tflite-fp32", "onnx-fp32")  # names from convert.formats
OUTSIDE = "outside.bin"  # beside the bundle folder; holds the bytes of model_int8.tflite
OUTSIDE_ABS = "@OUTSIDE@"  # replaced by the absolute path of OUTSIDE in the worker


def artifact_bytes(file: str) -> bytes:
    """The stand-in model file content (Bundle.load never parses a model)."""
    return hashlib.sha256(file.encode()).digest() * 64


def model_files() -> dict[str, str]:
    """Artifact name -> file name, as convert.formats names them."""
    from convert.formats import FORMATS

    return {row.name: row.file for row in FORMATS if row.name in FUZZED_ARTIFACTS}


def base_manifest() -> dict:
    """A valid manifest, written by the converter's own code, over stand-in model files."""
    from convert.formats import FORMATS
    from convert.manifest import artifact_entry, build_manifest
    from ct_edge import LABELS
    from ct_edge.preprocess import PreprocessSpec

    artifacts = []
    for row in FORMATS:
        if row.name in FUZZED_ARTIFACTS:
            data = artifact_bytes(row.file)
            artifacts.append(artifact_entry(
                row, hashlib.sha256(data).hexdigest(), len(data), "passed", [],
                {"accuracy": 0.9, "agreement": 1.0, "max_abs_diff": 1e-6}))
    return build_manifest(LABELS, PreprocessSpec(), 0.91, artifacts, "tflite-int8",
                          {"model_sha256": "0" * 64, "created": "2026-01-01T00:00:00+00:00"})


JSON_VALUES: list = [None, True, False, 0, -1, 1, 2, 3, 2**31, 2**63, 2**64 + 1, 1e308, -1e308,
                     float("nan"), float("inf"), float("-inf"), 0.5, 1e-320, "", "1", "..", "a" * 300,
                     "\x00", "ü", "NaN", [], {}, [1], [0, 0], [1, 2, 3, 4], [[1]], {"a": 1},
                     ["x", "y"], "@BIGINT@", "@DEEP@"]
FILE_ATTACKS = ["../outside.bin", OUTSIDE_ABS, "/etc/hostname", "sub/model_int8.tflite", "", ".", "..",
                "./model_int8.tflite", "model_int8.tflite/", "model\x00.tflite", "a" * 300, "~",
                "..\\outside.bin", "model_fp32.onnx", "manifest.json", "../bundle/model_int8.tflite",
                "//outside.bin", "model_int8.tflite/..", "nonexistent.tflite", 5, None, ["a"]]
FS_LAYOUTS = ["plain"] * 6 + ["symlink-out", "symlink-in", "symlink-chain-out", "symlink-loop",
                              "dangling", "fifo", "directory", "sparse-huge", "missing",
                              "manifest-huge", "manifest-fifo"]


def _paths(node, prefix=()) -> Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _set(root, path: tuple, value) -> object:
    if not path:
        return value
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return root


def _pick(rng: np.random.Generator, values: list):
    """A fresh copy of one of `values` (a shared list inserted twice could become a cycle)."""
    return copy.deepcopy(values[int(rng.integers(len(values)))])


def gen_manifest(rng: np.random.Generator, base: dict) -> Case:
    manifest = copy.deepcopy(base)
    for _ in range(int(rng.integers(1, 4))):
        paths = list(_paths(manifest))
        path = paths[int(rng.integers(len(paths)))]
        op = int(rng.integers(10))
        if op <= 3:
            manifest = _set(manifest, path, _pick(rng, JSON_VALUES))
        elif op == 4 and path:
            parent = manifest
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
        elif op in (5, 6) and isinstance(manifest, dict) and isinstance(manifest.get("artifacts"), list) \
                and manifest["artifacts"] and isinstance(manifest["artifacts"][0], dict):
            i = int(rng.integers(len(manifest["artifacts"])))
            entry = manifest["artifacts"][i]
            if isinstance(entry, dict):
                key = "file" if op == 5 else str(rng.choice(["bytes", "sha256", "name", "format",
                                                             "precision", "status", "parity"]))
                entry[key] = _pick(rng, FILE_ATTACKS if op == 5 else JSON_VALUES)
        elif op == 7 and isinstance(manifest, dict):
            key = str(rng.choice(["schema_version", "default", "labels", "input", "preprocess",
                                  "calibration"]))
            options = {"schema_version": [0, 2, -1, "1", 1.0, True, None, 10**30, [1]],
                             "default": ["onnx-fp32", "nope", "", None, 0, ["tflite-int8"], {}],
                             "labels": [["a"], ["a", "b"], list(range(1001)), "ab", [None, 1]],
                             "input": [{"shape": [1, 64, 64, 3]}, {"shape": [1, 128, 128]},
                                       {"shape": "1,128,128,3"}, {"shape": [1, 1e400, 128, 3]}],
                             "preprocess": [{"size": 4}, {"size": 1e300}, {"size": 128, "window": [1]},
                                            {"size": 128, "window": [0, 0]},
                                            {"size": 128, "window": ["nan", 0]},
                                            {"size": 128, "aspect": "zoom"}, {"size": "128"}],
                             "calibration": [{"temperature": 0}, {"temperature": 1e999},
                                             {"temperature": "x"}, {"uncertain_below": float("nan")},
                                             {"temperature": 10**400}]}[key]
            manifest[key] = _pick(rng, options)
        elif op == 8 and isinstance(manifest, dict):
            manifest[f"unknown_{int(rng.integers(100))}"] = _pick(rng, JSON_VALUES)
        elif op == 9 and isinstance(manifest, dict) and isinstance(manifest.get("artifacts"), list):
            manifest["artifacts"] = copy.deepcopy(manifest["artifacts"] * int(rng.choice([0, 2, 50])))
    try:
        text = json.dumps(manifest, indent=int(rng.choice([0, 2])))
    except (ValueError, OverflowError):
        text = json.dumps(base)
    text = text.replace('"@BIGINT@"', "9" * int(rng.choice([20, 400, 5000, 100_000])))
    depth = int(rng.choice([10, 900, 5000, 1_000_000]))
    text = text.replace('"@DEEP@"', "[" * depth + "]" * depth)
    data = text.encode()
    if rng.random() < 0.15:
        data = mutate_bytes(rng, data, [])
    fs = FS_LAYOUTS[int(rng.integers(len(FS_LAYOUTS)))]
    return Case("manifest", "manifest", data, fs=fs)


def manifest_cases(rng: np.random.Generator, count: int) -> Iterator[Case]:
    base = base_manifest()
    plain = json.dumps(base).encode()
    for fs in dict.fromkeys(FS_LAYOUTS):  # each layout at least once, with a sound manifest
        yield Case("manifest", "layout", plain, fs=fs)
    for _ in range(count):
        yield gen_manifest(rng, base)


# --------------------------------------------------------------------------------------------
# The campaign
# --------------------------------------------------------------------------------------------

def input_cases(rng: np.random.Generator, count: int, quick: bool, seeds: dict[str, bytes]
                ) -> Iterator[Case]:
    base = DicomBase(seeds["ct_small.dcm"])
    yield from bomb_cases(quick, base)
    yield from truncations(seeds, stride=97 if quick else 1)
    plain: list[tuple[float, Callable]] = [(0.12, gen_random), (0.30, gen_mutate), (0.14, gen_png),
                                           (0.08, gen_jpeg), (0.06, gen_tiff), (0.04, gen_bmp)]
    dicom = [(0.13, gen_dicom), (0.05, gen_dicom_lengths), (0.04, gen_dicom_encapsulated),
             (0.04, gen_enormous)]
    weights = np.array([w for w, _ in plain + dicom])
    makers = [g for _, g in plain] + [lambda r, s, g=g: g(r, s, base) for _, g in dicom]
    for _ in range(count):
        maker = makers[int(rng.choice(len(makers), p=weights / weights.sum()))]
        yield maker(rng, seeds)


@dataclass
class Result:
    case: Case
    outcome: str  # valid, error, crash, died, hang, memory, invalid
    detail: str = ""
    seconds: float = 0.0
    rss_growth_mb: float = 0.0


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    baseline_mb: float = 0.0

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.outcome in FAILURES]

    def counts(self) -> Counter:
        return Counter(r.outcome for r in self.results)

    def summary(self) -> dict:
        counts = self.counts()
        slowest = max(self.results, key=lambda r: r.seconds, default=None)
        hungriest = max(self.results, key=lambda r: r.rss_growth_mb, default=None)
        by_target: dict[str, dict] = {}
        for r in self.results:
            row = by_target.setdefault(r.case.target, Counter())
            row[r.outcome] += 1
        return {
            "cases": len(self.results), "valid": counts["valid"], "clean_errors": counts["error"],
            "crashes": counts["crash"] + counts["died"], "hangs": counts["hang"],
            "memory": counts["memory"], "invalid_output": counts["invalid"],
            "seconds": round(self.seconds, 1),
            "slowest_case": {"seconds": round(slowest.seconds, 3), "case": slowest.case.label()}
            if slowest else None,
            "peak_rss_growth_mb": round(hungriest.rss_growth_mb, 1) if hungriest else 0.0,
            "peak_rss_case": hungriest.case.label() if hungriest else None,
            "worker_baseline_rss_mb": round(self.baseline_mb, 1),
            "memory_bound_mb": MEMORY_BOUND_MB, "time_limit_s": TIME_LIMIT,
            "by_target": {k: dict(v) for k, v in by_target.items()},
            "by_generator": _by_generator(self.results),
        }


def _by_generator(results: list[Result]) -> dict:
    table: dict[str, Counter] = {}
    for r in results:
        table.setdefault(r.case.generator.split(":")[0], Counter())[r.outcome] += 1
    return {k: dict(v) for k, v in sorted(table.items())}


class Runner:
    """Runs cases in a worker process; replaces it after a hang or a death.

    The worker is a fresh interpreter (`python -c`), not a fork: a campaign may run inside a
    process that has started threads (pytest with TensorFlow loaded), where fork is unsafe.
    """

    def __init__(self, time_limit: float = TIME_LIMIT, memory_bound_mb: float = MEMORY_BOUND_MB):
        self.time_limit, self.memory_bound_mb = time_limit, memory_bound_mb
        self.process: subprocess.Popen | None = None
        self.baseline_mb = 0.0
        self.stderr = None

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        to_child, from_parent = os.pipe()[::-1]
        from_child, to_parent = os.pipe()
        code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'runtime')!r}]; "
                f"from tools.fuzz import worker_main; worker_main({from_parent}, {to_parent})")
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed in _close)
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                                        pass_fds=(from_parent, to_parent), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=self.stderr)
        os.close(from_parent)
        os.close(to_parent)
        self.send = Connection(to_child, readable=False)
        self.recv = Connection(from_child, writable=False)
        if not self.recv.poll(180):
            raise RuntimeError(f"the fuzz worker did not start within 180 s: {self._stderr_tail()}")
        self.baseline_mb = max(self.baseline_mb, self.recv.recv()["rss_mb"])

    def _stderr_tail(self) -> str:
        if self.stderr is None:
            return ""
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-2000:]

    def _close(self) -> None:
        for conn in (self.send, self.recv):
            conn.close()
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            self.send.send(None)
            self.process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self._close()

    def run(self, case: Case) -> Result:
        if self.process is None:
            self._start()
        start = time.perf_counter()
        try:
            self.send.send((case.target, case.data, case.suffix, case.spec, case.fs))
            ready = self.recv.poll(self.time_limit)
        except OSError:
            ready = True
        if not ready:
            self.process.kill()
            self.process.wait()
            self._close()
            return Result(case, "hang", f"no answer within {self.time_limit:g} s",
                          time.perf_counter() - start)
        try:
            answer = self.recv.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            detail = f"worker died (exit code {code}): {self._stderr_tail()}"
            self._close()
            return Result(case, "died", detail, time.perf_counter() - start)
        result = Result(case, answer["outcome"], answer["detail"], answer["seconds"],
                        answer["growth_mb"])
        peak = self.baseline_mb + result.rss_growth_mb
        if result.outcome in ("valid", "error") and peak > self.memory_bound_mb:
            result.outcome = "memory"
            result.detail = (f"peak RSS {peak:.0f} MiB (> {self.memory_bound_mb} MiB; the worker "
                             f"started at {self.baseline_mb:.0f} MiB)")
        return result


def run_campaign(cases: Iterator[Case], *, time_limit: float = TIME_LIMIT,
                 memory_bound_mb: float = MEMORY_BOUND_MB, progress: Callable[[int], None] | None = None,
                 save: Path | None = None) -> Report:
    report = Report()
    runner = Runner(time_limit, memory_bound_mb)
    start = time.perf_counter()
    try:
        for n, case in enumerate(cases, 1):
            result = runner.run(case)
            report.results.append(result)
            if result.outcome in FAILURES and save is not None:
                save_case(case, save)
            if progress is not None:
                progress(n)
    finally:
        runner.stop()
    report.seconds = time.perf_counter() - start
    report.baseline_mb = runner.baseline_mb
    return report


# --------------------------------------------------------------------------------------------
# Regression files
# --------------------------------------------------------------------------------------------

FILE_SUFFIXES = (".png", ".jpg", ".dcm", ".dicom", ".bmp", ".tif")


def save_case(case: Case, folder: Path) -> Path:
    """input: input-<generator>-<hash>[.specN][<suffix>].bin (always .bin, so no folder walk
    takes it for an image); manifest: manifest-<generator>-<hash>.case.json with the layout."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = case.generator.replace(":", "-").replace("/", "-")
    if case.target == "input":
        spec = f".spec{case.spec}" if case.spec else ""
        path = folder / f"input-{tag}-{case.digest()[:12]}{spec}{case.suffix}.bin"
        path.write_bytes(case.data)
    else:
        path = folder / f"manifest-{tag}-{case.digest()[:12]}.case.json"
        path.write_text(json.dumps({"fs": case.fs, "manifest_base64":
                                    base64.b64encode(case.data).decode()}, indent=1) + "\n")
    return path


def load_case(path: Path) -> Case:
    name = path.name
    if name.endswith(".case.json"):
        doc = json.loads(path.read_text())
        return Case("manifest", f"regression:{name}", base64.b64decode(doc["manifest_base64"]),
                    fs=doc["fs"])
    stem = name.removesuffix(".bin")
    suffix = next((s for s in FILE_SUFFIXES if stem.endswith(s)), "")
    stem = stem.removesuffix(suffix) if suffix else stem
    spec = 0
    if ".spec" in stem and stem.rpartition(".spec")[2].isdigit():
        spec = int(stem.rpartition(".spec")[2])
    return Case("input", f"regression:{name}", path.read_bytes(), suffix, spec)


def regression_cases(folder: Path = REGRESSIONS) -> list[Case]:
    """Every saved input, with every preprocessing variant for the image ones."""
    cases = []
    for path in sorted(folder.glob("*")):
        if path.name.startswith(("input-", "manifest-")):
            case = load_case(path)
            if case.target == "input":
                cases += [Case(case.target, case.generator, case.data, case.suffix, spec)
                          for spec in range(len(SPEC_ARGS))]
            else:
                cases.append(case)
    return cases


# --------------------------------------------------------------------------------------------
# The worker (a separate process)
# --------------------------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def check_array(array, spec) -> str | None:
    """Why `array` is not a valid model input for `spec`, or None."""
    if not isinstance(array, np.ndarray):
        return f"returned {type(array).__name__}, not an array"
    if array.dtype != np.float32:
        return f"dtype {array.dtype}"
    if array.shape != (spec.size, spec.size, spec.channels):
        return f"shape {array.shape}"
    if not np.isfinite(array).all():
        return "non-finite values"
    if array.min() < 0.0 or array.max() > 1.0:
        return f"values outside [0, 1]: {array.min()}..{array.max()}"
    return None


def run_input(data: bytes, suffix: str, spec_index: int, scratch: Path) -> tuple[str, str]:
    from ct_edge.errors import InputError
    from ct_edge.preprocess import PreprocessSpec, preprocess

    spec = PreprocessSpec(**SPEC_ARGS[spec_index])
    source: bytes | Path = data
    if suffix:
        source = scratch / f"case{suffix}"
        source.write_bytes(data)
    try:
        array = preprocess(source, spec)
    except InputError as exc:
        if "not enough memory" in exc.problem:
            return "memory", exc.problem
        return "error", exc.problem
    problem = check_array(array, spec)
    return ("invalid", problem) if problem else ("valid", "")


def _layout(root: Path, manifest: bytes, fs: str) -> None:
    outside = root.parent / OUTSIDE
    int8 = model_files()["tflite-int8"]
    outside.write_bytes(artifact_bytes(int8))
    root.mkdir()
    for file in model_files().values():
        (root / file).write_bytes(artifact_bytes(file))
    text = manifest.replace(OUTSIDE_ABS.encode(), str(outside).encode())
    (root / "manifest.json").write_bytes(text)
    target = root / int8
    if fs in ("symlink-out", "symlink-chain-out", "symlink-loop", "dangling", "symlink-in", "fifo",
              "directory", "missing"):
        target.unlink()
    if fs == "symlink-out":
        target.symlink_to(outside)  # bytes match the manifest: only the path check stops it
    elif fs == "symlink-chain-out":
        (root / "link.tflite").symlink_to(outside)
        target.symlink_to("link.tflite")
    elif fs == "symlink-loop":
        (root / "loop.tflite").symlink_to(int8)
        target.symlink_to("loop.tflite")
    elif fs == "dangling":
        target.symlink_to(root / "nowhere")
    elif fs == "symlink-in":
        (root / "real_int8.tflite").write_bytes(artifact_bytes(int8))
        target.symlink_to("real_int8.tflite")
    elif fs == "fifo":
        os.mkfifo(target)
    elif fs == "directory":
        target.mkdir()
    elif fs == "sparse-huge":
        with target.open("r+b") as handle:
            handle.truncate(8 << 30)  # 8 GiB, sparse: reading it all would exhaust memory
    elif fs == "manifest-huge":
        with (root / "manifest.json").open("r+b") as handle:
            handle.truncate(1 << 30)
    elif fs == "manifest-fifo":
        (root / "manifest.json").unlink()
        os.mkfifo(root / "manifest.json")


def accepted_problem(bundle, root: Path) -> str | None:
    """What a loaded bundle should not have accepted (the manifest rules of DESIGN.md)."""
    import math

    raw = bundle.manifest
    version = raw.get("schema_version")
    if type(version) is not int or version != 1:
        return f"accepted schema_version {version!r}"
    for artifact in bundle.artifacts.values():
        if artifact.path.parent != root or artifact.path.name in ("", ".", ".."):
            return f"accepted artifact file {artifact.file!r}"
        if not 0 < artifact.bytes <= 256 * 1024 * 1024:
            return f"accepted artifact size {artifact.bytes}"
    if not 2 <= len(bundle.labels) <= 1000:
        return f"accepted {len(bundle.labels)} labels"
    if not (math.isfinite(bundle.temperature) and 0.01 <= bundle.temperature <= 100):
        return f"accepted temperature {bundle.temperature}"
    if not (math.isfinite(bundle.uncertain_below) and 0 <= bundle.uncertain_below <= 1):
        return f"accepted uncertain_below {bundle.uncertain_below}"
    width, level = bundle.spec.window
    if not (math.isfinite(width) and width > 0 and math.isfinite(level)):
        return f"accepted window {bundle.spec.window}"
    shape = [int(d) for d in raw["input"]["shape"]]
    if shape[1:] != [bundle.spec.size, bundle.spec.size, bundle.spec.channels]:
        return f"accepted input shape {shape}"
    if bundle.default is not None and bundle.default not in bundle.artifacts:
        return f"accepted default {bundle.default!r}"
    return None


def run_manifest(data: bytes, fs: str, scratch: Path, counter: int) -> tuple[str, str]:
    import shutil

    from ct_edge.bundle import Bundle
    from ct_edge.errors import BundleError

    case_dir = scratch / f"m{counter}"
    case_dir.mkdir()
    root = case_dir / "bundle"
    try:
        _layout(root, data, fs)
        try:
            bundle = Bundle.load(root)
        except BundleError as exc:
            return "error", str(exc)[:300]
        problem = accepted_problem(bundle, root)
        if problem:
            return "invalid", problem
        inside = root.resolve()
        for artifact in bundle.artifacts.values():
            try:
                artifact.read_verified()
            except BundleError:
                continue
            if artifact.path.resolve().parent != inside:
                return "invalid", f"read {artifact.file!r} from outside the bundle"
        for fmt in (None, "tflite", "onnx"):
            with contextlib.suppress(BundleError):
                bundle.select(fmt=fmt)
        return "valid", ""
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)


def run_selftest(action: bytes) -> tuple[str, str]:
    """Misbehaviours on purpose, so tests can show the harness catches each kind."""
    if action == b"raise":
        raise KeyError("a stray exception")
    if action == b"hang":
        time.sleep(3600)
    if action == b"die":
        os.abort()
    if action == b"memory":
        hog = bytearray(512 << 20)
        hog[::4096] = b"\x01" * len(hog[::4096])  # touch every page
        return "valid", ""
    return "valid", ""


def worker_main(read_fd: int, write_fd: int) -> None:
    """The worker loop: receive a case, run it, answer with its outcome, time and peak memory."""
    import faulthandler
    import resource
    import traceback
    import warnings
    from multiprocessing.connection import Connection

    faulthandler.enable()  # a segfault in a decoder leaves its stack on stderr
    incoming, conn = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    warnings.simplefilter("ignore")  # library warnings about damaged files are expected
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import PIL.Image  # noqa: F401  (imported before measuring the baseline)
    import pydicom  # noqa: F401

    import ct_edge.bundle
    import ct_edge.dicom  # noqa: F401
    from ct_edge.preprocess import preprocess

    for path in FIXTURES.glob("*.*"):  # warm up every decoder once
        if path.suffix in (".png", ".jpg", ".dcm"):
            preprocess(path)
    limit = _status_kb("VmSize") * 1024 + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    peak_resets = _reset_peak()
    conn.send({"rss_mb": _status_kb("VmRSS") / 1024})
    counter = 0
    with tempfile.TemporaryDirectory(prefix="ct-edge-fuzz-") as tmp:
        scratch = Path(tmp)
        while True:
            try:
                message = incoming.recv()
            except EOFError:
                return
            if message is None:
                return
            target, data, suffix, spec, fs = message
            counter += 1
            before = _status_kb("VmRSS")
            before_peak = _status_kb("VmHWM")
            if peak_resets:
                _reset_peak()
            start = time.perf_counter()
            try:
                if target == "input":
                    outcome, detail = run_input(data, suffix, spec, scratch)
                elif target == "selftest":
                    outcome, detail = run_selftest(data)
                else:
                    outcome, detail = run_manifest(data, fs, scratch, counter)
            except BaseException as exc:  # anything else is the finding
                outcome = "crash"
                detail = "".join(traceback.format_exception(exc))[-3000:]
            seconds = time.perf_counter() - start
            peak = _status_kb("VmHWM")
            growth = (peak - before) if peak_resets else max(0, peak - before_peak)
            conn.send({"outcome": outcome, "detail": detail, "seconds": seconds,
                       "growth_mb": growth / 1024})


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def build_cases(cases: int, manifests: int, seed: int, quick: bool) -> list[Case]:
    """The campaign's cases, reproducible from `seed` (inputs first, then manifests)."""
    rng = np.random.default_rng(seed)
    out = list(input_cases(rng, cases, quick, load_seeds())) if cases else []
    out += list(manifest_cases(np.random.default_rng([seed, 1]), manifests)) if manifests else []
    return out


def print_summary(summary: dict, failures: list[Result], out=sys.stdout) -> None:
    s = summary
    print(f"fuzz: {s['cases']} cases in {s['seconds']} s: {s['valid']} valid, {s['clean_errors']} "
          f"clean errors (InputError/BundleError), {s['crashes']} crashes, {s['hangs']} hangs, "
          f"{s['memory']} over the memory bound, {s['invalid_output']} invalid outputs", file=out)
    if s["slowest_case"]:
        print(f"fuzz: slowest case {s['slowest_case']['seconds']} s: {s['slowest_case']['case']} "
              f"(limit {s['time_limit_s']:g} s)", file=out)
    print(f"fuzz: peak RSS growth in one case {s['peak_rss_growth_mb']} MiB: {s['peak_rss_case']} "
          f"(bound {s['memory_bound_mb']} MiB; worker baseline {s['worker_baseline_rss_mb']} MiB)",
          file=out)
    for target, row in s["by_target"].items():
        print(f"fuzz:   {target:<9} " + "  ".join(f"{k} {v}" for k, v in sorted(row.items())), file=out)
    for name, row in s["by_generator"].items():
        print(f"fuzz:     {name:<20} " + "  ".join(f"{k} {v}" for k, v in sorted(row.items())),
              file=out)
    groups: dict[str, list[Result]] = {}
    for r in failures:
        groups.setdefault(failure_signature(r), []).append(r)
    for signature, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"FAIL x{len(members)} {signature}  e.g. {members[0].case.label()}", file=out)


def failure_signature(result: Result) -> str:
    """outcome + the exception's type (or the detail's first words): one line per distinct bug."""
    last = result.detail.strip().splitlines()[-1] if result.detail.strip() else ""
    head = last.split(":", 1)[0] if result.outcome == "crash" else " ".join(last.split()[:6])
    return f"{result.outcome}: {result.case.target}/{result.case.generator.split(':')[0]}: {head}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="generated input cases (default "
                        "10000), on top of the bombs and the truncation sweep")
    parser.add_argument("--manifests", type=int, default=None,
                        help="generated manifest cases (default: cases / 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="every 97th truncation and the smaller bombs only")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT)
    parser.add_argument("--memory-bound", type=float, default=MEMORY_BOUND_MB,
                        help="peak RSS of the worker allowed, MiB")
    parser.add_argument("--save", type=Path, default=None, help="write failing inputs here")
    parser.add_argument("--replay", type=Path, default=None, help="run the saved inputs in DIR")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args(argv)

    if args.replay is not None:
        cases = regression_cases(args.replay)
    else:
        manifests = args.manifests if args.manifests is not None else args.cases // 5
        cases = build_cases(args.cases, manifests, args.seed, args.quick)
    total = len(cases)
    print(f"fuzz: {total} cases (seed {args.seed}), time limit {args.time_limit:g} s, memory bound "
          f"{args.memory_bound:g} MiB per case", flush=True)

    def progress(n: int) -> None:
        if n % 1000 == 0 or n == total:
            print(f"fuzz: {n}/{total}", file=sys.stderr, flush=True)

    report = run_campaign(iter(cases), time_limit=args.time_limit, memory_bound_mb=args.memory_bound,
                          progress=progress, save=args.save)
    summary = report.summary()
    print_summary(summary, report.failures)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**summary, "seed": args.seed, "failures": [
            {"outcome": r.outcome, "case": r.case.label(), "detail": r.detail}
            for r in report.failures]}, indent=2) + "\n")
    if report.failures and args.save is not None:
        print(f"fuzz: failing inputs saved in {args.save}/", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
