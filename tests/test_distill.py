"""Distillation: soft targets at a temperature, the combined loss, and a student that follows."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ct_edge.preprocess import PreprocessSpec


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_soften_is_softmax_of_log_probabilities_over_t() -> None:
    from training.distill import soften

    p = np.array([[0.7, 0.2, 0.1]], np.float32)
    np.testing.assert_allclose(soften(p, 1.0).numpy(), p, atol=1e-6)
    np.testing.assert_allclose(soften(p, 4.0).numpy(), _softmax(np.log(p) / 4), atol=1e-6)
    flatter = soften(p, 4.0).numpy()
    assert flatter.max() < p.max() and np.argmax(flatter) == 0


def test_loss_mixes_label_and_teacher_terms() -> None:
    from training.distill import distillation_loss

    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]], np.float32)
    hard = np.eye(3, dtype=np.float32)[[0, 2]]
    soft = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], np.float32)
    targets = np.concatenate([hard, soft], axis=1)
    ce = -(hard * np.log(_softmax(logits))).sum(axis=1)
    kd = -(soft * np.log(_softmax(logits / 3.0))).sum(axis=1) * 9.0
    for alpha in (0.0, 0.3, 1.0):
        got = distillation_loss(3, 3.0, alpha)(targets, logits).numpy()
        np.testing.assert_allclose(got, alpha * ce + (1 - alpha) * kd, rtol=1e-5)


def _constant_teacher(size: int, q: np.ndarray):
    """A 'model' that answers q for every image (zero kernel, bias log q)."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3))
    x = layers.GlobalAveragePooling2D()(inputs)
    dense = layers.Dense(3, activation="softmax")
    model = keras.Model(inputs, dense(x))
    dense.set_weights([np.zeros((3, 3), np.float32), np.log(q).astype(np.float32)])
    return model


@pytest.mark.slow
def test_student_follows_the_teacher_not_only_the_labels() -> None:
    """With alpha 0 the labels do not count: the student learns the teacher's answer."""
    from training.distill import distill
    from training.train import TrainConfig

    q = np.array([0.2, 0.3, 0.5], np.float32)
    rng = np.random.default_rng(0)
    x = rng.random((24, 48, 48, 3), dtype=np.float32)  # teacher size 48, student 32
    y = np.zeros(24, np.int64)  # every label says class 0; the teacher says mostly class 2
    config = TrainConfig(abstention_folds=0, arch="edge-sep", epochs=15, patience=15, learning_rate=3e-3,
                         batch_size=8, augment=True, class_weights=False,
                         spec=replace(PreprocessSpec(), size=32).to_dict())
    student, history = distill(_constant_teacher(48, q), config, x, y, x[:6], y[:6],
                               temperature=1.0, alpha=0.0)
    assert student.input_shape == (None, 32, 32, 3) and student.layers[-1].name == "probabilities"
    assert {"loss", "hard_loss", "val_hard_loss"} <= set(history)
    import tensorflow as tf

    p = student.predict(tf.image.resize(x, (32, 32), antialias=True).numpy(), verbose=0)
    assert np.argmax(p.mean(axis=0)) == 2
    assert np.abs(p.mean(axis=0) - q).max() < 0.15
    with pytest.raises(ValueError, match="the teacher takes"):
        distill(_constant_teacher(64, q), config, x, y, x[:6], y[:6])


def test_the_view_bank_pairs_each_view_with_the_teachers_answer_on_it() -> None:
    """The teacher answers on the very (augmented, blended) images the student gets, at its own
    size; labels are blended with the same weights; the images own part is the larger."""
    import keras

    from training.distill import view_bank
    from training.train import TrainConfig

    rng = np.random.default_rng(1)
    x = rng.random((10, 48, 48, 3), dtype=np.float32)
    y = np.arange(10) % 3
    seen = []

    def teacher(batch, training=False):  # mean brightness decides, so the answer tracks the view
        batch = np.asarray(batch)
        seen.append(batch)
        m = batch.mean(axis=(1, 2, 3))
        return np.stack([m, 1 - m, np.zeros_like(m)], axis=1).astype(np.float32)

    config = TrainConfig(spec=replace(PreprocessSpec(), size=32).to_dict())
    keras.utils.set_random_seed(0)
    images, labels, soft = view_bank(teacher, config, x, y, views=3, mixup=0.4, chunk=4)
    assert images.shape == (30, 32, 32, 3) and labels.shape == soft.shape == (30, 3)
    shown = np.concatenate(seen)
    assert shown.shape == (30, 48, 48, 3)
    np.testing.assert_allclose(soft[:, 0], shown.mean(axis=(1, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-6)
    own = labels[np.arange(30), np.tile(y, 3)]
    assert (own >= 0.5 - 1e-6).all() and (own < 1).any()  # blended, own image the larger part
    import tensorflow as tf

    np.testing.assert_allclose(images, tf.image.resize(shown, (32, 32), "bilinear",
                                                       antialias=True).numpy(), atol=1e-6)
    _, plain, _ = view_bank(teacher, config, x, y, views=1, mixup=0.0)
    assert set(np.unique(plain)) == {0.0, 1.0}
    # Labels blended with the images' weights: with augmentation off and every image of class k
    # the constant value k / 2, each view's pixels are its label vector . (0, 0.5, 1).
    flat = np.broadcast_to((y / 2.0).astype(np.float32)[:, None, None, None], x.shape).copy()
    still = replace(config, aug_rotation=0.0, aug_zoom=0.0, aug_translate=0.0, aug_flip=False,
                    aug_brightness=0.0, aug_contrast=0.0)
    seen.clear()
    images, labels, _ = view_bank(teacher, still, flat, y, views=2, mixup=0.4)
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), labels @ [0.0, 0.5, 1.0], atol=1e-5)
    assert (labels.max(axis=1) < 1).sum() > 5  # most views really are blends
    with pytest.raises(ValueError, match="views >= 1"):
        view_bank(teacher, config, x, y, views=0, mixup=0.0)


@pytest.mark.slow
def test_a_student_on_the_view_bank_learns_the_teacher() -> None:
    from training.distill import distill_on_bank
    from training.train import TrainConfig

    q = np.array([0.2, 0.3, 0.5], np.float32)
    x = np.random.default_rng(0).random((24, 48, 48, 3), dtype=np.float32)
    y = np.zeros(24, np.int64)  # the labels say class 0; with alpha 0 only the teacher counts
    config = TrainConfig(arch="edge-sep", learning_rate=3e-3, batch_size=8,
                         spec=replace(PreprocessSpec(), size=32).to_dict())
    student, history = distill_on_bank(_constant_teacher(48, q), config, x, y, views=4,
                                       mixup=0.2, epochs=6)
    assert len(history["loss"]) == 6 and student.input_shape == (None, 32, 32, 3)
    import tensorflow as tf

    p = student.predict(tf.image.resize(x, (32, 32), antialias=True).numpy(), verbose=0)
    assert np.argmax(p.mean(axis=0)) == 2 and np.abs(p.mean(axis=0) - q).max() < 0.15


@pytest.mark.slow
def test_cli_distils_a_trained_teacher_into_a_convertible_folder(tiny_model: Path,
                                                                 tmp_path: Path) -> None:
    from training.distill import main

    out = tmp_path / "student"
    assert main(["--teacher", str(tiny_model), "--out", str(out), "--size", "64",
                 "--epochs", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["spec"]["size"] == 64 and config["distilled_from"] == str(tiny_model)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] > 0 and metrics["architecture"] == "edge-gap"
    assert main(["--teacher", str(tmp_path / "missing"), "--out", str(out)]) == 2
    banked = tmp_path / "banked"
    assert main(["--teacher", str(tiny_model), "--out", str(banked), "--size", "64",
                 "--bank-views", "2", "--mixup", "0.4", "--epochs", "2"]) == 0
    bank = {"views": 2, "mixup": 0.4}
    assert json.loads((banked / "config.json").read_text())["distillation"]["bank"] == bank
    metrics = json.loads((banked / "metrics.json").read_text())
    assert metrics["bank"] == bank and metrics["epochs_run"] == 2  # exact passes, no early stop
    for misuse in (["--out", str(out), "--bank-views", "4"],  # neither --teacher nor --cv-fold
                   ["--teacher", str(tiny_model), "--out", str(out), "--mixup", "0.4"]):
        with pytest.raises(SystemExit):
            main(misuse)


def test_fold_table_pools_errors_over_the_folds_run() -> None:
    from training.distill import fold_table

    def result(fold: int, n: int, errors: dict[str, int]) -> dict:
        return {"seed": 0, "fold": fold, "n_test": n,
                "models": {name: {"accuracy": 1 - e / n, "errors": e, "params": 10}
                           for name, e in errors.items()}}

    table = fold_table([result(2, 50, {"a": 5, "b": 0}), result(1, 40, {"a": 4, "b": 2})])
    lines = table.splitlines()
    assert "seed 0 fold 1 (40)" in lines[0].split("|")[3]  # folds sorted
    assert lines[2].split(" | ")[1:] == ["10", "90.0%", "90.0%", "90.0% of 90", "9 |"]
    assert lines[3].endswith("97.8% of 90 | 2 |")


def test_seed_summary_pairs_complete_seeds_only() -> None:
    from training.distill import seed_summary

    def result(seed: int, fold: int, errors: dict[str, int]) -> dict:
        return {"seed": seed, "fold": fold, "n_test": 50,
                "models": {name: {"accuracy": 1 - e / 50, "errors": e, "params": 10}
                           for name, e in errors.items()}}

    five = [result(5, fold, {"edge-gap": 3, "student": 1}) for fold in range(5)]
    six = [result(6, fold, {"edge-gap": 2, "student": 2}) for fold in range(5)]
    partial = [result(7, 0, {"edge-gap": 9, "student": 0})]  # one fold: left out
    assert seed_summary(partial) == "no seed has all 5 folds yet"
    one = seed_summary(five).splitlines()
    assert one[3] == "| student | 98.0% | 98.0% (one seed) | +4.0 (one seed: no SE) |"
    lines = seed_summary(five + six + partial).splitlines()
    assert "accuracy per seed (5, 6)" in lines[0]
    assert lines[2] == "| edge-gap | 94.0% / 96.0% | 95.0% ± 1.4% | — |"
    assert lines[3] == "| student | 98.0% / 96.0% | 97.0% ± 1.4% | +2.0 ± 2.0 |"
