"""TFLite writers (float32, float16, dynamic-range int8, full int8) and the metadata they carry."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .bias_correction import corrected, offsets
from .quiet import quiet

if TYPE_CHECKING:
    from .formats import WriteContext

METADATA_NAME = "ct_edge_manifest"


def _convert(ctx: WriteContext, configure: Callable[[Any, Any], None]) -> bytes:
    return _convert_model(ctx.model, configure)


def _convert_model(model: Any, configure: Callable[[Any, Any], None]) -> bytes:
    import tensorflow as tf

    with quiet(), warnings.catch_warnings():
        # TF1-only advice, printed whenever inference_input_type is an integer type.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        # from_keras_model, not from_concrete_functions: with Keras 3 the latter keeps the
        # weights as unfrozen READ_VARIABLE ops and the model outputs NaN.
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        configure(converter, tf)
        return bytes(converter.convert())


def write_fp32(ctx: WriteContext) -> bytes:
    return _convert(ctx, lambda converter, tf: None)


def write_fp16(ctx: WriteContext) -> bytes:
    def configure(converter: Any, tf: Any) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]

    return _convert(ctx, configure)


def write_dynamic(ctx: WriteContext) -> bytes:
    """int8 weights, float activations: no calibration needed."""

    def configure(converter: Any, tf: Any) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

    return _convert(ctx, configure)


def full_int8(model: Any, images: np.ndarray) -> bytes:
    """int8 weights and activations, int8 input and output tensors, calibrated on `images`."""

    def representative() -> Any:
        for i in range(len(images)):
            yield [images[i : i + 1]]

    def configure(converter: Any, tf: Any) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8

    return _convert_model(model, configure)


def write_int8(ctx: WriteContext) -> bytes:
    """Full integer; with `ctx.bias_correction`, each head's bias corrected for its mean int8
    error on the calibration images (convert.bias_correction)."""
    images = ctx.calibration_images()
    found = offsets(ctx.model, images, full_int8) if ctx.bias_correction else []
    with corrected(found):
        return full_int8(ctx.model, images)


def embed_metadata(model: bytes, metadata: dict) -> bytes:
    """Add (or replace) a flatbuffer metadata entry `ct_edge_manifest` holding JSON."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    tree.metadata = [m for m in (tree.metadata or []) if _name(m.name) != METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata, sort_keys=True).encode(), dtype=np.uint8)
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(tree.buffers) - 1
    tree.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def read_metadata(model: bytes) -> dict | None:
    """The embedded `ct_edge_manifest` JSON, or None."""
    from tensorflow.lite.python import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if _name(entry.Name()) == METADATA_NAME:
            return json.loads(root.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return None


def _name(name: bytes | str | None) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)
