"""The one preprocessing function: every supported format, DICOM handling and every bad input.

The bad-input makers here (`BAD_INPUTS`, `make_dicom`) are reused by test_cli_inputs.py, which checks
the same files give one stderr line and exit 1 from the CLI.
"""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ct_edge.errors import InputError
from ct_edge.preprocess import (
    MAX_PIXELS,
    WINDOWS,
    PreprocessSpec,
    decode,
    parse_window,
    preprocess,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD = sorted(p for p in FIXTURES.iterdir() if p.suffix in (".png", ".jpg", ".dcm"))
IMAGES = [p for p in GOOD if p.suffix != ".dcm"]


def _as_unit(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32)
    return pixels / 255.0 if image.mode == "L" else pixels


# --- crafted files -------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (8-bit gray); nothing that size is allocated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + _chunk(b"IEND", b""))


def make_dicom(path: Path, pixels: np.ndarray, *, modality: str = "CT",
               photometric: str = "MONOCHROME2", slope: float = 1.0, intercept: float = -2048.0,
               with_pixels: bool = True, preamble: bool = True) -> Path:
    """Write a small uncompressed DICOM: 2-D/3-D (frames) uint16 gray, or (..., 3) uint8 colour."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path.name)])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "Test^Phantom"
    colour = pixels.shape[-1] == 3 and pixels.dtype == np.uint8
    frames = pixels.shape[0] if pixels.ndim == (4 if colour else 3) else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8 if colour else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if not colour:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if with_pixels:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:  # old ACR-NEMA style: no preamble, no 'DICM', no file meta
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


def _truncated(name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        data = (FIXTURES / name).read_bytes()
        path = tmp / f"truncated{Path(name).suffix}"
        path.write_bytes(data[: len(data) // 2])
        return path
    return make


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(data)
        return path
    return make


def _pillow_file(path: Path, fmt: str) -> Path:
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path, fmt)
    return path


def _no_pixel_dicom(tmp: Path) -> Path:
    return make_dicom(tmp / "no_pixels.dcm", np.zeros((4, 4), np.uint16), with_pixels=False)


def _empty_folder(tmp: Path) -> Path:
    path = tmp / "empty_folder"
    path.mkdir()
    return path


def _fifo(tmp: Path) -> Path:
    path = tmp / "pipe.png"
    os.mkfifo(path)
    return path


# name -> (maker(tmp_dir) -> path, a fragment of the message). The CLI tests reuse this table.
BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty file": (_write("empty.png", b""), "empty file"),
    "truncated png": (_truncated("gray8.png"), "truncated"),
    "truncated jpeg": (_truncated("rgb.jpg"), "truncated"),
    "text named .png": (_write("notes.png", b"patient list\nnot an image\n"),
                        "not a PNG, JPEG or DICOM image"),
    "dicom without pixel data": (_no_pixel_dicom, "no pixel data"),
    "png bomb 50000x50000": (_write("bomb.png", png_header_only(50_000, 50_000)),
                             "decompression bomb"),
    "png over own limit": (_write("big.png", png_header_only(9_000, 8_000)), "pixel limit"),
    "missing path": (lambda tmp: tmp / "no_such_scan.png", "no such file"),
    "fifo": (_fifo, "not a regular file"),
    "gif": (lambda tmp: _pillow_file(tmp / "anim.gif", "GIF"), "unsupported image format"),
}


# --- every supported format ----------------------------------------------------------------


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_every_fixture_becomes_the_model_input(path: Path) -> None:
    x = preprocess(path)
    assert x.shape == (128, 128, 3) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.01
    assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_formats_of_the_same_picture_agree(path: Path) -> None:
    reference = preprocess(FIXTURES / "gray8.png")
    # Gray PNGs match to rounding; the colour ones carry a slight tint (and 32 palette colours),
    # JPEG (quality 90) adds its own loss.
    tolerance = {"gray8.png": 1e-6, "gray16.png": 0.004}.get(path.name, 0.015 if path.suffix == ".png"
                                                                   else 0.03)
    assert np.abs(preprocess(path) - reference).mean() < tolerance


def test_sixteen_bit_png_keeps_its_precision_and_scales_by_the_bits_it_uses() -> None:
    image = decode(FIXTURES / "gray16.png")
    assert image.mode == "F"  # not squeezed through 8 bits
    reference = _as_unit(decode(FIXTURES / "gray8.png"))
    assert np.abs(np.asarray(image) - reference).max() < 1.0 / 255  # 12-bit data / 4095


def test_transparent_pixels_become_black() -> None:
    pixels = np.asarray(decode(FIXTURES / "rgba.png"))
    assert (pixels[:, :8] == 0).all() and pixels[:, 8:].mean() > 40


def test_palette_and_cmyk_are_converted_to_luminance() -> None:
    assert Image.open(FIXTURES / "palette.png").mode == "P"
    assert Image.open(FIXTURES / "cmyk.jpg").mode == "CMYK"
    gray = _as_unit(decode(FIXTURES / "gray8.png"))
    for name in ("palette.png", "cmyk.jpg"):
        assert np.abs(_as_unit(decode(FIXTURES / name)) - gray).mean() < 0.03


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    gradient = np.tile(np.linspace(0, 255, 2048, dtype=np.float32), (1536, 1)).astype(np.uint8)
    Image.fromarray(gradient).save(path, quality=85)
    image = decode(path)
    assert image.size == (256, 192)  # draft mode: 1/8 scale, still >= the 128 px input
    assert preprocess(path).shape == (128, 128, 3)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(path, exif=exif)
    assert decode(path).size == (64, 80)


def test_bytes_are_accepted_like_files() -> None:
    data = (FIXTURES / "gray8.png").read_bytes()
    assert np.array_equal(preprocess(data), preprocess(FIXTURES / "gray8.png"))
    with pytest.raises(InputError, match="empty file"):
        preprocess(b"")


def test_fixtures_are_reproducible(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path in module.make(tmp_path):
        committed = FIXTURES / path.name
        if path.suffix == ".png" or path.suffix == ".dcm":
            assert np.array_equal(_as_unit(decode(path)), _as_unit(decode(committed))), path.name
        else:  # JPEG bytes may differ between libjpeg builds; the picture may not
            assert np.abs(_as_unit(decode(path)) - _as_unit(decode(committed))).max() < 0.05


# --- DICOM ---------------------------------------------------------------------------------


HU = np.array([[-1350, -600], [150, 0]])


def _hu_phantom() -> np.ndarray:
    """Stored values whose Hounsfield units (with make_dicom's intercept -2048) are HU."""
    return (HU + 2048).astype(np.uint16)


def test_ct_slice_from_pydicom_matches_hounsfield_and_lung_window() -> None:
    import pydicom

    ds = pydicom.dcmread(FIXTURES / "ct_small.dcm")
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    width, level = WINDOWS["lung"]
    expected = np.clip((hu - (level - width / 2)) / width, 0, 1)
    assert np.allclose(np.asarray(decode(FIXTURES / "ct_small.dcm")), expected, atol=1e-6)


def test_ct_uses_slope_intercept_and_the_window(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "ct.dcm", _hu_phantom())
    lung = np.asarray(decode(path))
    assert np.allclose(lung, [[0.0, 0.5], [1.0, 0.9]], atol=1e-6)  # W 1500 / L -600
    mediastinum = np.asarray(decode(path, PreprocessSpec().with_window("mediastinum")))
    assert np.allclose(mediastinum, [[0.0, 0.0], [275 / 350, 125 / 350]], atol=1e-6)  # W 350 / L 50
    custom = np.asarray(decode(path, PreprocessSpec().with_window("2000,0")))
    assert np.allclose(custom, [[0.0, 0.2], [0.575, 0.5]], atol=1e-6)
    # The same HU stored with slope 2: the window sees the same values.
    doubled = make_dicom(tmp_path / "ct2.dcm", ((HU + 4096) // 2).astype(np.uint16), slope=2.0,
                         intercept=-4096.0)
    assert np.allclose(np.asarray(decode(doubled)), lung, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    normal = decode(make_dicom(tmp_path / "m2.dcm", _hu_phantom()))
    inverted = decode(make_dicom(tmp_path / "m1.dcm", _hu_phantom(), photometric="MONOCHROME1"))
    assert np.allclose(np.asarray(inverted), 1.0 - np.asarray(normal))


def test_multi_frame_uses_the_middle_frame(tmp_path: Path) -> None:
    frames = np.stack([np.full((4, 4), hu + 2048, np.uint16) for hu in (-1350, -600, 150)])
    image = np.asarray(decode(make_dicom(tmp_path / "multi.dcm", frames)))
    assert np.allclose(image, 0.5)  # frame 1 of 0..2: -600 HU, the lung window's level


def test_colour_dicom_is_converted_to_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    image = np.asarray(decode(make_dicom(tmp_path / "rgb.dcm", rgb, modality="OT", photometric="RGB")))
    assert np.allclose(image, (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, atol=1e-5)


def test_ybr_colour_dicom_is_luminance_not_a_channel(tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image = np.asarray(decode(make_dicom(tmp_path / "ybr.dcm", ybr, modality="OT",
                                         photometric="YBR_FULL")))
    assert np.allclose(image, (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, atol=2 / 255)


def test_non_ct_gray_dicom_uses_its_full_range(tmp_path: Path) -> None:
    pixels = np.array([[100, 200], [300, 500]], np.uint16)
    image = np.asarray(decode(make_dicom(tmp_path / "mr.dcm", pixels, modality="MR")))
    assert np.allclose(image, [[0.0, 0.25], [0.5, 1.0]])


def test_dicom_without_preamble_is_found_by_its_suffix(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "old.dcm", _hu_phantom(), preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert np.allclose(np.asarray(decode(path)), [[0.0, 0.5], [1.0, 0.9]], atol=1e-6)


def test_truncated_dicom_is_an_input_error(tmp_path: Path) -> None:
    data = (FIXTURES / "ct_small.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 5000])
    with pytest.raises(InputError, match="cannot decode the DICOM pixel data"):
        decode(path)


def test_dicom_without_pydicom_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` fail
    with pytest.raises(InputError, match=r"pip install 'ct-edge\[dicom\]'"):
        decode(FIXTURES / "ct_small.dcm")


# --- bad inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_input_error(case: str, tmp_path: Path) -> None:
    make, fragment = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        preprocess(path)
    assert fragment in info.value.problem
    assert info.value.path == str(path)
    assert "\n" not in str(info.value)


def test_a_folder_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a folder"):
        preprocess(tmp_path)


def test_bomb_is_refused_before_pixels_are_allocated() -> None:
    # 2.5 G pixels would need 2.5 GB; the header alone decides.
    assert MAX_PIXELS < 50_000 * 50_000
    with pytest.raises(InputError, match="decompression bomb"):
        decode(png_header_only(50_000, 50_000))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    path.write_bytes((FIXTURES / "gray8.png").read_bytes())
    path.chmod(0)
    with pytest.raises(InputError, match="permission denied"):
        preprocess(path)


def test_permission_error_is_an_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs as root too: the read itself is made to fail the way chmod 000 makes it fail."""
    path = tmp_path / "locked.png"
    path.write_bytes((FIXTURES / "gray8.png").read_bytes())

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(InputError, match="permission denied"):
        preprocess(path)


def test_unexpected_decoder_exception_becomes_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("decoder\nexploded")

    monkeypatch.setattr(Image, "open", explode)
    with pytest.raises(InputError, match="corrupt or truncated image \\(decoder exploded\\)"):
        decode((FIXTURES / "gray8.png").read_bytes())


# --- the spec ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("lung", (1500.0, -600.0)), ("mediastinum", (350.0, 50.0)), ("400,40", (400.0, 40.0)),
    ("1500, -600", (1500.0, -600.0)),
])
def test_windows_parse(text: str, expected: tuple[float, float]) -> None:
    assert parse_window(text) == expected


@pytest.mark.parametrize("text", ["bone", "400", "a,b", "0,40", "-5,40", "1,2,3"])
def test_bad_windows_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="window"):
        parse_window(text)


def test_spec_round_trips_through_the_manifest_dict() -> None:
    spec = PreprocessSpec(size=96, aspect="letterbox", window=(400.0, 40.0))
    again = PreprocessSpec.from_dict(spec.to_dict())
    assert again == spec and again.fingerprint() == spec.fingerprint()
    assert PreprocessSpec().fingerprint() != spec.fingerprint()


def test_decode_of_bytes_names_them() -> None:
    with pytest.raises(InputError) as info:
        decode(io.BytesIO(b"x").getvalue())
    assert info.value.path == "<bytes>"
