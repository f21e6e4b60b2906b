"""DICOM decoding (optional extra `ct-edge[dicom]`, pydicom >= 3).

What each kind of file becomes (docs/inputs.md says the same for users):

- CT: stored values -> Hounsfield units (modality LUT: RescaleSlope/RescaleIntercept) -> the spec's
  window (lung, W 1500 / L -600, by default; `--window` changes it) -> [0, 1].
- Other grayscale modalities (CR, DX, MR, ...): modality LUT, then the file's own VOI LUT or window
  when present, then its min..max range -> [0, 1].
- MONOCHROME1 (white = low values) is inverted so air is always dark.
- Multi-frame: only the middle frame (0-based index n // 2) is decoded and classified.
- Colour (RGB, YBR_* which pydicom converts to RGB, PALETTE COLOR through its lookup table):
  luminance 0.299 R + 0.587 G + 0.114 B, scaled by the stored bit depth.

The header fields the domain gate reads (ct_edge.domain.metadata_reason) travel with the result:
`image.info["dicom"]` of the decoded image, or `DicomError.info` when the object cannot be decoded
(e.g. a structured report, which holds no image). Within `header_check(...)` the header is judged
before any pixel is decoded: a colour or foreign object costs its header, not its pixels.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import BinaryIO

import numpy as np
from PIL import Image

from .errors import InputError, UnsupportedFormat, one_line
from .limits import MAX_FILE_BYTES, STRIP_ROWS, check_jpeg_scans

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Elements any real DICOM object has; a file with none of them (and no preamble) is not DICOM.
_IDENTIFYING_TAGS = ("SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID",
                     "SeriesInstanceUID", "Rows", "Columns", "PhotometricInterpretation")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Deflated Explicit VR Little Endian: only the file meta group (never compressed) names it.
DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"
META_BYTES = 64 * 1024  # the preamble and the file meta group fit in this, with room to spare
# Values larger than this are left in the file until used: a header read costs no pixel copy.
_DEFER_BYTES = 64 * 1024
# A decoded frame may take as many bytes as a 16-bit gray frame at the pixel limit, the input
# limits.MEMORY_BOUND_MB was measured with; colour and 32/64-bit frames take more per pixel.
FRAME_BYTES_PER_PIXEL = 2
# pydicom turns these into RGB through a float32 copy of the frame (4 more bytes a sample).
_CONVERTED_TO_RGB = ("YBR_FULL", "YBR_FULL_422")
INFO_KEY = "dicom"  # the decoded image's info[] key holding its DicomInfo
NOT_AN_IMAGE = "not a PNG, JPEG or DICOM image"  # as preprocess.decode says it

@dataclass(frozen=True)
class DicomInfo:
    """The header fields that say what a DICOM object is (upper case, stripped; '' when absent)."""

    modality: str = ""
    sop_class_uid: str = ""
    sop_class_name: str = ""
    photometric: str = ""
    body_part: str = ""
    image_type: tuple[str, ...] = ()
    has_pixels: bool = True
    samples: int = 1  # SamplesPerPixel, or the decoded frame's colour axis when it has more

    @classmethod
    def from_dataset(cls, ds) -> DicomInfo:
        def text(keyword: str) -> str:
            value = ds.get(keyword)
            return "" if value is None else str(value).strip().upper()

        uid = ds.get("SOPClassUID")
        name = ""
        if uid is not None:
            name = str(getattr(uid, "name", "") or "")
            name = "" if name == str(uid) else name
        image_type = ds.get("ImageType")
        values = [] if image_type is None else [image_type] if isinstance(image_type, str) \
            else list(image_type)
        return cls(modality=text("Modality"), sop_class_uid=str(uid or "").strip(),
                   sop_class_name=name, photometric=text("PhotometricInterpretation"),
                   body_part=text("BodyPartExamined"),
                   image_type=tuple(str(v).strip().upper() for v in values),
                   has_pixels=any(tag in ds for tag in _PIXEL_TAGS),
                   samples=_count(ds, "SamplesPerPixel", 1))


class DicomError(InputError):
    """A DICOM object that cannot be classified, with what its header says (`info`)."""

    def __init__(self, path: object, problem: str, info: DicomInfo) -> None:
        super().__init__(path, problem)
        self.info = info


HeaderCheck = Callable[[DicomInfo], str | None]
_HEADER_CHECK: ContextVar[HeaderCheck | None] = ContextVar("ct_edge_dicom_header_check",
                                                           default=None)


@contextmanager
def header_check(check: HeaderCheck) -> Iterator[None]:
    """Within the block, `read_dicom` refuses an object whose header `check` gives a reason for
    (a DicomError carrying the header) before decoding its pixels. A context variable: each
    decoding thread sees only its own check."""
    token = _HEADER_CHECK.set(check)
    try:
        yield
    finally:
        _HEADER_CHECK.reset(token)


def _judge(info: DicomInfo, name: str) -> None:
    """DicomError when the active header check finds `info` foreign."""
    check = _HEADER_CHECK.get()
    reason = None if check is None else check(info)
    if reason is not None:
        raise DicomError(name, reason, info)


@dataclass
class DicomFrame:
    """One decoded frame and the header it needs: what `read_dicom` gives once the file's own
    bytes may be dropped (the caller's copy is the largest buffer left; limits.MEMORY_BOUND_MB)."""

    ds: object  # the pydicom Dataset, pixel data elements removed
    pixels: np.ndarray
    name: str
    window: tuple[float, float]
    info: DicomInfo

    def to_image(self) -> Image.Image:
        """The frame -> gray 'F' image in [0, 1], its DicomInfo in `image.info["dicom"]`.
        Raises DicomError for values it cannot use."""
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

        ds, pixels, name = self.ds, self.pixels, self.name
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        try:
            if pixels.ndim == 2 and photometric != "PALETTE COLOR":
                image = _gray_image(ds, pixels, photometric, self.window, name,
                                    apply_modality_lut, apply_voi_lut)
            else:
                image = _colour_image(ds, pixels, photometric, name, apply_color_lut)
        except InputError as exc:
            raise DicomError(exc.path, exc.problem, self.info) from None
        except MemoryError:
            raise DicomError(name, "not enough memory to decode this DICOM file", self.info) \
                from None
        except Exception as exc:  # pydicom's LUT functions raise many unrelated types
            raise DicomError(name, f"cannot apply the DICOM lookup tables ({one_line(exc)})",
                             self.info) from None
        image.info[INFO_KEY] = self.info
        return image


def read_dicom(data: bytes, name: str, window: tuple[float, float], max_pixels: int) -> DicomFrame:
    """DICOM bytes -> its header and one decoded frame (`DicomFrame.to_image` makes the image).
    Raises InputError (DicomError once the header was read) for anything it cannot use; within
    `header_check`, a DicomError for a foreign header before any pixel is decoded."""
    stream = io.BytesIO(data)
    try:
        ds, info = _read_header(stream, data, name)
        _judge(info, name)
        try:
            pixels = _decode_frame(ds, data, name, max_pixels)
        except InputError as exc:
            raise DicomError(exc.path, exc.problem, info) from None
        if pixels.ndim == 3 and pixels.shape[-1] > info.samples:  # colour the header denied
            info = replace(info, samples=int(pixels.shape[-1]))
            _judge(info, name)
        for _ in ds.iterall():  # read what was deferred (a 16-bit LUT) while the stream is open
            pass
    finally:
        stream.close()  # a dataset read from a buffer keeps it: closing frees its copy
    return DicomFrame(ds=ds, pixels=pixels, name=name, window=window, info=info)


def _read_header(stream: BinaryIO, data: bytes, name: str) -> tuple[object, DicomInfo]:
    """The dataset, its large values (the pixel data) left unread, and its DicomInfo.
    InputError when it cannot be read, or is not DICOM at all."""
    try:
        import pydicom
        from pydicom import uid
    except ImportError:
        raise InputError(name, "DICOM support needs pydicom 3: pip install 'ct-edge[dicom]'") from None
    if DEFLATED_SYNTAX in data[:META_BYTES]:
        check_inflated_size(io.BytesIO(data), name)
    try:
        ds = pydicom.dcmread(stream, force=True, defer_size=_DEFER_BYTES)
        if "TransferSyntaxUID" not in ds.file_meta:  # no file meta (ACR-NEMA style): as read
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                              uid.ExplicitVRLittleEndian if little else
                                              uid.ExplicitVRBigEndian)
        info = DicomInfo.from_dataset(ds)
        identified = any(tag in ds for tag in _IDENTIFYING_TAGS)
    except MemoryError:
        raise InputError(name, "not enough memory to decode this DICOM file") from None
    except Exception as exc:  # pydicom raises many unrelated types for a damaged file
        raise InputError(name, "cannot decode the DICOM pixel data "
                               f"({_syntax(data)}{one_line(exc)})") from None
    if data[128:132] != b"DICM" and not info.has_pixels and not identified:
        raise InputError(name, _not_dicom(data))  # force=True reads anything as some dataset
    return ds, info


def _not_dicom(data: bytes) -> str:
    """Why a file named as DICOM is refused: a PNG or JPEG misnamed, or not an image at all."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
    except Exception:  # not an image Pillow knows either
        return NOT_AN_IMAGE
    suffix = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg"}.get(kind or "")
    if suffix is None:
        return NOT_AN_IMAGE
    return f"not a DICOM file but a {kind} image; rename it to {suffix}"


def _count(ds, keyword: str, default: int) -> int:
    """A whole-number header field; `default` when absent or empty."""
    return int(ds.get(keyword, default) or default)


def _decode_frame(ds, data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """The one frame classified (the middle one of a multi-frame object), as decoded."""
    from pydicom.pixels import pixel_array

    try:
        if not any(tag in ds for tag in _PIXEL_TAGS):
            raise InputError(name, "DICOM file has no pixel data (not an image)")
        rows, cols = _count(ds, "Rows", 0), _count(ds, "Columns", 0)
        frames = _count(ds, "NumberOfFrames", 1)
        if rows <= 0 or cols <= 0:
            raise InputError(name, "DICOM file has no image size (Rows/Columns)")
        if rows * cols > max_pixels:
            raise InputError(name, f"DICOM image {cols}x{rows} is over the {max_pixels} pixel limit")
        _check_decoded_bytes(ds, rows, cols, name, max_pixels * FRAME_BYTES_PER_PIXEL)
        _check_frame_size(ds, frames // 2 if frames > 1 else 0, frames, rows, cols, name)
        # Decode only the frame we use: a 500-slice volume must not be expanded in memory.
        pixels = pixel_array(ds, index=frames // 2 if frames > 1 else None)
    except InputError:
        raise
    except MemoryError:
        raise InputError(name, "not enough memory to decode this DICOM file") from None
    except Exception as exc:  # pydicom and its pixel decoders raise many unrelated types
        raise InputError(name, f"cannot decode the DICOM pixel data ({_syntax(data)}{one_line(exc)})") \
            from None
    for tag in _PIXEL_TAGS:  # the encoded copy: the frame is all that is used from here on
        ds.pop(tag, None)
    return pixels


def decoded_frame_bytes(ds, rows: int, cols: int) -> tuple[int, int, int]:
    """(bytes, samples, bits): what pydicom allocates to decode one frame (rows x cols x samples
    x bytes a sample, plus its float32 copy for YBR -> RGB); also `preprocess.decode_cost`'s."""
    samples, bits = max(1, _count(ds, "SamplesPerPixel", 1)), _count(ds, "BitsAllocated", 8)
    per_sample = max(1, -(-bits // 8))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples > 1 and photometric in _CONVERTED_TO_RGB:
        per_sample += 4
    return rows * cols * samples * per_sample, samples, bits


def _check_decoded_bytes(ds, rows: int, cols: int, name: str, limit: int) -> None:
    """Refuse a frame whose decoded array would be over `limit` bytes: the pixel limit alone lets
    colour and 32/64-bit frames take several times the memory the bound was measured with."""
    size, samples, bits = decoded_frame_bytes(ds, rows, cols)
    if size > limit:
        plural = "s" if samples > 1 else ""
        raise InputError(name, f"DICOM image {cols}x{rows} ({samples} sample{plural} of {bits} bits "
                               f"a pixel) takes {size} bytes to decode, over the {limit} byte limit "
                               "(memory bound)")


def _check_frame_size(ds, index: int, frames: int, rows: int, cols: int, name: str) -> None:
    """Refuse a compressed frame whose own header (JPEG, JPEG 2000) claims another size than
    Rows x Columns: pydicom decodes it whole before it notices, so a 3 kB file claiming 104 M
    pixels took 350 MB (found by tools/fuzz/). Read from the codestream header only."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_encapsulated or "PixelData" not in ds:
        return
    from pydicom.encaps import get_frame

    try:
        frame = get_frame(ds.PixelData, index, number_of_frames=frames)
    except Exception:  # a frame pydicom cannot find: its decoder reports that
        return
    if frame[:2] == b"\xff\xd8":  # a JPEG codestream (RLE frames are raw pixel bytes)
        check_jpeg_scans(frame, name)  # pydicom's JPEG decoders walk every scan too
    try:
        with Image.open(io.BytesIO(frame)) as image:
            width, height = image.size
    except Exception:  # RLE, JPEG-LS...: not read by Pillow; their decoders size by the header
        return
    if (width, height) != (cols, rows):
        raise InputError(name, f"the compressed frame is {width}x{height} pixels but the header "
                               f"says {cols}x{rows}")


def _colour_image(ds, pixels: np.ndarray, photometric: str, name: str,
                  apply_color_lut) -> Image.Image:
    """A colour frame (palette, or RGB: pydicom has converted YBR_*) -> its luminance as an 'F'
    image in [0, 1], STRIP_ROWS rows at a time: a whole-frame float32 RGB copy would take 12
    bytes a pixel, over limits.MEMORY_BOUND_MB at the pixel limit."""
    palette = photometric == "PALETTE COLOR" and pixels.ndim == 2
    if not palette and (pixels.ndim != 3 or pixels.shape[-1] < 3):
        raise UnsupportedFormat(name, f"unsupported DICOM pixel array shape {pixels.shape}")
    image = Image.new("F", (pixels.shape[1], pixels.shape[0]))
    for top in range(0, pixels.shape[0], STRIP_ROWS):
        strip = pixels[top : top + STRIP_ROWS]
        if palette:
            strip = apply_color_lut(strip, ds)
            peak = float(np.iinfo(strip.dtype).max) if strip.dtype.kind in "ui" else 1.0
        else:
            peak = 2.0 ** _count(ds, "BitsStored", 8) - 1.0
        luma = np.clip((strip[..., :3].astype(np.float32) @ _LUMA) / peak, 0.0, 1.0)
        if not np.isfinite(luma).all():
            raise InputError(name, "DICOM pixel values are not finite")
        image.paste(Image.fromarray(luma.astype(np.float32, copy=False), mode="F"), (0, top))
    return image


def _gray_image(ds, pixels: np.ndarray, photometric: str, window: tuple[float, float], name: str,
                apply_modality_lut, apply_voi_lut) -> Image.Image:
    """One gray frame -> 'F' image in [0, 1], air dark, STRIP_ROWS rows at a time: whole-frame
    float temporaries (pydicom's LUTs return float64) would break limits.MEMORY_BOUND_MB."""
    ct = str(ds.get("Modality", "")).strip().upper() == "CT"
    voi = not ct and ("WindowCenter" in ds or "VOILUTSequence" in ds)
    tops = range(0, pixels.shape[0], STRIP_ROWS)

    def values(top: int) -> np.ndarray:  # CT: Hounsfield units; others: the file's VOI output
        strip = np.asarray(apply_modality_lut(pixels[top : top + STRIP_ROWS], ds), dtype=np.float32)
        return np.asarray(apply_voi_lut(strip, ds), dtype=np.float32) if voi else strip

    if ct:
        width, level = window
        low, span = level - width / 2.0, width
    else:
        ranges = [(float(v.min()), float(v.max())) for v in map(values, tops)]
        low, span = min(r[0] for r in ranges), max(r[1] for r in ranges) - min(r[0] for r in ranges)
    image = Image.new("F", (pixels.shape[1], pixels.shape[0]))
    for top in tops:
        strip = values(top)
        scaled = np.clip((strip - low) / span if span > 0 else np.zeros_like(strip), 0.0, 1.0)
        scaled = (1.0 - scaled if photometric == "MONOCHROME1" else scaled).astype(np.float32)
        if not np.isfinite(scaled).all():
            raise InputError(name, "DICOM pixel values are not finite")
        image.paste(Image.fromarray(scaled, mode="F"), (0, top))
    return image


def check_inflated_size(stream: BinaryIO, name: str, limit: int = MAX_FILE_BYTES) -> None:
    """Refuse a deflated DICOM whose dataset inflates past `limit` (a decompression bomb).

    pydicom inflates a Deflated Explicit VR Little Endian dataset in one go, in memory, before
    anything can be checked: ~1 MiB of file can claim a gigabyte. So the inflated size is measured
    first, streaming, with nothing kept; the same limit as for an uncompressed file applies. The
    dataset starts where pydicom's own reader of the preamble and file meta group leaves off.
    `stream` is read from its start; any other transfer syntax returns at once.
    """
    try:
        from pydicom import uid
        from pydicom.filereader import (
            _read_command_set_elements,
            _read_file_meta_info,
            read_preamble,
        )

        read_preamble(stream, True)
        meta = _read_file_meta_info(stream)
        if meta.get("TransferSyntaxUID") != uid.DeflatedExplicitVRLittleEndian:
            return
        _read_command_set_elements(stream)
    except (ImportError, AttributeError):  # another pydicom: fail safe, refuse what can't be sized
        raise InputError(name, "deflated DICOM is not supported by this pydicom version") from None
    except Exception:  # an unreadable file meta group: pydicom's own read reports it
        return
    inflater, total, chunk = zlib.decompressobj(-zlib.MAX_WBITS), 0, 1 << 20
    try:
        while not inflater.eof and (data := stream.read(chunk)):
            pending = inflater.decompress(data, chunk)
            while pending:
                total += len(pending)
                if total > limit:
                    raise InputError(name, f"deflated DICOM data inflates to over {limit} bytes "
                                           "(decompression bomb guard)")
                pending = inflater.decompress(inflater.unconsumed_tail, chunk)
    except zlib.error:
        pass  # not a valid deflate stream: pydicom reports it


def _syntax(data: bytes) -> str:
    """'JPEG 2000 Image Compression: ' for compressed files (their decoder may be missing), else ''."""
    try:
        import pydicom

        uid = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True) \
            .file_meta.get("TransferSyntaxUID")
        if uid is not None and uid.is_compressed:
            return f"{uid.name} may need a pydicom decoder plugin, e.g. pylibjpeg; "
    except Exception:  # only decorates a message that is already an error
        pass
    return ""
