"""Model bundles for tests, their manifest.json written by the converter's own code.

The manifest comes from convert.manifest (artifact_entry, build_manifest), as `make convert` writes
it, so a change to the manifest schema reaches these bundles too; only the model bytes, the parity
figures and a few knobs are the test's own. Shared by several test files, as is `make_test_bundle`,
the small real bundle the CLI tests run (conftest's `bundle` fixture).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path

from convert.formats import FORMATS
from convert.manifest import UNCERTAIN_BELOW, artifact_entry, build_manifest, now, versions
from ct_edge import LABELS
from ct_edge.bundle import MANIFEST
from ct_edge.preprocess import PreprocessSpec

ROWS = {row.name: row for row in FORMATS}  # artifact name -> its row (file, format, engine, ...)


@functools.cache
def _versions() -> tuple[tuple[str, str | None], ...]:
    return tuple(versions().items())  # the same for every bundle of a session; ~10 ms to look up


def provenance_for(model_sha256: str, **extra: object) -> dict:
    """The provenance keys `make convert` always writes (the source model, package versions, when),
    plus `extra` (e.g. model_file, data_fingerprint)."""
    return {"model_sha256": model_sha256, **extra, "versions": dict(_versions()), "created": now()}


def manifest_for(models: dict[str, bytes], default: str | None, provenance: dict, *,
                 temperature: float = 1.0, uncertain_below: float = UNCERTAIN_BELOW,
                 parity: dict | None = None) -> dict:
    """The manifest `make convert` writes for these artifacts, {name in convert.formats.FORMATS:
    model bytes}, each with status 'passed' and the same `parity` figures.

    build_manifest always writes UNCERTAIN_BELOW; a test may ask for another threshold.
    """
    entries = [artifact_entry(ROWS[name], hashlib.sha256(data).hexdigest(), len(data), "passed", [],
                              dict(parity or {}))
               for name, data in models.items()]
    manifest = build_manifest(LABELS, PreprocessSpec(), temperature, entries, default, provenance)
    manifest["calibration"]["uncertain_below"] = uncertain_below
    return manifest


def write_bundle(root: Path, models: dict[str, bytes], manifest: dict | str) -> Path:
    """The model files (each under its FORMATS file name) and manifest.json (a dict, or raw text
    for tests of malformed manifests) in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in models.items():
        (root / ROWS[name].file).write_bytes(data)
    text = manifest if isinstance(manifest, str) else json.dumps(manifest, indent=2)
    (root / MANIFEST).write_text(text)
    return root


def make_test_bundle(root: Path, uncertain_below: float = 0.5) -> Path:
    """A real, tiny bundle in `root`: an untrained Keras CNN (fixed seed) converted to fp32 TFLite,
    plus a hand-built ONNX model when `onnx` is installed, and the manifest `make convert` writes.

    Stands in for conftest's `tiny_bundle` (a trained one, ~1 minute to build); set
    CT_EDGE_TEST_SHARED_BUNDLE=1 to run these tests on that one instead.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    spec = PreprocessSpec()
    keras.utils.set_random_seed(7)
    # Large dense weights, so random features still give confident, image-dependent answers.
    model = keras.Sequential([
        keras.Input((spec.size, spec.size, spec.channels)),
        keras.layers.Conv2D(8, 5, strides=4, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(LABELS), activation="softmax",
                           kernel_initializer=keras.initializers.RandomNormal(stddev=20.0, seed=7)),
    ])
    models = {"tflite-fp32": tf.lite.TFLiteConverter.from_keras_model(model).convert()}
    with contextlib.suppress(ImportError):  # no ONNX artifact without `onnx`
        models["onnx-fp32"] = _onnx_model(np.random.default_rng(7))
    manifest = manifest_for(
        models, "tflite-fp32",
        provenance_for(hashlib.sha256(models["tflite-fp32"]).hexdigest(),
                       data_fingerprint="none (untrained test model)"),
        uncertain_below=uncertain_below,
        parity={"test_images": 12, "accuracy": 1.0, "agreement": 1.0, "max_abs_diff": 0.0})
    return write_bundle(root, models, manifest)


def _onnx_model(rng) -> bytes:
    """mean and mean square of the image -> linear -> softmax, as a hand-built ONNX graph."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = rng.normal(0.0, 8.0, (2, len(LABELS))).astype(np.float32)
    bias = rng.normal(0.0, 1.0, (len(LABELS),)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["mean4"], keepdims=1),
        helper.make_node("Flatten", ["mean4"], ["mean"], axis=1),
        helper.make_node("Mul", ["image", "image"], ["square"]),
        helper.make_node("ReduceMean", ["square", "axes"], ["square4"], keepdims=1),
        helper.make_node("Flatten", ["square4"], ["mean_square"], axis=1),
        helper.make_node("Concat", ["mean", "mean_square"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "w", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "ct_edge_test",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 128, 128, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", len(LABELS)])],
        [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
         numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                             ir_version=8).SerializeToString()


def set_default_status(root: Path, status: str = "failed") -> str:
    """Rewrite bundle `root`'s manifest so its default artifact has parity status `status` (as
    convert writes one that missed parity); the artifact's name."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = next(a for a in manifest["artifacts"] if a["name"] == manifest["default"])
    entry["status"] = status
    path.write_text(json.dumps(manifest))  # ASCII: a \ud800 escape stays an escape
    return entry["name"]
