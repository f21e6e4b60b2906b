"""A foreign-input set for the domain gate, built without downloads.

    python -m tools.foreign --out artifacts/foreign --modality ct

What it holds (each file's name says what it is):
- other DICOM objects from pydicom's bundled test files: MR, RT dose, ultrasound, segmentation,
  secondary captures, nuclear medicine, structured reports, RT plans and structure sets, an ECG
  waveform; plus the CT files for an X-ray bundle;
- pictures that installed packages ship: matplotlib's photograph (grace_hopper.jpg), logos and
  icons, an MR brain slice (s1045.ima.gz) and elevation maps rendered as images;
- rendered here: text pages, charts, blank / constant / noise / gradient / checkerboard images and
  a colour test pattern.

The other modality's chest images (synthetic CT slices for an X-ray bundle, real X-rays for a CT
bundle) are added by the caller (benchmarks.domain), since where they live differs.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# pydicom test files that are not chest CT / X-ray images, by what they are.
FOREIGN_DICOM = {
    "mr": ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "examples_overlay.dcm"),
    "rtdose": ("rtdose.dcm", "rtdose_1frame.dcm", "rtdose_rle.dcm"),
    "us": ("ExplVR_BigEnd.dcm", "examples_palette.dcm", "examples_rgb_color.dcm",
           "examples_ybr_color.dcm", "examples_jpeg2k.dcm"),
    "seg": ("liver_1frame.dcm",),
    "sc": ("SC_rgb_small_odd.dcm", "SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm",
           "image_dfl.dcm", "JPEGLSNearLossless_08.dcm"),
    "nm": ("JPEG-lossy.dcm", "JPGExtended.dcm"),
    "sr": ("reportsi.dcm", "test-SR.dcm"),
    "rtplan": ("rtplan.dcm",),
    "rtstruct": ("rtstruct.dcm",),
    "ecg": ("waveform_ecg.dcm",),
}
CT_DICOM = ("CT_small.dcm", "693_J2KI.dcm")  # foreign to an X-ray bundle only
PACKAGE_PICTURES = ("sample_data/grace_hopper.jpg", "sample_data/Minduka_Present_Blue_Pack.png",
                    "sample_data/logo2.png", "images/matplotlib_large.png",
                    "images/home_large.png", "images/hand.png")
TEXT = ("Patient information leaflet. Please read this leaflet carefully before you start "
        "taking this medicine. Keep this leaflet: you may need to read it again. If you have any "
        "further questions, ask your doctor or pharmacist. ") * 6


def pydicom_files(modality: str) -> list[Path]:
    """The bundled pydicom test files foreign to a bundle of `modality` ('ct' or 'xray')."""
    from pydicom.data import get_testdata_file

    names = [name for group in FOREIGN_DICOM.values() for name in group]
    if modality == "xray":
        names += CT_DICOM
    found = []
    for name in names:
        path = get_testdata_file(name)
        if path:
            found.append(Path(path))
    return found


def _mpl_data() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path())


def package_pictures() -> list[Path]:
    """Photographs and drawings installed packages ship (matplotlib's sample data and icons)."""
    return [p for p in (_mpl_data() / name for name in PACKAGE_PICTURES) if p.is_file()]


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def _text_page(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    page = Image.new("L", (size, int(size * 1.3)), 255)
    draw = ImageDraw.Draw(page)
    words = TEXT.split()
    y, line = 20, []
    for word in words:
        line.append(word)
        if len(" ".join(line)) > 40 + int(rng.integers(0, 20)):
            draw.text((20, y), " ".join(line), fill=0)
            y, line = y + 14, []
            if y > page.height - 30:
                break
    draw.rectangle((20, 5, size - 20, 12), fill=int(rng.integers(0, 100)))
    return page


def _chart(kind: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(len(kind))
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if kind == "line":
        ax.plot(np.cumsum(rng.normal(size=200)))
    elif kind == "bar":
        ax.bar(range(8), rng.uniform(1, 10, 8))
    else:
        ax.hist(rng.normal(size=1000), bins=30)
    ax.set_title(f"a {kind} chart")
    fig.savefig(path)
    plt.close(fig)
    return path


def _colour_bars(size: int) -> Image.Image:
    colours = [(192, 192, 192), (192, 192, 0), (0, 192, 192), (0, 192, 0), (192, 0, 192),
               (192, 0, 0), (0, 0, 192)]
    bars = np.zeros((size, size, 3), np.uint8)
    for i, colour in enumerate(colours):
        bars[:, i * size // 7 : (i + 1) * size // 7] = colour
    return Image.fromarray(bars, "RGB")


def synthetic_images(size: int = 256, seed: int = 0) -> dict[str, Image.Image]:
    """Blank, constant, noise, gradient, checkerboard and colour-bar images, by name."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    radial = np.hypot(yy - 0.5, xx - 0.5) / np.sqrt(0.5)
    checker = ((np.arange(size)[:, None] // 32 + np.arange(size)[None, :] // 32) % 2) * 255

    def gray(a: np.ndarray) -> Image.Image:
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")

    return {
        "blank-black": gray(np.zeros((size, size))),
        "blank-white": gray(np.full((size, size), 255)),
        "constant-gray": gray(np.full((size, size), 128)),
        "noise-uniform": gray(rng.uniform(0, 255, (size, size))),
        "noise-gaussian": gray(rng.normal(128, 40, (size, size))),
        "noise-salt-pepper": gray((rng.random((size, size)) > 0.5) * 255),
        "gradient-horizontal": gray(xx * 255),
        "gradient-vertical": gray(yy * 255),
        "gradient-radial": gray(radial * 255),
        "checkerboard": gray(checker),
        "colour-bars": _colour_bars(size),
    }


def rendered(out: Path, size: int = 256) -> list[Path]:
    """Write the rendered foreign images into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [_save(image, out / f"{name}.png") for name, image in synthetic_images(size).items()]
    paths += [_save(_text_page(size * 2, seed), out / f"text-page-{seed}.png") for seed in range(3)]
    paths += [_chart(kind, out / f"chart-{kind}.png") for kind in ("line", "bar", "histogram")]
    data = _mpl_data() / "sample_data"
    if (data / "s1045.ima.gz").is_file():  # an MR brain slice, 256x256 16-bit
        raw = np.frombuffer(gzip.decompress((data / "s1045.ima.gz").read_bytes()), np.uint16)
        brain = raw.reshape(256, 256).astype(np.float32)
        paths.append(_save(Image.fromarray((brain / brain.max() * 255).astype(np.uint8), "L"),
                           out / "mr-brain-s1045.png"))
    for name in ("jacksboro_fault_dem.npz", "topobathy.npz"):
        if (data / name).is_file():
            with np.load(data / name) as npz:
                field = np.asarray(npz[npz.files[0]], np.float32)
            field = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
            paths.append(_save(Image.fromarray((field * 255).astype(np.uint8), "L"),
                               out / f"elevation-{name.split('.')[0]}.png"))
    return paths


def build(out: Path, modality: str) -> list[Path]:
    """The whole foreign set for a bundle of `modality` (files outside `out` are listed in place)."""
    return [*pydicom_files(modality), *package_pictures(), *rendered(Path(out))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.foreign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/foreign"),
                        help="folder for the rendered images; pydicom's and the packages' files are "
                             "listed where they are (default: %(default)s)")
    parser.add_argument("--modality", choices=["ct", "xray"], default="ct",
                        help="the bundle's modality; for xray, pydicom's CT files are foreign too "
                             "(default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for path in build(args.out, args.modality):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
