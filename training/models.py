"""One registry of architectures. Every model ends in a softmax layer named 'probabilities'."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
from keras import layers

InputShape = tuple[int, int, int]
Builder = Callable[[InputShape, int], keras.Model]
ARCHITECTURES: dict[str, Builder] = {}
DEFAULT_ARCHITECTURE = "edge-gap"
# Architectures with ImageNet weights: the ones the `probe` recipe (frozen backbone) can use.
PRETRAINED = ("efficientnet-lite0",)


@keras.saving.register_keras_serializable(package="ct_edge")
class HorizontalFlip(layers.Layer):
    """The image mirrored left-right (axis 2 of NHWC): the flip graphs saved before
    `WithMirror` (two passes per member) use it. Registered, so they load through
    `load_keras_model`."""

    def call(self, x):
        return keras.ops.flip(x, axis=2)


@keras.saving.register_keras_serializable(package="ct_edge")
class WithMirror(layers.Layer):
    """A batch of n images becomes 2n: the images, then their mirrors. Every member of a flip
    graph runs once on both, so each weight is stored and quantized once for the two views."""

    def call(self, x):
        return keras.ops.concatenate([x, keras.ops.flip(x, axis=2)], axis=0)

    def compute_output_shape(self, input_shape):
        batch = None if input_shape[0] is None else 2 * input_shape[0]
        return (batch, *input_shape[1:])


@keras.saving.register_keras_serializable(package="ct_edge")
class MirrorMean(layers.Layer):
    """The inverse of `WithMirror` for a member's output: the mean of each image's two answers
    (with unflip, the mirror's spatial map mirrored back first); first_only: the image's own."""

    def __init__(self, unflip: bool = False, first_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.unflip, self.first_only = unflip, first_only

    def call(self, x):
        first, mirrored = keras.ops.split(x, 2, axis=0)
        if self.first_only:
            return first
        if self.unflip:
            mirrored = keras.ops.flip(mirrored, axis=2)
        return (first + mirrored) * 0.5

    def compute_output_shape(self, input_shape):
        batch = None if input_shape[0] is None else input_shape[0] // 2
        return (batch, *input_shape[1:])

    def get_config(self):
        return {**super().get_config(), "unflip": self.unflip, "first_only": self.first_only}


def load_keras_model(path: str | Path) -> keras.Model:
    """A saved model.keras, with this project's own layers known to Keras; DataError when the
    file is no .keras archive at all (Keras itself would say "File not found")."""
    from .data import check_keras_archive

    check_keras_archive(Path(path))
    return keras.models.load_model(path, compile=False)


def register(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        ARCHITECTURES[name] = builder
        return builder

    return add


def _head(x: keras.KerasTensor, num_classes: int) -> keras.KerasTensor:
    x = layers.Dense(num_classes, name="logits")(x)
    return layers.Activation("softmax", name="probabilities", dtype="float32")(x)


@register("reference")
def reference(input_shape: InputShape, num_classes: int) -> keras.Model:
    """The original project's CNN: Conv 32/64/128 + max-pooling, Flatten, Dense 128, Dropout 0.5."""
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    return keras.Model(inputs, _head(x, num_classes), name="reference")


def _conv_bn(x: keras.KerasTensor, filters: int, separable: bool = False,
             l2: float = 0.0) -> keras.KerasTensor:
    conv = layers.SeparableConv2D if separable else layers.Conv2D
    kwargs = {}
    if l2:
        key = "pointwise_regularizer" if separable else "kernel_regularizer"
        kwargs[key] = keras.regularizers.L2(l2)
    x = conv(filters, 3, padding="same", use_bias=False, **kwargs)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.ReLU()(x)


def _squeeze_excite(x: keras.KerasTensor, ratio: int = 4) -> keras.KerasTensor:
    """Channel attention: GAP -> Dense(c/ratio, relu) -> Dense(c, sigmoid) -> rescale."""
    channels = x.shape[-1]
    s = layers.GlobalAveragePooling2D(keepdims=True)(x)
    s = layers.Conv2D(max(4, channels // ratio), 1, activation="relu")(s)
    s = layers.Conv2D(channels, 1, activation="sigmoid")(s)
    return layers.Multiply()([x, s])


def _gap_net(input_shape: InputShape, num_classes: int, name: str,
             filters: tuple[int, ...] = (16, 32, 48, 64), top: int = 96, dropout: float = 0.3,
             spatial_dropout: float = 0.0, l2: float = 0.0, se: bool = False) -> keras.Model:
    """Conv-BN-ReLU(+SE) blocks with max-pooling, a `top`-filter conv, GAP, dropout, one Dense."""
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, width in enumerate(filters):
        x = _conv_bn(x, width, l2=l2)
        if se and i > 0:
            x = _squeeze_excite(x)
        x = layers.MaxPooling2D()(x)
        if spatial_dropout and i > 0:
            x = layers.SpatialDropout2D(spatial_dropout)(x)
    x = _conv_bn(x, top, l2=l2)
    if se:
        x = _squeeze_excite(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    return keras.Model(inputs, _head(x, num_classes), name=name)


# Edge-sized variants of edge-gap: one change each (width, depth, regularisation, attention).
_GAP_VARIANTS: dict[str, dict] = {
    "edge-gap-wide": {"filters": (32, 32, 48, 64)},          # wider early filters
    "edge-gap-deep": {"filters": (16, 24, 32, 48, 64)},      # one more block: 4x4 before the top
    "edge-gap-se": {"se": True},                            # Squeeze-Excitation after blocks 2..5
    "edge-gap-l2": {"l2": 1e-4},                            # mild L2 on conv kernels
    "edge-gap-sdrop": {"spatial_dropout": 0.1},             # SpatialDropout2D after blocks 2..4
    "edge-gap-drop5": {"dropout": 0.5},                     # head dropout 0.5 instead of 0.3
    "edge-gap-deep-se": {"filters": (16, 24, 32, 48, 64), "se": True},
}


def _register_variant(name: str, settings: dict) -> None:
    @register(name)
    def build(input_shape: InputShape, num_classes: int) -> keras.Model:
        return _gap_net(input_shape, num_classes, name, **settings)

    build.__doc__ = f"edge-gap with {settings}."


@register("edge-gap")
def edge_gap(input_shape: InputShape, num_classes: int) -> keras.Model:
    """Conv-BN-ReLU blocks 16/32/48/64 with max-pooling, a 96-filter conv, GAP, one Dense."""
    return _edge_gap(input_shape, num_classes, "edge-gap")


@register("edge-gap-resize128")
def edge_gap_resize128(input_shape: InputShape, num_classes: int) -> keras.Model:
    """edge-gap behind an in-graph bilinear resize to 128 px: it takes a larger input (the
    224-px input a mixture with the pretrained probe shares) at edge-gap's cost, and is trained
    on exactly what that one graph will feed it."""
    return _edge_gap(input_shape, num_classes, "edge-gap-resize128", resize_to=128)


def _edge_gap(input_shape: InputShape, num_classes: int, name: str,
              resize_to: int | None = None) -> keras.Model:
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    if resize_to is not None and tuple(input_shape[:2]) != (resize_to, resize_to):
        x = layers.Resizing(resize_to, resize_to, interpolation="bilinear", name="resize_in")(x)
    for filters in (16, 32, 48, 64):
        x = _conv_bn(x, filters)
        x = layers.MaxPooling2D()(x)
    x = _conv_bn(x, 96)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, _head(x, num_classes), name=name)


@register("edge-sep")
def edge_sep(input_shape: InputShape, num_classes: int) -> keras.Model:
    """A plain first conv, then depthwise-separable Conv-BN-ReLU blocks up to 128, GAP head."""
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, 24)
    x = layers.MaxPooling2D()(x)
    for filters in (48, 64, 96):
        x = _conv_bn(x, filters, separable=True)
        x = layers.MaxPooling2D()(x)
    x = _conv_bn(x, 128, separable=True)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, _head(x, num_classes), name="edge-sep")


@register("efficientnet-lite0")
def efficientnet_lite0(input_shape: InputShape, num_classes: int) -> keras.Model:
    """EfficientNet-Lite0 (3,416,867 parameters with a 3-class head), ImageNet-initialised, GAP head."""
    from .efficientnet_lite import efficientnet_lite0 as build

    return build(input_shape, num_classes)


for _name, _settings in _GAP_VARIANTS.items():
    _register_variant(_name, _settings)


def build_model(name: str = DEFAULT_ARCHITECTURE, input_shape: InputShape = (128, 128, 3),
                num_classes: int = 3) -> keras.Model:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](input_shape, num_classes)


def layer_table(model: keras.Model) -> list[dict]:
    """Layer name, type, output shape and parameter count, for the README and metrics.json."""
    return [{"name": layer.name, "type": type(layer).__name__,
             "output_shape": str(tuple(layer.output.shape)) if hasattr(layer, "output") else "",
             "params": int(layer.count_params())} for layer in model.layers]
