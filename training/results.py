"""What a finished training run writes: test metrics, calibration, the operating point, the
model, its config.json and the report plots, into a staging folder that `training.train`
publishes as one step (`run_files.publish`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ct_edge import LABELS

from . import abstention
from . import data as data_mod
from .ensemble import MIXTURE_RECIPE, mixture_members
from .metrics import (
    classification_report,
    expected_calibration_error,
    fit_temperature,
    scale_temperature,
)
from .run_files import read_history, save_model_atomically

CONFIG_FILE = "config.json"
# What a finished run publishes in one step (run_files.publish), so that model.keras and its
# config.json (calibration, operating point) and reports never come from two runs. history.csv is
# not among them: it grows in `out` during the run, for resuming and for watching the epochs.
RESULT_FILES = (abstention.PREDICTIONS_FILE, abstention.PLOT_FILE, "model.keras", "metrics.json",
                CONFIG_FILE, "learning_curves.png", "confusion_matrix.png", "gradcam.png")


def write_results(config: Any, model: Any, fit: Callable[..., Any], root: Path,
                  splits: data_mod.Splits, arrays: dict, skipped: list[tuple[str, str]],
                  modality: str, out: Path, staged: Path, started: float) -> dict:
    """Test, calibrate and report a fitted model into `staged` (RESULT_FILES); metrics.json.
    `config` is its TrainConfig; `fit` is `training.train.fit_model` (for the abstention folds,
    passed in so this module never imports train)."""
    from .report import confusion_matrix_plot, learning_curves

    x_test, y_test = arrays["test"]
    test_probs = model.predict(x_test, verbose=0)
    report = classification_report(test_probs, y_test, LABELS)
    calibration = {"temperature": 1.0}
    if len(arrays["val"][1]):
        val_probs = model.predict(arrays["val"][0], verbose=0)
        temperature = fit_temperature(val_probs, arrays["val"][1])
        calibration = {
            "temperature": temperature,
            "fitted_on": "validation split",
            "test_ece_before": expected_calibration_error(test_probs, y_test),
            "test_ece_after": expected_calibration_error(
                scale_temperature(test_probs, temperature), y_test),
        }
    # config.out only says where for_training writes its predictions and plot: the staged folder.
    calibration.update(abstention.for_training(fit, replace(config, out=str(staged)),
                                               splits.train + splits.val, model,
                                               calibration["temperature"], arrays["val"],
                                               arrays["test"]))
    history = read_history(out / "history.csv")
    monitor = history.get("val_loss") or history["loss"]
    best_epoch = len(monitor) if config.schedule == "cosine" else int(np.argmin(monitor)) + 1

    save_model_atomically(model, staged / "model.keras")
    metrics = {
        "test_accuracy": report["accuracy"], "test_loss": report["loss"], "test": report,
        "best_epoch": best_epoch, "epochs_run": len(monitor),
        "params": int(model.count_params()), "architecture": config.arch,
        "labels": list(LABELS), "class_counts": splits.counts(),
        "data": str(root), "data_fingerprint": splits.fingerprint(),
        "test_source": splits.test_source, "skipped": skipped, "calibration": calibration,
        "seed": config.seed, "seconds": round(time.time() - started, 1), "modality": modality,
    }
    data_mod.write_json(staged / "metrics.json", metrics)
    data_mod.write_json(staged / CONFIG_FILE, {**asdict(config), "data": str(root),
                                               "modality": modality, "calibration": calibration})
    trained = (f"{MIXTURE_RECIPE} (curves: member 1, {mixture_members(config)[0]['arch']})"
               if config.recipe == MIXTURE_RECIPE else config.arch)
    learning_curves(history, best_epoch, staged / "learning_curves.png",
                    f"{trained} on {root.name}")
    confusion_matrix_plot(report["confusion_matrix"], LABELS, staged / "confusion_matrix.png",
                          f"test split ({report['n']} images), accuracy {report['accuracy']:.1%}")
    from .gradcam import gradcam_grid  # Grad-CAM of correct and wrong test predictions per class

    gradcam_grid(model, x_test, y_test, staged / "gradcam.png")
    return metrics
