"""Classification metrics and temperature scaling on probabilities (numpy only)."""

from __future__ import annotations

import itertools

import numpy as np

from ct_edge.classifier import apply_temperature as scale_temperature

EPS = 1e-7


def cross_entropy(probabilities: np.ndarray, y: np.ndarray) -> float:
    """Mean categorical cross-entropy of integer labels y."""
    picked = probabilities[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.clip(picked, EPS, 1.0))))


def confusion_matrix(y: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y, predicted), 1)
    return matrix


def classification_report(probabilities: np.ndarray, y: np.ndarray,
                          labels: tuple[str, ...]) -> dict:
    """Accuracy, loss, per-class precision/recall/F1/support and the confusion matrix."""
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y, predicted, len(labels))
    per_class = {}
    for i, label in enumerate(labels):
        tp = matrix[i, i]
        precision = tp / matrix[:, i].sum() if matrix[:, i].sum() else 0.0
        recall = tp / matrix[i].sum() if matrix[i].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": float(precision), "recall": float(recall),
                            "f1": float(f1), "support": int(matrix[i].sum())}
    return {"accuracy": float((predicted == y).mean()) if len(y) else 0.0,
            "loss": cross_entropy(probabilities, y), "n": len(y), "per_class": per_class,
            "confusion_matrix": matrix.tolist()}


MIN_TEMPERATURE = 1.0


def fit_temperature(probabilities: np.ndarray, y: np.ndarray) -> float:
    """The temperature >= 1 minimising validation NLL (log-spaced grid, then a finer one).

    Only softening is allowed: on a small validation split that the model gets entirely right,
    the NLL optimum runs to T -> 0 and would make every prediction, mistakes included, ~100% sure.
    """
    nll = lambda t: cross_entropy(scale_temperature(probabilities, t), y)  # noqa: E731
    grid = np.exp(np.linspace(np.log(MIN_TEMPERATURE), np.log(20.0), 81))
    best = min(grid, key=nll)
    fine = np.clip(best * np.exp(np.linspace(-0.05, 0.05, 41)), MIN_TEMPERATURE, None)
    return float(min(fine, key=nll))


def expected_calibration_error(probabilities: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE of top-1 confidence over equal-width bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)
