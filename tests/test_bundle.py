"""The manifest must describe the model it ships with; what the classifier makes of model outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ct_edge.classifier import Classifier, apply_temperature
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


def test_a_model_that_fails_at_run_time_is_a_bundle_error_not_a_file_error(
        tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from ct_edge import cli
    from ct_edge.backends import TFLiteBackend

    def broken(self, batch):
        raise BundleError("litert failed to run the model: simulated")

    monkeypatch.setattr(TFLiteBackend, "predict", broken)
    fixture = Path(__file__).parent / "fixtures" / "gray8.png"
    code = cli.main(["classify", "--bundle", str(tiny_bundle), "--artifact", "tflite-int8",
                     str(fixture), str(fixture.with_name("rgb.jpg"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert [line for line in err if line.startswith("error:")] == [
        "error: litert failed to run the model: simulated"]


def test_info_on_a_manifest_with_malformed_fields_is_one_line_and_exit_2(
        tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ct_edge import cli

    bundle = _edited(tiny_bundle, tmp_path, lambda m: m.update(provenance=["not", "a", "dict"]))
    assert cli.main(["info", "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert "malformed manifest" in err and "\n" not in err


def test_int8_probabilities_are_renormalised_to_sum_to_one() -> None:
    steps = np.array([[128, 60, 67], [0, 0, 256]], dtype=np.float32) / 256  # an int8 output
    probabilities = apply_temperature(steps, 1.0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert probabilities.argmax(axis=1).tolist() == [0, 2]
    np.testing.assert_allclose(probabilities[0], steps[0] / steps[0].sum(), rtol=1e-5)


@pytest.mark.parametrize("explain", ["cam", 5, [], {"class_maps": 3}, {"class_maps": {"shape": 1}},
                                     {"method": "cam", "class_maps": {"shape": [1, 8]}}])
def test_info_shows_a_malformed_explain_field_as_unknown_and_still_exits_0(
        tiny_bundle: Path, tmp_path: Path, capsys, explain: object) -> None:
    from ct_edge import cli

    bundle = _edited(tiny_bundle, tmp_path, lambda m: m.__setitem__("explain", explain))
    assert cli.main(["info", "--bundle", str(bundle)]) == 0
    (line,) = [row for row in capsys.readouterr().out.splitlines() if row.startswith("explain ")]
    assert "?" in line
