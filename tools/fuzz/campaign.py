"""A campaign's cases: random and mutated inputs, enormous headers, bombs, truncation sweeps."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator

import numpy as np

from ct_edge.limits import MAX_PIXELS

from .cases import SPEC_ARGS, Case, input_options, load_seeds, mutate_bytes, pillow_bytes
from .dicom import DicomBase, dicom_file, gen_dicom, gen_dicom_encapsulated, gen_dicom_lengths
from .images import (
    PNG_SIGNATURE,
    gen_bmp,
    gen_jpeg,
    gen_png,
    gen_tiff,
    jpeg_with_size,
    png_chunk,
    png_image,
    zlib_bomb,
)
from .manifest import manifest_cases

MAGICS = [b"", PNG_SIGNATURE, b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"BM",
          b"II*\x00", b"MM\x00*", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", b"\x00" * 128 + b"DICM",
          b"\x00\x00\x01\x00", b"8BPS", b"P5\n", b"%!PS-Adobe", b"\x00\x00\x00\x0cjP  \r\n\x87\n"]


def gen_random(rng: np.random.Generator, seeds: dict[str, bytes]) -> Case:
    """Random bytes of any length up to 64 KiB, behind a file format's magic number."""
    size = int(np.exp(rng.uniform(0, np.log(65536))))
    magic = MAGICS[int(rng.integers(len(MAGICS)))]
    suffix = str(rng.choice(["", "", ".png", ".jpg", ".dcm", ".dicom"]))
    return Case("input", "random", magic + rng.bytes(size), suffix, int(rng.integers(len(SPEC_ARGS))))


def gen_mutate(rng: np.random.Generator, seeds: dict[str, bytes]) -> Case:
    """Generic byte mutation of one seed, spliced with the others."""
    names = list(seeds)
    name = names[int(rng.integers(len(names)))]
    donors = [seeds[n] for n in names]
    suffix = "." + name.rsplit(".", 1)[1]
    return Case("input", f"mutate:{name}", mutate_bytes(rng, seeds[name], donors),
                *input_options(rng, suffix))


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
    return Case("input", f"enormous-{kind}", data, *input_options(rng, ""))


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
            _BOMBS["jpeg-max"] = Case("input", "bomb", pillow_bytes(
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


def input_cases(rng: np.random.Generator, count: int, quick: bool, seeds: dict[str, bytes]
                ) -> Iterator[Case]:
    """The bombs, the truncation sweep, then `count` cases from the weighted generators."""
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


def build_cases(cases: int, manifests: int, seed: int, quick: bool) -> list[Case]:
    """The campaign's cases, reproducible from `seed` (inputs first, then manifests)."""
    rng = np.random.default_rng(seed)
    out = list(input_cases(rng, cases, quick, load_seeds())) if cases else []
    out += list(manifest_cases(np.random.default_rng([seed, 1]), manifests)) if manifests else []
    return out
