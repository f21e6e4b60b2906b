"""Cross-validated comparison of training recipes (architecture, preprocessing, augmentation).

    python -m training.evaluate --data ../shared/data/covid19-xray [--experiments a,b] [--folds 5]

Protocol: stratified k-fold over near-duplicate groups (identical files and re-encoded or
rescaled copies stay in one fold). In each fold, 15% of the training part (same grouping) is held
out for early stopping and temperature fitting; the test fold is never seen by training. Figures
are mean ± standard deviation over folds; with several seeds, over seeds too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ct_edge import LABELS
from ct_edge.cli.common import positive_int
from ct_edge.errors import CtEdgeError, one_line
from ct_edge.preprocess import PreprocessSpec

from . import abstention, machine
from . import data as data_mod
from .cv_runs import (
    abstention_plots,
    abstention_table,
    errors_by_members,
    hard_images,
    load_runs,
    out_of_fold,
    seed_table,
)
from .metrics import classification_report, expected_calibration_error, fit_temperature, scale_temperature
from .train import TrainConfig, fit_model

DEFAULT_OUT = Path("artifacts") / "evaluate"
SPEC_KEYS = {"size", "aspect", "contrast", "resample"}

# The recipe every experiment starts from, pinned here (not read from the TrainConfig/PreprocessSpec
# defaults) so a row of the table means the same thing after the defaults change. It is the
# recipe of the first measurement (edge-gap, centre crop, default augmentation).
BASE: dict = {
    "arch": "edge-gap", "aspect": "crop", "contrast": "none", "size": 128,
    "epochs": 50, "learning_rate": 1e-3, "batch_size": 16, "patience": 10, "class_weights": True,
    "augment": True, "aug_rotation": 0.05, "aug_zoom": 0.1, "aug_translate": 0.0,
    "aug_flip": True, "aug_brightness": 0.1, "aug_contrast": 0.0,
    "schedule": "plateau", "warmup_epochs": 0, "label_smoothing": 0.0, "weight_decay": 0.0,
    "ema": False, "mixup": 0.0, "recipe": "finetune", "int8_grid": False, "flip_tta": False,
    "probe_uses_val": False,
}
COSINE = {"schedule": "cosine"}
STRONG_AUG = {"aug_rotation": 0.08, "aug_zoom": 0.15, "aug_translate": 0.08,
              "aug_brightness": 0.2, "aug_contrast": 0.2}
WEAK_AUG = {"aug_rotation": 0.02, "aug_zoom": 0.05, "aug_brightness": 0.05}

# Each experiment changes one thing against BASE (or reproduces the reference).
_CHANGES: dict[str, dict] = {
    # frame / aspect handling and contrast
    "reference-stretch": {"arch": "reference", "aspect": "stretch"},
    "reference-crop": {"arch": "reference", "aspect": "crop"},
    "edge-gap-stretch": {"aspect": "stretch"},
    "edge-gap-letterbox": {"aspect": "letterbox"},
    "edge-gap-crop": {},
    "edge-gap-crop-contrast": {"contrast": "stretch"},
    # augmentation
    "edge-gap-crop-noaug": {"augment": False},
    "edge-gap-crop-weakaug": WEAK_AUG,
    "edge-gap-crop-strongaug": STRONG_AUG,
    "edge-gap-crop-noflip": {"aug_flip": False},
    # optimisation
    "edge-gap-crop-p20": {"patience": 20, "epochs": 80},
    "edge-gap-crop-lr3e-3": {"learning_rate": 3e-3},
    "edge-gap-crop-bs32": {"batch_size": 32},
    "edge-gap-crop-nocw": {"class_weights": False},
    # architectures (edge-sized) and regularisation
    "edge-sep-crop": {"arch": "edge-sep"},
    "edge-gap-wide-crop": {"arch": "edge-gap-wide"},
    "edge-gap-deep-crop": {"arch": "edge-gap-deep"},
    "edge-gap-se-crop": {"arch": "edge-gap-se"},
    "edge-gap-deep-se-crop": {"arch": "edge-gap-deep-se"},
    "edge-gap-l2-crop": {"arch": "edge-gap-l2"},
    "edge-gap-sdrop-crop": {"arch": "edge-gap-sdrop"},
    "edge-gap-drop5-crop": {"arch": "edge-gap-drop5"},
    # a fixed cosine schedule instead of early stopping on ~30 validation images, and what
    # usually goes with it
    "cos": COSINE,
    "cos-noaug": {**COSINE, "augment": False},
    "cos-strongaug": {**COSINE, **STRONG_AUG},
    "cos-ls": {**COSINE, "label_smoothing": 0.1},
    "cos-ls-noaug": {**COSINE, "label_smoothing": 0.1, "augment": False},
    "cos-ema": {**COSINE, "ema": True},
    "cos-mixup": {**COSINE, "mixup": 0.2},
    "cos-wd": {**COSINE, "weight_decay": 0.05},
    "cos-e80": {**COSINE, "epochs": 80},
    # combinations of the changes that helped
    "edge-gap-deep-crop-p20": {"arch": "edge-gap-deep", "patience": 20, "epochs": 80},
    "edge-gap-se-crop-p20": {"arch": "edge-gap-se", "patience": 20, "epochs": 80},
    "edge-gap-deep-se-crop-p20": {"arch": "edge-gap-deep-se", "patience": 20, "epochs": 80},
    "edge-gap-crop-p20-strongaug": {"patience": 20, "epochs": 80, **STRONG_AUG},
    "edge-gap-deep-crop-p20-strongaug": {"arch": "edge-gap-deep", "patience": 20, "epochs": 80,
                                         **STRONG_AUG},
    # issue 14: ImageNet EfficientNet-Lite0 kept frozen, a logistic head (training.probe)
    "effnet-probe-128": {"arch": "efficientnet-lite0", "recipe": "probe"},
    "effnet-probe-160": {"arch": "efficientnet-lite0", "recipe": "probe", "size": 160},
    "effnet-probe-224": {"arch": "efficientnet-lite0", "recipe": "probe", "size": 224},
    "effnet-probe-224-grid": {"arch": "efficientnet-lite0", "recipe": "probe", "size": 224,
                              "int8_grid": True},
    # the same head fitted on the validation images too (no early stopping needs them)
    "effnet-probe-224-grid-val": {"arch": "efficientnet-lite0", "recipe": "probe", "size": 224,
                                  "int8_grid": True, "probe_uses_val": True},
    # edge-gap on the probe's 224-px input, resized to 128 inside: a mixture's member as it ships
    "edge-gap-from224": {"arch": "edge-gap-resize128", "size": 224},
    # both in one graph, trained per fold (training.ensemble.fit_mixture): `make train --recipe mixture`
    "mixture-224": {"arch": "mixture", "recipe": "mixture", "size": 224},
    # the same with every member also run on the mirrored image inside the graph (issue 14)
    "mixture-224-tta": {"arch": "mixture", "recipe": "mixture", "size": 224, "flip_tta": True},
    # ...and the probe's head fitted on the validation images too: the next candidate, registered
    # in docs/accuracy.md (seventh session) for seeds 5-9
    "mixture-224-tta-val": {"arch": "mixture", "recipe": "mixture", "size": 224, "flip_tta": True,
                            "mixture_members": [
                                {"arch": "edge-gap-resize128", "recipe": "finetune"},
                                {"arch": "efficientnet-lite0", "recipe": "probe", "int8_grid": True,
                                 "probe_uses_val": True}]},
}
EXPERIMENTS: dict[str, dict] = {name: {**BASE, **change} for name, change in _CHANGES.items()}
# The current defaults of TrainConfig/PreprocessSpec, whatever they are (what `make train` uses).
EXPERIMENTS["default"] = {}


def fold_count(text: str) -> int:
    """argparse type: k of k-fold, 2 or more (one fold would leave nothing to train on)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"k-fold needs 2 or more folds, got {value}")
    return value


def experiment_config(base: TrainConfig, settings: dict) -> TrainConfig:
    spec = replace(base.preprocess_spec(), **{k: v for k, v in settings.items() if k in SPEC_KEYS})
    fields = {k: v for k, v in settings.items() if k not in SPEC_KEYS}
    return replace(base, spec=spec.to_dict(), **fields)


def _predict(model, x: np.ndarray, tta: bool) -> np.ndarray:
    probs = model.predict(x, verbose=0)
    if tta:  # mean with the horizontally flipped image, as the augmentation flips too
        probs = (probs + model.predict(x[:, :, ::-1], verbose=0)) / 2
    return probs


def int8_probabilities(model, calibration: np.ndarray, x: np.ndarray,
                       recipe: str | None = None) -> np.ndarray:
    """What the shipped full-int8 TFLite artifact answers: the converter's own writer and
    CAM-ready head (bias-corrected as `make convert` does for `recipe`), run by the runtime's
    own backend."""
    from convert.bias_correction import wanted
    from convert.formats import FORMATS, WriteContext
    from ct_edge.backends import TFLiteBackend

    from .gradcam import cam_model

    row = next(f for f in FORMATS if f.name == "tflite-int8")
    with tempfile.TemporaryDirectory(prefix="ct-edge-cv-int8-") as scratch:
        data = row.writer(WriteContext(cam_model(model) or model, calibration, Path(scratch),
                                       bias_correction=wanted(recipe)))
    backend = TFLiteBackend(data, threads=None)
    return np.concatenate([backend.predict(x[i : i + 1]) for i in range(len(x))])


def cross_validate(root: Path, config: TrainConfig, folds: int = 5,
                   cache: Path = data_mod.DEFAULT_CACHE, members: int = 1,
                   tta: bool = False, int8: bool = False) -> dict:
    """Train and test one recipe on k folds; per-fold and summary figures.

    `members` > 1 trains that many models per fold (other seeds) and averages their
    probabilities (an ensemble); `tta` also averages over a horizontal flip. `int8` also
    converts each fold's model to full-int8 TFLite (calibrated on that fold's training images)
    and records its accuracy and top-1 agreement with Keras on the test fold.
    """
    if int8 and (members > 1 or tta):
        raise ValueError("int8 checks a single model without flip averaging")
    spec = config.preprocess_spec()
    train_dir = root / "train" if (root / "train").is_dir() else root
    samples = data_mod.scan_split(train_dir)
    x_all, y_all, skipped = data_mod.load_arrays(samples, spec, cache, desc="decode")
    data_mod.warn_skipped(skipped)
    bad = {p for p, _ in skipped}
    samples = [s for s in samples if str(s.path) not in bad]
    index = {s.path: i for i, s in enumerate(samples)}
    splits = data_mod.kfold_hash_splits(samples, folds, config.seed)
    if any(not test_part for _, test_part in splits):
        raise data_mod.DataError(f"{train_dir}: {len(samples)} readable images are too few for "
                                 f"{folds} folds (a test fold would be empty)")
    results = []
    for fold, (train_part, test_part) in enumerate(splits):
        fit_part, val_part = data_mod.stratified_hash_split(train_part, 0.15, config.seed + fold)
        pick = lambda part: np.asarray([index[s.path] for s in part])  # noqa: E731
        started = time.time()
        y_test, y_val = y_all[pick(test_part)], y_all[pick(val_part)]
        test_probs, val_probs, flipped_probs, epochs = [], [], [], []
        for member in range(members):
            # With an output folder, fit_model uses exactly the callbacks `make train` uses for
            # the recipe (plateau: early stopping, ReduceLROnPlateau, best-epoch checkpoint;
            # cosine: none of these); the folder is thrown away.
            with tempfile.TemporaryDirectory(prefix="ct-edge-cv-") as scratch:
                model, history = fit_model(replace(config, seed=config.seed + fold + 1000 * member),
                                           x_all[pick(fit_part)], y_all[pick(fit_part)],
                                           x_all[pick(val_part)], y_all[pick(val_part)],
                                           out=Path(scratch), verbose=0)
            test_probs.append(_predict(model, x_all[pick(test_part)], tta))
            flipped_probs.append(model.predict(x_all[pick(test_part)][:, :, ::-1], verbose=0))
            val_probs.append(_predict(model, x_all[pick(val_part)], tta))
            epochs.append(len(history["loss"]))
        member_probs = np.stack(test_probs, axis=1)  # (images, members, classes)
        test_probs, val_probs = np.mean(test_probs, axis=0), np.mean(val_probs, axis=0)
        flipped_probs = np.mean(flipped_probs, axis=0)
        temperature = fit_temperature(val_probs, y_val)
        scaled = scale_temperature(test_probs, temperature)  # what the runtime's bundle answers
        report = classification_report(test_probs, y_test, LABELS)
        quantized, int8_probs = {}, None
        if int8:
            from convert.pipeline import DEFAULT_CALIBRATION_IMAGES  # as `make convert`

            fit_x = x_all[pick(fit_part)]
            order = np.random.default_rng(config.seed + fold).permutation(len(fit_x))
            int8_probs = int8_probabilities(model, fit_x[order[:DEFAULT_CALIBRATION_IMAGES]],
                                            x_all[pick(test_part)], config.recipe)
            quantized = {"int8_accuracy": float((int8_probs.argmax(1) == y_test).mean()),
                         "int8_agreement": float((int8_probs.argmax(1)
                                                  == test_probs.argmax(1)).mean())}
        result = {
            "fold": fold, "accuracy": report["accuracy"], "loss": report["loss"],
            "recall": {k: v["recall"] for k, v in report["per_class"].items()},
            "confusion_matrix": report["confusion_matrix"], "n_test": report["n"],
            "epochs": float(np.mean(epochs)), "temperature": temperature,
            "ece_before": expected_calibration_error(test_probs, y_test),
            "ece_after": expected_calibration_error(scaled, y_test),
            **quantized,
            "seconds": round(time.time() - started, 1),
            # Which images a recipe gets wrong: the same ones in every recipe point at the data.
            "errors": [{"path": str(s.path), "true": LABELS[t], "predicted": LABELS[int(p.argmax())],
                        "confidence": round(float(p.max()), 4)}
                       for s, t, p in zip(test_part, y_test, test_probs, strict=True)
                       if int(p.argmax()) != t],
            # Every test image, temperature-scaled: the out-of-fold predictions the
            # risk-coverage curve (training.abstention) is drawn from; with the model's own
            # probabilities, and those of the mirrored image, so recipes and flip averaging can
            # be mixed afterwards (training.mixture).
            "predictions": [{"path": str(s.path), "true": LABELS[t],
                             "predicted": LABELS[int(p.argmax())],
                             "confidence": round(float(p.max()), 6),
                             "probabilities": [round(float(v), 6) for v in raw],
                             "flipped_probabilities": [round(float(v), 6) for v in flipped],
                             **({"int8_probabilities": [round(float(v), 6) for v in int8_probs[i]]}
                                if int8_probs is not None else {}),
                             # Each member's own answer, so the first k of K can be scored.
                             **({"member_probabilities": [[round(float(v), 6) for v in m]
                                                          for m in member_probs[i]]}
                                if members > 1 else {})}
                            for i, (s, t, p, raw, flipped) in enumerate(zip(
                                test_part, y_test, scaled, test_probs, flipped_probs,
                                strict=True))],
        }
        results.append(result)
        int8_note = (f"  int8 {result['int8_accuracy']:.1%}, agreement {result['int8_agreement']:.1%}"
                     if int8 else "")
        print(f"  fold {fold + 1}/{folds}: accuracy {result['accuracy']:.1%}  loss "
              f"{result['loss']:.3f}{int8_note}  ({result['epochs']} epochs, {result['seconds']} s)",
              flush=True)
    run = {"folds": results, "summary": summarise(results), "params": int(model.count_params()),
           "n_images": len(samples), "k": folds}
    if members > 1:
        run["accuracy_by_members"] = accuracy_by_members(results)
    return run


def accuracy_by_members(results: list[dict]) -> dict[str, float]:
    """Out-of-fold accuracy of the mean of each fold's first k members, k = 1..K: what an
    ensemble of k costs nothing extra to measure once K were trained."""
    predictions = [p for r in results for p in r["predictions"]]
    by_k, _ = errors_by_members(predictions)
    return {str(k): 1 - errors / len(predictions) for k, errors in enumerate(by_k, 1)}


def summarise(results: list[dict]) -> dict:
    def stat(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))
                if len(values) > 1 else 0.0}

    summary = {key: stat([r[key] for r in results])
               for key in ("accuracy", "loss", "ece_before", "ece_after")}
    summary["recall"] = {label: stat([r["recall"][label] for r in results]) for label in LABELS}
    for key in ("int8_accuracy", "int8_agreement"):
        if all(key in r for r in results):
            summary[key] = stat([r[key] for r in results])
    return summary


def _changes(config: dict) -> str:
    """What a run's recipe changes against BASE, e.g. 'patience=20, epochs=80'."""
    flat = {k: v for k, v in config.items() if k not in ("spec", "data", "seed", "out", "cache")}
    flat.update({k: config["spec"][k] for k in SPEC_KEYS if k in config.get("spec", {})})
    diff = [f"{k}={flat[k]}" for k in BASE if k in flat and flat[k] != BASE[k]
            and k not in ("arch", "aspect", "augment")]
    return ", ".join(diff) or "-"


def markdown_table(runs: dict[str, dict]) -> str:
    head = ("| experiment | arch | aspect | augment | other changes | seed | params | accuracy | "
            "loss | " + " | ".join(f"recall {label}" for label in LABELS)
            + " | ECE before → after | int8 agreement (int8 accuracy) | epochs | s/fold |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, run in runs.items():
        s, c = run["summary"], run["config"]
        recall = " | ".join(f"{s['recall'][label]['mean']:.1%} ± {s['recall'][label]['std']:.1%}"
                            for label in LABELS)
        epochs = np.mean([f["epochs"] for f in run["folds"]])
        seconds = np.mean([f["seconds"] for f in run["folds"]])
        int8 = (f"{s['int8_agreement']['mean']:.1%} ({s['int8_accuracy']['mean']:.1%})"
                if "int8_agreement" in s else "—")
        lines.append(
            f"| {name} | {c['arch']} | {c['spec']['aspect']} | {'yes' if c['augment'] else 'no'} | "
            f"{_changes(c)} | {c.get('seed', 0)} | "
            f"{run['params']:,} | {s['accuracy']['mean']:.1%} ± {s['accuracy']['std']:.1%} | "
            f"{s['loss']['mean']:.3f} ± {s['loss']['std']:.3f} | {recall} | "
            f"{s['ece_before']['mean']:.3f} → {s['ece_after']['mean']:.3f} | {int8} | {epochs:.0f} | "
            f"{seconds:.0f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None,
                        help="data folder; default: the built-in synthetic set")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS),
                        help="comma-separated names from: " + ", ".join(EXPERIMENTS)
                        + " (default: all)")
    parser.add_argument("--folds", type=fold_count, default=5,
                        help="k of k-fold, 2 or more (default: 5)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="maximum epochs, overriding the experiment's (default: its own)")
    parser.add_argument("--seed", type=int, default=0, help="seed, 0 or more (default: 0)")
    parser.add_argument("--members", type=positive_int, default=1,
                        help="models per fold, probabilities averaged (default: 1)")
    parser.add_argument("--int8", action="store_true",
                        help="also convert each fold's model to full-int8 TFLite and measure its "
                        "accuracy and agreement with Keras on the test fold (default: off)")
    parser.add_argument("--tta", action="store_true",
                        help="also average over a horizontal flip at test time (default: off)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help=f"results folder (default: {DEFAULT_OUT})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train import builtin_data

    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}")
    if not names:
        parser.error("--experiments names no experiment")
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    if args.int8 and (args.members > 1 or args.tta):
        parser.error("--int8 checks a single model without flip averaging: drop --members/--tta")
    if not args.out:
        parser.error("--out is empty: name a folder")

    def label_of(name: str) -> str:
        return (name + (f"+ens{args.members}" if args.members > 1 else "")
                + ("+tta" if args.tta else "") + (f"@seed{args.seed}" if args.seed else ""))

    try:
        root = Path(args.data) if args.data else builtin_data()
        data_mod.check_data_folder(root)
        out = Path(args.out)
        results = out / root.name
        # Before any training: an unusable --out or a broken earlier result would otherwise
        # fail only after the whole cross-validation.
        data_mod.check_writable(results, folder=True)
        for target in [*(results / f"{label_of(name)}.json" for name in names),
                       results / "summary.md"]:
            data_mod.check_writable(target)
        if results.is_dir():
            load_runs(results)
        runs: dict[str, dict] = {}
        for name in names:
            config = experiment_config(TrainConfig(seed=args.seed, spec=PreprocessSpec().to_dict()),
                             EXPERIMENTS[name])
            if args.epochs is not None:
                config = replace(config, epochs=args.epochs)
            label = label_of(name)
            print(f"{label}: {args.folds}-fold cross-validation on {root}", flush=True)
            started_on = machine.describe()
            run = cross_validate(root, config, args.folds, members=args.members, tta=args.tta,
                                 int8=args.int8)
            run["config"] = {**asdict(config), "data": str(root), "members": args.members,
                             "tta": args.tta}
            run["machine"] = started_on
            run["command"] = (f"python -m training.evaluate --data {root} --experiments {name}"
                              + (f" --seed {args.seed}" if args.seed else "")
                              + (f" --members {args.members}" if args.members > 1 else "")
                              + (" --tta" if args.tta else "")
                              + (" --int8" if args.int8 else "")
                              + (f" --epochs {args.epochs}" if args.epochs is not None else "")
                              + (f" --folds {args.folds}" if args.folds != 5 else ""))
            if all(fold.get("predictions") for fold in run["folds"]):
                run["abstention"] = abstention.summary(*out_of_fold(run))
                print(f"  risk-coverage: AURC {run['abstention']['aurc']:.3f}; at the operating "
                      f"point ct-edge {run['abstention']['in_words']}", flush=True)
            if "accuracy_by_members" in run:
                print("  accuracy of the first k members: " + ", ".join(
                    f"k={k} {acc:.1%}" for k, acc in run["accuracy_by_members"].items()), flush=True)
            data_mod.write_json(results / f"{label}.json", run)
            runs[label] = run
        existing = load_runs(results)
        table = (markdown_table(existing) + "\nSeveral seeds:\n\n" + seed_table(existing)
                 + "\nHard images:\n\n" + hard_images(existing)
                 + "\nAbstention: risk-coverage of the out-of-fold predictions (training.abstention)"
                 ":\n\n" + abstention_table(existing))
        data_mod.write_text(results / "summary.md", table)
        abstention_plots(existing, results)
        print("\n" + table + f"\nwrote {results}/summary.md")
    except CtEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or args.out}: {exc.strerror or one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
