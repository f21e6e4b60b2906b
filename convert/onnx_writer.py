"""ONNX writers (float32 via tf2onnx, static QDQ int8 via onnxruntime) and their metadata_props."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from .quiet import quiet

if TYPE_CHECKING:
    from .formats import WriteContext

OPSET = 17
METADATA_KEY = "ct_edge_manifest"
OUTPUT_NAME = "probabilities"
MAPS_NAME = "class_maps"  # the optional rank-4 output of a CAM-ready head (training.gradcam)
FEATURES_NAME = "features"  # the optional pooled features (n, d) for the domain gate


def keras_function(model: Any) -> Any:
    """The model as a tf.function with an explicit input signature (dynamic batch).

    tf2onnx's from_keras breaks on Keras 3 models; from_function on this wrapper does not.
    """
    import tensorflow as tf

    shape = [None, *(int(d) for d in model.inputs[0].shape[1:])]
    return tf.function(lambda image: model(image, training=False),
                       input_signature=[tf.TensorSpec(shape, tf.float32, name="image")])


def _fp32_proto(ctx: WriteContext) -> Any:
    import tf2onnx

    with quiet():
        function = keras_function(ctx.model)
        proto, _ = tf2onnx.convert.from_function(function, input_signature=function.input_signature,
                                                 opset=OPSET)
    if len(proto.graph.output) >= 2:
        _rename_by_rank(proto)
    else:
        _rename_output(proto, OUTPUT_NAME)
    return proto


def _rename_output(proto: Any, new: str) -> None:
    """tf2onnx names the output 'Identity:0'; a self-describing file says 'probabilities'."""
    graph = proto.graph
    if len(graph.output) != 1:
        return
    old = graph.output[0].name
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
    graph.output[0].name = new


def _rename_by_rank(proto: Any) -> None:
    """Several outputs, in the Keras model's order: the first rank-2 one is 'probabilities', a
    second rank-2 one 'features', the rank-4 one 'class_maps'."""
    renames = {}
    flat = iter((OUTPUT_NAME, FEATURES_NAME))
    for output in proto.graph.output:
        rank = len(output.type.tensor_type.shape.dim)
        renames[output.name] = next(flat) if rank == 2 else MAPS_NAME
    for node in proto.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name in renames:
                    names[i] = renames[name]
    for output in proto.graph.output:
        output.name = renames[output.name]


def write_fp32(ctx: WriteContext) -> bytes:
    return ctx.once("onnx-fp32", lambda: _fp32_proto(ctx)).SerializeToString()


class _Reader:
    """A CalibrationDataReader (by duck typing: ABC subclass hook) over the images, one at a time."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self._input = input_name
        self._images = images
        self._next = 0

    def get_next(self) -> dict | None:
        if self._next >= len(self._images):
            return None
        batch = self._images[self._next : self._next + 1]
        self._next += 1
        return {self._input: batch}

    def rewind(self) -> None:
        self._next = 0


def write_int8(ctx: WriteContext) -> bytes:
    """Static QDQ, per-channel int8 weights and int8 activations, calibrated with MinMax.

    Weights use 7 bits (reduce_range): onnxruntime's x86 kernels without VNNI (AVX2, AVX-512F)
    sum pairs of 8-bit products in int16 and saturate, which flipped answers on an AVX2-only CPU.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = ctx.calibration_images()
    fp32 = ctx.once("onnx-fp32", lambda: _fp32_proto(ctx))
    serialized = fp32.SerializeToString()
    session = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    workdir = ctx.workdir.resolve()  # absolute: the current folder changes below
    prepared = workdir / "onnx-int8-prepared.onnx"
    quantized = workdir / "onnx-int8.onnx"
    # Shape inference writes temporary files (and external data of large models) into the current
    # folder: keep them in the work folder, never beside the user's files.
    with quiet(), contextlib.chdir(workdir):
        # A copy each time: quant_pre_process moves the proto's tensors to external data.
        try:
            quant_pre_process(onnx.load_from_string(serialized), prepared)
        except Exception:
            # Its symbolic shape inference gives up on a graph that resizes inside (a mixture:
            # "Incomplete symbolic shape inference") unless allowed to merge the unknown sizes.
            quant_pre_process(onnx.load_from_string(serialized), prepared, auto_merge=True)
        quantize_static(prepared, quantized, _Reader(input_name, images),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return quantized.read_bytes()


def embed_metadata(model: bytes, metadata: dict) -> bytes:
    """metadata_props: the whole record as JSON, plus labels and input on their own keys."""
    import onnx

    proto = onnx.load_from_string(model)
    entries = {METADATA_KEY: json.dumps(metadata, sort_keys=True),
               "labels": json.dumps(metadata["labels"]),
               "input": json.dumps(metadata["input"], sort_keys=True)}
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"ct-edge {metadata.get('name', '')}: {', '.join(metadata['labels'])}"
    return proto.SerializeToString()


def read_metadata(model: bytes) -> dict | None:
    """The embedded `ct_edge_manifest` JSON, or None."""
    import onnx

    for prop in onnx.load_from_string(model).metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return None
