"""The parity check: run an artifact on the test split through the runtime, compare with Keras."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ct_edge.classifier import Classifier, apply_temperature
from training.metrics import classification_report

from .formats import Thresholds
from .quiet import quiet

BATCH = 32


@dataclass(frozen=True)
class Reference:
    """The Keras model's probabilities on the test split: what every artifact is measured against."""

    probabilities: np.ndarray
    y: np.ndarray
    labels: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.y)

    def figures(self) -> dict:
        return _report_figures(self.probabilities, self.y, self.labels)


def run_with_status(bundle_dir: Path, name: str, x: np.ndarray, reference: Reference,
                    reference_features: np.ndarray | None,
                    threads: int | None = None) -> tuple[np.ndarray, dict]:
    """Raw probabilities of one bundle artifact - loaded, sha256-verified and run by ct_edge itself -
    and how often its status (ok / uncertain / out_of_domain) agrees with the Keras model's, both
    decided by the runtime's own rule (Classifier.decide) with the bundle's domain gate.

    Raw (before the bundle's temperature) so they compare with Keras; the temperature is the same
    post-processing for every artifact. Probabilities and features come from one run per batch.
    """
    with quiet():
        classifier = Classifier.from_bundle(bundle_dir, artifact=name, threads=threads)
    gate = classifier.gate
    raw, scores = [], []
    for i in range(0, len(x), BATCH):
        if gate is None:
            raw.append(classifier.backend.predict(x[i : i + BATCH]))
            continue
        outputs = classifier.backend.run(x[i : i + BATCH], features=True)
        raw.append(outputs.probabilities)
        scores.append(gate.scores(outputs.features))
    probabilities = np.concatenate(raw) if raw else np.zeros((0, len(classifier.labels)), np.float32)
    if gate is None or reference_features is None:
        return probabilities, {}
    temperature = classifier.bundle.temperature

    def statuses(probs: np.ndarray, score: np.ndarray) -> list[str]:
        calibrated = apply_temperature(probs, temperature)
        return [classifier.decide(p, s)[1] for p, s in zip(calibrated, score, strict=True)]

    mine = statuses(probabilities, np.concatenate(scores))
    theirs = statuses(reference.probabilities.astype(np.float32), gate.scores(reference_features))
    same = [a == b for a, b in zip(mine, theirs, strict=True)]
    return probabilities, {
        "status_agreement": float(np.mean(same)) if same else 1.0,
        "status_disagreements": int(len(same) - sum(same)),
        "statuses": {status: mine.count(status) for status in ("ok", "uncertain", "out_of_domain")},
        "keras_statuses": {status: theirs.count(status)
                           for status in ("ok", "uncertain", "out_of_domain")},
    }


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _report_figures(probabilities: np.ndarray, y: np.ndarray, labels: tuple[str, ...]) -> dict:
    report = classification_report(probabilities, y, labels)
    return {"test_images": report["n"], "accuracy": report["accuracy"],
            "loss": _finite(report["loss"]),
            "per_class_recall": {label: c["recall"] for label, c in report["per_class"].items()},
            "confusion_matrix": report["confusion_matrix"]}


def figures(probabilities: np.ndarray, reference: Reference) -> dict:
    """Accuracy, loss, per-class recall, agreement and |Δp| of one artifact against Keras."""
    result = _report_figures(probabilities, reference.y, reference.labels)
    diff = np.abs(probabilities.astype(np.float64) - reference.probabilities)
    agree = probabilities.argmax(axis=1) == reference.probabilities.argmax(axis=1)
    finite = bool(np.isfinite(probabilities).all())
    result.update({
        "agreement": float(agree.mean()) if len(agree) else 0.0,
        "disagreements": int((~agree).sum()),
        "max_abs_diff": _finite(float(diff.max())) if finite and diff.size else None,
        "mean_abs_diff": _finite(float(diff.mean())) if finite and diff.size else None,
        "finite": finite,
    })
    return result


def gate(result: dict, reference: dict, thresholds: Thresholds) -> list[str]:
    """One line per broken threshold (empty: passed). Each line names the threshold."""
    failures = []
    n = reference["test_images"]
    if not result.get("finite", True):
        failures.append("outputs contain NaN or infinity")
    drop = reference["accuracy"] - result["accuracy"]
    allowed = thresholds.allowed_drop(n)
    if drop > allowed + 1e-9:
        failures.append(f"accuracy {result['accuracy']:.2%} is {drop:.2%} below Keras "
                        f"{reference['accuracy']:.2%}; max_accuracy_drop allows {allowed:.2%} "
                        f"(one of {n} test images or {thresholds.max_accuracy_drop * 100:g} point, "
                        "whichever is larger)")
    if not result["agreement"] >= thresholds.min_agreement:
        failures.append(f"top-1 agreement with Keras {result['agreement']:.2%} "
                        f"({result['disagreements']} of {n} images differ) is below "
                        f"min_agreement {thresholds.min_agreement:.0%}")
    agreement = result.get("status_agreement")
    if agreement is not None and not agreement >= thresholds.min_status_agreement:
        failures.append(f"status agreement with Keras {agreement:.2%} "
                        f"({result['status_disagreements']} of {n} images differ in ok / uncertain "
                        f"/ out_of_domain) is below min_status_agreement "
                        f"{thresholds.min_status_agreement:.0%}")
    if thresholds.max_abs_diff is not None:
        diff = result.get("max_abs_diff")
        if diff is None or not diff <= thresholds.max_abs_diff:
            shown = "not finite" if diff is None else f"{diff:.2e}"
            failures.append(f"max |Δp| vs Keras {shown} is above max_abs_diff "
                            f"{thresholds.max_abs_diff:.0e} (float32 artifacts)")
    return failures
