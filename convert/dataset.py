"""What convert needs from training: its recorded config, the test split and calibration images.

Splits are rebuilt with training's seed and fractions so the test split is the one training never
saw; images go through training's loader (the one preprocess function, with the decode cache).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ct_edge.preprocess import PreprocessSpec
from training import data as data_mod

from .errors import ConvertError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class TrainingRecord:
    """config.json (and metrics.json) written by training beside model.keras."""

    data: Path | None
    spec: PreprocessSpec
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    temperature: float = 1.0
    cache: Path = data_mod.DEFAULT_CACHE
    data_fingerprint: str | None = None
    # The uncertain threshold and how training chose it (training.abstention); None when the
    # record predates it: the manifest then keeps the fixed default and says so.
    uncertain_below: float | None = None
    operating_point: dict | None = None
    modality: str | None = None  # 'ct' | 'xray'; None in records from before it was kept
    recipe: str | None = None  # training's recipe ('finetune', 'probe', 'mixture')


def read_training_record(model_dir: Path) -> TrainingRecord | None:
    """The record beside the model, or None when training wrote none."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        fingerprint = None
        metrics = Path(model_dir) / METRICS_FILE
        if metrics.is_file():
            fingerprint = json.loads(metrics.read_text(encoding="utf-8")).get("data_fingerprint")
        calibration = config.get("calibration") or {}
        threshold = calibration.get("uncertain_below")
        operating_point = calibration.get("operating_point")
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"uncertain_below {threshold} is not in [0, 1]")
        if operating_point is not None and not isinstance(operating_point, dict):
            raise TypeError("calibration.operating_point is not an object")
        # Checked here, so a bad value is named with this file, not met as a crash in the splits.
        seed, val_fraction, test_fraction = data_mod.split_settings(config)
        return TrainingRecord(
            data=Path(config["data"]) if config.get("data") else None,
            spec=PreprocessSpec.from_dict(config.get("spec") or PreprocessSpec().to_dict()),
            seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
            temperature=float(calibration.get("temperature", 1.0)),
            cache=Path(config.get("cache") or data_mod.DEFAULT_CACHE),
            data_fingerprint=fingerprint,
            uncertain_below=None if threshold is None else float(threshold),
            operating_point=operating_point,
            modality=str(config["modality"]) if config.get("modality") else None,
            recipe=str(config["recipe"]) if config.get("recipe") else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConvertError(f"{path}: unreadable training config ({type(exc).__name__}: {exc})") from None


def resolve_record(model: Path, data: Path | None) -> tuple[TrainingRecord, Path]:
    """The training record (defaults when absent) and the data folder to use."""
    record = read_training_record(model.parent)
    if record is None:
        if data is None:
            raise ConvertError(f"no {CONFIG_FILE} beside {model}, so the data folder is unknown; "
                               "pass --data DIR")
        print(f"warning: no {CONFIG_FILE} beside {model}; assuming the default preprocessing, "
              "seed 0, 15% validation and 15% test, temperature 1.0", file=sys.stderr)
        record = TrainingRecord(data=None, spec=PreprocessSpec())
    root = Path(data) if data is not None else record.data
    if root is None:
        raise ConvertError(f"{model.parent / CONFIG_FILE} names no data folder; pass --data DIR")
    return record, root


def load_splits(record: TrainingRecord, root: Path) -> data_mod.Splits:
    return data_mod.load_splits(root, record.val_fraction, record.test_fraction, record.seed)


def held_out_arrays(record: TrainingRecord, splits: data_mod.Splits) -> tuple[np.ndarray, np.ndarray]:
    """The whole test split, float32 (n, h, w, c) and int labels."""
    x, y, skipped = data_mod.load_arrays(splits.test, record.spec, record.cache,
                                         progress=sys.stderr.isatty(), desc="decode test")
    data_mod.warn_skipped(skipped)
    data_mod.check_classes(y, "test")
    return x, y


def calibration_arrays(record: TrainingRecord, splits: data_mod.Splits, count: int) -> np.ndarray:
    """Up to `count` training images (all when fewer), a seeded random subset. Never test images."""
    if count < 1:
        raise ConvertError(f"calibration needs at least one image (got {count})")
    order = np.random.default_rng(record.seed).permutation(len(splits.train))
    chosen = [splits.train[i] for i in order[:count]]
    x, _, skipped = data_mod.load_arrays(chosen, record.spec, record.cache,
                                         progress=sys.stderr.isatty(), desc="decode calibration")
    data_mod.warn_skipped(skipped)
    if not len(x):
        raise ConvertError("no readable training images for int8 calibration")
    return x
