"""The fuzz case, its seeds and generic byte mutation, and saved (regression) cases."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
REGRESSIONS = FIXTURES / "fuzz"

# The preprocessing variants a case runs with (a bundle's spec decides this on a device).
SPEC_ARGS = [{}, {"aspect": "letterbox", "size": 64, "channels": 1},
             {"aspect": "stretch", "contrast": "stretch", "size": 32}]


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

def pillow_bytes(image, fmt: str, **options) -> bytes:
    """`image` saved by Pillow in format `fmt`, as bytes."""
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
    seeds["gray.bmp"] = pillow_bytes(gray, "BMP")
    seeds["rgb.bmp"] = pillow_bytes(gray.convert("RGB"), "BMP")
    seeds["raw.tif"] = pillow_bytes(gray, "TIFF")
    seeds["lzw.tif"] = pillow_bytes(gray, "TIFF", compression="tiff_lzw")
    seeds["packbits.tif"] = pillow_bytes(gray, "TIFF", compression="packbits")
    seeds["deflate.tif"] = pillow_bytes(gray, "TIFF", compression="tiff_adobe_deflate")
    seeds["i16.tif"] = pillow_bytes(Image.open(FIXTURES / "gray16.png"), "TIFF")
    floats = np.asarray(small, np.float32) / 255.0
    seeds["float.tif"] = pillow_bytes(Image.fromarray(floats), "TIFF")
    seeds["rgb.tif"] = pillow_bytes(small.convert("RGB"), "TIFF", compression="tiff_lzw")
    seeds["progressive.jpg"] = pillow_bytes(gray, "JPEG", progressive=True, quality=80)
    seeds["small.gif"] = pillow_bytes(small, "GIF")  # refused: not a supported format
    seeds["small.webp"] = pillow_bytes(small, "WEBP")
    seeds["tiny.png"] = pillow_bytes(Image.new("L", (1, 1)), "PNG")
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


def input_options(rng: np.random.Generator, suffix: str) -> tuple[str, int]:
    """How an input case is passed: (suffix or "" for bytes, index into SPEC_ARGS)."""
    spec = int(rng.choice(len(SPEC_ARGS), p=[0.7, 0.15, 0.15]))
    return (suffix if rng.random() < 0.3 else ""), spec


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
