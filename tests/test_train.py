"""A tiny end-to-end training run: every artifact written, readable and consistent."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ct_edge import LABELS
from training import metrics
from training.run_files import read_history
from training.train import TrainConfig, main


def test_training_writes_every_artifact(tiny_model: Path) -> None:
    for name in ("model.keras", "history.csv", "metrics.json", "config.json",
                 "learning_curves.png", "confusion_matrix.png"):
        assert (tiny_model / name).is_file(), name
    assert not (tiny_model / "checkpoint.keras").exists()
    assert not list(tiny_model.glob("backup-*")), "a finished run leaves no backup behind"
    with Image.open(tiny_model / "learning_curves.png") as img:
        assert img.width > 400


def test_metrics_are_consistent_with_the_confusion_matrix(tiny_model: Path) -> None:
    m = json.loads((tiny_model / "metrics.json").read_text())
    matrix = np.asarray(m["test"]["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == m["test"]["n"] == 18
    assert m["test_accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert m["labels"] == list(LABELS)
    assert set(m["class_counts"]) == {"train", "val", "test"}
    assert m["test_source"] == "test/ folder"
    assert 1 <= m["best_epoch"] <= m["epochs_run"] <= 3
    assert len(m["data_fingerprint"]) == 16


def test_saved_model_reloads_and_predicts(tiny_model: Path) -> None:
    import keras

    model = keras.models.load_model(tiny_model / "model.keras")
    p = np.asarray(model(np.zeros((1, 128, 128, 3), np.float32)))
    assert p.shape == (1, 3)
    config = json.loads((tiny_model / "config.json").read_text())
    assert TrainConfig(**{k: v for k, v in config.items() if k != "calibration"}).preprocess_spec()


def test_history_has_one_row_per_epoch(tiny_model: Path) -> None:
    history = read_history(tiny_model / "history.csv")
    with (tiny_model / "history.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(history["loss"])
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history)


@pytest.mark.parametrize(("argv", "problem"), [
    (["--size", "5"], "--size 5: unsupported input shape 5x5x3 (sides 8 to 1024 pixels"),
    (["--size", "0"], "argument --size: must be 1 or more"),
    (["--epochs", "0"], "argument --epochs: must be 1 or more"),
    (["--batch-size", "-4"], "argument --batch-size: must be 1 or more"),
])
def test_bad_settings_are_usage_errors_not_tracebacks(argv: list[str], problem: str,
                                                      capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and problem in capsys.readouterr().err


def test_missing_data_folder_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not exist" in err and "\n" not in err


def test_temperature_scaling_lowers_nll_of_overconfident_probabilities() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    logits = rng.normal(size=(400, 3))
    logits[np.arange(400), y] += 1.0
    overconfident = np.exp(4 * logits) / np.exp(4 * logits).sum(axis=1, keepdims=True)
    t = metrics.fit_temperature(overconfident, y)
    assert 2.5 < t < 6
    scaled = metrics.scale_temperature(overconfident, t)
    assert metrics.cross_entropy(scaled, y) < metrics.cross_entropy(overconfident, y)
    assert metrics.expected_calibration_error(scaled, y) < metrics.expected_calibration_error(
        overconfident, y)


def test_temperature_never_sharpens_a_perfectly_classified_validation_split() -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    confident_and_right = np.full((6, 3), 0.1)
    confident_and_right[np.arange(6), y] = 0.8
    assert metrics.fit_temperature(confident_and_right, y) == metrics.MIN_TEMPERATURE


def test_a_backup_cut_off_mid_write_is_repaired_or_dropped(tmp_path: Path) -> None:
    from training.run_files import usable_backup

    backup = tmp_path / "backup-abc"
    assert not usable_backup(backup)
    backup.mkdir()
    (backup / "training_metadata.json").write_text('{"epoch": 3, "batch": -1}')
    assert usable_backup(backup)
    (backup / "training_metadata.json").write_text('{"epo')  # killed mid-write
    (backup / "training_metadata.json.bkp").write_text('{"epoch": 2, "batch": -1}')
    assert usable_backup(backup)
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2
    (backup / "training_metadata.json").write_text("")
    assert not usable_backup(backup) and not backup.exists()


def test_the_same_training_twice_gives_the_same_model() -> None:
    from training.train import fit_model

    rng = np.random.default_rng(0)
    x = rng.random((24, 128, 128, 3), dtype=np.float32)
    y = np.arange(24) % 3
    config = TrainConfig(epochs=2, batch_size=8)
    first, _ = fit_model(config, x[:18], y[:18], x[18:], y[18:], verbose=0)
    second, _ = fit_model(config, x[:18], y[:18], x[18:], y[18:], verbose=0)
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cosine_schedule_runs_every_epoch_and_decays_the_rate() -> None:
    """No early stopping with the fixed schedule; EMA, AdamW, label smoothing and mixup together."""
    from training.train import fit_model

    rng = np.random.default_rng(1)
    x = rng.random((24, 128, 128, 3), dtype=np.float32)
    y = np.arange(24) % 3
    config = TrainConfig(epochs=3, batch_size=8, patience=1, schedule="cosine", warmup_epochs=1,
                         label_smoothing=0.1, weight_decay=0.05, ema=True, mixup=0.2)
    model, history = fit_model(config, x[:18], y[:18], x[18:], y[18:], verbose=0)
    assert len(history["loss"]) == 3
    import keras

    assert isinstance(model.optimizer, keras.optimizers.AdamW) and model.optimizer.use_ema
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.1)
    rate = model.optimizer.learning_rate
    assert float(rate.numpy() if hasattr(rate, "numpy") else rate) < config.learning_rate / 2
    assert np.isfinite(model.predict(x[:2], verbose=0)).all()


def test_mixup_keeps_labels_distributions_and_the_image_mostly_itself() -> None:
    import tensorflow as tf

    from training.train import mixup_batches

    x = tf.constant(np.arange(8, dtype=np.float32).reshape(8, 1, 1, 1))
    y = tf.one_hot(np.arange(8) % 3, 3)
    mixed_x, mixed_y = mixup_batches(0.2, seed=0)(x, y)
    np.testing.assert_allclose(mixed_y.numpy().sum(axis=1), 1.0, rtol=1e-6)
    # lam >= 0.5: each row's own label keeps at least half the weight.
    assert (np.take_along_axis(mixed_y.numpy(), (np.arange(8) % 3)[:, None], 1) >= 0.5 - 1e-6).all()
    assert mixed_x.shape == x.shape


def test_an_unknown_schedule_and_cosine_only_options_are_refused() -> None:
    from training.train import build_optimizer

    with pytest.raises(ValueError, match="unknown schedule"):
        build_optimizer(TrainConfig(schedule="bogus"), steps_per_epoch=3)
    # With early stopping the raw best-epoch weights would silently replace the average.
    with pytest.raises(ValueError, match="need schedule='cosine'"):
        build_optimizer(TrainConfig(ema=True), steps_per_epoch=3)
    with pytest.raises(ValueError, match="warmup_epochs must be"):
        build_optimizer(TrainConfig(schedule="cosine", epochs=2, warmup_epochs=2), steps_per_epoch=3)


# --- interrupts and re-runs into an existing folder ----------------------------------------------

def _fit_without_training(config: TrainConfig, x_train, y_train, x_val, y_val, out=None,
                          verbose=None):
    """fit_model's contract without the minutes of fitting: an untrained model, one epoch logged."""
    import keras

    from training.models import build_model

    keras.utils.set_random_seed(config.seed)
    spec = config.preprocess_spec()
    model = build_model(config.arch, (spec.size, spec.size, spec.channels), len(LABELS))
    if out is not None:
        (out / "history.csv").write_text("epoch,accuracy,loss,val_accuracy,val_loss\n"
                                         "0,0.3,1.1,0.3,1.1\n")
    return model, {"loss": [1.1]}


def test_an_interrupted_rerun_leaves_the_previous_model_and_its_config(
        synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the results are written: the earlier model still has its own config.json."""
    from ct_edge.preprocess import PreprocessSpec
    from training import data as data_mod
    from training import train as train_mod

    monkeypatch.setattr(train_mod, "fit_model", _fit_without_training)
    out = tmp_path / "model"
    config = TrainConfig(data=str(synthetic_root), out=str(out), arch="edge-gap",
                         abstention_folds=0, cache=str(tmp_path / "cache"),
                         spec=PreprocessSpec(size=32).to_dict())
    train_mod.train(config)
    results = ["model.keras", "config.json", "metrics.json", "learning_curves.png",
               "confusion_matrix.png", "gradcam.png", "held_out_predictions.json",
               "risk_coverage.png"]
    assert all((out / name).is_file() for name in results)
    before = {name: (out / name).read_bytes() for name in results}

    real_write_json = data_mod.write_json

    def interrupted_at_the_config(path: Path, data: object) -> None:
        if path.name == "config.json":
            raise KeyboardInterrupt
        real_write_json(path, data)

    monkeypatch.setattr(data_mod, "write_json", interrupted_at_the_config)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(dataclasses.replace(config, seed=1))  # other weights, other split
    assert {name: (out / name).read_bytes() for name in results} == before
    assert not list(out.glob(".*")), "a staging folder was left behind"


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT handled as in a terminal, whatever this process inherited: started in the
    background (`cmd &`, nohup), it ignores SIGINT, Python keeps that, and these tests failed."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def ctrl_c() -> None:
    """Ctrl-C at this point: the signal itself, to this process."""
    import signal

    signal.raise_signal(signal.SIGINT)


def test_publish_lets_ctrl_c_wait_until_every_file_is_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ctrl_c_raises: None) -> None:
    import os

    from training.run_files import publish, staging_folder

    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.keras", "config.json", "plot.png"):
        (out / name).write_text("old")
    staged = staging_folder(out)
    for name in ("model.keras", "config.json"):
        (staged / name).write_text("new")
    real_replace = os.replace

    def ctrl_c_during_the_first_rename(src, dst) -> None:
        monkeypatch.setattr(os, "replace", real_replace)
        ctrl_c()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", ctrl_c_during_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        publish(staged, out, ["model.keras", "config.json", "plot.png"])
    # plot.png was the previous run's: it would not describe the new model
    assert {p.name: p.read_text() for p in out.iterdir()} == {"model.keras": "new",
                                                              "config.json": "new"}


def test_ctrl_c_while_publishing_finishes_the_run(
        synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
        ctrl_c_raises: None) -> None:
    """The interrupt waits for the last rename; then the run is complete and says so."""
    import os

    from ct_edge.preprocess import PreprocessSpec
    from training import train as train_mod
    from training.run_files import publish

    monkeypatch.setattr(train_mod, "fit_model", _fit_without_training)
    real_replace = os.replace

    def publish_with_ctrl_c(staged: Path, out: Path, names) -> None:
        def ctrl_c_then_rename(src, dst) -> None:
            monkeypatch.setattr(os, "replace", real_replace)
            ctrl_c()
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", ctrl_c_then_rename)
        publish(staged, out, names)

    monkeypatch.setattr(train_mod, "publish", publish_with_ctrl_c)
    out = tmp_path / "model"
    metrics = train_mod.train(TrainConfig(data=str(synthetic_root), out=str(out), arch="edge-gap",
                                          abstention_folds=0, cache=str(tmp_path / "cache"),
                                          spec=PreprocessSpec(size=32).to_dict()))
    assert metrics["test"]["n"] > 0 and (out / "model.keras").is_file()
    assert json.loads((out / "config.json").read_text())["out"] == str(out)
    assert f"they are complete in {out}" in capsys.readouterr().err


@pytest.mark.parametrize("resumable", [True, False], ids=["backup", "no-backup"])
def test_ctrl_c_is_one_line_saying_what_a_rerun_does(resumable: bool, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys) -> None:
    from training import train as train_mod

    def interrupted(config: TrainConfig) -> dict:
        if resumable:  # BackupAndRestore's folder after a finished epoch
            (Path(config.out) / f"backup-{config.key()}").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    try:
        status = main(["--out", str(tmp_path / "m"), "--epochs", "3"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main: a traceback")
    assert status == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("interrupted; ")
    assert ("resume" in err) == resumable and ("start over" in err) != resumable


def test_only_this_mixtures_member_backups_promise_a_resume(tmp_path: Path) -> None:
    """A backup a mixture run with other settings left does not make a rerun resume."""
    from training.ensemble import mixture_member_configs
    from training.train import interrupted_state

    config = TrainConfig(out=str(tmp_path), recipe="mixture", seed=3)
    other = dataclasses.replace(config, seed=4)
    (member, _), *_ = mixture_member_configs(other, tmp_path)
    (Path(member.out) / f"backup-{member.key()}").mkdir(parents=True)
    assert "start over" in interrupted_state(config)
    (member, _), *_ = mixture_member_configs(config, tmp_path)
    (Path(member.out) / f"backup-{member.key()}").mkdir(parents=True)
    assert "resume" in interrupted_state(config)
