"""The risk–coverage curve, the operating-point rule, and the operating point's way into a bundle."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import manifest_for, provenance_for, write_bundle

from convert.dataset import read_training_record
from convert.manifest import FIXED_OPERATING_POINT, UNCERTAIN_BELOW, calibration_section
from ct_edge import LABELS
from ct_edge.bundle import Bundle
from ct_edge.errors import BundleError
from training import abstention
from training.data import Sample
from training.train import TrainConfig

# confidences (one tie at 0.8) and whether each answer was right
CONFIDENCE = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5])
CORRECT = np.array([True, True, False, True, False, True])


# --- the curve --------------------------------------------------------------------------------

def test_curve_is_traced_from_the_most_confident_and_ties_are_answered_together() -> None:
    curve = abstention.risk_coverage(CONFIDENCE[::-1], CORRECT[::-1])  # input order is irrelevant
    assert curve.thresholds.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert curve.answered.tolist() == [1, 3, 4, 5, 6] and curve.errors.tolist() == [0, 1, 1, 2, 2]
    assert curve.coverage.tolist() == pytest.approx([1 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert curve.risk.tolist() == pytest.approx([0.0, 1 / 3, 1 / 4, 2 / 5, 2 / 6])
    for threshold, answered, errors in zip(curve.thresholds, curve.answered, curve.errors,
                                           strict=True):
        confidence, correct = CONFIDENCE, CORRECT
        kept = confidence >= threshold  # the runtime's rule: uncertain when below the threshold
        assert kept.sum() == answered and (kept & ~correct).sum() == errors


def test_aurc_is_the_risk_averaged_over_coverage() -> None:
    curve = abstention.risk_coverage(CONFIDENCE, CORRECT)
    by_hand = (1 * 0 + 2 * (1 / 3) + 1 * (1 / 4) + 1 * (2 / 5) + 1 * (2 / 6)) / 6
    assert abstention.aurc(curve) == pytest.approx(by_hand)
    # a perfect ranking (errors least confident) reaches the optimum; no errors, zero
    perfect = abstention.risk_coverage(np.linspace(1, 0.4, 6), np.array([1, 1, 1, 1, 0, 0], bool))
    assert abstention.aurc(perfect) == pytest.approx(abstention.aurc_optimal(6, 2))
    assert abstention.aurc_optimal(6, 2) < abstention.aurc(curve)
    assert abstention.aurc(abstention.risk_coverage(CONFIDENCE, np.ones(6, bool))) == 0.0


def test_a_ranking_that_knows_nothing_has_aurc_near_the_error_rate() -> None:
    rng = np.random.default_rng(0)
    correct = rng.random(20000) > 0.2
    curve = abstention.risk_coverage(rng.random(20000), correct)
    assert abstention.aurc(curve) == pytest.approx(1 - correct.mean(), abs=0.01)


@pytest.mark.parametrize(("confidence", "correct"), [([], []), ([0.5, 0.7], [True]),
                                                     ([0.5, math.nan], [True, False])])
def test_curve_refuses_empty_mismatched_or_nan_input(confidence: list, correct: list) -> None:
    with pytest.raises(ValueError):
        abstention.risk_coverage(np.asarray(confidence), np.asarray(correct, bool))


def test_upper_bound_is_clopper_pearson() -> None:
    # no errors: the bound has the closed form 1 - alpha^(1/n)
    assert abstention.risk_upper_bound(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-6)
    # P(X <= k) at the bound is alpha
    errors, answered = 3, 120
    p = abstention.risk_upper_bound(errors, answered)
    cdf = sum(math.comb(answered, i) * p**i * (1 - p) ** (answered - i) for i in range(errors + 1))
    assert cdf == pytest.approx(0.05, rel=1e-4) and p > errors / answered
    assert abstention.risk_upper_bound(5, 5) == 1.0 and abstention.risk_upper_bound(0, 0) == 1.0
    assert abstention.risk_upper_bound(3, 300) < abstention.risk_upper_bound(3, 100)


# --- the operating-point rule -------------------------------------------------------------------

def test_rule_takes_the_lowest_threshold_that_meets_the_target() -> None:
    curve = abstention.risk_coverage(CONFIDENCE, CORRECT)
    point = abstention.choose(curve, target_risk=0.34, min_coverage=0.5)
    # 0.5 answers all six with 2 errors (33%): the lowest threshold within 34%
    assert (point.threshold, point.answered, point.errors, point.target_met) == (0.5, 6, 2, True)
    point = abstention.choose(curve, target_risk=0.3, min_coverage=0.5)
    # risk <= 30% first at 0.7 (1 of 4), though 0.8 above it is at 33%
    assert (point.threshold, point.coverage, point.risk) == (0.7, pytest.approx(4 / 6), 0.25)


def test_rule_falls_back_to_the_coverage_floor_when_the_target_needs_less() -> None:
    curve = abstention.risk_coverage(CONFIDENCE, CORRECT)
    # 0% risk only at 0.9, answering 1 of 6: below the 50% floor, so the floor's threshold
    point = abstention.choose(curve, target_risk=0.0, min_coverage=0.5)
    assert (point.threshold, point.answered, point.target_met) == (0.8, 3, False)
    assert abstention.choose(curve, target_risk=0.0, min_coverage=0.1).threshold == 0.9


def test_rule_answers_everything_when_every_point_is_within_the_target() -> None:
    point = abstention.choose(abstention.risk_coverage(CONFIDENCE, np.ones(6, bool)))
    assert point.threshold == CONFIDENCE.min() and point.coverage == 1.0 and point.target_met
    with pytest.raises(ValueError):
        abstention.choose(abstention.risk_coverage(CONFIDENCE, CORRECT), target_risk=1.5)


def test_summary_records_rule_target_bound_and_plain_words() -> None:
    found = abstention.summary(CONFIDENCE, CORRECT, target_risk=0.3)
    point = found["operating_point"]
    assert point["threshold"] == 0.7 and point["answered"] == 4 and point["images"] == 6
    assert point["target_risk"] == 0.3 and point["target_met"] is True and point["rule"]
    assert point["risk"] <= point["risk_upper_95"] <= 1
    assert found["error_rate"] == pytest.approx(2 / 6, abs=1e-4)
    assert "answers 67% of the images (4 of 6)" in found["in_words"]
    assert "wrong on 25.0%" in found["in_words"]
    json.dumps(found)  # JSON-ready: no numpy scalars
    assert abstention.at_threshold(CONFIDENCE, CORRECT, 0.7) == {
        "images": 6, "answered": 4, "errors": 1, "coverage": 0.6667, "risk": 0.25}


def test_fraction_type_for_the_command_line() -> None:
    assert abstention.fraction("0.05") == 0.05
    for bad in ("1.5", "-0.1", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            abstention.fraction(bad)


def test_plot_marks_the_point_and_stays_small(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.34, 1.0, 300)
    correct = rng.random(300) < confidence  # calibrated: right as often as it is sure
    point = abstention.plot([("pooled", confidence, correct), ("seed 0", confidence[:150],
                                                               correct[:150])],
                            tmp_path / "curve.png", "300 made-up predictions")
    assert point == abstention.choose(abstention.risk_coverage(confidence, correct))
    png = (tmp_path / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 200_000


# --- held-out predictions: k folds, nothing seen by its own model -------------------------------

class _Memorizer:
    """A 'model' that knows its training images (x holds each image's index) and is sure of them."""

    def __init__(self, seen: set[int]) -> None:
        self.seen = seen

    def predict(self, x: np.ndarray, verbose: int = 0) -> np.ndarray:
        ids = x[:, 0, 0, 0].astype(int)
        out = np.full((len(ids), len(LABELS)), 0.2, np.float32)
        out[:, 0] = np.where([i in self.seen for i in ids], 0.99, 0.6)
        return out / out.sum(1, keepdims=True)


def _fake_fit(calls: list[dict]):
    def fit(config, x_fit, y_fit, x_val, y_val, out=None, verbose=None):
        seen = set(x_fit[:, 0, 0, 0].astype(int).tolist())
        calls.append({"seed": config.seed, "fit": seen, "val": set(x_val[:, 0, 0, 0].astype(int))})
        return _Memorizer(seen), {"loss": [1.0, 0.5]}

    return fit


def _samples(n: int) -> tuple[list[Sample], np.ndarray, np.ndarray]:
    y = np.arange(n) % len(LABELS)
    samples = [Sample(Path(f"/d/{i}.png"), int(label), f"{i:064x}") for i, label in enumerate(y)]
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 2, 2, 3)).copy()
    return samples, x, y


def test_out_of_fold_predicts_every_image_with_a_model_that_never_saw_it() -> None:
    samples, x, y = _samples(30)
    calls: list[dict] = []
    probabilities = abstention.out_of_fold(_fake_fit(calls), TrainConfig(seed=4), samples, x, y, 3)
    assert len(calls) == 3 and [c["seed"] for c in calls] == [5, 6, 7]
    # a memorizer is 99% sure of what it saw: every out-of-fold answer is the unsure one
    assert (probabilities.max(1) <= 0.6 + 1e-6).all()
    assert np.allclose(probabilities.sum(1), 1.0)
    tested_by = [sum(i not in c["fit"] | c["val"] for c in calls) for i in range(30)]
    assert tested_by == [1] * 30  # each image held out by exactly one fold


def test_for_training_reports_a_cross_validated_point_and_the_test_split(tmp_path: Path,
                                                                          capsys) -> None:
    samples, x, y = _samples(30)
    calls: list[dict] = []
    config = TrainConfig(abstention_folds=3, target_risk=0.03, out=str(tmp_path / "model"))
    config_cache = _cache_with(samples, x, config, tmp_path)
    found = abstention.for_training(_fake_fit(calls), config_cache, samples, _Memorizer(set()), 1.0,
                                    (x[:0], y[:0]), (x[:6], y[:6]))
    assert len(calls) == 3
    point = found["operating_point"]
    assert found["uncertain_below"] == point["operating_point"]["threshold"]
    assert point["method"] == "cross-validated risk-coverage" and "30 images" in point["data"]
    assert point["operating_point"]["images"] == 30
    assert point["test_split"]["images"] == 6
    # beside the model: the held-out predictions and their curve
    saved = json.loads((tmp_path / "model" / abstention.PREDICTIONS_FILE).read_text())
    assert len(saved["confidence"]) == len(saved["correct"]) == 30
    assert (tmp_path / "model" / abstention.PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    assert "operating point: threshold" in capsys.readouterr().out


def test_for_training_without_folds_uses_the_validation_split_or_nothing(tmp_path: Path,
                                                                         capsys) -> None:
    samples, x, y = _samples(12)
    calls: list[dict] = []
    config = TrainConfig(abstention_folds=0, out=str(tmp_path))
    found = abstention.for_training(_fake_fit(calls), config, samples, _Memorizer({0, 1, 2}), 1.0,
                                    (x, y), (x, y))
    assert not calls and found["operating_point"]["method"] == "validation-split risk-coverage"
    assert found["operating_point"]["operating_point"]["images"] == 12
    assert abstention.for_training(_fake_fit(calls), config, samples, _Memorizer(set()), 1.0,
                                   (x[:0], y[:0]), (x, y)) == {}
    assert "keeps the fixed default" in capsys.readouterr().err


def _cache_with(samples: list[Sample], x: np.ndarray, config: TrainConfig,
                folder: Path) -> TrainConfig:
    """for_training loads its images through the decode cache: put the fake ones there, at
    the spec's shape (an entry of another shape is a miss)."""
    import dataclasses

    from training.data import cache_path

    spec = config.preprocess_spec()
    for sample, image in zip(samples, x, strict=True):
        path = cache_path(folder, spec, sample.sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.full((spec.size, spec.size, spec.channels), image[0, 0, 0], np.float32))
    return dataclasses.replace(config, cache=str(folder))


# --- into the bundle and back ------------------------------------------------------------------

POINT = {"method": "cross-validated risk-coverage", "data": "3-fold CV on 211 images",
         "operating_point": {"threshold": 0.8731, "coverage": 0.81, "risk": 0.029}}


def _bundle(tmp_path: Path, calibration: dict | None) -> Path:
    models = {"tflite-int8": b"not a model, never run by these tests"}
    manifest = manifest_for(models, "tflite-int8", provenance_for("0" * 64))
    if calibration is None:
        del manifest["calibration"]
    else:
        manifest["calibration"] = calibration
    return write_bundle(tmp_path / "bundle", models, manifest)


def test_operating_point_round_trips_through_the_bundle(tmp_path: Path) -> None:
    section = calibration_section(1.3, 0.8731, POINT)
    bundle = Bundle.load(_bundle(tmp_path, json.loads(json.dumps(section))))
    assert bundle.uncertain_below == 0.8731 and bundle.temperature == 1.3
    assert bundle.operating_point == POINT


def test_bundle_without_the_new_fields_still_loads(tmp_path: Path) -> None:
    old = Bundle.load(_bundle(tmp_path / "old", {"temperature": 1.0, "uncertain_below": 0.6}))
    assert old.uncertain_below == 0.6 and old.operating_point == {}
    older = Bundle.load(_bundle(tmp_path / "older", None))
    assert older.uncertain_below == 0.0 and older.operating_point == {}


def test_a_malformed_operating_point_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="operating_point"):
        Bundle.load(_bundle(tmp_path, {"temperature": 1.0, "uncertain_below": 0.6,
                                       "operating_point": ["not", "an", "object"]}))


def test_convert_takes_the_point_from_the_training_record_or_says_it_is_fixed(
        tmp_path: Path) -> None:
    config = {"data": "/d", "spec": None, "calibration": {"temperature": 1.2,
                                                         "uncertain_below": 0.8731,
                                                         "operating_point": POINT}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    record = read_training_record(tmp_path)
    assert (record.uncertain_below, record.operating_point) == (0.8731, POINT)
    del config["calibration"]["uncertain_below"], config["calibration"]["operating_point"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    record = read_training_record(tmp_path)
    assert record.uncertain_below is None
    fixed = calibration_section(record.temperature, record.uncertain_below, record.operating_point)
    assert fixed == {"temperature": 1.2, "uncertain_below": UNCERTAIN_BELOW,
                     "operating_point": FIXED_OPERATING_POINT}


def test_trained_and_converted_bundle_carries_the_cross_validated_point(tiny_model: Path,
                                                                          tiny_bundle: Path) -> None:
    calibration = json.loads((tiny_model / "config.json").read_text())["calibration"]
    bundle = Bundle.load(tiny_bundle)
    assert bundle.uncertain_below == calibration["uncertain_below"]
    assert bundle.operating_point == calibration["operating_point"]
    point = bundle.operating_point
    assert point["method"] == "cross-validated risk-coverage"
    assert point["operating_point"]["images"] == sum(
        json.loads((tiny_model / "metrics.json").read_text())["class_counts"][split][label]
        for split in ("train", "val") for label in LABELS)
    assert point["test_split"]["images"] == 18
