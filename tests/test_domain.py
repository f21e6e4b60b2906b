"""The domain gate: score math, the statistics file, DICOM header rules, and a real bundle that
refuses noise, a blank image and an MR slice while answering its own images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import manifest_for, provenance_for, write_bundle

from ct_edge.bundle import MANIFEST, Bundle
from ct_edge.dicom import DicomInfo
from ct_edge.domain import (
    DOMAIN_FILE,
    FeatureGate,
    energy,
    fit_arrays,
    fit_threshold,
    knn,
    ledoit_wolf,
    mahalanobis,
    max_logit,
    metadata_reason,
)
from ct_edge.errors import BundleError

RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 3)).astype(np.float32)
B = np.array([0.1, -0.2, 0.3], np.float32)


def _clusters(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Three tight classes in 4-d around (10,10,10,10), (15,10,10,10), (10,15,10,10)."""
    centres = np.array([[0, 0, 0, 0], [5, 0, 0, 0], [0, 5, 0, 0]], np.float32) + 10
    labels = np.repeat(np.arange(3), n // 3)
    return (centres[labels] + RNG.normal(scale=0.5, size=(len(labels), 4))).astype(np.float32), labels


# --- math ------------------------------------------------------------------------------------------


def test_ledoit_wolf_shrinks_more_with_fewer_samples() -> None:
    scales = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 13.0])
    few = RNG.normal(size=(8, 6)) * scales
    many = RNG.normal(size=(4000, 6)) * scales
    cov_few, s_few = ledoit_wolf(few - few.mean(0))
    cov_many, s_many = ledoit_wolf(many - many.mean(0))
    assert 0.0 <= s_many < 0.05 < s_few <= 1.0
    for cov in (cov_few, cov_many):
        assert np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() > 0
    assert np.allclose(np.sqrt(np.diag(cov_many)), scales, rtol=0.1)
    white = RNG.normal(size=(50, 6))  # the identity target is exactly right: shrink (nearly) fully
    assert ledoit_wolf(white - white.mean(0))[1] > 0.5


def test_mahalanobis_is_the_distance_to_the_nearest_class_mean() -> None:
    arrays = {"means": np.array([[0.0, 0.0], [10.0, 0.0]], np.float32),
              "precision": np.diag([1.0, 4.0]).astype(np.float32)}
    scores = mahalanobis(arrays, np.array([[0, 0], [9, 0], [0, 1]], np.float32))
    assert np.allclose(scores, [0.0, 1.0, 2.0])


def test_knn_is_cosine_distance_to_the_kth_neighbour() -> None:
    bank = np.eye(3, dtype=np.float32)
    scores = knn({"bank": bank, "k": np.int32(1)}, np.array([[2, 0, 0], [1, 1, 0]], np.float32))
    assert np.allclose(scores, [0.0, 1 - np.sqrt(0.5)], atol=1e-6)
    assert knn({"bank": bank, "k": np.int32(2)}, np.array([[1, 0, 0]], np.float32))[0] == \
        pytest.approx(1.0)


def test_energy_and_max_logit_follow_the_logits() -> None:
    f = RNG.normal(size=(5, 4)).astype(np.float32)
    z = f @ W + B
    arrays = {"weights": W, "bias": B}
    assert np.allclose(energy(arrays, f), -np.log(np.exp(z).sum(1)), atol=1e-5)
    assert np.allclose(max_logit(arrays, f), -z.max(1))


@pytest.mark.parametrize("method", ["mahalanobis", "knn", "combined"])
def test_fitted_gates_flag_far_points_and_pass_near_ones(method: str) -> None:
    train, labels = _clusters(90)
    val, _ = _clusters(30)
    gate = FeatureGate(method, 0.0, fit_arrays(method, train, labels, W, B, val))
    threshold = fit_threshold(gate.scores(val))
    gate = FeatureGate(method, threshold, gate.arrays)
    near, _ = _clusters(30)
    far = np.array([[-20, -20, 3, 3], [0, 0, 30, 0]], np.float32)
    assert np.mean(gate.scores(near) > threshold) <= 0.1
    assert (gate.scores(far) > threshold).all()
    assert gate.reason(float(gate.scores(far)[0])).startswith("unlike the training images (score")
    assert gate.reason(float(gate.scores(near)[0]) * 0 + threshold - 1e-3) is None
    assert gate.reason(float("nan")) is not None


def test_features_are_clipped_where_int8_artifacts_saturate() -> None:
    train, labels = _clusters()
    arrays = {**fit_arrays("mahalanobis", train, labels, W, B), "ceiling": np.float32(16.0)}
    gate = FeatureGate("mahalanobis", 3.0, arrays)
    saturated = np.array([[16.0, 10, 10, 10]], np.float32)
    beyond = saturated + np.array([[40.0, 0, 0, 0]], np.float32)
    assert gate.scores(beyond) == pytest.approx(gate.scores(saturated))


def test_threshold_rules() -> None:
    scores = np.arange(101, dtype=np.float64)  # 0..100: mean 50, sd ~29.15
    assert fit_threshold(scores, "max") == 100.0
    assert fit_threshold(scores, "q99") == pytest.approx(99.0)
    assert fit_threshold(scores, "mean+2sd") == pytest.approx(50 + 2 * scores.std())
    assert fit_threshold(scores) == pytest.approx(50 + 4 * scores.std())
    with pytest.raises(ValueError, match="unknown threshold rule"):
        fit_threshold(scores, "median")


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown domain method"):
        fit_arrays("nope", *_clusters(), W, B)


# --- the statistics file ------------------------------------------------------------------------------


STAND_IN = {"tflite-int8": b"a stand-in model: Bundle.load never parses one"}


def _gated_bundle(root: Path, **change: object) -> Path:
    """A bundle of a stand-in model with a fitted mahalanobis gate; `change` edits the manifest's domain
    section (a value of None drops the key)."""
    train, labels = _clusters()
    gate = FeatureGate("mahalanobis", 3.0, fit_arrays("mahalanobis", train, labels, W, B))
    data = gate.to_npz()
    section = {"modality": "ct", "method": "mahalanobis", "threshold": 3.0, "file": DOMAIN_FILE,
               "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **change}
    manifest = manifest_for(STAND_IN, "tflite-int8", provenance_for("0" * 64))
    manifest["domain"] = {key: value for key, value in section.items() if value is not None}
    write_bundle(root, STAND_IN, manifest)
    (root / DOMAIN_FILE).write_bytes(data)
    return root


def test_gate_round_trips_and_refuses_a_tampered_file(tmp_path: Path) -> None:
    root = _gated_bundle(tmp_path / "bundle")
    gate = Bundle.load(root).feature_gate()
    assert gate is not None and gate.method == "mahalanobis" and gate.feature_dim == 4
    data = bytearray((root / DOMAIN_FILE).read_bytes())
    data[-10] ^= 0xFF
    (root / DOMAIN_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(root).feature_gate()


@pytest.mark.parametrize("change", [
    {"method": "telepathy"}, {"file": "../domain.npz"}, {"threshold": "nan"},
    {"sha256": None, "bytes": None}, {"file": None},
    {"bytes": float("inf")},  # 1e999 in JSON: an OverflowError traceback
    {"threshold": 10**400},  # too large for a float: an OverflowError too
    {"file": "domain\x00.npz"},  # os.open raised ValueError
    {"file": "sub/domain.npz"}, {"file": ""}, {"bytes": 64 * 1024 * 1024 + 1}, {"bytes": 0},
], ids=lambda change: repr(change)[:40])
def test_malformed_domain_sections_are_one_line_bundle_errors(tmp_path: Path,
                                                               change: dict) -> None:
    root = _gated_bundle(tmp_path / "bundle", **change)
    bundle = Bundle.load(root)
    with pytest.raises(BundleError) as refused:
        bundle.feature_gate()
    message = str(refused.value)
    assert message.startswith(str(root)) and "\n" not in message and "\x00" not in message


def test_the_gate_comes_with_the_very_bytes_it_was_built_from(tmp_path: Path) -> None:
    root = _gated_bundle(tmp_path / "bundle")
    loaded = Bundle.load(root).gate_with_data()
    assert loaded is not None and loaded[1] == (root / DOMAIN_FILE).read_bytes()
    assert loaded[0].method == "mahalanobis"


# --- DICOM header rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(("info", "modality", "expected"), [
    (DicomInfo(modality="MR"), "ct", "modality MR; this bundle accepts CT"),
    (DicomInfo(modality="CT"), "xray", "modality CT; this bundle accepts X-ray (CR, DX)"),
    (DicomInfo(modality="RTDOSE"), "ct", "modality RTDOSE; this bundle accepts CT"),
    (DicomInfo(modality="SR", sop_class_name="Basic Text SR Storage", has_pixels=False), "ct",
     "DICOM Basic Text SR Storage holds no image; this bundle accepts CT"),
    (DicomInfo(modality="OT", sop_class_uid="1.2.840.10008.5.1.4.1.1.7", photometric="RGB"), "ct",
     "colour image (RGB); this bundle accepts CT"),
    (DicomInfo(modality="CT", body_part="HEAD"), "ct",
     "body part HEAD; this bundle accepts chest images"),
    (DicomInfo(modality="CT", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "ct",
     "image type LOCALIZER (a scout view); this bundle accepts CT slices"),
    (DicomInfo(sop_class_uid="1.2.840.10008.5.1.4.1.1.4", sop_class_name="MR Image Storage"), "ct",
     "SOP class MR Image Storage; this bundle accepts CT"),
    # A bundle converted before bundles named their modality: held to every rule ct-edge knows.
    (DicomInfo(modality="MR"), None, "modality MR; this bundle accepts CT or X-ray (CR, DX)"),
    (DicomInfo(modality="OT", photometric="RGB"), None,
     "colour image (RGB); this bundle accepts CT or X-ray (CR, DX)"),
])
def test_header_rules_flag_foreign_objects(info: DicomInfo, modality: str | None,
                                           expected: str) -> None:
    assert metadata_reason(info, modality) == expected


@pytest.mark.parametrize(("info", "modality"), [
    (DicomInfo(modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", photometric="MONOCHROME2",
               body_part="CHEST", image_type=("ORIGINAL", "PRIMARY", "AXIAL")), "ct"),
    (DicomInfo(modality="DX", photometric="MONOCHROME1", body_part="CHEST"), "xray"),
    (DicomInfo(modality="CR"), "xray"),
    (DicomInfo(modality="OT", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
               photometric="MONOCHROME2"), "ct"),  # a secondary capture: the pixels decide
    (DicomInfo(modality="DX"), None),  # a bundle that names no modality: any known one passes
])
def test_header_rules_pass_what_may_be_in_domain(info: DicomInfo, modality: str | None) -> None:
    assert metadata_reason(info, modality) is None


def test_header_fields_are_read_from_real_files() -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    mr = DicomInfo.from_dataset(pydicom.dcmread(get_testdata_file("MR_small.dcm")))
    assert (mr.modality, mr.sop_class_name, mr.photometric) == ("MR", "MR Image Storage",
                                                                "MONOCHROME2")
    assert mr.image_type == ("DERIVED", "SECONDARY", "OTHER") and mr.has_pixels
    sr = DicomInfo.from_dataset(pydicom.dcmread(get_testdata_file("reportsi.dcm")))
    assert sr.modality == "SR" and not sr.has_pixels


# --- a real bundle ------------------------------------------------------------------------------------


def test_converted_bundle_records_its_domain(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    domain = manifest["domain"]
    assert domain["modality"] == "xray"  # a folder of images, trained without --modality
    assert domain["method"] and domain["file"] == DOMAIN_FILE
    assert domain["sha256"] == hashlib.sha256((tiny_bundle / DOMAIN_FILE).read_bytes()).hexdigest()
    assert Bundle.load(tiny_bundle).feature_gate() is not None


def test_every_artifact_exports_features_and_agrees_on_status(tiny_bundle: Path) -> None:
    from ct_edge.classifier import Classifier

    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    x = RNG.uniform(size=(2, *manifest["input"]["shape"][1:])).astype(np.float32)
    dims = set()
    for entry in manifest["artifacts"]:
        classifier = Classifier.from_bundle(tiny_bundle, artifact=entry["name"])
        outputs = classifier.backend.run(x, maps=True, features=True)
        assert outputs.probabilities.shape == (2, 3) and outputs.maps is not None
        dims.add(outputs.features.shape)
        assert "status_agreement" in entry["parity"], entry["name"]
    assert len(dims) == 1


def _foreign_png(tmp_path: Path, name: str, pixels: np.ndarray) -> Path:
    from PIL import Image

    path = tmp_path / f"{name}.png"
    Image.fromarray(pixels.astype(np.uint8), "L").save(path)
    return path


def test_bundle_flags_foreign_inputs_and_answers_its_own(tiny_bundle: Path, synthetic_root: Path,
                                                         tmp_path: Path) -> None:
    from ct_edge.classifier import Classifier

    classifier = Classifier.from_bundle(tiny_bundle)
    noise = _foreign_png(tmp_path, "noise", RNG.uniform(0, 255, (128, 128)))
    blank = _foreign_png(tmp_path, "blank", np.full((128, 128), 255))
    for path in (noise, blank):
        p = classifier.predict(path)
        assert (p.status, p.label) == ("out_of_domain", None), path
        assert p.reason.startswith("unlike the training images")
    own = sorted((synthetic_root / "train").glob("*/*.png"))[:6]
    statuses = [classifier.predict(path).status for path in own]
    assert statuses.count("out_of_domain") <= 1 and any(s != "out_of_domain" for s in statuses)
    forced = Classifier.from_bundle(tiny_bundle, domain_check=False).predict(noise)
    assert forced.label is not None and "domain check off" in forced.reason


def test_explanations_carry_the_status(tiny_bundle: Path, tmp_path: Path) -> None:
    from ct_edge.classifier import Classifier
    from ct_edge.explain import explain

    noise = _foreign_png(tmp_path, "noise", RNG.uniform(0, 255, (128, 128)))
    explanation = explain(Classifier.from_bundle(tiny_bundle), noise)
    assert explanation.status == "out_of_domain"
    assert explanation.reason.startswith("unlike the training images")
    record = explanation.to_dict()
    assert record["label"] is None and record["status"] == "out_of_domain"
    forced = explain(Classifier.from_bundle(tiny_bundle, domain_check=False), noise)
    assert forced.status != "out_of_domain" and "domain check off" in forced.reason


def test_bundle_flags_other_dicom_objects_by_header(tiny_bundle: Path) -> None:
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from ct_edge.classifier import Classifier

    classifier = Classifier.from_bundle(tiny_bundle)
    mr = classifier.predict(get_testdata_file("MR_small.dcm"))
    assert (mr.status, mr.label) == ("out_of_domain", None)
    assert mr.reason == "modality MR; this bundle accepts X-ray (CR, DX)"
    assert "inference" not in mr.timings_ms  # refused without running the model
    report = classifier.predict(get_testdata_file("reportsi.dcm"))
    assert report.status == "out_of_domain" and "holds no image" in report.reason


def test_classify_and_explain_refuse_a_report_alike(tiny_bundle: Path, tmp_path: Path,
                                                    capsys) -> None:
    """A DICOM object with no image is out of domain for both commands, not an error in one."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from ct_edge import cli

    report = get_testdata_file("reportsi.dcm")
    records = []
    for command in (["classify"], ["explain", "-o", str(tmp_path / "heat.png")]):
        assert cli.main([*command, "--bundle", str(tiny_bundle), "--json", "-q", report]) == 0
        records.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    for record in records:
        assert (record["status"], record["label"], record["confidence"]) == ("out_of_domain", None,
                                                                             None)
        assert "holds no image" in record["reason"] and record["error"] is None
    assert records[0]["reason"] == records[1]["reason"]
    assert records[1]["output"] is None and not (tmp_path / "heat.png").exists()


def test_bundle_without_domain_section_still_loads(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from ct_edge.classifier import Classifier

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["domain"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    (old / DOMAIN_FILE).unlink()
    classifier = Classifier.from_bundle(old)
    assert classifier.gate is None and classifier.bundle.modality is None
    p = classifier.predict(RNG.uniform(size=manifest["input"]["shape"][1:]).astype(np.float32))
    assert p.status in ("ok", "uncertain") and p.label is not None


def test_foreign_set_is_built_without_downloads(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from tools import foreign

    for modality, has_ct in (("ct", False), ("xray", True)):
        names = {p.name for p in foreign.pydicom_files(modality)}
        assert {"MR_small.dcm", "rtdose.dcm", "liver_1frame.dcm", "reportsi.dcm"} <= names
        assert ("CT_small.dcm" in names) == has_ct
    rendered = foreign.rendered(tmp_path, size=64)
    assert {"blank-black.png", "noise-uniform.png", "text-page-0.png", "colour-bars.png"} <= \
        {p.name for p in rendered}
    assert all(p.stat().st_size > 0 for p in rendered)


def test_gates_load_one_at_a_time_across_threads(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy parses .npy headers with ast.literal_eval, which CPython before 3.11.8 cannot run in
    two threads at once (a SystemError in CI); a Classifier built per thread must not."""
    from concurrent.futures import ThreadPoolExecutor

    from thread_helpers import watch_header_parses

    bundle = Bundle.load(_gated_bundle(tmp_path / "bundle"))
    most_at_once = watch_header_parses(monkeypatch)
    with ThreadPoolExecutor(max_workers=8) as pool:
        gates = list(pool.map(lambda _: bundle.feature_gate(), range(16)))
    assert all(gate is not None and gate.feature_dim == 4 for gate in gates)
    assert most_at_once() == 1, f"{most_at_once()} threads parsed .npy headers at once"
