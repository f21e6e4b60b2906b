"""The one preprocessing function: any supported file -> the model's input array.

Training, calibration, the parity check and the CLI all call `preprocess`, so what the model
was trained on is exactly what a device feeds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from . import DICOM_SUFFIXES
from .dicom import DEFLATED_SYNTAX, META_BYTES, decoded_frame_bytes
from .errors import EMPTY_PATH, InputError, UnsupportedFormat, one_line
from .limits import (
    MAX_FILE_BYTES,
    MAX_PIXELS,
    MAX_PNG_TEXT_BYTES,
    MAX_PNG_TEXT_CHUNK,
    MAX_SIDE,
    STRIP_ROWS,
    check_jpeg_scans,
)

# Pillow's PNG text limits are module globals its plugin reads while a file is opened, so they are
# set once, here, where every ct-edge decode starts: changing them per call would race with other
# threads opening PNGs. Pillow's defaults let text chunks add 64 MB to the largest PNG's peak.
PngImagePlugin.MAX_TEXT_CHUNK = MAX_PNG_TEXT_CHUNK
PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES

Source = str | Path | bytes
Aspect = Literal["stretch", "letterbox", "crop"]
Contrast = Literal["none", "stretch"]

_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # more than 8 bits: gray becomes float32
# Bytes a pixel of a Pillow image takes in memory; every other mode is stored in 4.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}
_DICOM_SIZE_TAGS = ["Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PhotometricInterpretation"]
# (7FE0,0010) Pixel Data as little- and big-endian bytes: where a header ends.
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
_EXIF_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}
EXIF_ORIENTATION = 0x0112
SOURCE_SIZE = "ct_edge.source_size"  # the key in a decoded image's `info`


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}

# (width, level) in Hounsfield units.
WINDOWS: dict[str, tuple[float, float]] = {"lung": (1500.0, -600.0), "mediastinum": (350.0, 50.0)}
MAX_WINDOW_HU = 65_536


@dataclass(frozen=True)
class PreprocessSpec:
    """How a file becomes the model input; stored in every bundle's manifest."""

    size: int = 128
    channels: int = 3
    aspect: Aspect = "crop"
    resample: str = "bilinear"
    window: tuple[float, float] = WINDOWS["lung"]
    contrast: Contrast = "none"

    def __post_init__(self) -> None:
        if self.aspect not in ("stretch", "letterbox", "crop"):
            raise ValueError(f"unknown aspect handling {self.aspect!r}")
        if self.contrast not in ("none", "stretch"):
            raise ValueError(f"unknown contrast handling {self.contrast!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"unknown resample filter {self.resample!r}")
        if self.channels not in (1, 3) or not 8 <= self.size <= 1024:
            raise ValueError(f"unsupported input shape {self.size}x{self.size}x{self.channels} "
                             "(sides 8 to 1024 pixels, 1 or 3 channels)")
        check_window(*self.window)

    def to_dict(self) -> dict:
        return {**asdict(self), "window": list(self.window), "color": "gray replicated",
                "range": [0.0, 1.0], "layout": "NHWC", "dtype": "float32"}

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        window = data.get("window", WINDOWS["lung"])
        return cls(size=int(data["size"]), channels=int(data.get("channels", 3)),
                   aspect=data.get("aspect", "crop"), resample=data.get("resample", "bilinear"),
                   contrast=data.get("contrast", "none"),
                   window=(float(window[0]), float(window[1])))

    def with_window(self, window: str | tuple[float, float]) -> PreprocessSpec:
        return dataclasses.replace(self, window=parse_window(window))

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def parse_window(window: str | tuple[float, float]) -> tuple[float, float]:
    """'lung', 'mediastinum' or 'W,L' -> (width, level)."""
    if isinstance(window, tuple):
        width, level = window
    elif window in WINDOWS:
        width, level = WINDOWS[window]
    else:
        try:
            width, level = (float(part) for part in window.split(","))
        except ValueError:
            raise ValueError(f"window must be lung, mediastinum or W,L (got {window!r})") from None
    return check_window(float(width), float(level))


def check_window(width: float, level: float) -> tuple[float, float]:
    """The one check of a CT window (HU) for the CLI, the API and the manifest; ValueError if bad.

    DICOM asks for a width of at least 1; no CT value lies beyond +-MAX_WINDOW_HU (16-bit data
    after rescale), and beyond it float32 arithmetic on the pixels loses all meaning.
    """
    if not (math.isfinite(width) and math.isfinite(level)):
        raise ValueError(f"window width and level must be finite numbers (got {width:g},{level:g})")
    if not (1.0 <= width <= MAX_WINDOW_HU and abs(level) <= MAX_WINDOW_HU):
        raise ValueError(f"window width must be 1..{MAX_WINDOW_HU} and level within "
                         f"+-{MAX_WINDOW_HU} HU (got {width:g},{level:g})")
    return float(width), float(level)


def _read_bytes(source: Source) -> tuple[bytes, str]:
    if isinstance(source, bytes):
        if not source:
            raise InputError("<bytes>", "empty file")
        return source, "<bytes>"
    if not source:  # Path('') is '.', the current folder
        raise InputError(source, EMPTY_PATH)
    path = Path(source)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise InputError(path, "is a folder, not an image")
        if not stat.S_ISREG(info.st_mode):
            # A FIFO or device would block or never end; only regular files are read.
            raise InputError(path, "not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise InputError(path, f"file is {info.st_size} bytes, over the {MAX_FILE_BYTES} byte limit")
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except PermissionError:
        raise InputError(path, "permission denied") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
    if not data:
        raise InputError(path, "empty file")
    return data, str(path)


def is_dicom(data: bytes) -> bool:
    """True for a DICOM Part 10 file (128-byte preamble, then 'DICM')."""
    return len(data) > 132 and data[128:132] == b"DICM"


def decode(source: Source, spec: PreprocessSpec = PreprocessSpec()) -> Image.Image:
    """Decode a PNG, JPEG or DICOM into a gray image: mode 'L' (0..255) or 'F' (0..1).

    JPEGs are decoded at reduced scale (draft mode) when far larger than the model input;
    `source_size(image)` gives the file's own size.
    Any problem with the file raises InputError; nothing else escapes for a bad file.
    """
    data, name = _read_bytes(source)
    # Files without the DICOM preamble (old ACR-NEMA style) are recognised by their suffix.
    if is_dicom(data) or name.lower().endswith(DICOM_SUFFIXES):
        from .dicom import read_dicom  # pydicom is an optional extra

        frame = read_dicom(data, name, spec.window, MAX_PIXELS)
        # The file's bytes go before the float image is made: at the pixel limit both together
        # would take the process over limits.MEMORY_BOUND_MB.
        del data
        return frame.to_image()
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise InputError(name, f"{width}x{height} pixels is over the {MAX_PIXELS} pixel limit "
                                   "(decompression bomb guard)")
        if max(width, height) > MAX_SIDE:
            raise InputError(name, f"{width}x{height} pixels: a side is over the {MAX_SIDE} pixel "
                                   "limit (decompression bomb guard)")
        if image.format not in ("PNG", "JPEG", "MPO"):
            raise UnsupportedFormat(name, f"unsupported image format {image.format}; use PNG, JPEG or DICOM")
        _check_single_frame(image, name)
        if image.format in ("JPEG", "MPO"):
            check_jpeg_scans(data, name)
        if image.format in ("JPEG", "MPO") and image.mode in ("RGB", "L"):
            image.draft("L", (spec.size, spec.size))
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        image.load()
        # Turned on the smaller of the two images: a 16-bit source is half the size of its
        # float32 gray, an RGB(A) one four times the size of its 8-bit gray.
        deep = image.mode in _DEEP_MODES
        if deep:
            image = _orient(image, orientation)
        gray = to_gray(image, name)
        del image
        if not deep:
            gray = _orient(gray, orientation)
        # EXIF orientations 5-8 turn the image a quarter: its shown size is the stored one swapped.
        gray.info[SOURCE_SIZE] = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        return gray
    except InputError:
        raise
    except Image.DecompressionBombError:
        # Pillow's own hard limit (2x its MAX_IMAGE_PIXELS) fires inside Image.open.
        raise InputError(name, f"image dimensions are over the {MAX_PIXELS} pixel limit "
                               "(decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise InputError(name, "not a PNG, JPEG or DICOM image") from None
    except MemoryError:
        raise InputError(name, "not enough memory to decode this image") from None
    except Exception as exc:  # Pillow's plugins raise many unrelated types for damaged files
        raise InputError(name, _damage(exc)) from None


def _damage(exc: Exception) -> str:
    """What Pillow's exception for a file it cannot decode says, as one line."""
    if "MAX_TEXT" in str(exc):  # PngImagePlugin's text limits, set at import above
        return (f"PNG text or ICC profile chunks are over the {MAX_PNG_TEXT_BYTES} byte limit "
                "(decompression bomb guard)")
    return f"corrupt or truncated image ({one_line(exc)})"


def _check_single_frame(image: Image.Image, name: str) -> None:
    """Refuse an animated PNG: only its first frame would be seen. A multi-picture JPEG (MPO:
    a phone's photo with its depth or HDR map) is its first picture, the full image."""
    frames = int(getattr(image, "n_frames", 1) or 1)
    if image.format != "MPO" and (getattr(image, "is_animated", False) or frames > 1):
        raise InputError(name, f"animated image ({frames} frames); send one frame")


def decode_cost(source: Source, spec: PreprocessSpec = PreprocessSpec()) -> int | None:
    """Estimated peak bytes `decode(source, spec)` allocates, from the file's header alone: the
    file's bytes (a path's; bytes given are in memory already), its decoded pixels and its gray
    image. None when the header cannot be read."""
    try:
        if isinstance(source, bytes):
            return _work_bytes(io.BytesIO(source), source[:256], "", spec)
        path = Path(source)
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # opening a FIFO would block
            return None
        if info.st_size > MAX_FILE_BYTES:  # refused unread
            return 0
        with path.open("rb") as handle:
            work = _work_bytes(handle, handle.read(256), str(path), spec)
    except Exception:  # a damaged or unknown file: `decode` says what is wrong with it
        return None
    return None if work is None else info.st_size + work


def _work_bytes(handle: BinaryIO, head: bytes, name: str, spec: PreprocessSpec) -> int | None:
    handle.seek(0)
    if is_dicom(head) or name.lower().endswith(DICOM_SUFFIXES):
        return _dicom_work_bytes(handle)
    return _image_work_bytes(handle, spec)


def _image_work_bytes(handle: BinaryIO, spec: PreprocessSpec) -> int:
    """Bytes `decode` allocates for a PNG or JPEG besides the file's: decoded pixels, the gray
    image and a progressive JPEG's coefficients (libjpeg keeps 2 bytes a sample at full size)."""
    with Image.open(handle) as image:
        width, height = image.size
        coefficients = 0
        if image.format in ("JPEG", "MPO"):
            if image.info.get("progressive"):
                coefficients = 2 * width * height * len(image.getbands())
            if image.mode in ("RGB", "L"):
                image.draft("L", (spec.size, spec.size))  # as `decode` does: no pixels read
        gray = 4 if image.mode in _DEEP_MODES else 1
        return coefficients + image.size[0] * image.size[1] * (_PIXEL_BYTES.get(image.mode, 4) + gray)


def _dicom_work_bytes(handle: BinaryIO) -> int | None:
    """Bytes `decode` allocates for a DICOM besides the file's: one decoded frame, its float32
    gray and, for colour, float32 RGB. None for a deflated file: pydicom inflates the whole
    dataset to read its header, and `decode` checks the inflated size before it does."""
    prefix = handle.read(META_BYTES)
    if DEFLATED_SYNTAX in prefix:
        return None
    import pydicom  # an optional extra; without it the caller's estimate is None

    ds = None
    if any(tag in prefix for tag in _PIXEL_DATA_TAGS):
        # Parsed in memory when the whole header is in the prefix, since pydicom asks a file for
        # its position some 500 times a header (a system call each).
        buffer = io.BytesIO(prefix)
        try:
            ds = pydicom.dcmread(buffer, force=True, stop_before_pixels=True,
                                 specific_tags=_DICOM_SIZE_TAGS)
        except Exception:  # a value runs past the prefix: read the file itself
            ds = None
        end = buffer.tell()
        if prefix[end:end + 4] not in _PIXEL_DATA_TAGS:
            # Stopped elsewhere than at the top-level Pixel Data (its tag bytes were inside a
            # value or an icon): the elements after the prefix count too (a later Rows, say).
            ds = None
    if ds is None:
        handle.seek(0)
        ds = pydicom.dcmread(handle, force=True, stop_before_pixels=True,
                             specific_tags=_DICOM_SIZE_TAGS)
    pixels = int(ds.Rows) * int(ds.Columns)
    stored, samples, _ = decoded_frame_bytes(ds, int(ds.Rows), int(ds.Columns))
    return stored + pixels * (4 if samples == 1 else 4 + 4 * samples)


def source_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the input file's image, as shown: a `decode`d JPEG may be smaller
    (draft mode decodes at 1/2, 1/4 or 1/8 scale)."""
    width, height = image.info.get(SOURCE_SIZE, image.size)
    return int(width), int(height)


def _orient(image: Image.Image, orientation: int) -> Image.Image:
    """The image as EXIF `orientation` says it is shown (what ImageOps.exif_transpose does)."""
    method = _EXIF_TURNS.get(orientation)
    return image if method is None else image.transpose(method)


def _strips(image: Image.Image) -> Iterator[tuple[int, Image.Image]]:
    """(top row, strip) for every STRIP_ROWS rows of `image`."""
    width, height = image.size
    for top in range(0, height, STRIP_ROWS):
        yield top, image.crop((0, top, width, min(height, top + STRIP_ROWS)))


def to_gray(image: Image.Image, name: str = "<image>") -> Image.Image:
    """Any decoded image -> mode 'L', or 'F' in [0, 1] for 16/32-bit data; transparent pixels
    go over black. Converted in strips of rows, so no temporary is the whole image's size."""
    if image.mode in _DEEP_MODES:
        peak = 0.0
        for _, strip in _strips(image):  # first pass: the peak, and finiteness
            pixels = np.asarray(strip, dtype=np.float32)
            if not np.isfinite(pixels).all():  # a float TIFF may hold NaN or infinity
                raise InputError(name, "pixel values are not finite (NaN or infinity)")
            peak = max(peak, float(pixels.max()) if pixels.size else 0.0)
        # Scale by the bit depth the data uses (12-bit data in a 16-bit PNG is common).
        bits = max(8, int(np.ceil(np.log2(peak + 1.0)))) if peak > 0 else 8
        gray = Image.new("F", image.size)  # filled strip by strip: fromarray would copy it whole
        for top, strip in _strips(image):
            pixels = np.asarray(strip, dtype=np.float32)
            gray.paste(Image.fromarray(np.clip(pixels / (2.0**bits - 1.0), 0.0, 1.0), mode="F"),
                       (0, top))
        return gray
    if image.mode == "L":
        image.load()
        return image
    transparent = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P"
                                                         and "transparency" in image.info)
    gray = Image.new("L", image.size)
    for top, strip in _strips(image):
        if transparent:
            strip = Image.alpha_composite(Image.new("RGBA", strip.size, (0, 0, 0, 255)),
                                          strip.convert("RGBA"))
        gray.paste(strip.convert("L"), (0, top))
    return gray


def fit(image: Image.Image, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """Gray image -> float32 (size, size, channels) in [0, 1], with the spec's aspect handling."""
    size, resample = spec.size, _RESAMPLE[spec.resample]
    width, height = image.size
    if spec.aspect == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.resize((size, size), resample, box=(left, top, left + side, top + side))
    elif spec.aspect == "letterbox":
        scale = size / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new(image.mode, (size, size), 0)
        canvas.paste(image.resize(inner, resample), ((size - inner[0]) // 2, (size - inner[1]) // 2))
        image = canvas
    else:
        image = image.resize((size, size), resample)
    pixels = np.asarray(image, dtype=np.float32)
    if image.mode == "L":
        pixels = pixels * np.float32(1.0 / 255.0)
    if spec.contrast == "stretch":
        # Films from different sources differ in exposure; stretch the 1st-99th percentile range.
        # float32 bounds: numpy's float64 percentiles would turn the whole array into float64.
        low, high = (np.float32(v) for v in np.percentile(pixels, (1.0, 99.0)))
        if high > low:
            pixels = (pixels - low) * np.float32(1.0 / (high - low))
    pixels = np.clip(pixels, 0.0, 1.0)[:, :, None]
    return np.repeat(pixels, spec.channels, axis=2) if spec.channels > 1 else pixels


def preprocess(source: Source, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """Any supported file (path or bytes) -> float32 (size, size, channels) in [0, 1]."""
    return fit(decode(source, spec), spec)
