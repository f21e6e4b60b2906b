"""Regression tests for image decoding defects: JPEG scan bombs, PNG text chunks, animated images
and two large decodes in flight at once (one section each)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ct_edge import inputs
from ct_edge.errors import InputError
from ct_edge.limits import (
    DECODE_BUDGET_BYTES,
    MAX_JPEG_SCANS,
    MAX_PNG_TEXT_BYTES,
    MAX_PNG_TEXT_CHUNK,
    MEMORY_BOUND_MB,
    check_jpeg_scans,
)
from ct_edge.preprocess import PreprocessSpec, decode, decode_cost, source_size

# --- progressive JPEG scan bomb: one small scan repeated thousands of times ---------------------


def _progressive_jpeg(side: int = 256) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", progressive=True, quality=90)
    return out.getvalue()


def _scans(data: bytes) -> list[bytes]:
    """Each scan of a JPEG: its SOS segment and the entropy-coded data after it."""
    scans, at = [], 2
    while data[at + 1] != 0xD9:
        end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if data[at + 1] == 0xDA:  # entropy-coded data runs to the next marker but RSTn
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            scans.append(data[at:end])
        at = end
    return scans


def _scan_bomb(repeats: int) -> bytes:
    """A gray progressive JPEG with its first AC scan repeated `repeats` more times."""
    data = _progressive_jpeg()
    # One component: Ss is byte 7 of the scan header, Ah (high nibble) byte 9.
    first_ac = next(scan for scan in _scans(data) if scan[7] > 0 and scan[9] >> 4 == 0)
    return data[:-2] + first_ac * repeats + b"\xff\xd9"


def test_a_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    assert source_size(decode(_scan_bomb(0))) == (256, 256)  # the same file, no scan repeated
    with pytest.raises(InputError, match="scan") as error:
        decode(_scan_bomb(MAX_JPEG_SCANS))
    assert "\n" not in str(error.value) and "scan bomb" in error.value.problem


def test_the_scan_check_is_public_for_dicom_frames_and_ignores_stuffed_bytes() -> None:
    check_jpeg_scans(_progressive_jpeg(), "x.jpg")  # libjpeg's own script: ~6-10 scans
    check_jpeg_scans(b"\xff\xd8" + b"\xff\x00" * 100_000 + b"\xff\xd9", "stuffed.jpg")
    with pytest.raises(InputError, match="scan"):
        check_jpeg_scans(_scan_bomb(MAX_JPEG_SCANS), "bomb.jpg")
    check_jpeg_scans(b"\xff\x00" * (32 * 1024 * 1024), "large.jpg")  # MAX_FILE_BYTES of data


def test_a_scan_bomb_inside_a_dicom_file_is_refused(tmp_path: Path) -> None:
    """pydicom hands a JPEG frame to the same kind of decoder: the same guard applies."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    def dicom_with(frame: bytes, path: Path) -> Path:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality = "DX"
        ds.Rows = ds.Columns = 256
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].is_undefined_length = True
        ds.save_as(path, enforce_file_format=True)
        return path

    assert source_size(decode(dicom_with(_scan_bomb(0), tmp_path / "one.dcm"))) == (256, 256)
    with pytest.raises(InputError, match="scan bomb"):
        decode(dicom_with(_scan_bomb(MAX_JPEG_SCANS), tmp_path / "bomb.dcm"))


# --- PNG text chunks: Pillow's defaults keep up to 64 MB of them ----------------------------------


def _png_with_text(chunks: int, chars: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    for index in range(chunks):
        info.add_text(f"k{index}", "A" * chars, zip=True)  # 1 MB of text is ~1 kB compressed
    out = io.BytesIO()
    Image.new("L", (64, 64), 90).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def test_pillow_text_limits_are_set_once_at_import() -> None:
    assert PngImagePlugin.MAX_TEXT_MEMORY == MAX_PNG_TEXT_BYTES < 64 * 1024 * 1024
    assert PngImagePlugin.MAX_TEXT_CHUNK == MAX_PNG_TEXT_CHUNK


def test_png_text_chunks_over_the_limit_are_refused_and_ordinary_text_is_kept() -> None:
    with pytest.raises(InputError, match="PNG text"):
        decode(_png_with_text(3, 1_000_000))
    assert decode(_png_with_text(4, 20_000)).size == (64, 64)  # software, XMP: a few kB


def test_png_text_chunks_add_little_to_peak_rss(tmp_path: Path) -> None:
    (tmp_path / "text.png").write_bytes(_png_with_text(63, 1024 * 1024 - 64))
    code = """
import sys
from pathlib import Path
from ct_edge.errors import InputError
from ct_edge.preprocess import decode

def hwm():
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith("VmHWM")) / 1024

before = hwm()
try:
    decode(sys.argv[1])
except InputError:
    pass
print(hwm() - before)
"""
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path / "text.png")],
                           capture_output=True, text=True, timeout=60, check=True)
    assert float(child.stdout) < 16, child.stdout  # Pillow's defaults: +63 MB


# --- animated PNG and MPO: one frame would be classified silently ---------------------------------


def test_animated_png_is_refused_and_an_mpo_is_its_first_picture(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 64), (v, v, v)) for v in (0, 128, 255)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "phone.jpg", "MPO", save_all=True, append_images=frames[1:2])
    with pytest.raises(InputError) as error:
        decode(tmp_path / "anim.png")
    assert error.value.problem == "animated image (3 frames); send one frame"
    # A phone's JPEG with a depth or HDR map: the first picture is the photo itself.
    assert np.asarray(decode(tmp_path / "phone.jpg")).max() < 0.05
    frames[0].save(tmp_path / "one.png", save_all=True)  # an APNG of one frame is a still image
    assert decode(tmp_path / "one.png").size == (64, 64)


# --- parallel decodes: two large inputs in flight at once went over MEMORY_BOUND_MB ---------------


def _deep_png(path: Path, side: int) -> Path:
    """A 16-bit PNG of `side` x `side` zeros: a few kB on disk, `side`**2 x 6 bytes to decode."""
    Image.fromarray(np.zeros((side, side), np.uint16)).save(path)
    return path


def _overlaps(items: list[tuple[str, None]], monkeypatch: pytest.MonkeyPatch) -> list[set[str]]:
    """The sets of files in flight together while `inputs.predictions` runs over `items`."""
    active: set[str] = set()
    seen: list[set[str]] = []
    lock = threading.Lock()

    def classify_one(classifier: object, path: str, error: str | None) -> str:
        with lock:
            active.add(path)
            seen.append(set(active))
        time.sleep(0.05)
        with lock:
            active.discard(path)
        return path

    monkeypatch.setattr(inputs, "classify_one", classify_one)
    classifier = SimpleNamespace(spec=PreprocessSpec())
    assert list(inputs.predictions(classifier, items)) == [path for path, _ in items]  # type: ignore[arg-type]
    return seen


def test_large_inputs_are_not_decoded_together_and_small_ones_are(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    large = _deep_png(tmp_path / "large0.png", 4320)
    assert DECODE_BUDGET_BYTES / 2 < decode_cost(large) <= DECODE_BUDGET_BYTES  # from the header
    for index in (1, 2):
        shutil.copy(large, tmp_path / f"large{index}.png")
    small = [_deep_png(tmp_path / f"small{index}.png", 64) for index in range(4)]
    unknown = tmp_path / "unknown.png"  # a header that cannot be read: its cost is unknown
    unknown.write_bytes(b"not a PNG")
    names = [small[0], tmp_path / "large0.png", tmp_path / "large1.png", small[1], unknown,
             tmp_path / "large2.png", small[2], small[3]]
    for together in _overlaps([(str(path), None) for path in names], monkeypatch):
        assert sum(decode_cost(path) or DECODE_BUDGET_BYTES for path in together) \
            <= DECODE_BUDGET_BYTES, together
        assert len(together) == 1 or str(unknown) not in together
    only_small = _overlaps([(str(path), None) for path in small], monkeypatch)
    assert max(len(together) for together in only_small) == inputs.DECODE_WORKERS


def test_peak_rss_of_two_largest_inputs_in_one_run_is_within_the_bound(
        bundle: Path, tmp_path: Path) -> None:
    from benchmarks.memory import limit_input
    from benchmarks.proc import run_child

    first = limit_input(tmp_path, "png-16bit")
    second = Path(shutil.copy(first, tmp_path / "second.png"))
    onnx = (bundle / "model_fp32.onnx").is_file()  # onnxruntime: the heavier engine
    child = run_child([sys.executable, "-m", "ct_edge.cli", "classify", "--json", "--bundle",
                       str(bundle), "--artifact", "onnx-fp32" if onnx else "tflite-fp32",
                       str(first), str(second)])
    rows = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    assert [row["error"] for row in rows] == [None, None], child.stderr[-2000:]
    assert child.max_rss_mb <= MEMORY_BOUND_MB, child.max_rss_mb
