"""Regression tests for DICOM and domain-gate defects found in review (one section each)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import GOOD
from PIL import Image

from ct_edge.classifier import CHECK_OFF, NO_GATE, Classifier
from ct_edge.dicom import DicomError, DicomInfo, read_dicom
from ct_edge.domain import FeatureGate, metadata_reason
from ct_edge.errors import InputError
from ct_edge.limits import MEMORY_BOUND_MB, STRIP_ROWS
from ct_edge.preprocess import decode, decode_cost

pydicom = pytest.importorskip("pydicom")

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
WINDOW = (1500.0, -600.0)


def write_dicom(path: Path, pixels: bytes, rows: int, cols: int, *, photometric: str = "MONOCHROME2",
                samples: int = 1, bits: int = 16, jpeg: bool = False, **extra: str) -> Path:
    """A one-frame DX DICOM of raw `pixels` (or one encapsulated JPEG frame when `jpeg`)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds.Modality = "DX"
    ds.PhotometricInterpretation, ds.SamplesPerPixel = photometric, samples
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    with warnings.catch_warnings():  # odd values are the point of some tests
        warnings.simplefilter("ignore")
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
    ds.PixelData = encapsulate([pixels]) if jpeg else pixels
    if jpeg:
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_dicom(path: Path, side: int, photometric: str = "YBR_FULL_422") -> Path:
    """A gray ramp saved as a 3-component JPEG: small file, `side` x `side` x 3 decoded."""
    ramp = np.tile(np.linspace(0, 255, side, dtype=np.uint8), (side, 1))
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([ramp, ramp, ramp])).save(buffer, "JPEG", quality=50)
    return write_dicom(path, buffer.getvalue(), side, side, photometric=photometric, samples=3,
                       bits=8, jpeg=True)


def rgb_dicom(path: Path, rgb: np.ndarray, photometric: str = "RGB") -> Path:
    return write_dicom(path, rgb.tobytes(), *rgb.shape[:2], photometric=photometric, samples=3,
                       bits=8)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files whose pixels pydicom was asked to decode, in order."""
    import pydicom.pixels

    calls: list[str] = []
    real = pydicom.pixels.pixel_array

    def counted(src, *args, **kwargs):
        calls.append(str(getattr(src, "SOPInstanceUID", src)))
        return real(src, *args, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "pixel_array", counted)
    return calls


# --- 1. colour and 32/64-bit DICOMs within limits.MEMORY_BOUND_MB ---------------------------


@pytest.mark.parametrize("kind", ["rgb", "jpeg-ybr"])
def test_colour_dicom_is_out_of_domain_from_its_header_alone(bundle: Path, tmp_path: Path,
                                                             decodes: list[str], kind: str) -> None:
    path = tmp_path / f"{kind}.dcm"
    if kind == "rgb":
        rgb_dicom(path, np.zeros((64, 64, 3), np.uint8))
    else:
        jpeg_dicom(path, 64)
    p = Classifier.from_bundle(bundle).predict(path)
    photometric = "RGB" if kind == "rgb" else "YBR_FULL_422"
    assert (p.status, p.label) == ("out_of_domain", None)
    assert p.reason.startswith(f"colour image ({photometric}); this bundle accepts ")
    assert decodes == [] and list(p.timings_ms) == ["decode"]  # header only: no pixel decoded


def test_peak_rss_of_a_small_jpeg_colour_dicom_is_within_the_bound(bundle: Path,
                                                                   tmp_path: Path) -> None:
    from benchmarks.proc import run_child

    path = jpeg_dicom(tmp_path / "ybr.dcm", 4320)  # ~0.3 MB; 56 MB decoded, 500 MB as it was
    code = ("import json, sys\nfrom ct_edge.classifier import Classifier\n"
            "p = Classifier.from_bundle(sys.argv[1]).predict(sys.argv[2])\n"
            "print(json.dumps([p.status, p.reason]))")
    child = run_child([sys.executable, "-c", code, str(bundle), str(path)])
    assert child.returncode == 0, child.stderr[-2000:]
    status, reason = json.loads(child.stdout.strip().splitlines()[-1])
    assert status == "out_of_domain" and reason.startswith("colour image (YBR_FULL_422)")
    assert child.max_rss_mb <= MEMORY_BOUND_MB, child.max_rss_mb


@pytest.mark.parametrize(("photometric", "samples", "bits", "side", "refused"), [
    ("MONOCHROME2", 1, 16, 10, False),  # 200 bytes: the limit, 2 bytes a pixel
    ("MONOCHROME2", 1, 32, 10, True),  # 400 bytes
    ("MONOCHROME2", 1, 32, 7, False),  # 196 bytes
    ("RGB", 3, 8, 8, False),  # 192 bytes
    ("RGB", 3, 8, 10, True),  # 300 bytes
    ("YBR_FULL", 3, 8, 6, True),  # 108 bytes, but pydicom's float32 RGB copy: 540
])
def test_decoded_size_counts_samples_and_bits(tmp_path: Path, photometric: str, samples: int,
                                              bits: int, side: int, refused: bool) -> None:
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]
    shape = (side, side, samples) if samples > 1 else (side, side)
    path = write_dicom(tmp_path / "f.dcm", np.zeros(shape, dtype).tobytes(), side, side,
                       photometric=photometric, samples=samples, bits=bits)
    if not refused:
        assert read_dicom(path.read_bytes(), "f.dcm", WINDOW, max_pixels=100).to_image().size \
            == (side, side)
        return
    with pytest.raises(DicomError, match=r"bytes to decode, over the 200 byte limit"):
        read_dicom(path.read_bytes(), "f.dcm", WINDOW, max_pixels=100)


def test_colour_is_converted_to_luminance_in_strips_exactly(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (STRIP_ROWS * 2 + 3, 5, 3), dtype=np.uint8)
    image = decode(rgb_dicom(tmp_path / "rgb.dcm", rgb))  # no header check: decoded, as before
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    np.testing.assert_allclose(np.asarray(image), np.clip(luma, 0.0, 1.0), atol=1e-6)


# --- 2. three samples are colour whatever PhotometricInterpretation says ----------------------


def test_three_samples_labelled_monochrome_are_colour(bundle: Path, tmp_path: Path,
                                                      decodes: list[str]) -> None:
    expected = "colour image (3 samples per pixel, labelled MONOCHROME2); this bundle accepts "
    assert metadata_reason(DicomInfo(photometric="MONOCHROME2", samples=3), "xray") \
        == expected + "X-ray (CR, DX)"
    assert metadata_reason(DicomInfo(samples=3), "xray").startswith("colour image (3 samples ")
    classifier = Classifier.from_bundle(bundle)
    for path in (rgb_dicom(tmp_path / "mono3.dcm", np.zeros((32, 32, 3), np.uint8), "MONOCHROME2"),
                 jpeg_dicom(tmp_path / "mono3.jpg.dcm", 32, "MONOCHROME2")):
        p = classifier.predict(path)
        assert (p.status, p.label) == ("out_of_domain", None) and p.reason.startswith(expected)
    assert decodes == []


def test_a_decoded_colour_axis_is_colour(bundle: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels

    path = write_dicom(tmp_path / "gray.dcm", np.zeros((16, 16), np.uint16).tobytes(), 16, 16)
    monkeypatch.setattr(pydicom.pixels, "pixel_array",
                        lambda *args, **kwargs: np.zeros((16, 16, 3), np.uint8))
    p = Classifier.from_bundle(bundle).predict(path)
    assert p.status == "out_of_domain"
    assert p.reason.startswith("colour image (3 samples per pixel, labelled MONOCHROME2)")


# --- 3. a file named .dcm that is not DICOM is an error, not a result -------------------------


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (32, 32), 90).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("content", "problem"), [
    (b"patient list\nnot an image\n" * 20, "not a PNG, JPEG or DICOM image"),
    (_png_bytes(), "not a DICOM file but a PNG image; rename it to .png"),
], ids=["text", "png"])
def test_a_non_dicom_file_named_dcm_is_an_input_error(bundle: Path, tmp_path: Path,
                                                      content: bytes, problem: str) -> None:
    path = tmp_path / "scan.dcm"
    path.write_bytes(content)
    classifier = Classifier.from_bundle(bundle)
    with pytest.raises(InputError) as raised:
        classifier.predict(path)
    assert not isinstance(raised.value, DicomError) and raised.value.problem == problem
    (p,) = classifier.predict_many([path])
    assert (p.status, p.error) == (None, problem)


def test_a_dicom_without_preamble_or_pixels_is_still_dicom(bundle: Path,
                                                           tmp_path: Path) -> None:
    from test_preprocess import make_dicom

    path = make_dicom(tmp_path / "acr.dcm", np.zeros((4, 4), np.uint16), with_pixels=False,
                      preamble=False)
    p = Classifier.from_bundle(bundle).predict(path)
    assert p.status == "out_of_domain" and "holds no image" in p.reason


# --- 4. a bundle without a domain gate never answers "ok" -------------------------------------


def test_a_bundle_without_gate_answers_uncertain_and_says_why(bundle: Path) -> None:
    classifier = Classifier.from_bundle(bundle)
    assert classifier.gate is None  # the test bundle records no domain statistics
    noise = np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    for source in (GOOD[0], buffer.getvalue()):
        p = classifier.predict(source)
        assert p.status == "uncertain" and p.label is not None
        assert p.reason.split("; ")[-1] == NO_GATE
    confident = np.array([0.98, 0.01, 0.01], np.float32)
    assert classifier.decide(confident) == (classifier.labels[0], "uncertain", NO_GATE)


def test_no_domain_check_and_a_gate_keep_their_own_marks(bundle: Path) -> None:
    confident = np.array([0.98, 0.01, 0.01], np.float32)
    forced = Classifier.from_bundle(bundle, domain_check=False)
    assert forced.decide(confident) == (forced.labels[0], "ok", CHECK_OFF)
    gated = Classifier.from_bundle(bundle)
    gated.gate = FeatureGate("max_logit", 1.0, {})
    assert gated.decide(confident, score=0.5) == (gated.labels[0], "ok", None)
    assert gated.decide(confident, score=2.0)[1] == "out_of_domain"


# --- 5. pydicom's warnings stay off stderr ------------------------------------------------------


def test_pydicom_warnings_do_not_reach_stderr(bundle: Path, tmp_path: Path) -> None:
    # Pixel data with excess padding: pydicom warns while decoding it. Two files, so the
    # decoding threads run.
    padded = np.zeros((16, 16), np.uint16).tobytes() + bytes(128)
    paths = [write_dicom(tmp_path / f"padded{i}.dcm", padded, 16, 16) for i in range(2)]
    result = subprocess.run([sys.executable, "-m", "ct_edge.cli", "classify", "-q", "--json",
                             "--bundle", str(bundle), *map(str, paths)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert [json.loads(line)["error"] for line in result.stdout.splitlines()] == [None, None]


# --- what the header-first read must not break -------------------------------------------------


def test_a_16_bit_voi_lut_left_in_the_file_by_the_header_read_is_applied(tmp_path: Path) -> None:
    """A 65,536-entry LUT is over the deferral size: it must still be read, stream open."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = write_dicom(tmp_path / "voi.dcm", (np.arange(64 * 64, dtype=np.uint16) * 7).tobytes(),
                       64, 64)
    import pydicom

    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [0, 0, 16]
    item.add(DataElement(0x00283006, "OW", np.arange(65536, dtype=np.uint16).tobytes()))
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path, enforce_file_format=True)
    assert decode(path).size == (64, 64)


def test_an_rle_frame_is_not_taken_for_a_jpeg_scan_bomb(tmp_path: Path) -> None:
    """RLE frames are raw pixel bytes: FF DA pairs in them are pixel values, not JPEG scans."""
    import pydicom
    from pydicom.uid import RLELossless

    low_bytes = np.tile(np.array([0xFF, 0xDA], np.uint16), 64 * 64 // 2)  # FF DA FF DA ... once coded
    path = write_dicom(tmp_path / "rle.dcm", low_bytes.tobytes(), 64, 64)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(path, enforce_file_format=True)
    assert path.read_bytes().count(b"\xff\xda") > 100
    assert decode(path).size == (64, 64)


# --- the header estimate of classify and serve, parsed in memory when it can be ---------------


def _sources_of_header_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What pydicom.dcmread is handed, in order: 'memory' or 'file'."""
    calls: list[str] = []
    real = pydicom.dcmread

    def counted(source, *args, **kwargs):
        calls.append("memory" if isinstance(source, io.BytesIO) else "file")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counted)
    return calls


def _element(group: int, element: int, vr: str, value: bytes) -> bytes:
    """One explicit-VR little-endian data element, written by hand (out of order if need be)."""
    if vr in ("OB", "OW", "UN", "SQ", "UT"):
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


@pytest.mark.parametrize("padding", [0, 70_000])
def test_the_header_estimate_is_the_same_in_memory_or_from_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, padding: int) -> None:
    """A header inside the first 64 KiB is parsed from memory; a longer one whose value carries
    Pixel Data's tag bytes early, from the file: the same estimate either way."""
    path = write_dicom(tmp_path / "x.dcm", bytes(2 * 40 * 30), 30, 40)
    if padding:
        ds = pydicom.dcmread(path)
        ds.add_new(0x00190010, "LO", "CT-EDGE TEST")
        ds.add_new(0x00191000, "OB", b"\xe0\x7f\x10\x00" + bytes(padding))
        ds.save_as(path, enforce_file_format=True)
    reads = _sources_of_header_reads(monkeypatch)
    expected = path.stat().st_size + 30 * 40 * (2 + 4)  # the file, 16-bit pixels, float32 gray
    assert decode_cost(path) == expected
    assert reads == (["memory", "file"] if padding else ["memory"])


def test_a_header_whose_later_size_is_past_the_first_64_kib_is_estimated_by_it(
        tmp_path: Path) -> None:
    """Found in review: Pixel Data's tag bytes early in a long private value, and the true Rows
    and Columns after it (out of order, as `decode` reads them): the in-memory parse saw only
    the small early ones and put a 4096 x 4096 frame at 5 bytes."""
    frame = io.BytesIO()
    Image.new("L", (4096, 4096), 128).save(frame, "JPEG", quality=50)
    path = write_dicom(tmp_path / "x.dcm", frame.getvalue(), 1, 1, bits=8, jpeg=True)
    data = path.read_bytes()
    pixel_data = data.rfind(b"\xe0\x7f\x10\x00")
    late = (_element(0x0029, 0x0010, "LO", b"CT-EDGE ")
            + _element(0x0029, 0x1010, "OB", b"\xe0\x7f\x10\x00" + bytes(70_000))
            + _element(0x0028, 0x0010, "US", struct.pack("<H", 4096))
            + _element(0x0028, 0x0011, "US", struct.pack("<H", 4096)))
    path.write_bytes(data[:pixel_data] + late + data[pixel_data:])
    assert decode(path).size == (4096, 4096)  # what decode reads: the later size
    assert decode_cost(path) == path.stat().st_size + 4096 * 4096 * (1 + 4)
