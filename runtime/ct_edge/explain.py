"""Heatmaps on the device, without TensorFlow: where in the image does the answer come from?

Two methods, both through the bundle's own artifact and engine:

- ``cam``: the class-activation maps the converter exports as a second, rank-4 model output
  (the 'logits' Dense applied at every position of the last feature map). One inference; the
  same map as Grad-CAM on the Keras model for GAP heads. Only for artifacts that carry it.
- ``occlusion``: a grey patch slides over the image and the drop of the class's log-probability
  is the heat. Any architecture, but one inference per patch position (169 at 128 px).

The default is ``cam`` when the artifact has the map output, ``occlusion`` otherwise
(docs/explain.md has the measured speed and fidelity behind that choice).

The lung mask behind ``lung_share`` is a heuristic on the preprocessed image (dark regions inside
the body, split at the body's midline, each side's convex hull); ``lung_share`` is None when it
does not find two plausible lung fields. Pillow and numpy only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import BundleError
from .files import create_temp
from .preprocess import PreprocessSpec, Source, fit, source_size

if TYPE_CHECKING:
    from .classifier import Classifier

METHODS = ("cam", "occlusion")
PANEL = 256  # px: each of the two panels of the figure
GAP = 8  # px between the panels
HEADER = 64  # px: the text band above the panels
BORDER = 0.08  # the border band is this fraction of the side, on every side
HEAT_ALPHA = 0.55  # overlay opacity where the heat is 1
OCCLUSION_BATCH = 16  # patches per engine call: speed without a large activation buffer
LOG_FLOOR = 1e-4  # log-probabilities are clipped here (int8 outputs reach exactly 0)

# A 'jet'-like colormap: dark blue, blue, cyan, yellow, red, dark red.
_COLORS = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0],
                    [128, 0, 0]], np.float32)


@dataclass
class Explanation:
    """One explained input: the prediction, the heatmap (model-input frame) and where heat lies."""

    path: str
    label: str
    probabilities: dict[str, float]
    target: str  # the class the heatmap is for (the predicted one unless asked otherwise)
    method: str
    artifact: str
    image: np.ndarray  # float32 (size, size) gray model input in [0, 1]
    heatmap: np.ndarray  # float32 (size, size) in [0, 1]
    source_size: tuple[int, int]  # (width, height) of the input image (not of a JPEG's draft)
    peak: dict[str, float]
    lung_share: float | None
    lung_area: float | None
    border_share: float | None
    border_area: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    # As in Prediction: "ok", "uncertain" or "out_of_domain" (then the JSON label is null; `label`
    # stays the class the model picked, which the heatmap explains), and why.
    status: str = "ok"
    reason: str | None = None

    @property
    def uncertain(self) -> bool:
        return self.status == "uncertain"

    def to_dict(self) -> dict:
        """The --json object (without the output path)."""
        answered = self.status != "out_of_domain"
        return {"path": self.path, "label": self.label if answered else None,
                "confidence": round(self.probabilities[self.label], 6) if answered else None,
                "status": self.status, "reason": self.reason,
                "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
                "target": self.target, "method": self.method, "artifact": self.artifact,
                "peak": self.peak, "lung_share": _round(self.lung_share),
                "lung_area": _round(self.lung_area), "border_share": _round(self.border_share),
                "border_area": round(self.border_area, 4),
                "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()}}


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def choose_method(classifier: Classifier, method: str | None = None) -> str:
    """`method`, checked against the artifact; by default cam when the artifact has maps."""
    if method is None:
        return "cam" if classifier.has_maps else "occlusion"
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "cam" and not classifier.has_maps:
        raise BundleError(f"artifact {classifier.artifact.name!r} has no class-activation-map "
                          "output (models without a GAP head, or bundles converted before it "
                          "existed); use --method occlusion, or a bundle converted with class "
                          "maps (on the build machine: `make convert`)")
    return method


def explain(classifier: Classifier, source: Source | np.ndarray, method: str | None = None,
            target: str | None = None) -> Explanation:
    """Classify `source` (a file path, bytes, or a preprocessed (size, size, c) array) and explain
    the answer for `target` (default: the predicted class). Raises InputError for a bad file."""
    method = choose_method(classifier, method)
    if target is not None and target not in classifier.labels:
        raise ValueError(f"unknown class {target!r}; choose one of {', '.join(classifier.labels)}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if isinstance(source, np.ndarray):
        name, x = "<array>", np.asarray(source, np.float32)
        input_size = decoded_size = (x.shape[1], x.shape[0])
    else:
        name = "<bytes>" if isinstance(source, bytes) else str(source)
        image = classifier.decode(source)
        input_size, decoded_size = source_size(image), image.size
        timings["decode"] = (time.perf_counter() - t0) * 1e3
        x = fit(image, classifier.spec)
    t1 = time.perf_counter()
    timings["preprocess"] = (t1 - t0) * 1e3 - timings.get("decode", 0.0)

    if method == "cam":  # one run: probabilities, class maps and the domain score
        probabilities, maps, scores = classifier.predict_with_maps_scored(x[None])
        probabilities = probabilities[0]
        index = classifier.labels.index(target) if target else int(np.argmax(probabilities))
        heatmap = cam_heatmap(maps[0, :, :, index], x.shape[0])
    else:
        probabilities, scores = classifier.predict_scored(x[None])
        probabilities = probabilities[0]
        index = classifier.labels.index(target) if target else int(np.argmax(probabilities))
        heatmap = occlusion_heatmap(classifier, x, index)
    t2 = time.perf_counter()
    timings["heatmap"] = (t2 - t1) * 1e3

    gray = x[:, :, 0]
    lungs = lung_mask(gray)
    border = border_mask(gray.shape[0])
    total = float(heatmap.sum())
    best = int(np.argmax(probabilities))
    info = None if isinstance(source, np.ndarray) else image.info.get("dicom")
    _, status, reason = classifier.decide(probabilities, None if scores is None else scores[0], info)
    result = Explanation(
        path=name, label=classifier.labels[best],
        probabilities={label: float(p) for label, p in zip(classifier.labels, probabilities,
                                                            strict=True)},
        target=classifier.labels[index], method=method, artifact=classifier.artifact.name,
        image=gray, heatmap=heatmap, source_size=input_size,
        peak=peak_location(heatmap, input_size, classifier.spec, decoded_size),
        lung_share=float((heatmap * lungs).sum() / total) if lungs is not None and total > 0
        else None,
        lung_area=float(lungs.mean()) if lungs is not None else None,
        border_share=float((heatmap * border).sum() / total) if total > 0 else None,
        border_area=float(border.mean()), timings_ms=timings, status=status, reason=reason)
    timings["analysis"] = (time.perf_counter() - t2) * 1e3
    return result


# --- the two methods --------------------------------------------------------------------------------


def cam_heatmap(grid: np.ndarray, size: int) -> np.ndarray:
    """A class map (h, w) -> heatmap (size, size) in [0, 1]: ReLU, scale to max 1, bilinear.

    ReLU keeps the evidence for the class, as Grad-CAM does; all zero when there is none.
    """
    heat = np.maximum(np.asarray(grid, np.float32), 0.0)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else heat
    return resize(heat, size)


def occlusion_heatmap(classifier: Classifier, x: np.ndarray, index: int,
                      patch: int | None = None, stride: int | None = None) -> np.ndarray:
    """Drop of log p(class) when a patch of the image's mean grey hides each region, averaged
    over the patches covering a pixel; ReLU and scaled to max 1.

    Patch side/4, stride side/16 (169 positions): of the sizes measured, the closest to Grad-CAM
    (docs/explain.md); smaller patches barely move a prediction that several regions support.
    """
    size = x.shape[0]
    patch = patch or max(4, size // 4)
    stride = stride or max(1, size // 16)
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    positions = [(r, c) for r in starts for c in starts]
    # The image mean: a neutral grey that adds no structure (black or white patches look like
    # air or consolidation to a chest model and would add evidence of their own).
    fill = np.float32(x.mean())
    base = _log_p(classifier.backend.predict(x[None]), index)[0]
    drops = np.empty(len(positions), np.float32)
    for start in range(0, len(positions), OCCLUSION_BATCH):
        chunk = positions[start : start + OCCLUSION_BATCH]
        # Always a full batch: a different batch size would make the engine reallocate.
        batch = np.repeat(x[None], OCCLUSION_BATCH, axis=0)
        for k, (r, c) in enumerate(chunk):
            batch[k, r : r + patch, c : c + patch] = fill
        drops[start : start + len(chunk)] = base - _log_p(classifier.backend.predict(batch),
                                                          index)[: len(chunk)]
    heat = np.zeros((size, size), np.float32)
    count = np.zeros((size, size), np.float32)
    for (r, c), drop in zip(positions, drops, strict=True):
        heat[r : r + patch, c : c + patch] += drop
        count[r : r + patch, c : c + patch] += 1.0
    heat = np.maximum(heat / count, 0.0)
    peak = float(heat.max())
    return heat / peak if peak > 0 else heat


def _log_p(probabilities: np.ndarray, index: int) -> np.ndarray:
    return np.log(np.maximum(probabilities[:, index].astype(np.float64), LOG_FLOOR))


def resize(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float map to (size, size), pixel centres aligned."""
    if grid.shape == (size, size):
        return np.asarray(grid, np.float32)
    image = Image.fromarray(np.asarray(grid, np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), np.float32)


# --- where the heat is ------------------------------------------------------------------------------


def peak_location(heatmap: np.ndarray, source_size: tuple[int, int], spec: PreprocessSpec,
                  decoded_size: tuple[int, int] | None = None) -> dict[str, float]:
    """The hottest pixel, in the input image's pixels (x right, y down) and relative (0..1).

    `decoded_size` is the size `fit` resampled from when it differs from the input's own (a JPEG
    decoded in draft mode at 1/2..1/8 scale): the peak is found there, then scaled up.
    """
    v, u = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    width, height = source_size
    decoded_width, decoded_height = decoded_size or source_size
    x, y = model_to_source(float(u), float(v), (decoded_width, decoded_height), spec)
    x = float(np.clip((x + 0.5) * width / decoded_width - 0.5, 0, width - 1))
    y = float(np.clip((y + 0.5) * height / decoded_height - 0.5, 0, height - 1))
    return {"x": round(x, 1), "y": round(y, 1), "x_rel": round((x + 0.5) / width, 4),
            "y_rel": round((y + 0.5) / height, 4), "value": round(float(heatmap[v, u]), 4)}


def model_to_source(u: float, v: float, source_size: tuple[int, int],
                    spec: PreprocessSpec) -> tuple[float, float]:
    """A model-input pixel (u, v) -> the input image pixel it was resampled from (the inverse
    of `preprocess.fit` for the spec's aspect handling), clipped to the image."""
    width, height = source_size
    size = spec.size
    if spec.aspect == "crop":
        side = min(width, height)
        x = (width - side) // 2 + (u + 0.5) * side / size - 0.5
        y = (height - side) // 2 + (v + 0.5) * side / size - 0.5
    elif spec.aspect == "letterbox":
        scale = size / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        x = (u - (size - inner[0]) // 2 + 0.5) * width / inner[0] - 0.5
        y = (v - (size - inner[1]) // 2 + 0.5) * height / inner[1] - 0.5
    else:
        x = (u + 0.5) * width / size - 0.5
        y = (v + 0.5) * height / size - 0.5
    return float(np.clip(x, 0, width - 1)), float(np.clip(y, 0, height - 1))


def border_mask(size: int, fraction: float = BORDER) -> np.ndarray:
    """True in the band of `fraction` of the side along every edge (markers, collimation)."""
    band = max(1, round(size * fraction))
    mask = np.zeros((size, size), bool)
    mask[:band], mask[-band:], mask[:, :band], mask[:, -band:] = True, True, True, True
    return mask


def lung_mask(gray: np.ndarray, min_area: float = 0.04, max_area: float = 0.6,
              min_fill: float = 0.15) -> np.ndarray | None:
    """An estimate of the lung fields in a preprocessed slice or film, or None.

    Dark pixels (below an Otsu threshold) not connected to the image border are air inside the
    body; small specks are removed, the rest is split at the body's midline and each side is
    replaced by its convex hull, so opacities at the lung's edge (where findings are) stay in.
    None unless both sides are found, each at least `min_fill` dark within its hull (scattered
    dark specks are not a lung), and together cover min_area..max_area of the image. Heuristic: it
    takes the heart notch for lung, misses lungs that touch the image edge (tight crops), and a
    completely white lung.
    """
    size = gray.shape[0]
    smooth = _box3(np.asarray(gray, np.float32))
    dark = smooth < _otsu(smooth)
    outside = _reach_from_border(dark)
    inside = _dilate(_erode(dark & ~outside, 1), 1)  # opening: drop specks and thin lines
    body = ~outside
    if not body.any():
        return None
    middle = float(np.nonzero(body)[1].mean())
    columns = np.arange(size)[None, :]
    mask = np.zeros((size, size), bool)
    for side in (columns < middle, columns >= middle):
        part = inside & side
        if part.mean() < min_area / 4:
            return None
        hull = _hull(part)
        if part.sum() < min_fill * hull.sum():
            return None
        mask |= hull
    return mask if min_area <= mask.mean() <= max_area else None


def _box3(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, 1, mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


def _otsu(image: np.ndarray, bins: int = 64) -> float:
    hist, edges = np.histogram(image, bins=bins, range=(0.0, 1.0))
    p = hist / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    omega = np.cumsum(p)
    mu = np.cumsum(p * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return float(centres[int(np.nanargmax(between))]) if np.isfinite(between).any() else 0.5


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        for k in range(1, radius + 1):
            if axis == 0:
                grown[k:] |= out[:-k]
                grown[:-k] |= out[k:]
            else:
                grown[:, k:] |= out[:, :-k]
                grown[:, :-k] |= out[:, k:]
        out = grown
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    return ~_dilate(~mask, radius)


def _reach_from_border(allowed: np.ndarray) -> np.ndarray:
    """Pixels of `allowed` connected to the image border through `allowed` (8-connected)."""
    seen = np.zeros_like(allowed)
    seen[0], seen[-1], seen[:, 0], seen[:, -1] = allowed[0], allowed[-1], allowed[:, 0], allowed[:, -1]
    while True:
        grown = seen
        for _ in range(8):  # several steps per convergence check
            grown = _dilate(grown, 1) & allowed
        if np.array_equal(grown, seen):
            return seen
        seen = grown


def _hull(part: np.ndarray) -> np.ndarray:
    """The convex hull of a mask's pixels, filled (per-row extremes, monotone chain)."""
    rows = np.flatnonzero(part.any(axis=1))
    if len(rows) == 0:
        return part
    left = part[rows].argmax(axis=1)
    right = part.shape[1] - 1 - part[rows][:, ::-1].argmax(axis=1)
    points = sorted({(int(c), int(r)) for r, a, b in zip(rows, left, right, strict=True)
                     for c in (a, b)})
    if len(points) < 3:
        return part

    def cross(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[int, int]] = []
    upper: list[tuple[int, int]] = []
    for chain, ordered in ((lower, points), (upper, reversed(points))):
        for point in ordered:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], point) <= 0:
                chain.pop()
            chain.append(point)
    canvas = Image.new("1", (part.shape[1], part.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon(lower[:-1] + upper[:-1], fill=1, outline=1)
    return np.asarray(canvas, bool) | part


# --- the figure -------------------------------------------------------------------------------------


def figure_size(panel: int = PANEL) -> tuple[int, int]:
    """(width, height) of the PNG `render` draws."""
    return 2 * panel + GAP, HEADER + panel


def colorize(heat: np.ndarray) -> np.ndarray:
    """Heat in [0, 1] -> uint8 RGB through a 'jet'-like colormap."""
    position = np.clip(heat, 0.0, 1.0) * (len(_COLORS) - 1)
    low = np.minimum(position.astype(np.int64), len(_COLORS) - 2)
    t = (position - low)[..., None]
    return np.rint(_COLORS[low] * (1 - t) + _COLORS[low + 1] * t).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render(e: Explanation, panel: int = PANEL) -> Image.Image:
    """The input (as the model saw it) and the heatmap over it, side by side, with the label,
    the probabilities and the peak marked."""
    gray = Image.fromarray(np.rint(np.clip(e.image, 0, 1) * 255).astype(np.uint8), mode="L")
    gray = gray.resize((panel, panel), Image.Resampling.BILINEAR).convert("RGB")
    base = np.asarray(gray, np.float32)
    heat = resize(e.heatmap, panel)[..., None]
    alpha = HEAT_ALPHA * heat
    over = np.rint(base * (1 - alpha) + colorize(heat[..., 0]) * alpha).astype(np.uint8)
    canvas = Image.new("RGB", figure_size(panel), (0, 0, 0))
    canvas.paste(gray, (0, HEADER))
    canvas.paste(Image.fromarray(over, mode="RGB"), (panel + GAP, HEADER))
    draw = ImageDraw.Draw(canvas)
    if float(e.heatmap.max()) > 0:
        v, u = np.unravel_index(int(np.argmax(e.heatmap)), e.heatmap.shape)
        px = panel + GAP + (u + 0.5) * panel / e.heatmap.shape[1]
        py = HEADER + (v + 0.5) * panel / e.heatmap.shape[0]
        for width, color in ((3, (0, 0, 0)), (1, (255, 255, 255))):
            draw.line([(px - 7, py), (px + 7, py)], fill=color, width=width)
            draw.line([(px, py - 7), (px, py + 7)], fill=color, width=width)
    font, small = _font(15), _font(12)
    confidence = e.probabilities[e.label]
    if e.status == "out_of_domain":
        title = f"OUT OF DOMAIN: no answer (heat for the model's pick, {e.label})"
    else:
        title = f"{e.label} {confidence:.1%}" + (" (UNCERTAIN)" if e.uncertain else "")
    draw.text((6, 4), title, fill=(255, 255, 255), font=font)
    others = "   ".join(f"{label} {p:.1%}" for label, p in
                       sorted(e.probabilities.items(), key=lambda item: -item[1]))
    draw.text((6, 24), others, fill=(200, 200, 200), font=small)
    shares = [f"heat for {e.target} ({e.method}, {e.artifact})"]
    if e.lung_share is not None:
        shares.append(f"in lungs {e.lung_share:.0%}")
    if e.border_share is not None:
        shares.append(f"at border {e.border_share:.0%}")
    draw.text((6, 42), ", ".join(shares), fill=(200, 200, 200), font=small)
    draw.text((figure_size(panel)[0] - 130, 6), "not for diagnosis", fill=(160, 160, 160),
              font=small)
    return canvas


def save(e: Explanation, path: str | Path, panel: int = PANEL) -> Path:
    """Render and write a PNG atomically (temp file, then rename); adds 'render' to timings."""
    start = time.perf_counter()
    path = Path(path)
    figure = render(e, panel)
    fd, tmp = create_temp(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            # Level 1: a quarter larger than the default 6 but 4x faster to write on a device.
            figure.save(handle, format="PNG", compress_level=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    e.timings_ms["render"] = (time.perf_counter() - start) * 1e3
    return path
