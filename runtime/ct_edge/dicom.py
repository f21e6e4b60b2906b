"""DICOM decoding (optional extra `ct-edge[dicom]`).

CT: stored values -> Hounsfield units (RescaleSlope/Intercept) -> the spec's window (lung by
default). Projection X-ray (CR/DX/...): the file's own VOI LUT/window when present, else the
full range. MONOCHROME1 is inverted so air is always dark. Multi-frame: the middle frame is
classified. Colour (RGB/YBR): converted to luminance.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .errors import InputError


def decode_dicom(data: bytes, name: str, window: tuple[float, float], max_pixels: int) -> Image.Image:
    """DICOM bytes -> gray 'F' image in [0, 1]."""
    try:
        import pydicom
        from pydicom.pixels import apply_voi_lut
    except ImportError:
        raise InputError(name, "DICOM support needs pydicom: pip install 'ct-edge[dicom]'") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "PixelData" not in ds:
            raise InputError(name, "DICOM file has no pixel data")
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if rows <= 0 or cols <= 0:
            raise InputError(name, "DICOM file has no image size (Rows/Columns)")
        if rows * cols > max_pixels or frames > 4096:
            raise InputError(name, f"DICOM image {cols}x{rows}x{frames} is over the size limit")
        pixels = ds.pixel_array
    except InputError:
        raise
    except Exception as exc:  # pydicom and its pixel handlers raise many unrelated types
        raise InputError(name, f"corrupt or unsupported DICOM ({type(exc).__name__}: {exc})") from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if frames > 1:
        pixels = pixels[frames // 2]
    if pixels.ndim == 3:  # colour: RGB or YBR after pydicom's conversion
        if photometric.startswith("YBR"):
            pixels = pixels[..., 0]
        else:
            pixels = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        photometric = "MONOCHROME2"
    if pixels.ndim != 2:
        raise InputError(name, f"unsupported DICOM pixel array shape {pixels.shape}")

    pixels = pixels.astype(np.float32)
    if str(ds.get("Modality", "")).upper() == "CT":
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        width, level = window
        low = level - width / 2.0
        scaled = (pixels * slope + intercept - low) / width
    else:
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            pixels = apply_voi_lut(pixels, ds).astype(np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    scaled = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    if not np.isfinite(scaled).all():
        raise InputError(name, "DICOM pixel values are not finite")
    return Image.fromarray(np.ascontiguousarray(scaled), mode="F")
