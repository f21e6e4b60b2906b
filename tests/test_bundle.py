"""The manifest must describe the model it ships with; what the classifier makes of model outputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import manifest_for, provenance_for, write_bundle

from ct_edge.bundle import MANIFEST, Bundle
from ct_edge.classifier import Classifier, apply_temperature
from ct_edge.domain import DOMAIN_FILE, FeatureGate
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


# --- every file of a bundle: one rule, and the manifest that was parsed ---------------------------

STAND_IN = {"tflite-int8": b"a stand-in model: Bundle.load never parses one"}


def _gated_bundle(root: Path) -> Path:
    """A bundle of a stand-in model whose manifest records a feature gate and its statistics."""
    arrays = {"weights": np.eye(4, 3, dtype=np.float32), "bias": np.zeros(3, np.float32)}
    data = FeatureGate("max_logit", 3.0, arrays).to_npz()
    manifest = manifest_for(STAND_IN, "tflite-int8", provenance_for("0" * 64))
    manifest["domain"] = {"modality": "xray", "method": "max_logit", "threshold": 3.0,
                          "file": DOMAIN_FILE, "sha256": hashlib.sha256(data).hexdigest(),
                          "bytes": len(data)}
    write_bundle(root, STAND_IN, manifest)
    (root / DOMAIN_FILE).write_bytes(data)
    return root


def _use(root: Path) -> None:
    """What a front end reads of a bundle: the manifest, the default model, the domain gate."""
    bundle = Bundle.load(root)
    bundle.select().read_verified()
    bundle.feature_gate()


@pytest.mark.parametrize("file", ["manifest.json", "model_int8.tflite", "domain.npz"])
def test_a_bundle_file_linked_outside_the_folder_is_refused(tmp_path: Path, file: str) -> None:
    """Model files linked out were refused; the manifest and domain.npz were read from anywhere.
    The link target holds the very bytes the manifest names: only the path rule stops it."""
    root = _gated_bundle(tmp_path / "bundle")
    _use(root)
    outside = tmp_path / f"outside-{file}"
    (root / file).rename(outside)
    (root / file).symlink_to(outside)
    with pytest.raises(BundleError, match="links outside the bundle folder") as refused:
        _use(root)
    assert str(refused.value).startswith(f"{root / file}: ") and "\n" not in str(refused.value)


def test_a_link_inside_the_folder_is_still_followed(tmp_path: Path) -> None:
    root = _gated_bundle(tmp_path / "bundle")
    for file in ("manifest.json", "model_int8.tflite", "domain.npz"):
        (root / file).rename(root / f"real-{file}")
        (root / file).symlink_to(f"real-{file}")
    _use(root)


def test_the_bundle_identity_is_the_manifest_that_was_parsed(tmp_path: Path) -> None:
    """Results were stamped with the sha256 of manifest.json read again later: a bundle installed
    in between would be named for answers the loaded one gave."""
    root = _gated_bundle(tmp_path / "bundle")
    loaded = (root / MANIFEST).read_bytes()
    bundle = Bundle.load(root)
    manifest = json.loads(loaded)
    manifest["calibration"]["temperature"] = 5.0  # `make convert` installs a new bundle now
    (root / MANIFEST).write_text(json.dumps(manifest))
    assert bundle.manifest_bytes == loaded
    assert bundle.manifest_sha256 == hashlib.sha256(loaded).hexdigest()
    assert json.loads(bundle.manifest_bytes) == bundle.manifest and bundle.temperature == 1.0


def test_an_artifact_that_did_not_pass_parity_has_a_warning(tmp_path: Path) -> None:
    root = _gated_bundle(tmp_path / "bundle")
    assert Bundle.load(root).select().parity_warning is None
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["artifacts"][0]["status"] = "failed"
    (root / MANIFEST).write_text(json.dumps(manifest))
    assert Bundle.load(root).select().parity_warning == (
        "artifact 'tflite-int8' has parity status 'failed'; its answers may differ from the "
        "reference model")
