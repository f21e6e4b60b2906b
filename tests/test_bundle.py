"""The manifest must describe the model it ships with: labels and input shape are checked on load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ct_edge.classifier import Classifier
from ct_edge.errors import BundleError


def _edited(bundle: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("artifact", ["tflite-int8", "onnx-fp32"])
def test_more_labels_than_model_outputs_is_a_bundle_error(tiny_bundle: Path, tmp_path: Path,
                                                         artifact: str) -> None:
    bundle = _edited(tiny_bundle, tmp_path, lambda m: m["labels"].append("Bacterial"))
    with pytest.raises(BundleError, match="3 outputs but the manifest lists 4 labels"):
        Classifier.from_bundle(bundle, artifact=artifact)


def test_input_size_that_the_model_does_not_take_is_a_bundle_error(tiny_bundle: Path,
                                                                    tmp_path: Path) -> None:
    def shrink(manifest: dict) -> None:
        manifest["preprocess"]["size"] = 64
        manifest["input"]["shape"] = [1, 64, 64, 3]

    with pytest.raises(BundleError, match="does not match the manifest"):
        Classifier.from_bundle(_edited(tiny_bundle, tmp_path, shrink), artifact="tflite-int8")


def test_the_unedited_bundle_loads(tiny_bundle: Path) -> None:
    classifier = Classifier.from_bundle(tiny_bundle, artifact="tflite-int8")
    assert classifier.backend.num_classes == len(classifier.labels) == 3
    assert classifier.backend.input_shape == (128, 128, 3)
