"""Cross-validated comparison of training recipes (architecture, preprocessing, augmentation).

    python -m training.evaluate --data ../shared/data/covid19-xray [--experiments a,b] [--folds 5]

Protocol: stratified k-fold over unique file contents (duplicates stay in one fold). In each
fold, 15% of the training part (by content hash) is held out for early stopping and temperature
fitting; the test fold is never seen by training. Figures are mean ± standard deviation over folds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ct_edge import LABELS
from ct_edge.errors import CtEdgeError
from ct_edge.preprocess import PreprocessSpec

from . import data as data_mod
from .metrics import classification_report, expected_calibration_error, fit_temperature, scale_temperature
from .train import TrainConfig, fit_model

DEFAULT_OUT = Path("artifacts") / "evaluate"
SPEC_KEYS = {"size", "aspect", "contrast", "resample"}

# Each experiment changes one thing against the default recipe (or reproduces the reference).
EXPERIMENTS: dict[str, dict] = {
    "reference-stretch": {"arch": "reference", "aspect": "stretch"},
    "reference-crop": {"arch": "reference", "aspect": "crop"},
    "edge-gap-stretch": {"arch": "edge-gap", "aspect": "stretch"},
    "edge-gap-letterbox": {"arch": "edge-gap", "aspect": "letterbox"},
    "edge-gap-crop": {"arch": "edge-gap", "aspect": "crop"},
    "edge-gap-crop-noaug": {"arch": "edge-gap", "aspect": "crop", "augment": False},
    "edge-sep-crop": {"arch": "edge-sep", "aspect": "crop"},
}


def _config(base: TrainConfig, settings: dict) -> TrainConfig:
    spec = replace(base.preprocess_spec(), **{k: v for k, v in settings.items() if k in SPEC_KEYS})
    fields = {k: v for k, v in settings.items() if k not in SPEC_KEYS}
    return replace(base, spec=spec.to_dict(), **fields)


def cross_validate(root: Path, config: TrainConfig, folds: int = 5,
                   cache: Path = data_mod.DEFAULT_CACHE) -> dict:
    """Train and test one recipe on k folds; per-fold and summary figures."""
    spec = config.preprocess_spec()
    train_dir = root / "train" if (root / "train").is_dir() else root
    samples = data_mod.scan_split(train_dir)
    x_all, y_all, skipped = data_mod.load_arrays(samples, spec, cache, desc="decode")
    data_mod.warn_skipped(skipped)
    bad = {p for p, _ in skipped}
    samples = [s for s in samples if str(s.path) not in bad]
    index = {s.path: i for i, s in enumerate(samples)}
    results = []
    for fold, (train_part, test_part) in enumerate(
            data_mod.kfold_hash_splits(samples, folds, config.seed)):
        fit_part, val_part = data_mod.stratified_hash_split(train_part, 0.15, config.seed + fold)
        pick = lambda part: np.asarray([index[s.path] for s in part])  # noqa: E731
        started = time.time()
        model, history = fit_model(replace(config, seed=config.seed + fold),
                                   x_all[pick(fit_part)], y_all[pick(fit_part)],
                                   x_all[pick(val_part)], y_all[pick(val_part)], verbose=0)
        y_test, y_val = y_all[pick(test_part)], y_all[pick(val_part)]
        test_probs = model.predict(x_all[pick(test_part)], verbose=0)
        temperature = fit_temperature(model.predict(x_all[pick(val_part)], verbose=0), y_val)
        report = classification_report(test_probs, y_test, LABELS)
        result = {
            "fold": fold, "accuracy": report["accuracy"], "loss": report["loss"],
            "recall": {k: v["recall"] for k, v in report["per_class"].items()},
            "confusion_matrix": report["confusion_matrix"], "n_test": report["n"],
            "epochs": len(history["loss"]), "temperature": temperature,
            "ece_before": expected_calibration_error(test_probs, y_test),
            "ece_after": expected_calibration_error(scale_temperature(test_probs, temperature),
                                                    y_test),
            "seconds": round(time.time() - started, 1),
        }
        results.append(result)
        print(f"  fold {fold + 1}/{folds}: accuracy {result['accuracy']:.1%}  loss "
              f"{result['loss']:.3f}  ({result['epochs']} epochs, {result['seconds']} s)",
              flush=True)
    return {"folds": results, "summary": summarise(results), "params": int(model.count_params()),
            "n_images": len(samples), "k": folds}


def summarise(results: list[dict]) -> dict:
    def stat(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))
                if len(values) > 1 else 0.0}

    summary = {key: stat([r[key] for r in results])
               for key in ("accuracy", "loss", "ece_before", "ece_after")}
    summary["recall"] = {label: stat([r["recall"][label] for r in results]) for label in LABELS}
    return summary


def markdown_table(runs: dict[str, dict]) -> str:
    head = ("| experiment | arch | aspect | augment | params | accuracy | loss | "
            + " | ".join(f"recall {label}" for label in LABELS) + " | ECE before → after |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, run in runs.items():
        s, c = run["summary"], run["config"]
        recall = " | ".join(f"{s['recall'][label]['mean']:.1%} ± {s['recall'][label]['std']:.1%}"
                            for label in LABELS)
        lines.append(
            f"| {name} | {c['arch']} | {c['spec']['aspect']} | {'yes' if c['augment'] else 'no'} | "
            f"{run['params']:,} | {s['accuracy']['mean']:.1%} ± {s['accuracy']['std']:.1%} | "
            f"{s['loss']['mean']:.3f} ± {s['loss']['std']:.3f} | {recall} | "
            f"{s['ece_before']['mean']:.3f} → {s['ece_after']['mean']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None,
                        help="data folder; default: the built-in synthetic set")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS),
                        help="comma-separated names from: " + ", ".join(EXPERIMENTS)
                        + " (default: all)")
    parser.add_argument("--folds", type=int, default=5, help="k of k-fold (default: 5)")
    parser.add_argument("--epochs", type=int, default=50, help="maximum epochs (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help=f"results folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    from .train import builtin_data

    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}")
    try:
        root = Path(args.data) if args.data else builtin_data()
        if not root.is_dir():
            raise data_mod.DataError(f"data folder {root} does not exist")
        out = Path(args.out)
        runs: dict[str, dict] = {}
        for name in names:
            config = _config(TrainConfig(epochs=args.epochs, seed=args.seed,
                                         spec=PreprocessSpec().to_dict()), EXPERIMENTS[name])
            print(f"{name}: {args.folds}-fold cross-validation on {root}", flush=True)
            run = cross_validate(root, config, args.folds)
            run["config"] = {"arch": config.arch, "spec": config.spec, "augment": config.augment,
                             "epochs": config.epochs, "seed": config.seed, "data": str(root)}
            data_mod.write_json(out / root.name / f"{name}.json", run)
            runs[name] = run
        existing = {p.stem: json.loads(p.read_text()) for p in sorted((out / root.name).glob("*.json"))}
        table = markdown_table(existing)
        (out / root.name / "summary.md").write_text(table)
        print("\n" + table + f"\nwrote {out / root.name}/summary.md")
    except CtEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
