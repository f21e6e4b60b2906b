"""Measure the domain gate of a bundle: foreign inputs flagged, held-out images wrongly flagged,
accuracy on the answered ones, the gate's cost, and a comparison of scoring methods.

    python -m benchmarks.domain --bundle artifacts/bundle --model artifacts/model/model.keras \\
        --cross '../shared/data/covid19-xray/train/*/*' --out benchmarks/results/domain-demo.json

- In-domain: the test split of the data the model was trained on (never used to fit the gate).
- Foreign: tools.foreign (other DICOM objects, package pictures, rendered images) plus `--cross`
  (the other modality's chest images: real X-rays for a CT bundle, synthetic CT for an X-ray one).
- Methods: each scored on the features the bundle's default artifact exports (ct_edge itself),
  fitted on the training split, thresholds by several rules on the validation split's scores.
  The logits layer for energy / max-logit comes from the Keras model.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np

from ct_edge.classifier import Classifier
from ct_edge.domain import DEFAULT_RULE, METHODS, FeatureGate, fit_arrays, fit_threshold
from ct_edge.errors import CtEdgeError, InputError
from ct_edge.preprocess import preprocess

CROSS_LIMIT = 30  # other-modality chest images, an evenly spaced subset
TIMING_RUNS = 1000


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(a foreign score > an in-domain score), ties half."""
    if not len(inside) or not len(outside):
        return float("nan")
    greater = (outside[:, None] > inside[None, :]).mean()
    ties = (outside[:, None] == inside[None, :]).mean()
    return float(greater + 0.5 * ties)


def _features(classifier: Classifier, x: np.ndarray) -> np.ndarray:
    out = [classifier.backend.run(x[i : i + 32], features=True).features for i in range(0, len(x), 32)]
    return np.concatenate(out)


def _cross(pattern: str | None) -> list[Path]:
    if not pattern:
        return []
    paths = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
    if len(paths) > CROSS_LIMIT:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, CROSS_LIMIT).astype(int)]
    return paths


def classify(classifier: Classifier, paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        try:
            p = classifier.predict(path)
        except InputError as exc:
            rows.append({"path": str(path), "status": "error", "reason": exc.problem})
            continue
        forced = max(p.probabilities, key=p.probabilities.get) if p.probabilities else None
        rows.append({"path": str(path), "status": p.status, "label": p.label, "forced": forced,
                     "reason": p.reason})
    return rows


def overhead(classifier: Classifier, x: np.ndarray) -> dict:
    """Median ms of one batch-1 inference without and with the gate (interleaved)."""
    batch = x[:1]
    plain, gated = [], []
    for _ in range(20):
        classifier.predict_array(batch)
        classifier.predict_scored(batch)
    for _ in range(TIMING_RUNS):
        start = time.perf_counter()
        classifier.predict_array(batch)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        classifier.predict_scored(batch)
        gated.append(time.perf_counter() - start)
    a, b = float(np.median(plain)) * 1e3, float(np.median(gated)) * 1e3
    return {"runs": TIMING_RUNS, "plain_ms": round(a, 4), "gated_ms": round(b, 4),
            "overhead": round(b / a - 1.0, 4)}


RULES = ("q99", "max", "mean+3sd", "mean+4sd")


def compare_methods(classifier: Classifier, model: Path, x: dict[str, np.ndarray],
                    y_train: np.ndarray) -> list[dict]:
    from training.models import load_keras_model

    keras_model = load_keras_model(model)
    weights, bias = (np.asarray(w, np.float32) for w in keras_model.get_layer("logits").get_weights())
    features = {name: _features(classifier, images) for name, images in x.items() if len(images)}
    ceiling = classifier.gate.arrays.get("ceiling") if classifier.gate else None
    if ceiling is not None:  # as the bundle's gate: clipped where the int8 artifacts saturate
        features = {name: np.minimum(f, ceiling) for name, f in features.items()}
    results = []
    for method in METHODS:
        arrays = fit_arrays(method, features["train"], y_train, weights, bias, features["val"])
        gate = FeatureGate(method, 0.0, arrays)
        scores = {name: gate.scores(f) for name, f in features.items()}
        for rule in RULES if method == "mahalanobis" else (DEFAULT_RULE,):
            threshold = fit_threshold(scores["val"], rule)
            results.append({
                "method": method, "rule": rule, "threshold": threshold,
                "validation_flagged": float(np.mean(scores["val"] > threshold)),
                "test_flagged": float(np.mean(scores["test"] > threshold)),
                "foreign_flagged": float(np.mean(scores["foreign"] > threshold)),
                "auroc": _auroc(scores["test"], scores["foreign"]),
                "foreign_images": len(scores["foreign"]), "test_images": len(scores["test"])})
    return results


def measure(bundle: Path, model: Path, cross: str | None, foreign_dir: Path) -> dict:
    from convert import dataset
    from tools import foreign
    from training import data as data_mod

    classifier = Classifier.from_bundle(bundle)
    modality = classifier.bundle.modality or "ct"
    record, root = dataset.resolve_record(model, None)
    splits = dataset.load_splits(record, root)
    test = classify(classifier, [s.path for s in splits.test])
    truth = [classifier.labels[s.label] for s in splits.test]
    answered = [(r, t) for r, t in zip(test, truth, strict=True) if r["status"] in ("ok", "uncertain")]
    foreign_paths = [*foreign.build(foreign_dir, modality), *_cross(cross)]
    foreign_rows = classify(classifier, foreign_paths)
    flagged = [r for r in foreign_rows if r["status"] == "out_of_domain"]

    arrays = {}
    for name in ("train", "val"):
        arrays[name], labels, _ = data_mod.load_arrays(getattr(splits, name), record.spec,
                                                       record.cache, progress=False)
        if name == "train":
            y_train = labels
    arrays["test"], _, _ = data_mod.load_arrays(splits.test, record.spec, record.cache,
                                                progress=False)
    decodable = []
    for path in foreign_paths:
        try:
            decodable.append(preprocess(path, classifier.spec))
        except InputError:
            continue
    arrays["foreign"] = np.stack(decodable)
    return {
        "bundle": str(bundle), "artifact": classifier.artifact.name, "modality": modality,
        "method": classifier.bundle.domain.get("method"),
        "threshold": classifier.bundle.domain.get("threshold"), "data": str(root),
        "test": {"images": len(test),
                 "flagged": sum(r["status"] == "out_of_domain" for r in test) / max(len(test), 1),
                 "uncertain": sum(r["status"] == "uncertain" for r in test) / max(len(test), 1),
                 "accuracy_answered": (sum(r["label"] == t for r, t in answered)
                                       / max(len(answered), 1)),
                 "answered": len(answered),
                 "accuracy_all_forced": (sum(r.get("forced") == t for r, t in zip(test, truth,
                                                                                  strict=True))
                                         / max(len(test), 1))},
        "foreign": {"inputs": len(foreign_rows), "flagged": len(flagged) / max(len(foreign_rows), 1),
                    "by_metadata": sum("modality" in (r["reason"] or "") or "DICOM" in
                                       (r["reason"] or "") or "SOP class" in (r["reason"] or "")
                                       or "colour image" in (r["reason"] or "")
                                       or "body part" in (r["reason"] or "") for r in flagged),
                    "errors": sum(r["status"] == "error" for r in foreign_rows),
                    "missed": [r for r in foreign_rows if r["status"] != "out_of_domain"]},
        "test_flagged_rows": [r for r in test if r["status"] == "out_of_domain"],
        "overhead": overhead(classifier, arrays["test"]),
        "methods": compare_methods(classifier, model, arrays, y_train),
    }


def markdown(report: dict) -> str:
    t, f, o = report["test"], report["foreign"], report["overhead"]
    lines = [f"bundle {report['bundle']} ({report['artifact']}, modality {report['modality']}, "
             f"method {report['method']}, threshold {report['threshold']:.3g})", "",
             f"- held-out in-domain: {t['images']} images, wrongly flagged {t['flagged']:.1%}, "
             f"uncertain {t['uncertain']:.1%}; accuracy on the answered {t['answered']}: "
             f"{t['accuracy_answered']:.1%} (all {t['images']} with the check off: "
             f"{t['accuracy_all_forced']:.1%})",
             f"- foreign: {f['inputs']} inputs, flagged {f['flagged']:.1%} ({f['by_metadata']} by "
             f"DICOM metadata), unreadable {f['errors']}; missed: "
             + (", ".join(f"{Path(r['path']).name} ({r['status']})" for r in f["missed"]) or "none"),
             f"- gate cost: {o['plain_ms']:.3f} ms -> {o['gated_ms']:.3f} ms per batch-1 inference "
             f"({o['overhead']:+.1%}, median of {o['runs']})", "",
             "| method | threshold rule | validation flagged | test flagged | foreign flagged "
             "(decodable) | AUROC |", "|---|---|---|---|---|---|"]
    for m in report["methods"]:
        lines.append(f"| {m['method']} | {m['rule']} | {m['validation_flagged']:.1%} | "
                     f"{m['test_flagged']:.1%} | "
                     f"{m['foreign_flagged']:.1%} of {m['foreign_images']} | {m['auroc']:.3f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.domain",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundle"),
                        help="bundle whose domain gate is measured (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=Path("artifacts/model/model.keras"),
                        help="the bundle's Keras model: the training record beside it gives the data "
                             "and splits, its logits layer the energy / max-logit methods "
                             "(default: %(default)s)")
    parser.add_argument("--cross", help="glob of the other modality's chest images (quote it); at "
                        f"most {CROSS_LIMIT}, evenly spaced, are used (default: none)")
    parser.add_argument("--foreign-dir", type=Path, default=Path("artifacts/foreign"),
                        help="folder tools.foreign renders its foreign images into "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=Path,
                        help="also write the report as JSON here (default: none, Markdown on stdout only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = measure(args.bundle, args.model, args.cross, args.foreign_dir)
    except (CtEdgeError, OSError) as exc:
        print(f"benchmarks.domain: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
