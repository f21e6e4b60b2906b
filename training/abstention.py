"""When to answer: the risk–coverage curve of held-out predictions and the bundle's operating point.

A prediction is *answered* when its (temperature-scaled) top probability is at least the
threshold, else the runtime marks it "uncertain". Over held-out predictions, each threshold gives
a **coverage** (share answered) and a **risk** (share wrong among the answered). The curve is
traced at every distinct confidence, highest first; equal confidences are answered together.

The operating point rule (fixed before any curve was looked at):

1. the lowest threshold whose held-out risk among answered images is at most `target_risk`
   (default 3%: the project's accuracy goal of 97%, met on the answered images);
2. unless that answers fewer than `min_coverage` (default 50%) of the images: a flag raised on
   most images stops meaning anything, so then the threshold that answers `min_coverage` is used
   and the point is recorded with `target_met: false`.

The threshold is the confidence of the least confident answered image, so the runtime's rule
(uncertain when confidence < threshold) reproduces the chosen point exactly on the images it was
chosen on. The one-sided 95% Clopper–Pearson upper bound of the risk is recorded beside it: with
a few hundred images the measured risk is a rough estimate.

AURC, the area under the risk–coverage curve, summarises the whole curve: the mean of the risk
over all coverages. A ranking that knows nothing gives the overall error rate; a perfect one
(every error less confident than every right answer) gives `aurc_optimal`.

Where the held-out predictions come from: `training.train` runs a k-fold cross-validation by
near-duplicate group over its training and validation images (never the test split) with the
same recipe (`out_of_fold`); `training.evaluate` records them for every recipe it compares.
"""

from __future__ import annotations

import math
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ct_edge import LABELS

from . import data as data_mod
from .metrics import fit_temperature, scale_temperature

if TYPE_CHECKING:
    from .train import TrainConfig

DEFAULT_TARGET_RISK = 0.03
DEFAULT_MIN_COVERAGE = 0.5
BOUND_LEVEL = 0.95
PREDICTIONS_FILE = "held_out_predictions.json"  # written beside the model by for_training
PLOT_FILE = "risk_coverage.png"
RULE = ("lowest confidence threshold whose held-out risk among answered images is at most "
        "target_risk; if that answers fewer than min_coverage of the images, the threshold that "
        "answers min_coverage (target_met false)")

# fit(config, x_fit, y_fit, x_val, y_val, out=folder, verbose=0) -> (model, history): the
# training loop, passed in (training.train.fit_model) so this module never imports train.
Fit = Callable[..., tuple[Any, dict]]


@dataclass(frozen=True)
class Curve:
    """The risk–coverage curve: one point per distinct confidence, highest threshold first."""

    thresholds: np.ndarray  # answered iff confidence >= threshold
    answered: np.ndarray    # images answered at each threshold
    errors: np.ndarray      # wrong answers among them
    n: int                  # all images

    @property
    def coverage(self) -> np.ndarray:
        return self.answered / self.n

    @property
    def risk(self) -> np.ndarray:
        return self.errors / self.answered


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> Curve:
    """The curve of held-out top-1 confidences and whether each answer was right."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences but {len(correct)} outcomes")
    if not len(confidence) or not np.isfinite(confidence).all():
        raise ValueError("a risk-coverage curve needs at least one finite confidence")
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    errors = np.cumsum(~correct[order])
    # the last image of each run of equal confidences: a threshold cannot split a tie
    last = np.flatnonzero(np.r_[sorted_confidence[1:] != sorted_confidence[:-1], True])
    return Curve(thresholds=sorted_confidence[last], answered=last + 1, errors=errors[last],
                 n=len(confidence))


def aurc(curve: Curve) -> float:
    """Area under the risk–coverage curve (each point's risk over the coverage it adds)."""
    added = np.diff(np.r_[0, curve.answered]) / curve.n
    return float(np.sum(added * curve.risk))


def aurc_optimal(n: int, errors: int) -> float:
    """AURC of a perfect ranking with the same number of errors (they come last)."""
    k = np.arange(1, n + 1)
    return float(np.mean(np.maximum(0, k - (n - errors)) / k))


def risk_upper_bound(errors: int, answered: int, level: float = BOUND_LEVEL) -> float:
    """One-sided Clopper–Pearson upper confidence bound of a binomial error rate."""
    if answered <= 0:
        return 1.0
    if errors >= answered:
        return 1.0
    alpha = 1.0 - level

    def cdf(p: float) -> float:  # P(X <= errors) for X ~ Binomial(answered, p)
        logs = [math.lgamma(answered + 1) - math.lgamma(i + 1) - math.lgamma(answered - i + 1)
                + i * math.log(p) + (answered - i) * math.log1p(-p) for i in range(errors + 1)]
        top = max(logs)
        return math.exp(top) * sum(math.exp(v - top) for v in logs)

    low, high = errors / answered, 1.0
    for _ in range(60):  # cdf falls as p grows: bisect for cdf(p) = alpha
        middle = (low + high) / 2
        if middle <= 0.0 or cdf(middle) > alpha:
            low = middle
        else:
            high = middle
    return high


@dataclass(frozen=True)
class OperatingPoint:
    """The chosen threshold and what it does on the images it was chosen on."""

    threshold: float
    answered: int
    errors: int
    n: int
    target_risk: float
    min_coverage: float
    target_met: bool

    @property
    def coverage(self) -> float:
        return self.answered / self.n

    @property
    def risk(self) -> float:
        return self.errors / self.answered

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "coverage": round(self.coverage, 4),
                "risk": round(self.risk, 4),
                "risk_upper_95": round(risk_upper_bound(self.errors, self.answered), 4),
                "answered": self.answered, "errors": self.errors, "images": self.n,
                "target_risk": self.target_risk, "min_coverage": self.min_coverage,
                "target_met": self.target_met, "rule": RULE}

    def sentence(self) -> str:
        """The point in plain words."""
        return (f"answers {self.coverage:.0%} of the images ({self.answered} of {self.n}) and is "
                f"wrong on {self.risk:.1%} of those it answers ({self.errors}); the rest it marks "
                f"uncertain (confidence below {self.threshold:.1%})")


def choose(curve: Curve, target_risk: float = DEFAULT_TARGET_RISK,
           min_coverage: float = DEFAULT_MIN_COVERAGE) -> OperatingPoint:
    """The operating point by the module's rule (see the module docstring)."""
    if not 0.0 <= target_risk <= 1.0 or not 0.0 <= min_coverage <= 1.0:
        raise ValueError(f"target_risk and min_coverage must be in [0, 1], got {target_risk}, "
                         f"{min_coverage}")
    within = np.flatnonzero(curve.risk <= target_risk)
    floor = int(np.flatnonzero(curve.coverage >= min_coverage)[0])  # coverage reaches 1
    met = bool(len(within)) and bool(curve.coverage[within[-1]] >= min_coverage)
    index = int(within[-1]) if met else floor
    return OperatingPoint(threshold=float(curve.thresholds[index]),
                          answered=int(curve.answered[index]), errors=int(curve.errors[index]),
                          n=curve.n, target_risk=target_risk, min_coverage=min_coverage,
                          target_met=met)


def at_threshold(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> dict:
    """Coverage and risk of a fixed threshold on other images (e.g. the test split)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    answered = confidence >= threshold
    count, errors = int(answered.sum()), int((answered & ~correct).sum())
    return {"images": len(confidence), "answered": count, "errors": errors,
            "coverage": round(count / len(confidence), 4) if len(confidence) else None,
            "risk": round(errors / count, 4) if count else None}


def summary(confidence: np.ndarray, correct: np.ndarray, target_risk: float = DEFAULT_TARGET_RISK,
            min_coverage: float = DEFAULT_MIN_COVERAGE) -> dict:
    """Curve summary and operating point of held-out predictions, JSON-ready."""
    curve = risk_coverage(confidence, correct)
    point = choose(curve, target_risk, min_coverage)
    return {"aurc": round(aurc(curve), 4),
            "aurc_optimal": round(aurc_optimal(curve.n, int(curve.errors[-1])), 4),
            "error_rate": round(float(curve.risk[-1]), 4),
            "operating_point": point.to_dict(), "in_words": point.sentence()}


def plot(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path, title: str,
         target_risk: float = DEFAULT_TARGET_RISK,
         min_coverage: float = DEFAULT_MIN_COVERAGE) -> OperatingPoint:
    """Risk–coverage curves (label, confidence, correct) into a PNG; the operating point of the
    first (e.g. all seeds pooled) is marked and returned. Later curves are drawn thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    point = None
    for i, (label, confidence, correct) in enumerate(curves):
        curve = risk_coverage(confidence, correct)
        x = np.r_[0.0, curve.coverage]  # a step per point: its risk holds over what it adds
        y = np.r_[curve.risk[0], curve.risk]
        ax.step(100 * x, 100 * y, where="pre", lw=2.0 if i == 0 else 0.8,
                alpha=1.0 if i == 0 else 0.6,
                label=f"{label} (AURC {aurc(curve):.3f})", zorder=3 if i == 0 else 2)
        if i == 0:
            point = choose(curve, target_risk, min_coverage)
    assert point is not None, "plot needs at least one curve"
    ax.axhline(100 * target_risk, color="grey", ls="--", lw=0.8,
               label=f"target risk {target_risk:.0%}")
    ax.axvline(100 * min_coverage, color="grey", ls=":", lw=0.8,
               label=f"coverage floor {min_coverage:.0%}")
    ax.plot(100 * point.coverage, 100 * point.risk, "o", color="crimson", ms=8, zorder=4,
            label=(f"operating point: threshold {point.threshold:.2f}, answers "
                   f"{point.coverage:.0%}, wrong on {point.risk:.1%}"))
    ax.set_xlabel("coverage: share of images answered (%)")
    ax.set_ylabel("risk: share wrong among answered (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(bottom=0)
    ax.set_title("\n".join(textwrap.fill(line, 95) for line in title.splitlines()), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return point


def out_of_fold(fit: Fit, config: TrainConfig, samples: Sequence[data_mod.Sample], x: np.ndarray,
                y: np.ndarray, folds: int) -> np.ndarray:
    """Temperature-scaled probabilities of every image from the model that did not see it.

    k folds by near-duplicate group; inside each, 15% of the training part (same grouping) drives
    early stopping and the fold's temperature, exactly as `make train` uses its validation split.
    """
    index = {s.path: i for i, s in enumerate(samples)}
    probabilities = np.zeros((len(samples), len(LABELS)), np.float32)
    for fold, (train_part, test_part) in enumerate(
            data_mod.kfold_hash_splits(samples, folds, config.seed)):
        fit_part, val_part = data_mod.stratified_hash_split(train_part, 0.15, config.seed + fold)
        fit_i, val_i, test_i = ([index[s.path] for s in part]
                                for part in (fit_part, val_part, test_part))
        started = time.time()
        with tempfile.TemporaryDirectory(prefix="ct-edge-abstention-") as scratch:
            model, history = fit(replace(config, seed=config.seed + fold + 1), x[fit_i], y[fit_i],
                                 x[val_i], y[val_i], out=Path(scratch), verbose=0)
        temperature = fit_temperature(model.predict(x[val_i], verbose=0), y[val_i]) \
            if val_i else 1.0
        probabilities[test_i] = scale_temperature(model.predict(x[test_i], verbose=0),
                                                  temperature)
        print(f"  operating point: fold {fold + 1}/{folds} trained ({len(history['loss'])} "
              f"epochs, {len(fit_i)} images, {time.time() - started:.0f} s), tested on "
              f"{len(test_i)}", flush=True)
    return probabilities


def for_training(fit: Fit, config: TrainConfig, samples: Sequence[data_mod.Sample], model: Any,
                 temperature: float, validation: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray]) -> dict:
    """The `uncertain_below` and `operating_point` fields of a training run's calibration.

    `samples`: the training and validation images (never the test split), for a k-fold
    cross-validation with the run's recipe when `config.abstention_folds` >= 2. Otherwise the
    fallback: the final `model`'s temperature-scaled probabilities on the `validation` arrays.
    On the `test` arrays the final model's coverage and risk at the chosen threshold are
    reported (they play no part in the choice). Empty when nothing is held out to choose from.
    """
    target, folds = config.target_risk, config.abstention_folds
    if folds >= 2:
        x, y, skipped = data_mod.load_arrays(samples, config.preprocess_spec(), Path(config.cache),
                                             progress=False)
        bad = {path for path, _ in skipped}
        samples = [s for s in samples if str(s.path) not in bad]
        print(f"choosing the operating point: {folds}-fold cross-validation on the {len(samples)} "
              "training and validation images (the test split is not used)", flush=True)
        probabilities = out_of_fold(fit, config, samples, x, y, folds)
        method = "cross-validated risk-coverage"
        source = (f"{folds}-fold cross-validation by near-duplicate group on the training and "
                  f"validation splits ({len(samples)} images; test split not used), same recipe, "
                  "temperature-scaled out-of-fold probabilities")
    elif len(validation[1]):
        y = validation[1]
        probabilities = scale_temperature(model.predict(validation[0], verbose=0), temperature)
        method = "validation-split risk-coverage"
        source = (f"validation split, final model ({len(y)} images; they also drove early "
                  "stopping and the temperature, so slightly optimistic; no cross-validation run)")
    else:
        print("warning: no held-out images to choose the operating point from; the bundle keeps "
              "the fixed default", file=sys.stderr)
        return {}
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == y
    found = summary(confidence, correct, target)
    point = found["operating_point"]
    out = Path(config.out)
    # The held-out predictions themselves, to redraw or re-choose without training again.
    data_mod.write_json(out / PREDICTIONS_FILE, {
        "data": source, "confidence": [round(float(c), 6) for c in confidence],
        "correct": [bool(c) for c in correct]})
    plot([("held out", confidence, correct)], out / PLOT_FILE,
         f"{config.data or 'built-in synthetic CT slices'}: {source}", target,
         DEFAULT_MIN_COVERAGE)
    test_probs = scale_temperature(model.predict(test[0], verbose=0), temperature)
    found["test_split"] = at_threshold(test_probs.max(1), test_probs.argmax(1) == test[1],
                                       point["threshold"])
    print(f"operating point: threshold {point['threshold']:.3f}; on held-out images ct-edge "
          f"{found['in_words']}" + ("" if point["target_met"] else
                                    f" - target risk {target:.0%} not reached above the "
                                    "coverage floor"), flush=True)
    return {"uncertain_below": point["threshold"],
            "operating_point": {"method": method, "data": source, **found}}
