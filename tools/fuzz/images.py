"""PNG, JPEG, TIFF and BMP: builders, structure-aware generators, zlib/deflate bombs, EXIF."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from .cases import INTERESTING_16, INTERESTING_32, Case, input_options, mutate_bytes

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
    return Case("input", "png", data, *input_options(rng, ".png"))


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
    return Case("input", "jpeg", jpeg_build(segments, rest), *input_options(rng, ".jpg"))


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
    return Case("input", "tiff", bytes(buf), *input_options(rng, ".tif"))


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
    return Case("input", "bmp", bytes(buf), *input_options(rng, ".bmp"))
