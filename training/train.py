"""Train a classifier on a `<root>/<split>/<class>/<image>` folder (default: the built-in data).

    python -m training.train [--data DIR] [--epochs N] [--arch NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ct_edge import DISCLAIMER, LABELS
from ct_edge.cli.common import positive_int
from ct_edge.errors import CtEdgeError
from ct_edge.preprocess import PreprocessSpec

from . import abstention
from . import data as data_mod
from .ensemble import (
    MIXTURE_MEMBERS,
    MIXTURE_RECIPE,
    MIXTURE_SIZE,
    fit_mixture,
    mixture_member_configs,
)
from .models import ARCHITECTURES, DEFAULT_ARCHITECTURE, PRETRAINED
from .results import RESULT_FILES, write_results
from .run_files import (
    describe_os_error,
    publish,
    save_model_atomically,
    staging_folder,
    usable_backup,
)
from .synthetic import DEFAULT_ROOT as BUILTIN_DATA

DEFAULT_OUT = Path("artifacts") / "model"



@dataclass
class TrainConfig:
    """Everything that decides a training run; stored beside the model."""

    data: str | None = None
    out: str = str(DEFAULT_OUT)
    arch: str = DEFAULT_ARCHITECTURE
    epochs: int = 50
    batch_size: int = 16
    learning_rate: float = 1e-3
    patience: int = 10
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    augment: bool = True
    # Augmentation strength (training batches only; used when augment is True).
    aug_rotation: float = 0.05    # max rotation, fraction of a full turn (0.05 = 18 degrees)
    aug_zoom: float = 0.1         # max zoom in/out, fraction
    aug_translate: float = 0.0    # max shift, fraction of height/width
    aug_flip: bool = True         # random horizontal flip
    aug_brightness: float = 0.1   # max brightness shift in [0, 1] units
    aug_contrast: float = 0.0     # max contrast factor change
    class_weights: bool = True
    # Optimisation: "plateau" = early stopping on validation loss (best epoch restored) with
    # ReduceLROnPlateau; "cosine" = a fixed cosine-decay schedule over all epochs, last epoch kept.
    schedule: str = "plateau"
    warmup_epochs: int = 0        # linear warm-up (cosine schedule only)
    label_smoothing: float = 0.0
    weight_decay: float = 0.0     # decoupled (AdamW) when > 0
    ema: bool = False             # cosine only: the final model holds an exponential moving
                                  # average of the weights (validation during training: raw ones)
    mixup: float = 0.0            # Beta(a, a) mixup of training batches when a > 0
    # "finetune": every layer trained by gradient descent (the options above); "probe": a
    # pretrained backbone kept frozen and a logistic head fitted exactly (training.probe).
    recipe: str = "finetune"
    # probe only: snap the frozen backbone's convolutions to the int8 grid first
    # (training.int8_grid), so the Keras model and its int8 artifacts share the weights.
    int8_grid: bool = False
    # probe only: fit the head on the training and the validation images (the probe needs no
    # validation split: its L2 is chosen by inner cross-validation, and nothing stops early).
    probe_uses_val: bool = False
    # "mixture" only (training.ensemble.fit_mixture): TrainConfig changes of each member, all
    # trained on the same images and merged into one graph; None: the registered mixture.
    mixture_members: list | None = None
    # "mixture" only: every member also runs on the mirrored image inside the one graph and the
    # means include it (flip averaging at twice the compute).
    flip_tta: bool = False
    spec: dict = field(default_factory=lambda: PreprocessSpec().to_dict())
    cache: str = str(data_mod.DEFAULT_CACHE)
    # What the images are ("ct" slices or projection "xray"s): the bundle's domain (ct_edge.domain).
    # None: "ct" for the built-in data, "xray" for a folder (said when training starts).
    modality: str | None = None
    # The uncertain threshold (training.abstention): chosen from a k-fold cross-validation of this
    # recipe on the training + validation images; 0 or 1: from the validation split instead.
    abstention_folds: int = 2
    target_risk: float = 0.03     # the most errors among answered images the threshold allows

    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.spec)

    def key(self) -> str:
        """Identifies a run for resuming: same command, same key."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def resolve_modality(config: TrainConfig) -> tuple[str, str | None]:
    """The modality to record and, when it was assumed rather than given, a line saying so."""
    if config.modality:
        return config.modality, None
    if not config.data:
        return "ct", None  # the built-in synthetic slices are CT
    return "xray", ("assuming the images are projection X-rays (modality xray); pass "
                    "--modality ct if they are CT slices")


def builtin_data(root: Path = BUILTIN_DATA) -> Path:
    """The embedded default data set, generated on first use."""
    from .synthetic import generate_dataset

    return generate_dataset(root)


def augmenter(seed: int, config: TrainConfig | None = None):
    """Rotation, zoom, shift, horizontal flip, brightness, contrast (strengths from the config;
    a zero strength leaves that step out): training batches only."""
    from keras import Sequential, layers

    c = config or TrainConfig()
    steps = []
    if c.aug_rotation:
        steps.append(layers.RandomRotation(c.aug_rotation, fill_mode="constant", seed=seed))
    if c.aug_zoom:
        steps.append(layers.RandomZoom(c.aug_zoom, fill_mode="constant", seed=seed + 1))
    if c.aug_translate:
        steps.append(layers.RandomTranslation(c.aug_translate, c.aug_translate,
                                              fill_mode="constant", seed=seed + 4))
    if c.aug_flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed + 2))
    if c.aug_brightness:
        steps.append(layers.RandomBrightness(c.aug_brightness, value_range=(0.0, 1.0),
                                             seed=seed + 3))
    if c.aug_contrast:
        steps.append(layers.RandomContrast(c.aug_contrast, value_range=(0.0, 1.0), seed=seed + 5))
    return Sequential(steps or [layers.Identity()], name="augment")


def _callbacks(config: TrainConfig, out: Path, val_available: bool) -> list:
    import keras

    monitor = "val_loss" if val_available else "loss"
    resume = [
        # double_checkpoint: a kill while the weights are written leaves the previous epoch's
        # copy, which Keras falls back to instead of failing the resumed run.
        keras.callbacks.BackupAndRestore(str(out / f"backup-{config.key()}"),
                                         double_checkpoint=True),
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
    ]
    if config.schedule == "cosine":
        return resume

    class AtomicBestCheckpoint(keras.callbacks.Callback):
        """Keeps the best epoch's model; written to a temp file then renamed."""

        def __init__(self) -> None:
            super().__init__()
            self.best = np.inf

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            value = (logs or {}).get(monitor, np.inf)
            if value < self.best:
                self.best = value
                save_model_atomically(self.model, out / "checkpoint.keras")

    return [
        *resume,
        keras.callbacks.EarlyStopping(monitor=monitor, patience=config.patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5,
                                          patience=max(3, config.patience // 2), min_lr=1e-5),
        AtomicBestCheckpoint(),
    ]


def build_optimizer(config: TrainConfig, steps_per_epoch: int):
    import keras

    rate = config.learning_rate
    if config.schedule != "cosine" and (config.ema or config.warmup_epochs):
        # EarlyStopping/the best checkpoint would put the raw best-epoch weights back.
        raise ValueError("ema and warmup_epochs need schedule='cosine'")
    if config.schedule == "cosine" and not 0 <= config.warmup_epochs < config.epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs), got {config.warmup_epochs}")
    if config.schedule == "cosine":
        warmup = config.warmup_epochs * steps_per_epoch
        rate = keras.optimizers.schedules.CosineDecay(
            rate if not warmup else rate / 10, (config.epochs - config.warmup_epochs)
            * steps_per_epoch, warmup_target=rate if warmup else None, warmup_steps=warmup)
    elif config.schedule != "plateau":
        raise ValueError(f"unknown schedule {config.schedule!r}; use plateau or cosine")
    options = {"use_ema": config.ema}
    if config.weight_decay:
        return keras.optimizers.AdamW(rate, weight_decay=config.weight_decay, **options)
    return keras.optimizers.Adam(rate, **options)


def mixup_batches(alpha: float, seed: int):
    """Mixes each batch with a shuffled copy of itself, weight ~ Beta(alpha, alpha)."""
    import tensorflow as tf

    def mix(x, y):
        n = tf.shape(x)[0]
        a = tf.random.gamma([1], alpha, seed=seed)
        b = tf.random.gamma([1], alpha, seed=seed + 1)
        lam = tf.maximum(a / (a + b), b / (a + b))  # the original image stays the larger part
        order = tf.random.shuffle(tf.range(n), seed=seed + 2)
        return (lam * x + (1 - lam) * tf.gather(x, order),
                lam * y + (1 - lam) * tf.gather(y, order))

    return mix


def fit_model(config: TrainConfig, x_train: np.ndarray, y_train: np.ndarray,
              x_val: np.ndarray, y_val: np.ndarray, out: Path | None = None,
              verbose: int | None = None):
    """Build and fit one model; returns (model, history dict). Used by training and evaluation."""
    if config.recipe == "probe":
        from .probe import fit_probe

        return fit_probe(config, x_train, y_train, x_val, y_val, out, verbose)
    if config.recipe == MIXTURE_RECIPE:
        return fit_mixture(fit_model, config, x_train, y_train, x_val, y_val, out, verbose)
    import keras
    import tensorflow as tf

    from .models import build_model

    keras.utils.set_random_seed(config.seed)
    # Bit-identical reruns (about 9% slower here): without it, threaded CPU kernels reorder float
    # sums and the same command moved one cross-validation fold from 82% to 67%.
    tf.config.experimental.enable_op_determinism()
    spec = config.preprocess_spec()
    model = build_model(config.arch, (spec.size, spec.size, spec.channels), len(LABELS))
    steps_per_epoch = -(-len(x_train) // config.batch_size)
    model.compile(optimizer=build_optimizer(config, steps_per_epoch),
                  loss=keras.losses.CategoricalCrossentropy(
                      label_smoothing=config.label_smoothing),
                  metrics=["accuracy"])
    one_hot = np.eye(len(LABELS), dtype=np.float32)
    train = tf.data.Dataset.from_tensor_slices((x_train, one_hot[y_train]))
    train = train.shuffle(len(x_train), seed=config.seed, reshuffle_each_iteration=True)
    train = train.batch(config.batch_size)
    if config.augment:
        augment = augmenter(config.seed, config)
        train = train.map(lambda x, y: (augment(x, training=True), y),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if config.mixup:
        train = train.map(mixup_batches(config.mixup, config.seed))
    train = train.prefetch(tf.data.AUTOTUNE)
    val = (x_val, one_hot[y_val]) if len(y_val) else None
    weights = None
    if config.class_weights:
        counts = np.bincount(y_train, minlength=len(LABELS)).astype(np.float64)
        weights = {i: float(len(y_train) / (len(LABELS) * c)) for i, c in enumerate(counts) if c}
    if out is not None:
        callbacks = _callbacks(config, out, val is not None)
    elif config.schedule == "plateau":
        callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss" if val else "loss",
                                                   patience=config.patience,
                                                   restore_best_weights=True)]
    else:
        callbacks = []
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    history = model.fit(train, validation_data=val, epochs=config.epochs, class_weight=weights,
                        callbacks=callbacks, verbose=verbose, shuffle=False)
    checkpoint = out / "checkpoint.keras" if out is not None else None
    if checkpoint is not None and checkpoint.is_file():
        # A resumed run's EarlyStopping forgot the best epoch; the checkpoint did not.
        model.set_weights(keras.models.load_model(checkpoint).get_weights())
    return model, {k: [float(v) for v in vs] for k, vs in history.history.items()}


def train(config: TrainConfig) -> dict:
    """The whole job: data, fit, test, calibration, reports. Returns metrics.json's content.

    The results replace an earlier run's in `out` only once all are written (RESULT_FILES).
    """
    started = time.time()
    spec = config.preprocess_spec()
    root = Path(config.data) if config.data else builtin_data()
    splits = data_mod.load_splits(root, config.val_fraction, config.test_fraction, config.seed)
    modality, assumed = resolve_modality(config)
    if assumed:
        print(assumed, flush=True)
    cache = Path(config.cache)
    arrays = {}
    skipped: list[tuple[str, str]] = []
    for name in ("train", "val", "test"):
        x, y, bad = data_mod.load_arrays(getattr(splits, name), spec, cache, desc=f"decode {name}")
        arrays[name] = (x, y)
        skipped += bad
    data_mod.warn_skipped(skipped)
    for name in ("train", "test"):
        data_mod.check_classes(arrays[name][1], name)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    resumed = usable_backup(out / f"backup-{config.key()}")
    if not resumed:
        for stale in ("history.csv", "checkpoint.keras"):
            (out / stale).unlink(missing_ok=True)
    print(f"training {config.arch} on {root} ({len(arrays['train'][1])} train, "
          f"{len(arrays['val'][1])} validation, {len(arrays['test'][1])} test images; "
          f"test split: {splits.test_source})" + (" - resuming" if resumed else ""), flush=True)
    model, _ = fit_model(config, *arrays["train"], *arrays["val"], out=out)
    staged = staging_folder(out)
    try:
        metrics = write_results(config, model, fit_model, root, splits, arrays, skipped, modality,
                                out, staged, started)
        try:
            publish(staged, out, RESULT_FILES)
        except KeyboardInterrupt:  # deferred to the end of publish: nothing is left to stop
            print(f"\ninterrupted while the results were written; they are complete in {out}",
                  file=sys.stderr)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    (out / "checkpoint.keras").unlink(missing_ok=True)
    return metrics


def interrupted_state(config: TrainConfig) -> str:
    """What an interrupted run left and what running it again does (a line for Ctrl-C)."""
    out = Path(config.out)
    backups = [out / f"backup-{config.key()}"]
    if config.recipe == MIXTURE_RECIPE:  # only this mixture's members resume
        backups += [Path(member.out) / f"backup-{member.key()}"
                    for member, _ in mixture_member_configs(config, out)]
    if any(path.is_dir() for path in backups):
        return "run the same command again to resume from the last finished epoch"
    return (f"model.keras, config.json and the reports in {out}, if any, are still the last "
            "finished run's; run the same command again to start over")


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m training.train\n"
               "  python -m training.train --data ../shared/data/covid19-xray --epochs 50")
    add = parser.add_argument
    add("--data", default=None, help="data folder <root>/<split>/<class>/<image>; default: the "
        f"built-in synthetic set (generated into {BUILTIN_DATA})")
    add("--out", default=defaults.out, help=f"output folder (default: {defaults.out})")
    add("--arch", default=None, choices=sorted(ARCHITECTURES),
        help=f"architecture (default: {defaults.arch})")
    members = " + ".join(f"{m['arch']} ({m['recipe']})" for m in MIXTURE_MEMBERS)
    add("--recipe", default=defaults.recipe, choices=["finetune", "probe", MIXTURE_RECIPE],
        help="finetune: train every layer; probe: keep a pretrained backbone frozen and fit a "
        "logistic head on its features (needs --arch efficientnet-lite0); mixture: train "
        f"{members} on the same images and merge them into one graph (no --arch; "
        f"{MIXTURE_SIZE} px unless --size) (default: {defaults.recipe})")
    add("--int8-grid", action="store_true",
        help="probe recipe: snap the frozen backbone's convolutions to the int8 grid first, so "
        "the Keras model and its int8 artifacts share the weights (default: off)")
    add("--probe-uses-val", action="store_true",
        help="probe recipe (or the mixture's probe member): fit the head on the validation images "
        "too; the probe needs none (inner cross-validation picks its L2, nothing stops early), "
        "but the temperature is then fitted on images the head has seen (default: off)")
    add("--flip-tta", action="store_true",
        help="mixture recipe: every member also runs on the mirrored image inside the one graph "
        "and the means include it; twice the compute per image (default: off)")
    add("--epochs", type=positive_int, default=defaults.epochs,
        help=f"maximum epochs; early stopping usually ends sooner (default: {defaults.epochs})")
    add("--batch-size", type=positive_int, default=defaults.batch_size,
        help=f"batch size (default: {defaults.batch_size})")
    add("--lr", type=float, default=defaults.learning_rate,
        help=f"Adam learning rate (default: {defaults.learning_rate})")
    add("--patience", type=positive_int, default=defaults.patience,
        help=f"early-stopping patience in epochs (default: {defaults.patience})")
    add("--seed", type=int, default=defaults.seed, help=f"seed for splits and weights "
        f"(default: {defaults.seed})")
    add("--aspect", default=PreprocessSpec().aspect, choices=["crop", "letterbox", "stretch"],
        help=f"how non-square images become square (default: {PreprocessSpec().aspect})")
    add("--size", type=positive_int, default=None,
        help=f"input size in pixels, square (default: {PreprocessSpec().size}; "
        f"{MIXTURE_SIZE} for --recipe mixture)")
    add("--no-augment", action="store_true", help="train without augmentation (default: augment)")
    add("--schedule", default=defaults.schedule, choices=["plateau", "cosine"],
        help="plateau: early stopping on validation loss, best epoch kept, LR halved on plateaus; "
        f"cosine: fixed cosine decay over all epochs, last epoch kept (default: {defaults.schedule})")
    add("--modality", choices=["ct", "xray"], default=None,
        help="what the images are: CT slices or projection X-rays; the bundle refuses other "
        "modalities (default: ct for the built-in data, xray for a folder)")
    add("--label-smoothing", type=float, default=defaults.label_smoothing,
        help=f"label smoothing of the cross-entropy (default: {defaults.label_smoothing})")
    add("--abstention-folds", type=int, default=defaults.abstention_folds,
        help="k of the cross-validation that chooses the uncertain threshold; 0: choose it on the "
        f"validation split instead (default: {defaults.abstention_folds})")
    add("--target-risk", type=abstention.fraction, default=defaults.target_risk,
        help="the most errors among answered images the uncertain threshold allows "
        f"(default: {defaults.target_risk})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mixture = args.recipe == MIXTURE_RECIPE
    if mixture and args.arch is not None:
        parser.error("--recipe mixture trains its own members; drop --arch")
    arch = MIXTURE_RECIPE if mixture else args.arch or DEFAULT_ARCHITECTURE
    if args.recipe == "probe" and arch not in PRETRAINED:
        parser.error(f"--recipe probe needs a pretrained --arch ({', '.join(PRETRAINED)})")
    if args.int8_grid and args.recipe != "probe":
        parser.error("--int8-grid snaps a frozen backbone: it needs --recipe probe")
    if args.probe_uses_val and args.recipe not in ("probe", MIXTURE_RECIPE):
        parser.error("--probe-uses-val changes a probe's head: it needs --recipe probe or mixture")
    if args.flip_tta and not mixture:
        parser.error("--flip-tta averages the members of one graph: it needs --recipe mixture")
    size = args.size or (MIXTURE_SIZE if mixture else PreprocessSpec().size)
    try:
        spec = PreprocessSpec(aspect=args.aspect, size=size)
    except ValueError as exc:
        parser.error(f"--size {size}: {exc}")
    config = TrainConfig(data=args.data, out=args.out, arch=arch, epochs=args.epochs,
                         batch_size=args.batch_size, learning_rate=args.lr,
                         patience=args.patience, seed=args.seed, augment=not args.no_augment,
                         schedule=args.schedule, label_smoothing=args.label_smoothing,
                         recipe=args.recipe, int8_grid=args.int8_grid, flip_tta=args.flip_tta,
                         probe_uses_val=args.probe_uses_val,
                         spec=spec.to_dict(), modality=args.modality,
                         abstention_folds=args.abstention_folds, target_risk=args.target_risk)
    out = Path(config.out)
    try:
        metrics = train(config)
    except CtEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; {interrupted_state(config)}", file=sys.stderr)
        return 130
    print(f"\ntest accuracy {metrics['test_accuracy']:.2%}  test loss {metrics['test_loss']:.3f}  "
          f"({metrics['test']['n']} test images, {metrics['test_source']}; best epoch "
          f"{metrics['best_epoch']} of {metrics['epochs_run']}; {metrics['params']:,} parameters)")
    print(f"wrote {out / 'model.keras'}, metrics.json, learning_curves.png, confusion_matrix.png, "
          "gradcam.png")
    print(DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
