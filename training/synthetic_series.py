"""One synthetic patient as a CT series of DICOM files (the built-in data for `ct-edge listen`).

The slices come from training.synthetic's generator with one fixed anatomy seed (the same
patient at every level); along z the lungs grow from the apex to mid-chest and shrink towards
the diaphragm, and a COVID-19 or Viral Pneumonia patient shows findings only in the slices of
the lower two thirds where the lungs are wide (`finding_slices`).

Pixel values: the generator's 8-bit intensities are mapped through the inverse of the lung window
(W 1500 / L -600) to Hounsfield units, so that ct-edge's DICOM decoding (HU -> lung window ->
[0, 1]) gives the model the image it was trained on. Air is therefore at -1350 HU, not -1000:
this is a calibration of the synthetic scale, not anatomy. Stored as signed 16-bit with
RescaleSlope 1 and RescaleIntercept -1024, as scanners do.

    python -m training.synthetic_series --out artifacts/series/covid --label COVID-19 --slices 60
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ct_edge.cli.common import int_at_least
from training.folders import check_replaceable, replace_folder
from training.phantom import CLASSES, MIN_SIZE, render_slice
from training.run_files import describe_os_error

LUNG_WINDOW = (1500.0, -600.0)  # (width, level) HU; ct_edge.preprocess.WINDOWS["lung"]
RESCALE_INTERCEPT = -1024.0
SLICE_THICKNESS_MM = 5.0
FIELD_OF_VIEW_MM = 360.0
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SLICE_NAME = re.compile(r"slice_\d{4,}\.dcm")  # what write_series names its files


@dataclass(frozen=True)
class SeriesInfo:
    """What was written: the folder, the files in slice order and the identifiers."""

    folder: Path
    files: list[Path]
    label: str
    study_uid: str
    series_uid: str
    finding_slices: list[int]


APEX_EXTENT = 0.4
BASE_EXTENT = 0.6


def lung_extent(z: float, apex: float = APEX_EXTENT, base: float = BASE_EXTENT) -> float:
    """Lung size factor at relative height z (0 = apex, 1 = base): `apex` at the apex, 1.0
    between z 0.45 and 0.7 (the size of the training set's mid-chest slices), `base` at the
    diaphragm."""
    if z < 0.45:
        return apex + (1.0 - apex) * math.sin(0.5 * math.pi * z / 0.45)
    if z <= 0.7:
        return 1.0
    return 1.0 - (1.0 - base) * ((z - 0.7) / 0.3) ** 2


def finding_slices(label: str, slices: int, apex: float = APEX_EXTENT,
                   base: float = BASE_EXTENT) -> list[int]:
    """Indexes of the slices that show the label's findings: none for Normal, else the slices
    from one third of the way down to just above the base, where the lungs are at least 0.85
    of their full size."""
    if label == "Normal":
        return []
    return [i for i in range(slices)
            if (z := _z(i, slices)) >= 1 / 3 and lung_extent(z, apex, base) >= 0.85]


def _z(index: int, slices: int) -> float:
    return index / max(1, slices - 1)


def to_hounsfield(image: np.ndarray) -> np.ndarray:
    """uint8 generator intensities -> Hounsfield units through the inverse lung window."""
    width, level = LUNG_WINDOW
    return image.astype(np.float64) / 255.0 * width + (level - width / 2.0)


def _dataset(pixels_hu: np.ndarray, index: int, slices: int, uids: dict[str, str],
             patient_id: str, when: dt.datetime):
    """One CT Image Storage dataset (pydicom is imported lazily: it is a training dependency)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rows, cols = pixels_hu.shape
    spacing = FIELD_OF_VIEW_MM / cols
    z_mm = -index * SLICE_THICKNESS_MM  # patient coordinates: z falls from head to feet
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    day, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = day
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "ct-edge synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic chest CT (ct-edge built-in data)"
    ds.SeriesDescription = "Synthetic axial chest, not a real patient"
    ds.PatientName = "SYNTHETIC^PATIENT"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{SLICE_THICKNESS_MM:g}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [f"{-FIELD_OF_VIEW_MM / 2:g}", f"{-FIELD_OF_VIEW_MM / 2:g}", f"{z_mm:g}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z_mm:g}"
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = f"{LUNG_WINDOW[1]:g}", f"{LUNG_WINDOW[0]:g}"
    stored = np.rint(pixels_hu - RESCALE_INTERCEPT).astype(np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def is_earlier_series(folder: Path) -> bool:
    """True when `folder` holds slice files only, as `write_series` writes."""
    return all(SLICE_NAME.fullmatch(path.name) and path.is_file() for path in folder.iterdir())


def write_series(out: Path, label: str = "COVID-19", slices: int = 60, seed: int = 0,
                 size: int = 192, render_size: int | None = None, apex: float = APEX_EXTENT,
                 base: float = BASE_EXTENT) -> SeriesInfo:
    """Write one patient's series as `out/slice_0001.dcm`...; deterministic pixels for a seed
    (UIDs are new on every call, as a scanner's are). With `render_size`, slices are drawn at
    that side and resized to `size` (a 512-px series for transfer benchmarks in a fraction of the
    time: drawing costs about 1 s per 512-px slice here). `apex` and `base` are the lung size
    factors at the two ends (see `lung_extent`); 0.9 for both keeps every slice near the size of
    the training slices. The slices are written to a new folder that then replaces `out` whole
    (an earlier series' slices never stay beside the new ones; see check_replaceable)."""
    from PIL import Image
    from pydicom.uid import generate_uid

    if label not in CLASSES:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")
    if slices < 1:
        raise ValueError("slices must be >= 1")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if not (0.2 <= apex <= 1.0 and 0.2 <= base <= 1.0):
        raise ValueError("apex and base lung extents must be between 0.2 and 1")
    if min(size, render_size or size) < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    out = Path(out)
    check_replaceable(out, is_earlier_series, "an earlier series (slice_NNNN.dcm files only)")
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    sick = set(finding_slices(label, slices, apex, base))
    when = dt.datetime.now(dt.timezone.utc)
    anatomy_seed = int(np.random.SeedSequence([seed, 7919]).generate_state(1)[0])
    names = [f"slice_{index + 1:04d}.dcm" for index in range(slices)]

    def write(folder: Path) -> None:
        for index, name in enumerate(names):
            rng = np.random.default_rng([seed, CLASSES.index(label), index])
            image = render_slice(label if index in sick else "Normal", rng, render_size or size,
                                 lung_extent=lung_extent(_z(index, slices), apex, base),
                                 anatomy_seed=anatomy_seed)
            if image.shape[0] != size:
                image = np.asarray(Image.fromarray(image).resize((size, size),
                                                                 Image.Resampling.BILINEAR))
            ds = _dataset(to_hounsfield(image), index, slices, uids, f"SYN{seed:05d}", when)
            ds.save_as(folder / name, enforce_file_format=True)

    replace_folder(out, write)
    return SeriesInfo(out, [out / name for name in names], label, uids["study"], uids["series"],
                      sorted(sick))


def main(argv: list[str] | None = None) -> int:
    """CLI: write one synthetic CT series and print its folder."""
    parser = argparse.ArgumentParser(
        prog="python -m training.synthetic_series",
        description="Write one synthetic patient as a CT series (CT Image Storage DICOM files).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, default=argparse.SUPPRESS,
                        help="output folder: a new or empty one, or an earlier series', replaced "
                        "only once the new series is complete (required)")
    parser.add_argument("--label", choices=CLASSES, default="COVID-19", help="the patient's class")
    parser.add_argument("--slices", type=int_at_least(1), default=60, help="number of slices")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="random seed")
    parser.add_argument("--size", type=int_at_least(MIN_SIZE), default=192,
                        help=f"slice side in pixels (>= {MIN_SIZE})")
    parser.add_argument("--render-size", type=int_at_least(MIN_SIZE), default=argparse.SUPPRESS,
                        help="draw at this side and resize to --size, faster for large series "
                        "(default: draw at --size)")
    parser.add_argument("--apex-extent", type=float, default=APEX_EXTENT,
                        help="lung size at the apex (1 = mid-chest)")
    parser.add_argument("--base-extent", type=float, default=BASE_EXTENT,
                        help="lung size at the base (1 = mid-chest)")
    args = parser.parse_args(argv)
    try:
        info = write_series(args.out, args.label, args.slices, args.seed, args.size,
                            getattr(args, "render_size", None), args.apex_extent,
                            args.base_extent)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {describe_os_error(exc, writing=args.out)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; {args.out} was left as it was", file=sys.stderr)
        return 130
    print(f"{len(info.files)} slices ({info.label}, findings in {len(info.finding_slices)}) "
          f"series {info.series_uid}", file=sys.stderr)
    print(info.folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
