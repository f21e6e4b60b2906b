"""Bias correction of full-int8 artifacts: the mean int8 error of each head removed from its bias.

Rounding every activation to int8 does not only add noise: part of the error is the same on
every image (a few channels round the same way throughout), and a linear head turns that into a
constant shift of the logits. Measured on the EfficientNet-Lite0 probe of `make train RECIPE=
mixture` (docs/accuracy.md): logit error rms 0.31, of which a constant offset of (+0.15, -0.28,
+0.13) on the calibration images and (+0.10, -0.29, +0.19) on held-out ones. So, as in
post-training bias correction (Nagel et al. 2019, "Data-free quantization", section 4.2, here
measured on the calibration images rather than derived from BatchNorm statistics): each 'logits'
Dense layer, of the model or of each ensemble member, is converted alone to full int8 with the
calibration images, its mean error over them is subtracted from its bias, and the artifact is
converted from those weights. The Keras model the parity gate compares against is unchanged.

Only for models of the recipes where it was measured to help (`RECIPES`, recorded in config.json):
held out, it raised the probe's int8 agreement from 97.8% to 98.7% (five seeds) and the mixture's
from 97.6% to 98.8% (seed 0), but lowered gradient-trained edge-gap's from 248 to 246 of 248.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from training.ensemble import LOGITS_LAYER, ensemble_members

RECIPES = ("probe", "mixture")  # training recipes whose int8 artifacts are bias-corrected


def wanted(recipe: str | None) -> bool:
    """Whether a model trained with `recipe` gets its full-int8 heads bias-corrected."""
    return recipe in RECIPES


def heads(model: Any) -> list[Any]:
    """(sub)models that own a biased 'logits' Dense layer: the model, or each ensemble member."""
    found = []
    for owner in ensemble_members(model) or [model]:
        try:
            layer = owner.get_layer(LOGITS_LAYER)
        except ValueError:
            continue
        if len(layer.get_weights()) == 2:  # kernel and bias
            found.append(owner)
    return found


def head_model(owner: Any) -> Any:
    """The owner's input to its 'logits' output, as a model of its own."""
    import keras

    return keras.Model(owner.inputs, owner.get_layer(LOGITS_LAYER).output,
                       name=f"{owner.name}-logits")


def at_input_size(images: np.ndarray, owner: Any) -> np.ndarray:
    """`images` at the owner's input size, resized as the ensemble's Resizing layer does."""
    import tensorflow as tf

    size = tuple(int(d) for d in owner.inputs[0].shape[1:3])
    return images if images.shape[1:3] == size else \
        tf.image.resize(images, size, "bilinear").numpy()


def int8_outputs(data: bytes, images: np.ndarray) -> np.ndarray:
    """Dequantized output of a one-output full-int8 TFLite model, through the runtime's backend."""
    from ct_edge.backends import TFLiteBackend

    backend = TFLiteBackend(data, threads=None)
    return np.concatenate([backend.predict(images[i : i + 1]) for i in range(len(images))])


def offsets(model: Any, images: np.ndarray,
            convert: Callable[[Any, np.ndarray], bytes]) -> list[tuple[Any, np.ndarray]]:
    """[('logits' layer, mean int8 - float error of its output on `images`)] for each head.
    `convert(keras_model, calibration_images)` writes a full-int8 TFLite model."""
    found = []
    for owner in heads(model):
        logits, x = head_model(owner), at_input_size(images, owner)
        error = int8_outputs(convert(logits, x), x) - logits.predict(x, verbose=0)
        found.append((owner.get_layer(LOGITS_LAYER), error.mean(axis=0)))
    return found


@contextmanager
def corrected(found: list[tuple[Any, np.ndarray]]) -> Iterator[None]:
    """The heads' biases minus their int8 offsets while the block runs, then restored exactly
    (the layers are shared with the Keras model the parity gate compares against)."""
    saved = [layer.get_weights() for layer, _ in found]
    try:
        for (layer, offset), (kernel, bias) in zip(found, saved, strict=True):
            layer.set_weights([kernel, (bias - offset).astype(bias.dtype)])
        yield
    finally:
        for (layer, _), weights in zip(found, saved, strict=True):
            layer.set_weights(weights)
