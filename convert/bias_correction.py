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

LOGITS_LAYER = "logits"
RECIPES = ("probe", "mixture")  # training recipes whose int8 artifacts are bias-corrected


def wanted(recipe: str | None) -> bool:
    """Whether a model trained with `recipe` gets its full-int8 heads bias-corrected."""
    return recipe in RECIPES


def heads(model: Any) -> list[Any]:
    """(sub)models that own a 'logits' Dense layer: the model itself, or each ensemble member."""
    from training.ensemble import ensemble_members

    owners = ensemble_members(model) or [model]
    found = []
    for owner in owners:
        try:
            owner.get_layer(LOGITS_LAYER)
        except ValueError:
            continue
        found.append(owner)
    return found


def int8_outputs(data: bytes, images: np.ndarray) -> np.ndarray:
    """Dequantized output of a one-output full-int8 TFLite model, one image at a time."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    (in_scale, in_zero), (out_scale, out_zero) = source["quantization"], target["quantization"]
    out = []
    for image in images:
        q = np.clip(np.round(image[None] / in_scale + in_zero), -128, 127)
        interpreter.set_tensor(source["index"], q.astype(source["dtype"]))
        interpreter.invoke()
        out.append((interpreter.get_tensor(target["index"]).astype(np.float32) - out_zero)
                   * out_scale)
    return np.concatenate(out)


def offsets(model: Any, images: np.ndarray,
            convert: Callable[[Any, np.ndarray], bytes]) -> list[tuple[Any, np.ndarray]]:
    """[('logits' layer, mean int8 - float error of its output on `images`)] for each head.
    `convert(keras_model, calibration_images)` writes a full-int8 TFLite model."""
    import keras
    import tensorflow as tf

    found = []
    for owner in heads(model):
        layer = owner.get_layer(LOGITS_LAYER)
        if len(layer.get_weights()) != 2:  # no bias to correct
            continue
        logits = keras.Model(owner.inputs, layer.output, name=f"{owner.name}-logits")
        size = tuple(int(d) for d in owner.inputs[0].shape[1:3])
        x = images if images.shape[1:3] == size else \
            tf.image.resize(images, size, "bilinear").numpy()  # as the ensemble's Resizing
        reference = logits.predict(x, verbose=0)
        quantized = int8_outputs(convert(logits, x), x)
        found.append((layer, (quantized - reference).mean(axis=0)))
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
