"""Knowledge distillation: a teacher's soft targets, at a temperature, teach a small student.

    python -m training.distill --teacher artifacts/ensemble --out artifacts/distilled \\
        [--arch edge-gap] [--temperature 4] [--alpha 0.5] [--epochs 50]

The teacher is any saved ct-edge model folder (one model, a `training.ensemble`, another input
size). It answers on exactly the student's training batches - the training images and their
augmentations, never validation or test images - so each batch is augmented once at the
teacher's input size, shown to the teacher, and resized for the student. The loss is
alpha * cross-entropy(labels) + (1 - alpha) * T^2 * cross-entropy(teacher^(1/T), student at T)
(Hinton et al. 2015); the teacher's probabilities p give the soft targets p^(1/T) / sum, which is
softmax(log p / T), so an ensemble's mean probabilities teach as well as one model's logits.
Early stopping watches the plain cross-entropy on the validation split, as `make train` does.
The student folder is an ordinary model folder: `python -m convert` takes it unchanged.

`--bank-views V [--mixup A]` distils instead on a fixed bank of views (`view_bank`,
`distill_on_bank`): the teacher answers once on V augmented, optionally mixup-blended copies of
every training image, and the student trains exactly --epochs passes over them with a cosine
schedule, no early stopping and no class weights (the teacher's answers set the balance). With
--teacher it writes a student folder as above; with --cv-fold N it scores one fold.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ct_edge import DISCLAIMER, LABELS
from ct_edge.errors import CtEdgeError, one_line
from ct_edge.preprocess import PreprocessSpec

from . import data as data_mod
from . import machine
from .distill_args import (
    CV_FOLDS,
    DEFAULT_ALPHA,
    DEFAULT_TEMPERATURE,
    build_parser,
    check_arguments,
    check_weights,
)
from .distill_tables import fold_table, read_results, seed_summary
from .ensemble import MIXTURE_RECIPE, MIXTURE_SIZE
from .metrics import classification_report
from .progress import clock, progress_callback, watch_training
from .train import TrainConfig, augmenter


def soften(probabilities: Any, temperature: float) -> Any:
    """softmax(log p / T): the teacher's probabilities at temperature T (a tensor or array)."""
    import tensorflow as tf

    logp = tf.math.log(tf.clip_by_value(tf.cast(probabilities, tf.float32), 1e-7, 1.0))
    return tf.nn.softmax(logp / temperature, axis=-1)


def at_size(x: Any, size: int) -> Any:
    """Teacher-sized images at the student's size (antialiased bilinear); unchanged if equal."""
    import tensorflow as tf

    return x if x.shape[1] == size else tf.image.resize(x, (size, size), "bilinear",
                                                        antialias=True)


def distillation_loss(classes: int, temperature: float, alpha: float):
    """Loss on the student's logits; targets are [one-hot labels | teacher soft targets]."""
    import tensorflow as tf

    def loss(targets, logits):
        hard, soft = targets[:, :classes], targets[:, classes:]
        ce = tf.keras.losses.categorical_crossentropy(hard, tf.nn.softmax(logits))
        kd = tf.keras.losses.categorical_crossentropy(soft, tf.nn.softmax(logits / temperature))
        return alpha * ce + (1.0 - alpha) * temperature ** 2 * kd

    return loss


def hard_cross_entropy(classes: int):
    """The plain cross-entropy against the labels: what early stopping watches."""
    import tensorflow as tf

    def hard_loss(targets, logits):
        return tf.keras.losses.categorical_crossentropy(targets[:, :classes], tf.nn.softmax(logits))

    return hard_loss


def hard_accuracy(classes: int):
    import tensorflow as tf

    def accuracy(targets, logits):
        return tf.cast(tf.equal(tf.argmax(targets[:, :classes], -1), tf.argmax(logits, -1)),
                       tf.float32)

    return accuracy


def distill(teacher: Any, config: TrainConfig, x_train: np.ndarray, y_train: np.ndarray,
            x_val: np.ndarray, y_val: np.ndarray, temperature: float = DEFAULT_TEMPERATURE,
            alpha: float = DEFAULT_ALPHA, verbose: int = 0,
            progress: bool = False) -> tuple[Any, dict]:
    """Train `config.arch` at `config`'s input size from `teacher`; x_* at the teacher's size.

    Returns (student, history). Uses `config`'s seed, epochs, batch size, learning rate,
    patience, augmentation and class weights; schedule 'plateau' only. `progress` prints a
    line per epoch to stderr.
    """
    import keras
    import tensorflow as tf

    from .models import build_model

    check_weights(temperature, alpha)
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    spec = config.preprocess_spec()
    classes = len(LABELS)
    student = build_model(config.arch, (spec.size, spec.size, spec.channels), classes)
    logits_model = keras.Model(student.inputs, student.get_layer("logits").output)
    teacher_size = tuple(int(d) for d in teacher.inputs[0].shape[1:3])
    if x_train.shape[1:3] != teacher_size:
        raise ValueError(f"training images are {x_train.shape[1:3]}, the teacher takes "
                         f"{teacher_size}")

    def to_student(x):
        return at_size(x, spec.size)

    one_hot = np.eye(classes, dtype=np.float32)
    weights = np.ones(len(y_train), np.float32)
    if config.class_weights:
        counts = np.bincount(y_train, minlength=classes).astype(np.float64)
        per_class = np.where(counts > 0, len(y_train) / (classes * np.maximum(counts, 1)), 0.0)
        weights = per_class[y_train].astype(np.float32)
    train = tf.data.Dataset.from_tensor_slices((x_train, one_hot[y_train], weights))
    train = train.shuffle(len(x_train), seed=config.seed, reshuffle_each_iteration=True)
    train = train.batch(config.batch_size)
    augment = augmenter(config.seed, config) if config.augment else None

    def with_soft_targets(x, y, w):
        if augment is not None:
            x = augment(x, training=True)
        soft = soften(teacher(x, training=False), temperature)
        return to_student(x), tf.concat([y, soft], axis=1), w

    train = train.map(with_soft_targets).prefetch(tf.data.AUTOTUNE)
    # Validation: labels only (the soft half is the label too), student-sized, no teacher.
    x_val_student = to_student(tf.constant(x_val)).numpy() if len(y_val) else x_val
    val_targets = np.concatenate([one_hot[y_val], one_hot[y_val]], axis=1)
    val = (x_val_student, val_targets) if len(y_val) else None
    monitor = "val_hard_loss" if val else "hard_loss"
    logits_model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                         loss=distillation_loss(classes, temperature, alpha),
                         metrics=[hard_cross_entropy(classes), hard_accuracy(classes)])
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=monitor, mode="min", patience=config.patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="min", factor=0.5,
                                          patience=max(3, config.patience // 2), min_lr=1e-5),
    ]
    if progress:
        callbacks.append(progress_callback("student", config.epochs))
    history = logits_model.fit(train, validation_data=val, epochs=config.epochs,
                               callbacks=callbacks, verbose=verbose, shuffle=False)
    return student, {k: [float(v) for v in vs] for k, vs in history.history.items()}


def view_bank(teacher: Any, config: TrainConfig, x: np.ndarray, y: np.ndarray, views: int,
              mixup: float, chunk: int = 32,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images at the student's size, blended one-hot labels, the teacher's probabilities on
    exactly those images): `views` augmented copies of every training image, each blended with
    another image's augmented copy (weight ~ Beta(mixup, mixup), the image's own the larger part)
    when mixup > 0. The teacher runs once per view, so a long student schedule costs no more
    teacher time ("function matching", Beyer et al. 2022, with a fixed set of views).
    `progress` prints a line to stderr after a view when 30 s passed, and after the last."""

    if views < 1 or mixup < 0:
        raise ValueError(f"need views >= 1 and mixup >= 0, got {views}, {mixup}")
    spec = config.preprocess_spec()
    augment = augmenter(config.seed, config)
    rng = np.random.default_rng(config.seed)
    one_hot = np.eye(len(LABELS), dtype=np.float32)[y]
    images, labels, soft = [], [], []
    started = shown = time.time()
    for view in range(views):
        partners = rng.permutation(len(x))
        for start in range(0, len(x), chunk):
            own = np.arange(start, min(start + chunk, len(x)))
            batch, target = augment(x[own], training=True), one_hot[own]
            if mixup > 0:
                lam = rng.beta(mixup, mixup, size=(len(own), 1)).astype(np.float32)
                lam = np.maximum(lam, 1 - lam)
                other = augment(x[partners[own]], training=True)
                batch = lam[:, :, None, None] * batch + (1 - lam[:, :, None, None]) * other
                target = lam * target + (1 - lam) * one_hot[partners[own]]
            soft.append(np.asarray(teacher(batch, training=False), np.float32))
            images.append(np.asarray(at_size(batch, spec.size)))
            labels.append(target)
        if progress and (view + 1 == views or time.time() - shown >= 30):
            shown = time.time()
            print(f"  view bank: {view + 1}/{views} views of {len(x)} images, {clock(started)}",
                  file=sys.stderr, flush=True)
    return np.concatenate(images), np.concatenate(labels), np.concatenate(soft)


def distill_on_bank(teacher: Any, config: TrainConfig, x_train: np.ndarray, y_train: np.ndarray,
                    views: int, mixup: float, epochs: int, temperature: float = 1.0,
                    alpha: float = 0.0, verbose: int = 0,
                    progress: bool = False) -> tuple[Any, dict]:
    """`config.arch` trained on `view_bank`'s images for a fixed cosine schedule of `epochs`
    passes over the bank (no early stopping: the validation split is not used), loss as
    `distillation_loss`. Returns (student, history). `progress` prints the view bank's and each
    epoch's progress to stderr."""
    import keras
    import tensorflow as tf

    from .models import build_model

    check_weights(temperature, alpha)
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    x, hard, soft = view_bank(teacher, config, x_train, y_train, views, mixup, progress=progress)
    spec = config.preprocess_spec()
    classes = len(LABELS)
    student = build_model(config.arch, (spec.size, spec.size, spec.channels), classes)
    logits_model = keras.Model(student.inputs, student.get_layer("logits").output)
    targets = np.concatenate([hard, np.asarray(soften(soft, temperature))], axis=1)
    steps = -(-len(x) // config.batch_size) * epochs
    logits_model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
            config.learning_rate, steps)),
        loss=distillation_loss(classes, temperature, alpha),
        metrics=[hard_cross_entropy(classes), hard_accuracy(classes)])
    history = logits_model.fit(x, targets, batch_size=config.batch_size, epochs=epochs,
                               verbose=verbose, shuffle=True,
                               callbacks=[progress_callback("student", epochs)] if progress else None)
    return student, {k: [float(v) for v in vs] for k, vs in history.history.items()}


def load_teacher(folder: Path) -> tuple[Any, dict]:
    """The teacher's model.keras and config.json (data, seed and split come from it)."""
    from .models import load_keras_model

    path = folder / "model.keras"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model.keras in the teacher folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the teacher has no config.json (data and split)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{config_path}: unreadable teacher config ({one_line(exc)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("spec"), dict) \
            or not config.get("data"):
        raise ValueError(f"{config_path}: not a training config (needs spec and data)")
    try:
        model = load_keras_model(path)
    except data_mod.DataError:
        raise
    except Exception as exc:  # Keras raises many types for an unreadable archive
        raise ValueError(f"{path}: cannot load the Keras model ({one_line(exc)})") from None
    return model, config


def run(teacher_dir: Path, out: Path, arch: str, size: int, temperature: float, alpha: float,
        epochs: int, bank: dict | None = None) -> dict:
    """Distil on the teacher's own training split; test on its test split; write the folder.
    bank: {'views', 'mixup'} distils on a fixed set of views for exactly `epochs` passes
    (`distill_on_bank`) instead of online with early stopping."""
    teacher, teacher_config = load_teacher(teacher_dir)
    try:
        teacher_spec = PreprocessSpec.from_dict(teacher_config["spec"])
        seed, val_fraction, test_fraction = data_mod.split_settings(teacher_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{teacher_dir / 'config.json'}: unusable teacher config "
                         f"({one_line(exc)})") from None
    root = Path(teacher_config["data"])
    config = TrainConfig(data=str(root), out=str(out), arch=arch, epochs=epochs,
                         seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                         spec=replace(teacher_spec, size=size).to_dict(),
                         cache=teacher_config.get("cache") or str(data_mod.DEFAULT_CACHE),
                         modality=teacher_config.get("modality"))
    splits = data_mod.load_splits(root, config.val_fraction, config.test_fraction, config.seed)
    cache = Path(config.cache)
    arrays = {name: data_mod.load_arrays(getattr(splits, name), teacher_spec, cache,
                                         desc=f"decode {name}")[:2]
              for name in ("train", "val")}
    x_test, y_test, _ = data_mod.load_arrays(splits.test, config.preprocess_spec(), cache,
                                             desc="decode test")
    print(f"distilling {teacher_dir} ({teacher_config.get('arch')}, {teacher_spec.size} px) into "
          f"{arch} at {size} px, T={temperature}, alpha={alpha}", flush=True)
    if bank:
        student, history = distill_on_bank(teacher, config, *arrays["train"], bank["views"],
                                           bank["mixup"], epochs, temperature, alpha, verbose=2)
    else:
        student, history = distill(teacher, config, *arrays["train"], *arrays["val"],
                                   temperature=temperature, alpha=alpha, verbose=2)
    report = classification_report(student.predict(x_test, verbose=0), y_test, LABELS)
    out.mkdir(parents=True, exist_ok=True)
    student.save(out / "model.keras")
    metrics = {"test_accuracy": report["accuracy"], "test_loss": report["loss"], "test": report,
               "params": int(student.count_params()), "architecture": arch,
               "epochs_run": len(history["loss"]), "test_source": splits.test_source,
               "data_fingerprint": splits.fingerprint(), "teacher": str(teacher_dir),
               "temperature": temperature, "alpha": alpha, "bank": bank}
    data_mod.write_json(out / "metrics.json", metrics)
    data_mod.write_json(out / "config.json", {
        **asdict(config), "modality": config.modality or "xray",
        "distilled_from": str(teacher_dir), "distillation": {"temperature": temperature,
                                                             "alpha": alpha, "bank": bank},
        "calibration": {"temperature": 1.0, "fitted_on": "none (distilled)"}})
    return metrics


def compare_fold(root: Path, seed: int, fold: int, teacher_settings: dict,
                 temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                 folds: int = CV_FOLDS, cache: Path = data_mod.DEFAULT_CACHE,
                 bank: dict | None = None) -> dict:
    """One fold of `training.evaluate`'s cross-validation (same groups, folds, validation split,
    seeds): the default edge-gap, a teacher (TrainConfig fields in `teacher_settings`), their
    mean (a mixed ensemble) and edge-gap distilled from the teacher, all on the same test fold.
    bank: {'views', 'mixup', 'epochs'} distils on a fixed set of views (`distill_on_bank`)
    instead of online with early stopping."""
    from .train import fit_model

    base = TrainConfig(seed=seed + fold)  # the seed evaluate gives this fold's single model
    teacher_config = replace(base, **teacher_settings)
    teacher_spec, spec = teacher_config.preprocess_spec(), base.preprocess_spec()
    train_dir = root / "train" if (root / "train").is_dir() else root
    samples = data_mod.scan_split(train_dir)
    x_all, y_all, skipped = data_mod.load_arrays(samples, spec, cache, desc="decode")
    bad = {p for p, _ in skipped}
    samples = [s for s in samples if str(s.path) not in bad]
    x_big = (x_all if teacher_spec == spec else
             data_mod.load_arrays(samples, teacher_spec, cache, desc="decode teacher")[0])
    index = {s.path: i for i, s in enumerate(samples)}
    train_part, test_part = data_mod.kfold_hash_splits(samples, folds, seed)[fold]
    fit_part, val_part = data_mod.stratified_hash_split(train_part, 0.15, seed + fold)

    def pick(part):
        return np.asarray([index[s.path] for s in part])

    fit, val, test = pick(fit_part), pick(val_part), pick(test_part)
    y_test = y_all[test]
    out: dict = {"seed": seed, "fold": fold, "n_test": len(test), "temperature": temperature,
                 "alpha": alpha, "teacher_settings": teacher_settings, "bank": bank,
                 "machine": machine.describe(), "models": {}}

    def score(name: str, probabilities: np.ndarray, seconds: float, params: int) -> None:
        report = classification_report(probabilities, y_test, LABELS)
        out["models"][name] = {"accuracy": report["accuracy"], "loss": report["loss"],
                               "errors": int((probabilities.argmax(1) != y_test).sum()),
                               "params": params, "seconds": round(seconds, 1)}
        print(f"  {name}: accuracy {report['accuracy']:.1%} ({len(y_test)} test images), loss "
              f"{report['loss']:.3f}, {seconds:.0f} s", flush=True)

    probabilities = {}
    for name, config, x in (("edge-gap", base, x_all), ("teacher", teacher_config, x_big)):
        started = time.time()
        print(f"  training {name} ({config.arch}, {config.recipe})...", file=sys.stderr, flush=True)
        with (tempfile.TemporaryDirectory(prefix="ct-edge-distill-") as scratch,
              watch_training(name, Path(scratch))):
            model, _ = fit_model(config, x[fit], y_all[fit], x[val], y_all[val],
                                 out=Path(scratch), verbose=0)
        probabilities[name] = model.predict(x[test], verbose=0)
        score(name, probabilities[name], time.time() - started, int(model.count_params()))
        if name == "teacher":
            teacher = model
    score("mean(edge-gap, teacher)", (probabilities["edge-gap"] + probabilities["teacher"]) / 2,
          0.0, out["models"]["edge-gap"]["params"] + out["models"]["teacher"]["params"])
    started = time.time()
    print("  distilling edge-gap from the teacher...", file=sys.stderr, flush=True)
    if bank:
        student, _ = distill_on_bank(teacher, base, x_big[fit], y_all[fit], bank["views"],
                                     bank["mixup"], bank["epochs"], temperature, alpha,
                                     progress=True)
    else:
        student, _ = distill(teacher, base, x_big[fit], y_all[fit], x_big[val], y_all[val],
                             temperature=temperature, alpha=alpha, progress=True)
    score("edge-gap distilled", student.predict(x_all[test], verbose=0), time.time() - started,
          int(student.count_params()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    if args.table:
        try:
            results = read_results(args.table)
        except CtEdgeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(fold_table(results) + "\n\n" + seed_summary(results))
        return 0
    if args.cv_fold is not None:
        if args.data is None or args.out is None:
            parser.error("--cv-fold needs --data and --out (a JSON file)")
        if args.teacher_recipe == MIXTURE_RECIPE:
            size = args.teacher_size or MIXTURE_SIZE
            settings = {"arch": MIXTURE_RECIPE, "recipe": MIXTURE_RECIPE,
                        "spec": PreprocessSpec(size=size).to_dict()}
        else:
            settings = {"arch": args.teacher_arch, "recipe": args.teacher_recipe,
                        "learning_rate": args.teacher_lr, "epochs": args.teacher_epochs,
                        "spec": PreprocessSpec(size=args.teacher_size
                                               or PreprocessSpec().size).to_dict()}
        try:
            # Before the hour of training: a bad --data or --out fails now.
            data_mod.check_data_folder(args.data)
            data_mod.check_writable(args.out)
            bank = ({"views": args.bank_views, "mixup": args.mixup, "epochs": args.epochs}
                    if args.bank_views else None)
            result = compare_fold(args.data, args.seed, args.cv_fold, settings, args.temperature,
                                  args.alpha, bank=bank)
        except (CtEdgeError, OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            data_mod.write_json(args.out, result)  # atomic: `make distill-cv` skips folds on file
        except OSError as exc:
            # Keep the hour's result: on stdout, after the one error line.
            print(f"error: {args.out}: cannot write the result ({exc.strerror or one_line(exc)}); "
                  "it follows on stdout", file=sys.stderr)
            print(json.dumps(result, indent=2))
            return 2
        print(f"wrote {args.out}")
        return 0
    if args.teacher is None or args.out is None:
        parser.error("--teacher and --out are required")
    try:
        data_mod.check_writable(args.out, folder=True)
        bank = {"views": args.bank_views, "mixup": args.mixup} if args.bank_views else None
        metrics = run(args.teacher, args.out, args.arch, args.size, args.temperature, args.alpha,
                      args.epochs, bank)
    except (CtEdgeError, OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"test accuracy {metrics['test_accuracy']:.2%} ({metrics['test']['n']} images); wrote "
          f"{args.out / 'model.keras'}")
    print(DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
