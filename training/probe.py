"""Linear probe: frozen ImageNet EfficientNet-Lite0 features, a logistic head, the project's folds.

    python -m training.probe --data ../shared/data/covid19-xray [--sizes 128,160,224,288]

Every image goes through `ct_edge.preprocess` with `PreprocessSpec(size=S)`; the frozen network's
global-average-pooled features (after the head conv, and of two earlier stages) of the image and
of its horizontal flip are cached as .npz. A multinomial logistic regression on standardised
features is cross-validated with exactly the folds of `training.evaluate.cross_validate` (k-fold
by near-duplicate group, `data.kfold_hash_splits` with the run's seed); its L2 strength is chosen
by an inner k-fold (same grouping) on the training part only, never on the test fold. Figures are
the share of all images right, each image tested once per seed, without and with flip averaging.

The same head is a training recipe: `python -m training.train --arch efficientnet-lite0 --recipe
probe` (`fit_probe`) gives a model folder that `python -m convert` turns into a bundle.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ct_edge import LABELS
from ct_edge.errors import CtEdgeError
from ct_edge.files import NUMPY_LOAD_LOCK
from ct_edge.preprocess import PreprocessSpec

from . import data as data_mod

DEFAULT_OUT = Path("artifacts") / "issue14" / "probe"
DEFAULT_SIZES = "128,160,224,288"
DEFAULT_SEEDS = "0,1,2"
DEFAULT_LAMBDAS = "1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1,3"
# Pooled feature maps: name -> Keras layer of `efficientnet_lite.features` (channels).
LAYERS = {"head": "head_relu",      # 1280, stride 32: what the registry model's 'gap' sees
          "stage6": "block14_add",  # 192, stride 32
          "stage5": "block10_add"}  # 112, stride 16


def extract_features(x: np.ndarray, layers: dict[str, str] = LAYERS,
                     batch_size: int = 16) -> dict[str, np.ndarray]:
    """Frozen ImageNet EfficientNet-Lite0: name -> (n, channels) spatial means of `layers`' maps
    for the [0, 1] images `x` (n, s, s, 3); also name + '_flip' for their horizontal flips."""
    import keras

    from .efficientnet_lite import features, load_imagenet

    inputs = keras.Input(x.shape[1:], name="image")
    backbone = keras.Model(inputs, features(inputs))
    load_imagenet(backbone)
    model = keras.Model(inputs, [backbone.get_layer(name).output for name in layers.values()])
    out: dict[str, list[np.ndarray]] = {}
    for flip in (False, True):
        batch = x[:, :, ::-1] if flip else x
        for start in range(0, len(x), batch_size):
            maps = model.predict_on_batch(np.ascontiguousarray(batch[start:start + batch_size]))
            for name, fmap in zip(layers, maps, strict=True):
                out.setdefault(name + ("_flip" if flip else ""), []).append(
                    np.asarray(fmap).mean(axis=(1, 2)))
    return {name: np.concatenate(parts).astype(np.float32) for name, parts in out.items()}


def load_or_extract(root: Path, size: int, out: Path,
                    cache: Path = data_mod.DEFAULT_CACHE) -> tuple[list[data_mod.Sample], dict]:
    """The readable samples of `root`'s train/ folder and their features at `size` px, read from
    `out`/features-<size>.npz when it holds exactly these files, else extracted and saved there."""
    train_dir = root / "train" if (root / "train").is_dir() else root
    samples = data_mod.scan_split(train_dir)
    spec = PreprocessSpec(size=size)
    path = out / f"features-{size}.npz"
    if path.is_file():
        with NUMPY_LOAD_LOCK:
            stored = dict(np.load(path))
        kept = set(stored["sha256"].tolist())
        readable = [s for s in samples if s.sha256 in kept]
        if (stored["fingerprint"].item() == spec.fingerprint()
                and [s.sha256 for s in readable] == stored["sha256"].tolist()):
            return readable, stored
    x, _, skipped = data_mod.load_arrays(samples, spec, cache, desc=f"decode {size}px")
    data_mod.warn_skipped(skipped)
    bad = {p for p, _ in skipped}
    samples = [s for s in samples if str(s.path) not in bad]
    started = time.time()
    stored = extract_features(x)
    stored.update(sha256=np.asarray([s.sha256 for s in samples]),
                  paths=np.asarray([str(s.path) for s in samples]),
                  labels=np.asarray([s.label for s in samples]),
                  fingerprint=np.asarray(spec.fingerprint()),
                  seconds=np.asarray(time.time() - started))
    out.mkdir(parents=True, exist_ok=True)
    np.savez(path, **stored)
    return samples, stored


@dataclass
class LinearHead:
    """Multinomial logistic regression on standardised features, mean cross-entropy plus
    (l2 / 2)·|W|² (bias unpenalised but for a tiny ridge that fixes softmax's free constant).

    Fitted in the basis of the training features' right singular vectors: the L2 optimum lies in
    their span, so this is the full-dimensional model exactly, with at most n weights per class.
    """

    l2: float
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    basis: np.ndarray | None = None
    theta: np.ndarray | None = None

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = ((x - self.mean) / self.scale) @ self.basis
        return _softmax(z @ self.theta[:-1] + self.theta[-1])


def fit_path(x: np.ndarray, y: np.ndarray, lambdas: list[float], classes: int = len(LABELS),
             per_feature: bool = True) -> list[LinearHead]:
    """One LinearHead per L2 strength on the same data: standardised and decomposed once, each
    fit started from the solution of the next stronger penalty. `per_feature` False scales all
    features by one common standard deviation instead of each by its own."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0) if per_feature else np.full(x.shape[1], x.std())
    scale[scale < 1e-8] = 1.0
    xs = (x - mean) / scale
    _, singular, vt = np.linalg.svd(xs, full_matrices=False)
    basis = vt[singular > 1e-8 * singular[0]].T
    z = np.hstack([xs @ basis, np.ones((len(x), 1))])
    onehot = np.eye(classes)[y]
    heads: dict[int, LinearHead] = {}
    theta = None
    for i in sorted(range(len(lambdas)), key=lambda i: -lambdas[i]):
        theta = _newton(z, onehot, lambdas[i], start=theta)
        heads[i] = LinearHead(lambdas[i], mean, scale, basis, theta)
    return [heads[i] for i in range(len(lambdas))]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _newton(z: np.ndarray, onehot: np.ndarray, l2: float, iterations: int = 100,
            start: np.ndarray | None = None) -> np.ndarray:
    """Damped Newton on the (strictly convex) penalised mean cross-entropy; z's last column is 1."""
    n, d = z.shape
    k = onehot.shape[1]
    ridge = np.full(d, float(l2))
    ridge[-1] = 1e-6

    def objective(theta: np.ndarray) -> float:
        logits = z @ theta
        top = logits.max(axis=1, keepdims=True)
        logsum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        return float((logsum - (logits * onehot).sum(axis=1)).mean()
                     + 0.5 * (ridge[:, None] * theta**2).sum())

    theta = np.zeros((d, k)) if start is None else start.copy()
    value = objective(theta)
    for _ in range(iterations):
        p = _softmax(z @ theta)
        grad = z.T @ (p - onehot) / n + ridge[:, None] * theta
        if np.abs(grad).max() < 1e-7:
            break
        hess = np.empty((k, d, k, d))
        for a in range(k):
            for b in range(a, k):
                w = p[:, a] * ((a == b) - p[:, b]) / n
                block = (z * w[:, None]).T @ z
                if a == b:
                    block[np.diag_indices(d)] += ridge
                hess[a, :, b, :] = block
                hess[b, :, a, :] = block.T
        step = np.linalg.solve(hess.reshape(k * d, k * d), grad.T.reshape(-1)).reshape(k, d).T
        rate = 1.0
        while rate > 1e-6:
            trial = theta - rate * step
            trial_value = objective(trial)
            if trial_value <= value - 1e-4 * rate * float((grad * step).sum()):
                break
            rate /= 2
        theta, value = trial, trial_value
    return theta


def _log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


def group_folds(samples: list[data_mod.Sample], folds: int, seed: int) -> np.ndarray:
    """A fold number per row of `samples`: training.evaluate's folds by near-duplicate group."""
    index = {s.path: i for i, s in enumerate(samples)}
    fold = np.empty(len(samples), dtype=np.int64)
    for k, (_, test_part) in enumerate(data_mod.kfold_hash_splits(samples, folds, seed)):
        fold[[index[s.path] for s in test_part]] = k
    return fold


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold number per row, stratified by class, drawn from `seed` (for arrays without files)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        fold[rows] = np.arange(len(rows)) % min(folds, int(np.bincount(y).min()))
    return fold


def choose_l2(x: np.ndarray, x_flip: np.ndarray | None, y: np.ndarray, fold: np.ndarray,
              lambdas: list[float], train_flip: bool = False, score_flip: bool = False,
              per_feature: bool = True) -> tuple[float, list[float]]:
    """The L2 strength of `lambdas` with the least inner-CV log loss over the folds `fold` (a fold
    number per row; an image and its flip stay on one side). `train_flip` also trains on
    `x_flip`, `score_flip` scores the mean with the flipped image (as flip TTA answers).
    Returns it and every lambda's loss."""
    probs = np.zeros((len(lambdas), len(y), len(LABELS)))
    for k in np.unique(fold):
        tr, te = fold != k, fold == k
        xt, yt = ((np.vstack([x[tr], x_flip[tr]]), np.concatenate([y[tr], y[tr]]))
                  if train_flip else (x[tr], y[tr]))
        for j, head in enumerate(fit_path(xt, yt, lambdas, per_feature=per_feature)):
            probs[j, te] = (((head.predict_proba(x[te]) + head.predict_proba(x_flip[te])) / 2)
                            if score_flip else head.predict_proba(x[te]))
    losses = [_log_loss(p, y) for p in probs]
    return lambdas[int(np.argmin(losses))], losses


def cross_validate_probe(samples: list[data_mod.Sample], x: np.ndarray, x_flip: np.ndarray,
                         y: np.ndarray, seed: int, folds: int = 5, inner_folds: int = 5,
                         lambdas: list[float] | None = None, train_flip: bool = False,
                         per_feature: bool = True) -> dict:
    """Out-of-fold probabilities of a linear head on frozen features `x` (rows = `samples`),
    with `training.evaluate.cross_validate`'s folds for `seed`; `train_flip` also trains on the
    flipped copies. Returns {'plain', 'tta'} (n, classes) probabilities and the chosen L2 per fold.
    """
    lambdas = lambdas or [float(v) for v in DEFAULT_LAMBDAS.split(",")]
    index = {s.path: i for i, s in enumerate(samples)}
    plain, tta = np.zeros((len(y), len(LABELS))), np.zeros((len(y), len(LABELS)))
    chosen = []
    for fold, (train_part, test_part) in enumerate(data_mod.kfold_hash_splits(samples, folds, seed)):
        tr = np.asarray([index[s.path] for s in train_part])
        te = np.asarray([index[s.path] for s in test_part])
        inner = group_folds(list(train_part), inner_folds, seed + fold)
        l2, _ = choose_l2(x[tr], x_flip[tr], y[tr], inner, lambdas, train_flip, score_flip=True,
                          per_feature=per_feature)
        xt, yt = ((np.vstack([x[tr], x_flip[tr]]), np.concatenate([y[tr], y[tr]]))
                  if train_flip else (x[tr], y[tr]))
        head = fit_path(xt, yt, [l2], per_feature=per_feature)[0]
        plain[te] = head.predict_proba(x[te])
        tta[te] = (plain[te] + head.predict_proba(x_flip[te])) / 2
        chosen.append(l2)
    return {"plain": plain, "tta": tta, "l2": chosen}


# --- the `probe` training recipe: what `python -m training.train --recipe probe` fits ---------


def dense_weights(head: LinearHead) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of a Dense layer whose softmax is `head.predict_proba`: standardisation
    and basis folded into one matrix."""
    kernel = (head.basis / head.scale[:, None]) @ head.theta[:-1]
    return kernel, head.theta[-1] - head.mean @ kernel


def fit_probe(config, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
              y_val: np.ndarray, out: Path | None = None, verbose: int | None = None):
    """`training.train.fit_model` for `config.recipe == "probe"`: the architecture's ImageNet
    backbone stays frozen, its 'gap' features feed a LinearHead (L2 by inner k-fold on the
    training split only; with augmentation, also fitted on horizontal flips), and the head, its
    standardisation folded in, becomes the 'logits' Dense layer. Returns (model, history)."""
    import csv

    import keras

    from .models import PRETRAINED, build_model

    if config.arch not in PRETRAINED:
        raise ValueError(f"the probe recipe needs a pretrained architecture ({', '.join(PRETRAINED)}),"
                         f" not {config.arch!r}")
    keras.utils.set_random_seed(config.seed)
    spec = config.preprocess_spec()
    model = build_model(config.arch, (spec.size, spec.size, spec.channels), len(LABELS))
    if config.int8_grid:
        from .int8_grid import snap_convolutions

        snap_convolutions(model)
    pooled = keras.Model(model.inputs, model.get_layer("gap").output)

    def features(x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(pooled.predict_on_batch(x[i:i + 16]), np.float64)
                               for i in range(0, len(x), 16)]) if len(x) else np.zeros((0, 1))

    if config.probe_uses_val:
        x_train, y_train = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    flips = config.augment and config.aug_flip
    f_train = features(x_train)
    f_flip = features(np.ascontiguousarray(x_train[:, :, ::-1])) if flips else None
    lambdas = [float(v) for v in DEFAULT_LAMBDAS.split(",")]
    # One common scale, not one per feature: per-feature standardisation gave a few features of
    # tiny spread weights 500x the median, and int8 (weights and the pooled activations alike)
    # then rounded the rest to nothing (tflite-int8 agreed with Keras on 51% of a test split).
    l2, _ = choose_l2(f_train, f_flip, y_train, stratified_folds(y_train, 5, config.seed),
                      lambdas, train_flip=flips, per_feature=False)
    xt, yt = ((np.vstack([f_train, f_flip]), np.concatenate([y_train, y_train]))
              if flips else (f_train, y_train))
    head = fit_path(xt, yt, [l2], per_feature=False)[0]
    model.get_layer("logits").set_weights([w.astype(np.float32) for w in dense_weights(head)])
    history = {"loss": [_log_loss(head.predict_proba(f_train), y_train)],
               "accuracy": [float((head.predict_proba(f_train).argmax(1) == y_train).mean())]}
    if len(y_val) and not config.probe_uses_val:
        val_probs = head.predict_proba(features(x_val))
        history.update(val_loss=[_log_loss(val_probs, y_val)],
                       val_accuracy=[float((val_probs.argmax(1) == y_val).mean())])
    if verbose != 0:
        print(f"probe: {len(xt)} training features (flips: {'yes' if flips else 'no'}), L2 {l2} "
              f"chosen by inner 5-fold CV; training loss {history['loss'][0]:.3f}"
              + (f", validation loss {history['val_loss'][0]:.3f}" if "val_loss" in history else ""),
              flush=True)
    if out is not None:  # what train() reads back, as for a gradient-trained run of one epoch
        with (Path(out) / "history.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["epoch", *history])
            writer.writeheader()
            writer.writerow({"epoch": 0, **{k: v[0] for k, v in history.items()}})
    return model, history


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.probe",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="data folder with train/<class>/ (required)")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated input sizes in px (default: {DEFAULT_SIZES})")
    parser.add_argument("--seeds", default=DEFAULT_SEEDS,
                        help=f"comma-separated fold seeds (default: {DEFAULT_SEEDS})")
    parser.add_argument("--features", default="head",
                        help="comma-separated feature sets from " + ", ".join(LAYERS)
                        + "; a+b concatenates (default: head)")
    parser.add_argument("--folds", type=int, default=5, help="outer k (default: 5)")
    parser.add_argument("--inner-folds", type=int, default=5,
                        help="k of the inner CV that picks the L2 strength (default: 5)")
    parser.add_argument("--lambdas", default=DEFAULT_LAMBDAS,
                        help=f"L2 strengths to choose from (default: {DEFAULT_LAMBDAS})")
    parser.add_argument("--train-flip", action="store_true",
                        help="also train on the flipped copies (default: off)")
    parser.add_argument("--common-scale", action="store_true",
                        help="scale all features by one common spread, as the probe recipe does "
                        "(default: each feature by its own)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help=f"folder for the feature caches and results (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    out, root = Path(args.out), Path(args.data)
    lambdas = _floats(args.lambdas)
    try:
        if not root.is_dir():
            raise data_mod.DataError(f"data folder {root} does not exist")
        rows = []
        for size in _ints(args.sizes):
            started = time.time()
            samples, stored = load_or_extract(root, size, out)
            print(f"{size}px: features of {len(samples)} images ready in {time.time() - started:.0f} s "
                  f"(extraction {float(stored['seconds']):.0f} s)", flush=True)
            y = stored["labels"].astype(np.int64)
            for name in (n.strip() for n in args.features.split(",") if n.strip()):
                parts = name.split("+")
                unknown = [p for p in parts if p not in LAYERS]
                if unknown:
                    parser.error(f"unknown feature set(s) {', '.join(unknown)}")
                x = np.hstack([stored[p] for p in parts]).astype(np.float64)
                x_flip = np.hstack([stored[p + "_flip"] for p in parts]).astype(np.float64)
                for seed in _ints(args.seeds):
                    started = time.time()
                    result = cross_validate_probe(samples, x, x_flip, y, seed, args.folds,
                                                  args.inner_folds, lambdas, args.train_flip,
                                                  not args.common_scale)
                    seconds = time.time() - started
                    for mode in ("plain", "tta"):
                        wrong = np.flatnonzero(result[mode].argmax(1) != y)
                        rows.append({"size": size, "features": name, "train_flip": args.train_flip,
                                     "common_scale": args.common_scale,
                                     "tta": mode == "tta", "seed": seed, "n": len(y),
                                     "errors": len(wrong), "accuracy": 1 - len(wrong) / len(y),
                                     "log_loss": _log_loss(result[mode], y), "l2": result["l2"],
                                     "seconds": round(seconds, 1),
                                     "wrong": ["/".join(Path(str(p)).parts[-2:])
                                               for p in stored["paths"][wrong]]})
                        print(f"  {name} seed {seed} {'tta ' if mode == 'tta' else 'plain'}: "
                              f"{rows[-1]['accuracy']:.1%} of {len(y)} ({len(wrong)} errors), "
                              f"log loss {rows[-1]['log_loss']:.3f}, l2 {result['l2']} "
                              f"({seconds:.0f} s)", flush=True)
        tag = ("-trainflip" if args.train_flip else "") + ("-common" if args.common_scale else "")
        data_mod.write_json(out / f"results{tag}-{args.features.replace(',', '_')}"
                            f"-{args.sizes.replace(',', '_')}.json", {"rows": rows, "argv": argv
                                                                       or sys.argv[1:]})
    except CtEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
