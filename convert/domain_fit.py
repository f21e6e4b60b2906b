"""The bundle's domain: the exported model (probabilities, class maps, pooled features) and the
feature gate fitted on the training images, its threshold on the validation images.

The runtime side (scores, the .npz it reads, DICOM rules) is ct_edge.domain; this module only
fits. The test split is never used to fit anything: its figures are reported, not tuned on.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ct_edge.domain import DEFAULT_RULE, DOMAIN_FILE, MODALITIES, FeatureGate, fit_arrays, fit_threshold
from training import data as data_mod
from training.ensemble import ensemble_export_model, ensemble_members, first_member_head
from training.gradcam import cam_model

from .dataset import TrainingRecord
from .quiet import quiet

# Chosen by measurement on the built-in data and the real X-rays (docs/domain.md).
DEFAULT_METHOD = "mahalanobis"
FEATURES_LAYER = "logits"  # the features are what this Dense layer reads
BATCH = 32


def export_model(model: Any) -> tuple[Any, Any | None]:
    """(the model every artifact is written from, its CAM-ready form or None).

    Outputs in this order: probabilities, class maps (GAP + Dense heads only, see
    training.gradcam.cam_model), pooled features (n, d): the input of the 'logits' layer.
    ct_edge.backends finds them by that order and rank.
    """
    import keras

    maps_model = cam_model(model)
    try:
        features = model.get_layer(FEATURES_LAYER).input
    except ValueError:
        ensemble = ensemble_export_model(model)  # an ensemble gates on its first member's
        return (ensemble, maps_model) if ensemble is not None else (maps_model or model, maps_model)
    outputs = list(maps_model.outputs if maps_model is not None else model.outputs[:1])
    return keras.Model(model.inputs, [*outputs, features], name=f"{model.name}-export"), maps_model


def head_weights(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the Dense layer the gate's features feed: the model's, or an ensemble's first
    member's."""
    try:
        layer = model.get_layer(FEATURES_LAYER)
    except ValueError:
        layer = first_member_head(model)
    kernel, bias = layer.get_weights()
    return np.asarray(kernel, np.float32), np.asarray(bias, np.float32)


def keras_outputs(model: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, features) of the export model, float64 / float32."""
    with quiet():
        outputs = model.predict(x, batch_size=BATCH, verbose=0)
    return np.asarray(outputs[0], np.float64), np.asarray(outputs[-1], np.float32)


@dataclass
class Fitted:
    """A fitted gate, its manifest section and the .npz bytes the section's sha256 covers."""

    gate: FeatureGate
    section: dict
    data: bytes


def split_arrays(record: TrainingRecord, samples: list, desc: str) -> tuple[np.ndarray, np.ndarray]:
    x, y, skipped = data_mod.load_arrays(samples, record.spec, record.cache,
                                         progress=sys.stderr.isatty(), desc=desc)
    data_mod.warn_skipped(skipped)
    return x, y


def features_source(model: Any) -> str:
    """Where the gate's features come from, in words: the model's or its first member's head."""
    members = ensemble_members(model)
    owner = f" of member '{members[0].name}'" if members else ""
    return f"input of '{FEATURES_LAYER}'{owner}"


def fit_domain(model: Any, export: Any, record: TrainingRecord, splits: data_mod.Splits,
               modality: str | None, calibration: np.ndarray | None = None,
               method: str = DEFAULT_METHOD, rule: str = DEFAULT_RULE) -> Fitted | None:
    """Fit `method` on the training split's features, its threshold on the validation split's.
    With the int8 `calibration` images, features are clipped where int8 artifacts saturate
    (ct_edge.domain.clip). None (no feature gate) when the model exports no features or there is
    no validation split."""
    if len(export.outputs) < 2 or len(export.outputs[-1].shape) != 2:
        return None
    x_train, y_train = split_arrays(record, splits.train, "decode train (domain)")
    x_val, _ = split_arrays(record, splits.val, "decode validation (domain)")
    if not len(x_val) or not len(x_train):
        return None
    weights, bias = head_weights(model)
    _, train_features = keras_outputs(export, x_train)
    _, val_features = keras_outputs(export, x_val)
    ceiling = None
    if calibration is not None and len(calibration):
        ceiling = float(keras_outputs(export, calibration)[1].max())
        train_features = np.minimum(train_features, ceiling)
        val_features = np.minimum(val_features, ceiling)
    arrays = fit_arrays(method, train_features, y_train, weights, bias, val_features)
    if ceiling is not None:
        arrays["ceiling"] = np.float32(ceiling)
    scores = FeatureGate(method, 0.0, arrays).scores(val_features)
    gate = FeatureGate(method, fit_threshold(scores, rule), arrays)
    data = gate.to_npz()
    section = {
        "modality": modality,
        "modality_name": MODALITIES[modality]["name"] if modality in MODALITIES else None,
        "method": method, "threshold": gate.threshold, "rule": rule,
        "file": DOMAIN_FILE, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
        "features": {"output": "features", "dim": gate.feature_dim,
                     "layer": features_source(model), "ceiling": ceiling},
        "fitted_on": {"statistics": f"training split ({len(x_train)} images)",
                      "threshold": f"validation split ({len(x_val)} images), {rule} of their "
                                   "scores"},
        "validation_flagged": float(np.mean(scores > gate.threshold)),
    }
    return Fitted(gate, section, data)
