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
    from training.distill_tables import fold_table

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
    from training.distill_tables import seed_summary

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


REGISTERED = ["--cv-fold", "2", "--seed", "6", "--data", "DIR", "--teacher-recipe", "mixture",
              "--bank-views", "32", "--mixup", "0.4", "--temperature", "1", "--alpha", "0",
              "--epochs", "30", "--out", "FILE"]


def test_the_registered_command_parses_to_the_same_values() -> None:
    """The running experiment's arguments: same values, same types, as before the checks."""
    from training.distill import build_parser

    args = build_parser().parse_args(REGISTERED)
    got = {k: (v, type(v)) for k, v in vars(args).items()
           if k in ("cv_fold", "seed", "bank_views", "mixup", "temperature", "alpha", "epochs")}
    assert got == {"cv_fold": (2, int), "seed": (6, int), "bank_views": (32, int),
                   "mixup": (0.4, float), "temperature": (1.0, float), "alpha": (0.0, float),
                   "epochs": (30, int)}
    assert args.teacher_recipe == "mixture" and args.out == Path("FILE")


def test_cli_every_option_states_its_default() -> None:
    from training.distill import build_parser

    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in (action.help or ""), action.option_strings


@pytest.fixture
def no_fold(monkeypatch):
    """compare_fold fails the test: every check below comes before any training."""
    from training import distill

    def refuse(*args, **kwargs):
        raise AssertionError("trained although the arguments were unusable")

    monkeypatch.setattr(distill, "compare_fold", refuse)
    return distill


@pytest.mark.parametrize(("change", "message"), [
    (["--cv-fold", "9"], "invalid choice: 9"), (["--cv-fold", "-1"], "invalid choice: -1"),
    (["--teacher-size", "-1"], "must be 1 or more"), (["--teacher-size", "4"], "--teacher-size 4"),
    (["--temperature", "0"], "--temperature must be more than 0"),
    (["--temperature", "nan"], "--temperature must be more than 0"),
    (["--alpha", "1.5"], "--alpha"), (["--teacher-arch", "bogus"], "invalid choice: 'bogus'"),
    (["--teacher-recipe", "probe", "--teacher-arch", "edge-gap"], "pretrained"),
    (["--epochs", "0"], "must be 1 or more"), (["--seed", "-1"], "--seed must be 0 or more"),
    (["--teacher-lr", "0"], "--teacher-lr"), (["--bank-views", "2", "--mixup", "nan"], "must be 0 or more"),
])
def test_cv_fold_usage_errors_exit_2_before_training(change: list[str], message: str,
                                                     tmp_path: Path, no_fold, capsys) -> None:
    argv = ["--cv-fold", "0", "--data", str(tmp_path), "--out", str(tmp_path / "r.json"), *change]
    with pytest.raises(SystemExit) as info:
        no_fold.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cv_fold_checks_data_and_out_before_training(tmp_path: Path, no_fold, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["--cv-fold", "0", "--bank-views", "2"]
    assert no_fold.main([*base, "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path} is a folder; expected a file name\n"
    assert no_fold.main([*base, "--data", str(tmp_path), "--out", str(afile / "r.json")]) == 2
    assert capsys.readouterr().err == f"error: {afile / 'r.json'}: {afile} is not a folder\n"
    assert no_fold.main([*base, "--data", str(afile), "--out", str(tmp_path / "r.json")]) == 2
    assert "is not a folder (it is a file)" in capsys.readouterr().err
    assert no_fold.main([*base, "--data", str(tmp_path / "none"),
                         "--out", str(tmp_path / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_result_that_cannot_be_written_is_printed_not_lost(tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    from training import distill

    out = tmp_path / "r.json"
    result = {"seed": 0, "fold": 1, "models": {}}

    def fold(*args, **kwargs):
        out.mkdir()  # the file's place taken while the fold trained
        return result

    monkeypatch.setattr(distill, "compare_fold", fold)
    assert distill.main(["--cv-fold", "1", "--data", str(tmp_path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {out}: cannot write the result")
    assert captured.err.count("\n") == 1 and json.loads(captured.out) == result
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left


def test_table_refuses_missing_broken_and_foreign_files(tmp_path: Path, capsys) -> None:
    from training.distill import main

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"seed": 0, "fold": 0, "n_test": 10, "models": {
        "edge-gap": {"accuracy": 0.9, "errors": 1, "params": 5}}}))
    cases = [(tmp_path / "missing.json", None, "cannot read it (No such file or directory)"),
             (tmp_path / "broken.json", "{", "cannot read it (Expecting"),
             (tmp_path / "empty.json", "{}", "not a --cv-fold result"),
             (tmp_path / "models.json", json.dumps({"seed": 0, "fold": 1, "n_test": 10,
                                                    "models": {"other": {"accuracy": 1.0,
                                                                         "errors": 0,
                                                                         "params": 5}}}),
              "are not those of")]
    for path, text, message in cases:
        if text is not None:
            path.write_text(text)
        assert main(["--table", str(good), str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and message in err and err.count("\n") == 1
    assert main(["--table", str(good)]) == 0
    assert "| edge-gap | 5 | 90.0% |" in capsys.readouterr().out


def _teacher_folder(tmp_path: Path, model: bytes) -> Path:
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "model.keras").write_bytes(model)
    (folder / "config.json").write_text(json.dumps({"data": str(tmp_path),
                                                   "spec": PreprocessSpec().to_dict()}))
    return folder


def test_a_corrupt_teacher_model_is_named_as_such(tmp_path: Path, capsys) -> None:
    from training.distill import main

    teacher = _teacher_folder(tmp_path, b"garbage")
    assert main(["--teacher", str(teacher), "--out", str(tmp_path / "student")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {teacher / 'model.keras'}: not a Keras .keras archive (corrupt or "
                   "another format)\n")
    (teacher / "config.json").write_text("{")
    assert main(["--teacher", str(teacher), "--out", str(tmp_path / "student")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {teacher / 'config.json'}: unreadable")
    assert not (tmp_path / "student").exists()


def test_view_bank_and_student_report_progress(capsys) -> None:
    """Progress lines on stderr; the bank itself is the same with or without them."""
    import keras

    from training.distill import view_bank
    from training.progress import progress_callback
    from training.train import TrainConfig

    x = np.random.default_rng(2).random((6, 40, 40, 3), dtype=np.float32)
    y = np.arange(6) % 3
    config = TrainConfig(spec=replace(PreprocessSpec(), size=32).to_dict())

    def teacher(batch, training=False):
        return np.full((len(batch), 3), 1 / 3, np.float32)

    keras.utils.set_random_seed(0)
    quiet = view_bank(teacher, config, x, y, views=2, mixup=0.4)
    assert capsys.readouterr().err == ""
    keras.utils.set_random_seed(0)
    loud = view_bank(teacher, config, x, y, views=2, mixup=0.4, progress=True)
    for a, b in zip(quiet, loud, strict=True):
        np.testing.assert_array_equal(a, b)
    assert "view bank: 2/2 views of 6 images" in capsys.readouterr().err
    callback = progress_callback("student", 30)
    callback.on_train_begin()
    callback.on_epoch_end(2, {"loss": 0.5, "hard_loss": 0.25, "accuracy": 1.0})
    line = capsys.readouterr().err
    assert line.startswith("  student: epoch 3/30, loss 0.500, hard_loss 0.250, 0:0")


def test_watch_training_prints_each_epoch_the_csv_logger_appends(tmp_path: Path, capsys) -> None:
    import time

    from training.progress import watch_training

    member = tmp_path / "member-0-edge-gap"
    member.mkdir()
    history = member / "history.csv"
    with watch_training("teacher", tmp_path, every=0.05, quiet=1000):
        history.write_text("epoch,accuracy,loss,val_loss\n0,0.5,1.2,1.3\n1,0.6,1.0,")  # torn
        time.sleep(0.3)
        history.write_text("epoch,accuracy,loss,val_loss\n0,0.5,1.2,1.3\n1,0.6,1.0,1.1\n")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(", 0:")[0] for line in lines] == [
        "  teacher member-0-edge-gap: epoch 1, loss 1.200, val_loss 1.300",
        "  teacher member-0-edge-gap: epoch 2, loss 1.000, val_loss 1.100"]


def test_progress_changes_nothing_the_student_learns(capsys) -> None:
    """The running experiment's numbers must not move: same weights with progress on or off."""
    from training.distill import distill_on_bank
    from training.train import TrainConfig

    q = np.array([0.2, 0.3, 0.5], np.float32)
    x = np.random.default_rng(3).random((8, 40, 40, 3), dtype=np.float32)
    y = np.arange(8) % 3
    config = TrainConfig(arch="edge-sep", batch_size=4,
                         spec=replace(PreprocessSpec(), size=32).to_dict())
    runs = [distill_on_bank(_constant_teacher(40, q), config, x, y, views=2, mixup=0.4, epochs=2,
                            progress=progress) for progress in (False, True)]
    for a, b in zip(runs[0][0].get_weights(), runs[1][0].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert runs[0][1] == runs[1][1]
    err = capsys.readouterr().err
    assert "view bank: 2/2 views" in err and "student: epoch 2/2" in err
