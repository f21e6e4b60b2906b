"""make convert, the happy path: a tiny trained model becomes a bundle of six artifacts, all proven
by the runtime, int8 the default; the manifest, the model files and the parity reports."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import SIZE, leftovers

from ct_edge import LABELS
from ct_edge.bundle import Bundle
from ct_edge.errors import BundleError

ALL = ("tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8", "onnx-fp32", "onnx-int8")


def _test_images(easy_model: Path, per_class: int) -> tuple[list[Path], np.ndarray]:
    data = Path(json.loads((easy_model.parent / "config.json").read_text())["data"])
    paths = [p for label in LABELS for p in sorted((data / "test" / label).glob("*.png"))[:per_class]]
    return paths, np.repeat(np.arange(len(LABELS)), per_class)


# --- the happy path: six artifacts, all proven, int8 the default ---------------------------------


def test_convert_writes_six_artifacts_all_passing_with_int8_default(converted) -> None:
    out, manifest = converted
    names = [a["name"] for a in manifest["artifacts"]]
    assert names == list(ALL)
    assert {a["status"] for a in manifest["artifacts"]} == {"passed"}
    assert all(a["failures"] == [] for a in manifest["artifacts"])
    assert manifest["default"] == "tflite-int8"
    expected = {"manifest.json", "parity.json", "parity.md", "model_fp32.tflite", "model_fp16.tflite",
                "model_dynamic.tflite", "model_int8.tflite", "model_fp32.onnx", "model_int8.onnx",
                "domain.npz"}
    assert {p.name for p in out.iterdir()} == expected
    assert leftovers(out) == [], "no staging or backup folder is left beside the bundle"
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_manifest_hashes_verify_and_match_the_runtime_schema(converted, easy_model: Path) -> None:
    out, manifest = converted
    bundle = Bundle.load(out)
    assert bundle.labels == LABELS and bundle.default == "tflite-int8"
    for entry in manifest["artifacts"]:
        data = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
        assert bundle.artifacts[entry["name"]].read_verified() == data
        assert entry["engine"] in ("litert", "onnxruntime")
        parity = entry["parity"]
        for key in ("accuracy", "loss", "per_class_recall", "agreement", "max_abs_diff",
                    "mean_abs_diff", "convert_seconds", "bytes"):
            assert key in parity, key
        assert set(parity["per_class_recall"]) == set(LABELS)
    config = json.loads((easy_model.parent / "config.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["input"]["shape"] == [1, SIZE, SIZE, 3]
    assert manifest["input"]["dtype"] == "float32" and manifest["input"]["layout"] == "NHWC"
    assert manifest["calibration"] == {key: config["calibration"][key] for key in
                                       ("temperature", "uncertain_below", "operating_point")}
    provenance = manifest["provenance"]
    assert provenance["model_sha256"] == hashlib.sha256(easy_model.read_bytes()).hexdigest()
    metrics = json.loads((easy_model.parent / "metrics.json").read_text())
    assert provenance["data_fingerprint"] == metrics["data_fingerprint"]
    assert set(provenance["versions"]) >= {"tensorflow", "tf2onnx", "onnx", "onnxruntime",
                                           "ai-edge-litert", "numpy", "pillow"}
    assert all(provenance["versions"].values())
    # Fewer than 300 training images: calibration used all of them, and only them.
    train_images = sum(metrics["class_counts"]["train"].values())
    assert provenance["calibration"]["images"] == train_images


def test_onnx_int8_weights_use_seven_bits_so_avx2_cpus_do_not_saturate(converted) -> None:
    # onnxruntime's x86 int8 kernels without VNNI (AVX2, AVX-512F) add pairs of u8 x s8 products
    # in int16, which saturates for 8-bit weights: on an AVX2-only AMD EPYC the 8-bit onnx-int8 of
    # this model changed 4 of 60 statuses (max |dp| 0.28). Weights within +-64 cannot saturate.
    import onnx
    from onnx import numpy_helper

    model = onnx.load(converted[0] / "model_int8.onnx")
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer
               if t.name.endswith("_quantized") and t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64


def test_a_tampered_file_in_the_bundle_is_refused(converted, tmp_path: Path) -> None:
    from ct_edge.classifier import Classifier

    copy = tmp_path / "bundle"
    shutil.copytree(converted[0], copy)
    target = copy / "model_int8.tflite"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Classifier.from_bundle(copy, artifact="tflite-int8")
    Classifier.from_bundle(copy, artifact="onnx-int8")  # the untouched files still load


def test_every_artifact_classifies_files_like_keras(converted, easy_model: Path) -> None:
    import keras

    from ct_edge.classifier import Classifier
    from ct_edge.preprocess import preprocess

    out, _ = converted
    paths, _ = _test_images(easy_model, per_class=4)
    bundle = Bundle.load(out)
    x = np.stack([preprocess(p, bundle.spec) for p in paths])
    keras_labels = np.asarray(keras.models.load_model(easy_model)(x)).argmax(axis=1)
    for name in ALL:
        # The labels themselves: an input the domain gate refuses has none (test_domain.py).
        classifier = Classifier.from_bundle(out, artifact=name, domain_check=False)
        predicted = [LABELS.index(classifier.predict(p).label) for p in paths]
        assert predicted == keras_labels.tolist(), name
    assert Classifier.from_bundle(out).artifact.name == "tflite-int8"


def test_int8_tflite_takes_and_returns_int8(converted) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=(converted[0] / "model_int8.tflite").read_bytes())
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8


def test_each_model_file_describes_itself(converted) -> None:
    from convert.formats import READERS

    out, manifest = converted
    for entry in manifest["artifacts"]:
        meta = READERS[entry["format"]]((out / entry["file"]).read_bytes())
        assert meta is not None, entry["name"]
        assert meta["name"] == entry["name"] and meta["labels"] == list(LABELS)
        assert meta["input"] == manifest["input"] and meta["preprocess"] == manifest["preprocess"]


def test_onnx_int8_is_qdq_per_channel_at_opset_17_or_newer(converted) -> None:
    import onnx

    out, _ = converted
    fp32 = onnx.load(str(out / "model_fp32.onnx"))
    int8 = onnx.load(str(out / "model_int8.onnx"))
    assert max(o.version for o in fp32.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = {node.op_type for node in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    per_channel = [init for init in int8.graph.initializer
                   if init.name.endswith("_scale") and len(init.dims) == 1 and init.dims[0] > 1]
    assert per_channel, "weights are quantized per channel"


def test_parity_reports_have_one_row_per_artifact_and_the_keras_row(converted) -> None:
    out, _ = converted
    text = (out / "parity.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 1 + len(ALL)  # header, rule, Keras, artifacts
    assert "keras (reference)" in rows[2]
    for name in ALL:
        assert any(line.startswith(f"| {name} ") and "passed" in line for line in rows), name
    assert "agreement with Keras" in rows[0] and "Default artifact: **tflite-int8**" in text
    report = json.loads((out / "parity.json").read_text())
    assert report["gate"] == {"passed": True, "reasons": []}
    assert [a["name"] for a in report["artifacts"]] == list(ALL)
    assert report["keras"]["test_images"] == report["test_images"] == 60
