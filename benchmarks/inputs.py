"""Deterministic real-size benchmark inputs, made once into an ignored folder and reused.

JPEGs of about 1000, 2000 and 4000 px a side, a 16-bit PNG, a 512 x 512 DICOM CT slice (built on
pydicom's CT_small.dcm), a 1024-px `scan.png` for the cold start, and folders of small JPEGs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ct_edge import IMAGE_SUFFIXES

# Bump when the generated content changes: files live under v<VERSION>/ and are made only if missing.
VERSION = 1
JPEG_SIDES = (1000, 2000, 4000)
PNG16_SIDE = 2048
DICOM_SIDE = 512
FOLDER_SIDE = 512
REAL_PER_CLASS = 1


@dataclass
class Inputs:
    per_image: dict[str, Path]  # name -> file, timed one by one
    scan: Path  # the cold-start input
    folder: Path | None = None
    folder_count: int = 0
    notes: list[str] = field(default_factory=list)


def chest(width: int, height: int, seed: int) -> np.ndarray:
    """A chest-film-like float32 image in [0, 1]: body, two dark lungs, ribs, spine, noise."""
    rng = np.random.default_rng(seed)
    # Drawn at <= 512 px and upscaled: drawing a 4000-px image directly costs seconds of numpy.
    w = min(width, 512)
    h = max(1, round(w * height / width))
    yy, xx = np.mgrid[-1:1:complex(0, h), -1:1:complex(0, w)].astype(np.float32)
    shift = rng.uniform(-0.05, 0.05, size=2).astype(np.float32)
    xx, yy = xx + shift[0], yy + shift[1]
    body = np.clip(1.0 - (xx / 0.9) ** 2 - (yy / 1.05) ** 2, 0, 1) ** 0.3
    lungs = sum(np.clip(1.0 - ((xx - cx) / 0.3) ** 2 - ((yy + 0.05) / 0.62) ** 2, 0, 1) ** 0.5
                for cx in (-0.4, 0.4))
    ribs = 0.12 * (np.sin(yy * 22.0 + 0.8 * np.abs(xx) * 6.0) > 0.55) * (lungs > 0)
    spine = 0.25 * np.exp(-((xx / 0.07) ** 2)) * (body > 0)
    image = 0.08 + 0.6 * body - 0.45 * lungs + ribs + spine
    small = Image.fromarray(np.clip(image * 255.0, 0, 255).astype(np.uint8))
    big = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.integers(-6, 7, size=big.shape, dtype=np.int16).astype(np.float32)
    return np.clip((big + grain) / 255.0, 0.0, 1.0)


def _write_once(path: Path, make: Callable[[Path], None]) -> Path:
    """Make `path` unless it exists; through a temporary name so a killed run leaves no half file."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial{path.suffix}")
        make(partial)
        os.replace(partial, path)
    return path


def _jpeg(side: int, seed: int, quality: int = 90) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        pixels = chest(side, round(side * 1.15), seed)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path, "JPEG", quality=quality)

    return make


def _png8(side: int, seed: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        Image.fromarray((chest(side, side, seed) * 255).astype(np.uint8)).save(path, "PNG")

    return make


def _png16(side: int, seed: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        # 12-bit values in a 16-bit PNG, as detector exports usually are.
        pixels = (chest(side, side, seed) * 4095).astype(np.uint16)
        Image.fromarray(pixels).save(path, "PNG")

    return make


def _dicom(side: int, seed: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        import pydicom
        from pydicom.data import get_testdata_file

        template = get_testdata_file("CT_small.dcm")
        if template is None:
            raise FileNotFoundError("pydicom's CT_small.dcm test file is not installed")
        ds = pydicom.dcmread(template)
        # Air -1000 HU ... bone about +700 HU; stored = HU - RescaleIntercept (-1024).
        hu = chest(side, side, seed) * 1700.0 - 1000.0
        stored = np.round(hu - float(ds.RescaleIntercept)).astype(np.int16)
        ds.Rows, ds.Columns = side, side
        ds.PixelData = stored.tobytes()
        ds.save_as(path)

    return make


def real_files(root: Path, per_class: int = REAL_PER_CLASS) -> list[Path]:
    """The first file(s) in sorted order of each class folder under root/train."""
    found: list[Path] = []
    for folder in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        found.extend(files[:per_class])
    return found


def make_folder(root: Path, count: int) -> Path:
    folder = root / f"folder-{count}"
    for i in range(count):
        _write_once(folder / f"img{i:04d}.jpg", _jpeg(FOLDER_SIDE, 1000 + i, quality=85))
    return folder


def make_inputs(root: Path, folder_count: int, real_root: Path | None = None,
                log: Callable[[str], None] = lambda _: None) -> Inputs:
    """All inputs under root/v<VERSION>/ (made only where missing)."""
    base = root / f"v{VERSION}"
    per_image: dict[str, Path] = {}
    for i, side in enumerate(JPEG_SIDES):
        log(f"input jpeg-{side}")
        per_image[f"jpeg-{side}"] = _write_once(base / f"chest_{side}.jpg", _jpeg(side, i))
    log("input png16")
    per_image[f"png16-{PNG16_SIDE}"] = _write_once(base / f"chest_{PNG16_SIDE}_16bit.png",
                                                   _png16(PNG16_SIDE, 10))
    inputs = Inputs(per_image, _write_once(base / "scan.png", _png8(1024, 20)))
    try:
        log("input dicom")
        per_image[f"dicom-ct-{DICOM_SIDE}"] = _write_once(base / f"ct_{DICOM_SIDE}.dcm",
                                                          _dicom(DICOM_SIDE, 30))
    except (ImportError, FileNotFoundError) as exc:
        inputs.notes.append(f"no DICOM input: {exc}")
    if real_root is not None and (real_root / "train").is_dir():
        for path in real_files(real_root):
            per_image[f"real-{path.parent.name}-{path.name}".replace(" ", "_")] = path
    if folder_count:
        log(f"input folder of {folder_count} JPEGs")
        inputs.folder, inputs.folder_count = make_folder(base, folder_count), folder_count
    return inputs
