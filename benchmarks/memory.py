"""Peak resident memory of a fresh process that loads one artifact and classifies one image."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from .proc import ChildError, run_child, tail

# Only ct_edge is imported here: this is the footprint of the runtime a device would run.
_CLASSIFY_ONE = """
import json, sys
from ct_edge.classifier import Classifier
classifier = Classifier.from_bundle(sys.argv[1], artifact=sys.argv[2])
prediction = classifier.predict(sys.argv[3])
print(json.dumps({"label": prediction.label, "tensorflow_imported": "tensorflow" in sys.modules}))
"""


def peak_rss_mb() -> float:
    """This process's peak RSS so far (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def artifact_memory(bundle_dir: Path, name: str, image: Path) -> dict:
    """Peak RSS (MiB) of `Classifier.from_bundle(bundle, artifact=name).predict(image)` in a new process."""
    child = run_child([sys.executable, "-c", _CLASSIFY_ONE, str(bundle_dir), name, str(image)])
    if child.returncode != 0:
        raise ChildError(f"classifying with {name} exited {child.returncode}:\n{tail(child.stderr)}")
    answer = json.loads(child.stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": child.max_rss_mb, "wall_s": child.wall_s, **answer,
            "input": describe_input(image)}


def describe_input(image: Path) -> str:
    """'scan.png, 512x512 L, 180 kB': what a peak-RSS figure was measured on."""
    try:
        from PIL import Image

        with Image.open(image) as opened:
            shape = f"{opened.size[0]}x{opened.size[1]} {opened.mode}"
    except Exception:  # a DICOM or another file Pillow cannot open
        shape = "DICOM" if image.suffix.lower() == ".dcm" else "unknown"
    return f"{image.name}, {shape}, {image.stat().st_size / 1e3:.0f} kB"


def limit_memory(bundle_dir: Path, name: str, folder: Path,
                 kinds: tuple[str, ...] = ()) -> dict:
    """Peak RSS of classifying the largest accepted input of each kind (`limit_input`) with
    artifact `name`, each in a fresh process, against MEMORY_BOUND_MB."""
    from ct_edge.limits import MAX_FILE_BYTES, MAX_PIXELS, MEMORY_BOUND_MB

    folder.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for kind in kinds or LIMIT_KINDS:
        image = limit_input(folder, kind)
        try:
            inputs[kind] = artifact_memory(bundle_dir, name, image)
        finally:
            image.unlink(missing_ok=True)  # 10-40 MB each
    worst = max(inputs, key=lambda k: inputs[k]["peak_rss_mb"])
    return {"artifact": name, "bound_mb": MEMORY_BOUND_MB, "max_pixels": MAX_PIXELS,
            "max_file_bytes": MAX_FILE_BYTES, "inputs": inputs, "worst": worst,
            "worst_peak_rss_mb": inputs[worst]["peak_rss_mb"]}


LIMIT_KINDS = ("png-16bit", "png-rgba", "png-rgb", "jpeg-cmyk", "dicom-ct")


def limit_input(folder: Path, kind: str) -> Path:
    """The largest input of `kind` the runtime accepts (MAX_PIXELS, square): a 16-bit gray PNG,
    an RGBA or RGB PNG, a CMYK JPEG (no draft decoding) or an uncompressed 16-bit CT DICOM.

    A gradient with noise in the low bits: files of 20-50% of the raw size, the largest real
    films' range, so the file's own bytes count in the peak too.
    """
    import math

    import numpy as np
    from PIL import Image

    from ct_edge.limits import MAX_PIXELS

    side = math.isqrt(MAX_PIXELS)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 3800, side, dtype=np.float32)
    deep = (ramp[None, :] + ramp[:, None] / 8).astype(np.uint16)
    deep |= rng.integers(0, 64, (side, side), dtype=np.uint16)
    path = folder / f"limit-{kind}-{side}x{side}"
    if kind == "png-16bit":
        Image.fromarray(deep).save(path := path.with_suffix(".png"), compress_level=1)
    elif kind in ("png-rgba", "png-rgb", "jpeg-cmyk"):
        gray = (deep >> 4).astype(np.uint8)
        del deep
        if kind == "png-rgba":
            pixels = np.dstack([gray, gray // 2, gray, np.full_like(gray, 200)])
            Image.fromarray(pixels, "RGBA").save(path := path.with_suffix(".png"), compress_level=1)
        elif kind == "png-rgb":
            Image.fromarray(np.dstack([gray, gray // 2, gray]), "RGB").save(
                path := path.with_suffix(".png"), compress_level=1)
        else:
            Image.fromarray(np.dstack([gray, gray // 2, gray]), "RGB").convert("CMYK").save(
                path := path.with_suffix(".jpg"), quality=90)
    elif kind == "dicom-ct":
        path = _ct_dicom(path.with_suffix(".dcm"), deep)
    else:
        raise ValueError(f"unknown input kind {kind!r}; choose one of {', '.join(LIMIT_KINDS)}")
    return path


def _ct_dicom(path: Path, pixels) -> Path:
    """An uncompressed CT slice (stored values, rescale intercept -1024)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CT", "MONOCHROME2", 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
