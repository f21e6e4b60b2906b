"""Grad-CAM for the Keras model, the CAM-ready head the converter exports, and the device check.

    python -m training.gradcam --model artifacts/model/model.keras --out gradcam.png
    python -m training.gradcam --compare --model artifacts/model/model.keras --bundle artifacts/bundle

Grad-CAM (Selvaraju et al. 2017) weights the last feature map by the mean gradient of the class
logit. For a GAP + Dense head that gradient is the Dense kernel column divided by h*w, so
Grad-CAM equals ReLU of the Dense kernel applied at every position of that feature map: exactly
what `cam_model` adds as a second output for the device (no bias, so the two agree exactly).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ct_edge import LABELS
from ct_edge.cli.common import positive_int
from ct_edge.errors import CtEdgeError, one_line

from .run_files import describe_os_error

MAPS_LAYER = "class_maps"
HEAD_PASSTHROUGH = ("Dropout", "SpatialDropout2D", "Identity", "GaussianNoise", "GaussianDropout")
COMPARE_GRID = 16  # both heatmaps are resized to this grid before correlating them
GRID_PER_CLASS = 3  # Grad-CAM grid: up to this many correct and this many wrong per class


class ModelFolderError(CtEdgeError):
    """The model, or the config.json its training run wrote beside it, is missing or unusable."""


# --- the model side -------------------------------------------------------------------------------


def _producer(tensor: Any) -> Any:
    return tensor._keras_history.operation


def last_feature_layer(model: Any) -> Any:
    """The layer whose output Grad-CAM weights: the input of 'gap' if there is one, else the last
    layer with a rank-4 output (e.g. the last pooling of the Flatten 'reference' CNN)."""
    try:
        return _producer(model.get_layer("gap").input)
    except ValueError:
        pass
    for layer in reversed(model.layers):
        if len(getattr(getattr(layer, "output", None), "shape", None) or ()) == 4:
            return layer
    raise ValueError(f"model {model.name!r} has no rank-4 feature map to explain")


def cam_head(model: Any) -> tuple[Any, np.ndarray] | None:
    """(last feature map tensor, Dense kernel (c, classes)) when the head is GAP -> [Dropout] ->
    Dense 'logits' -> softmax, so that a CAM is exact; None otherwise (e.g. Flatten heads)."""
    from keras import layers

    try:
        gap, logits = model.get_layer("gap"), model.get_layer("logits")
    except ValueError:
        return None
    if not isinstance(gap, layers.GlobalAveragePooling2D) or not isinstance(logits, layers.Dense):
        return None
    if getattr(gap, "keepdims", False) or logits.activation.__name__ != "linear":
        return None
    op = _producer(logits.input)
    while type(op).__name__ in HEAD_PASSTHROUGH:  # inference-time identities
        op = _producer(op.input)
    if op is not gap:
        return None
    return gap.input, np.asarray(logits.get_weights()[0], np.float32)


def cam_model(model: Any) -> Any | None:
    """`model` with a second output 'class_maps' (1, h, w, classes): the 'logits' kernel applied
    at every position of the last feature map, no bias. Its spatial mean plus the bias is the
    logits, so it costs one 1x1 conv. None when the head is not GAP + Dense."""
    import keras
    from keras import layers

    head = cam_head(model)
    if head is None:
        from .ensemble import ensemble_cam_model  # an ensemble's maps: its members' mean map

        return ensemble_cam_model(model)
    features, kernel = head
    conv = layers.Conv2D(kernel.shape[1], 1, use_bias=False, name=MAPS_LAYER, dtype="float32")
    maps = conv(features)
    conv.set_weights([kernel[None, None]])
    return keras.Model(model.inputs, [model.outputs[0], maps], name=f"{model.name}-cam")


def grad_cam(model: Any, images: np.ndarray, classes: np.ndarray | None = None,
             layer: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (n, h, w), each scaled to max 1 (all zero when nothing supports the class),
    for `classes` (default: the predicted ones), and the probabilities (n, classes).

    The gradient is that of the class logit (the 'logits' layer, before softmax), as in the paper.
    """
    import keras
    import tensorflow as tf

    if layer is None and cam_head(model) is None:
        maps_model = cam_model(model)  # an ensemble: its members' mean class map
        if maps_model is not None:
            return _mean_cam(maps_model, images, classes)
    layer = layer or last_feature_layer(model)
    probe = keras.Model(model.inputs, [layer.output, model.get_layer("logits").output,
                                       model.outputs[0]])
    maps, probs = [], []
    for start in range(0, len(images), 32):
        x = tf.convert_to_tensor(images[start : start + 32], tf.float32)
        with tf.GradientTape() as tape:
            features, logits, probabilities = probe(x, training=False)
            tape.watch(features)
            chosen = (np.asarray(probabilities).argmax(axis=1) if classes is None
                      else np.asarray(classes[start : start + 32]))
            score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
        grads = tape.gradient(score, features)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
        maps.append(cam)
        probs.append(np.asarray(probabilities))
    cams = np.concatenate(maps).astype(np.float32)
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0), np.concatenate(probs)


def _mean_cam(maps_model: Any, images: np.ndarray,
              classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """`grad_cam` of a model without one 'logits' layer (an ensemble), from its class maps: for a
    GAP + Dense head Grad-CAM's channel weights are the Dense kernel / (h * w), so Grad-CAM is the
    class map itself, up to the ReLU and the scaling to max 1 done here."""
    maps, probs = [], []
    for start in range(0, len(images), 32):
        probabilities, class_maps = maps_model.predict(images[start : start + 32], verbose=0)
        chosen = (probabilities.argmax(axis=1) if classes is None
                  else np.asarray(classes[start : start + 32]))
        maps.append(np.maximum(class_maps[np.arange(len(chosen)), :, :, chosen], 0.0))
        probs.append(probabilities)
    cams = np.concatenate(maps).astype(np.float32)
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0), np.concatenate(probs)


# --- the training report grid ----------------------------------------------------------------------


def pick_examples(y: np.ndarray, predicted: np.ndarray, per_class: int = GRID_PER_CLASS,
                  seed: int = 0) -> list[int]:
    """Per class in label order: up to `per_class` correct then up to `per_class` wrong indices."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in range(len(LABELS)):
        for correct in (True, False):
            pool = np.flatnonzero((y == label) & ((predicted == y) == correct))
            chosen += sorted(rng.permutation(pool)[:per_class].tolist())
    return chosen


def gradcam_grid(model: Any, x: np.ndarray, y: np.ndarray, path: Path,
                 per_class: int = GRID_PER_CLASS, title: str = "") -> Path:
    """A PNG grid: one row per class, `per_class` correct then `per_class` wrong predictions,
    each the image with its Grad-CAM (for the predicted class) overlaid."""
    import matplotlib.pyplot as plt

    from ct_edge.explain import resize

    from .report import save_figure

    cams, probs = grad_cam(model, x)
    predicted = probs.argmax(axis=1)
    picked = pick_examples(y, predicted, per_class)
    columns = 2 * per_class
    fig, axes = plt.subplots(len(LABELS), columns, figsize=(2.0 * columns, 2.3 * len(LABELS)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, label in enumerate(LABELS):
        for kind, correct in enumerate((True, False)):
            cell = [i for i in picked if y[i] == row and (predicted[i] == row) == correct]
            for k, i in enumerate(cell):
                ax = axes[row, kind * per_class + k]
                ax.imshow(x[i, :, :, 0], cmap="gray", vmin=0, vmax=1)
                ax.imshow(resize(cams[i], x.shape[1]), cmap="jet", alpha=0.4, vmin=0, vmax=1)
                verdict = "ok" if correct else "WRONG"
                ax.set_title(f"{verdict}: {LABELS[predicted[i]]} {probs[i, predicted[i]]:.0%}",
                             fontsize=7, color="black" if correct else "red")
            if not cell:
                ax = axes[row, kind * per_class]
                ax.text(0.5, 0.5, "none" if correct else "no errors", ha="center", va="center",
                        fontsize=8, transform=ax.transAxes)
        axes[row, 0].text(-0.08, 0.5, label, rotation=90, ha="right", va="center", fontsize=9,
                          transform=axes[row, 0].transAxes)
    if cam_head(model) is None and cam_model(model) is not None:
        where = f"the members' mean class map {tuple(cams.shape[1:3])}"
    else:
        layer = last_feature_layer(model)
        where = f"'{layer.name}' {tuple(layer.output.shape[1:3])}"
    fig.suptitle(title or f"Grad-CAM on {where}: {per_class} correct | {per_class} wrong per "
                 "true class", fontsize=9)
    save_figure(fig, path)
    return path


def describe(model: Any, maps: Any | None) -> dict:
    """The manifest's `explain` section: which heatmap method the artifacts support."""
    if maps is None:
        return {"method": "occlusion", "class_maps": None,
                "note": "the head is not GAP + Dense 'logits', so there is no class-activation-map "
                        "output; heatmaps come from occlusion through the runtime"}
    layer = last_feature_layer(model)
    return {"method": "cam", "fallback": "occlusion",
            "class_maps": {"output": "class_maps", "rank": 4,
                           "shape": [1, *(int(d) for d in maps.outputs[1].shape[1:])],
                           "layer": layer.name,
                           "meaning": "the 'logits' Dense kernel (no bias) at every position of the "
                                      "last feature map; ReLU of a class's map is its Grad-CAM, "
                                      "the spatial mean plus the bias its logit"}}


# --- the device check: agreement with Grad-CAM, time per image ---------------------------------------


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two maps; None when either is constant (e.g. all zero)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 1e-12 else None


def check_model(model_path: Path) -> None:
    """A one-line ModelFolderError unless `model_path` is a file."""
    if model_path.is_dir():
        raise ModelFolderError(f"--model {model_path} is a folder; pass its model.keras")
    if not model_path.is_file():
        raise ModelFolderError(f"--model {model_path}: no such file")


def _test_split(model_path: Path, data: Path | None) -> tuple[list[Any], Any, Path]:
    """The model's test split (samples), its preprocessing spec and cache, from config.json."""
    from ct_edge.preprocess import PreprocessSpec

    from . import data as data_mod

    path = model_path.parent / "config.json"
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; the training run writes it beside the model "
                               "(its data, split and preprocessing)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "spec" not in config:
        raise ModelFolderError(f"{path}: no 'spec' (preprocessing); not a training run's config")
    if not (data or config.get("data")):
        raise ModelFolderError(f"{path} names no data folder; pass --data DIR")
    try:
        spec = PreprocessSpec.from_dict(config["spec"])
        seed, val_fraction, test_fraction = data_mod.split_settings(config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ModelFolderError(f"{path}: unusable 'spec', split or seed ({one_line(exc)})") from None
    splits = data_mod.load_splits(Path(data or config["data"]), val_fraction, test_fraction, seed)
    return splits.test, spec, Path(config.get("cache") or data_mod.DEFAULT_CACHE)


def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None}
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "p90": round(float(np.percentile(values, 90)), 4)}


def compare(model_path: Path, bundle: Path, artifacts: list[str] | None = None,
            methods: tuple[str, ...] = ("cam", "occlusion"), limit: int | None = None,
            data: Path | None = None, threads: int | None = None) -> dict:
    """Device heatmaps (`ct_edge.explain`, each artifact x method) against Keras Grad-CAM on the
    test split: Pearson r at a COMPARE_GRID square grid, peak distance, and time per image.

    Both explain the class the Keras model predicts. Times are `explain()` on the file (decode,
    preprocess, heatmap, lung mask) plus rendering the PNG, measured separately.
    """
    from ct_edge.classifier import Classifier
    from ct_edge.explain import choose_method, explain, render, resize

    from . import data as data_mod
    from .models import load_keras_model

    samples, spec, cache = _test_split(model_path, data)
    samples = samples[:limit] if limit else samples
    x, y, skipped = data_mod.load_arrays(samples, spec, cache, progress=False)
    samples = [s for s in samples if str(s.path) not in {path for path, _ in skipped}]
    model = load_keras_model(model_path)
    cams, probs = grad_cam(model, x)
    classes = probs.argmax(axis=1)
    # Upsampled to the input as the device heatmap is, then both down to the comparison grid.
    keras_full = [resize(c, spec.size) for c in cams]
    keras_grid = [resize(c, COMPARE_GRID) for c in keras_full]
    keras_peaks = [np.unravel_index(int(np.argmax(c)), c.shape) for c in keras_full]
    chosen = artifacts or [Classifier.from_bundle(bundle).artifact.name]
    results = []
    for name in chosen:
        classifier = Classifier.from_bundle(bundle, artifact=name, threads=threads)
        for method in methods:
            if method == "cam" and not classifier.has_maps:
                continue
            explain(classifier, samples[0].path, method=method)  # warm-up: allocation, caches
            rs, distances, seconds, render_seconds, agree = [], [], [], [], 0
            for i, sample in enumerate(samples):
                start = time.perf_counter()
                e = explain(classifier, sample.path, method=method, target=LABELS[classes[i]])
                seconds.append(time.perf_counter() - start)
                start = time.perf_counter()
                render(e)
                render_seconds.append(time.perf_counter() - start)
                r = pearson(resize(e.heatmap, COMPARE_GRID), keras_grid[i])
                if r is not None:
                    rs.append(r)
                v, u = np.unravel_index(int(np.argmax(e.heatmap)), e.heatmap.shape)
                distances.append(float(np.hypot(u - keras_peaks[i][1], v - keras_peaks[i][0]))
                                 / spec.size)
                agree += LABELS.index(e.label) == classes[i]
            results.append({
                "artifact": name, "method": method, "default": choose_method(classifier) == method,
                "images": len(samples), "pearson": _summary(rs), "undefined": len(samples) - len(rs),
                "peak_distance": _summary(distances),
                "explain_ms": _summary([s * 1e3 for s in seconds]),
                "render_ms": _summary([s * 1e3 for s in render_seconds]),
                "label_agreement": round(agree / max(len(samples), 1), 4)})
    return {"model": str(model_path), "bundle": str(bundle), "grid": COMPARE_GRID,
            "feature_layer": last_feature_layer(model).name,
            "keras_accuracy": round(float((classes == y).mean()), 4), "results": results}


def markdown(report: dict) -> str:
    """The comparison as a Markdown table (what docs/explain.md shows)."""
    lines = ["| artifact | method | images | Pearson r mean (median) | peak distance mean | "
             "explain ms median (p90) | render ms median |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        p, d, t = r["pearson"], r["peak_distance"], r["explain_ms"]
        lines.append(f"| {r['artifact']} | {r['method']}{' (default)' if r['default'] else ''} | "
                     f"{r['images']} | {p['mean']} ({p['median']}) | {d['mean']} | "
                     f"{t['median']} ({t['p90']}) | {r['render_ms']['median']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.gradcam",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("artifacts/model/model.keras"),
                        help="Keras model with config.json beside it (default: %(default)s)")
    parser.add_argument("--data", type=Path, help="data folder (default: the one in config.json)")
    parser.add_argument("--out", type=Path, help="grid mode: the PNG (default: gradcam.png beside "
                        "the model); --compare: also write the report as JSON here")
    parser.add_argument("--compare", action="store_true",
                        help="compare the bundle's device heatmaps with Grad-CAM on the test split "
                        "(default: off: draw the Grad-CAM grid)")
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundle"),
                        help="--compare: the bundle (default: %(default)s)")
    parser.add_argument("--artifacts", help="--compare: comma-separated artifact names "
                        "(default: the bundle's default)")
    parser.add_argument("--methods", default="cam,occlusion",
                        help="--compare: methods to measure (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int,
                        help="--compare: first N test images (default: all)")
    parser.add_argument("--threads", type=positive_int,
                        help="--compare: engine threads (default: engine's)")
    args = parser.parse_args(argv)
    try:
        check_model(args.model)
        return _run(args)
    except CtEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
    except ValueError as exc:  # e.g. a model.keras Keras cannot load
        print(f"error: {args.model}: {one_line(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 2


def _run(args: argparse.Namespace) -> int:
    """The command once its arguments are parsed: the comparison or the grid."""
    if args.compare:
        report = compare(args.model, args.bundle, args.artifacts.split(",") if args.artifacts else None,
                         tuple(args.methods.split(",")), args.limit, args.data, args.threads)
        if args.out:
            from . import data as data_mod

            data_mod.write_json(args.out, report)
        print(markdown(report), end="")
        return 0
    from . import data as data_mod
    from .models import load_keras_model

    samples, spec, cache = _test_split(args.model, args.data)
    x, y, _ = data_mod.load_arrays(samples, spec, cache, progress=False)
    model = load_keras_model(args.model)
    path = gradcam_grid(model, x, y, args.out or args.model.parent / "gradcam.png")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
