"""Heatmaps: Grad-CAM and the CAM-ready head agree, the device explains through its own engine,
`ct-edge explain` writes the figure and JSON, and (slow) the heat lands on the finding's lung."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ct_edge import LABELS, cli
from ct_edge.classifier import Classifier
from ct_edge.errors import BundleError
from ct_edge.explain import (
    choose_method,
    explain,
    figure_size,
    lung_mask,
    model_to_source,
    occlusion_heatmap,
    save,
)
from ct_edge.preprocess import PreprocessSpec

JSON_KEYS = {"path", "label", "confidence", "status", "reason", "probabilities",
             "target", "method", "artifact", "peak", "lung_share", "lung_area", "border_share", "border_area",
             "timings_ms", "output", "error"}


def _test_images(data: Path) -> list[Path]:
    """The first test image of each class: test/<class>/00000.png."""
    return [sorted((data / "test" / label).glob("*.png"))[0] for label in LABELS]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the model side: Grad-CAM and the exported head ----------------------------------------------


def test_cam_head_is_grad_cam_and_averages_to_the_logits(tiny_model: Path,
                                                         synthetic_root: Path) -> None:
    import keras

    from ct_edge.preprocess import preprocess
    from training.gradcam import cam_model, grad_cam

    model = keras.models.load_model(tiny_model / "model.keras", compile=False)
    x = np.stack([preprocess(p) for p in _test_images(synthetic_root)])
    probabilities, maps = cam_model(model).predict(x, verbose=0)
    logits = keras.Model(model.inputs, model.get_layer("logits").output).predict(x, verbose=0)
    bias = model.get_layer("logits").get_weights()[1]
    np.testing.assert_allclose(maps.mean(axis=(1, 2)) + bias, logits, atol=1e-4)
    cams, keras_probabilities = grad_cam(model, x)
    np.testing.assert_allclose(probabilities, keras_probabilities, atol=1e-6)
    for i, c in enumerate(probabilities.argmax(axis=1)):
        relu = np.maximum(maps[i, :, :, c], 0)
        expected = relu / relu.max() if relu.max() > 0 else relu
        np.testing.assert_allclose(cams[i], expected, atol=1e-4)


def test_flatten_heads_get_no_cam_output() -> None:
    from training.gradcam import cam_model, describe, last_feature_layer
    from training.models import build_model

    model = build_model("reference", (32, 32, 3), len(LABELS))
    assert cam_model(model) is None
    assert describe(model, None)["method"] == "occlusion"
    assert len(last_feature_layer(model).output.shape) == 4


def test_training_report_writes_the_gradcam_grid(tiny_model: Path) -> None:
    grid = Image.open(tiny_model / "gradcam.png")
    assert grid.size[0] > 600 and grid.size[1] > 300


def _gradcam_cli(argv: list[str], capsys) -> tuple[int, str]:
    from training.gradcam import main

    try:
        status = main(argv)
    except Exception as exc:  # what the user would have seen as a traceback
        pytest.fail(f"traceback: {exc!r}")
    return status, capsys.readouterr().err.strip()


@pytest.mark.parametrize(("make", "problem"), [
    ("nothing", "--model {model}: no such file"),
    ("folder", "--model {model} is a folder; pass its model.keras"),
    ("model only", "{config}: missing; the training run writes it beside the model"),
    ("config without spec", "{config}: no 'spec' (preprocessing); not a training run's config"),
    ("config not json", "{config}: not valid JSON"),
    ("config without data", "{config} names no data folder; pass --data DIR"),
])
def test_gradcam_cli_refuses_an_unusable_model_folder_in_one_line(make: str, problem: str,
                                                                  tmp_path: Path,
                                                                  capsys) -> None:
    folder = tmp_path / "m"
    model, config = folder / "model.keras", folder / "config.json"
    folder.mkdir()
    if make == "folder":
        model.mkdir()
    elif make != "nothing":
        model.write_bytes(b"not opened before config.json is checked")
    if make == "config without spec":
        config.write_text(json.dumps({"data": str(tmp_path), "seed": 0}))
    elif make == "config not json":
        config.write_text("{")
    elif make == "config without data":
        config.write_text(json.dumps({"spec": PreprocessSpec().to_dict()}))
    for argv in (["--model", str(model)], ["--compare", "--model", str(model)]):
        status, err = _gradcam_cli(argv, capsys)
        assert status == 2 and "\n" not in err, err
        assert err.startswith("error: " + problem.format(model=model, config=config)), err


def test_gradcam_cli_help_states_every_default(capsys) -> None:
    from training.gradcam import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: off: draw the Grad-CAM grid)" in text
    assert text.count("(default: ") == 9  # every option but --help


# --- the bundle: every artifact carries the maps, the manifest says so ---------------------------


def test_every_artifact_has_class_maps_and_the_manifest_records_them(tiny_bundle: Path,
                                                                    synthetic_root: Path) -> None:
    from ct_edge.preprocess import preprocess

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    section = manifest["explain"]
    assert section["method"] == "cam" and section["class_maps"]["output"] == "class_maps"
    assert all(entry["status"] == "passed" for entry in manifest["artifacts"])
    batch = np.stack([preprocess(p) for p in _test_images(synthetic_root)])
    maps_of = {}
    for entry in manifest["artifacts"]:
        classifier = Classifier.from_bundle(tiny_bundle, artifact=entry["name"])
        assert classifier.has_maps, entry["name"]
        probabilities, maps = classifier.predict_with_maps(batch)
        assert list(maps.shape[1:]) == section["class_maps"]["shape"][1:], entry["name"]
        # The probabilities are those of the plain predict path.
        np.testing.assert_allclose(probabilities, classifier.predict_array(batch), atol=1e-6)
        maps_of[entry["name"]] = maps
    # int8 maps, dequantized with their own scale and zero-point, follow the float ones.
    for name in ("tflite-int8", "onnx-int8"):
        r = np.corrcoef(maps_of[name].ravel(), maps_of["tflite-fp32"].ravel())[0, 1]
        assert r > 0.9, (name, r)
    np.testing.assert_allclose(maps_of["onnx-fp32"], maps_of["tflite-fp32"], atol=1e-3)


# --- explain(): API --------------------------------------------------------------------------------


def test_info_says_how_explain_works(tiny_bundle: Path, capsys) -> None:
    from ct_edge import cli

    assert cli.main(["info", "--bundle", str(tiny_bundle)]) == 0
    (line,) = [row for row in capsys.readouterr().out.splitlines() if row.startswith("explain ")]
    assert "cam from the" in line and "class maps of layer" in line and "fallback occlusion" in line


def test_explain_api_both_methods(tiny_bundle: Path, synthetic_root: Path,
                                  tmp_path: Path) -> None:
    classifier = Classifier.from_bundle(tiny_bundle)
    image = _test_images(synthetic_root)[0]
    assert choose_method(classifier) == "cam"
    for method in ("cam", "occlusion"):
        e = explain(classifier, image, method=method)
        assert e.method == method and e.label in LABELS and e.target == e.label
        assert e.heatmap.shape == (128, 128) and 0.0 <= e.heatmap.min() <= e.heatmap.max() <= 1.0
        width, height = Image.open(image).size
        assert 0 <= e.peak["x"] <= width - 1 and 0 <= e.peak["y"] <= height - 1
        assert 0 < e.peak["x_rel"] < 1 and 0 < e.peak["y_rel"] < 1
        path = save(e, tmp_path / f"{method}.png")
        assert Image.open(path).size == figure_size()
    other = next(label for label in LABELS if label != e.label)
    assert explain(classifier, image, target=other).target == other


def test_without_maps_occlusion_is_the_default_and_cam_is_refused(tiny_bundle: Path,
                                                                  synthetic_root: Path,
                                                                  monkeypatch) -> None:
    classifier = Classifier.from_bundle(tiny_bundle, artifact="tflite-fp32")
    monkeypatch.setattr(Classifier, "has_maps", property(lambda self: False))
    assert choose_method(classifier) == "occlusion"
    with pytest.raises(BundleError, match="occlusion"):
        choose_method(classifier, "cam")
    image = str(_test_images(synthetic_root)[0])
    assert cli.main(["explain", "--bundle", str(tiny_bundle), "--json", image]) == 0
    assert cli.main(["explain", "--bundle", str(tiny_bundle), "--method", "cam", "--json",
                     image]) == 2


class _RegionBackend:
    """p(class 0) grows with the brightness of the top-left quarter only."""

    engine = "fake"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        score = batch[:, :16, :16, 0].mean(axis=(1, 2)) * 8.0 - 2.0
        p0 = 1.0 / (1.0 + np.exp(-score))
        return np.stack([p0, (1 - p0) / 2, (1 - p0) / 2], axis=1).astype(np.float32)


def test_occlusion_finds_the_region_the_model_looks_at(tiny_bundle: Path) -> None:
    bundle = Classifier.from_bundle(tiny_bundle).bundle
    # The stand-in engine exports no features, so the bundle's domain gate cannot run on it.
    classifier = Classifier(bundle, bundle.select(), _RegionBackend(), PreprocessSpec(size=32),
                            domain_check=False)
    x = np.full((32, 32, 3), 0.2, np.float32)
    x[:16, :16] = 0.9  # the evidence; the occluding grey (the image mean) is darker
    heat = occlusion_heatmap(classifier, x, 0)
    v, u = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert u < 16 and v < 16
    assert heat[24:, 24:].max() == 0.0


# --- geometry and the lung mask ---------------------------------------------------------------------


@pytest.mark.parametrize(("aspect", "corner"), [
    ("crop", (50.0, 0.0)),  # a 228x128 image: the 128 px square from x = 50
    ("stretch", (0.39, 0.0)),  # 1.78 source pixels per model pixel across
    ("letterbox", (0.39, 0.0)),  # model row 0 is padding above the image: clipped to it
])
def test_peak_maps_back_to_input_image_pixels(aspect: str, corner: tuple[float, float]) -> None:
    spec = PreprocessSpec(size=128, aspect=aspect)
    # The model's centre is the image's centre whatever the aspect handling.
    assert model_to_source(63.5, 63.5, (228, 128), spec) == pytest.approx((113.5, 63.5), abs=0.01)
    assert model_to_source(0, 0, (228, 128), spec) == pytest.approx(corner, abs=0.01)


def test_lung_mask_finds_both_lungs_on_synthetic_slices_and_refuses_noise() -> None:
    from training.phantom import render_slice

    for seed in range(4):
        pixels = render_slice("Normal", np.random.default_rng(seed), 128) / 255.0
        mask = lung_mask(pixels.astype(np.float32))
        assert mask is not None
        assert 0.08 < mask.mean() < 0.45
        assert mask[:, :64].any() and mask[:, 64:].any()
    assert lung_mask(np.full((128, 128), 0.5, np.float32)) is None
    assert lung_mask(np.random.default_rng(0).uniform(0, 1, (128, 128)).astype(np.float32)) is None


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_writes_a_png_of_the_expected_size(tiny_bundle: Path, synthetic_root: Path,
                                               tmp_path: Path, capsys) -> None:
    out = tmp_path / "heatmap.png"
    code = cli.main(["explain", "--bundle", str(tiny_bundle), str(_test_images(synthetic_root)[0]),
                     "-o", str(out)])
    assert code == 0
    assert Image.open(out).size == figure_size() == (520, 320)
    text = capsys.readouterr().out
    assert str(out) in text and "heat for" in text


def test_cli_json_fields(tiny_bundle: Path, synthetic_root: Path, capsys) -> None:
    images = _test_images(synthetic_root)
    code = cli.main(["explain", "--bundle", str(tiny_bundle), "--json", *map(str, images)])
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == len(images)
    for record, image in zip(records, images, strict=True):
        assert set(record) == JSON_KEYS
        assert record["path"] == str(image) and record["output"] is None and record["error"] is None
        assert record["method"] == "cam" and record["artifact"] == "tflite-int8"
        assert set(record["peak"]) == {"x", "y", "x_rel", "y_rel", "value"}
        assert 0 <= record["peak"]["x_rel"] <= 1 and 0 <= record["peak"]["y_rel"] <= 1
        assert 0 <= record["border_share"] <= 1
        assert record["border_area"] == pytest.approx(1 - (1 - 2 * 10 / 128) ** 2, abs=1e-3)
        assert record["lung_share"] is None or 0 <= record["lung_share"] <= 1
        assert set(record["probabilities"]) == set(LABELS)


def test_cli_several_inputs_go_to_a_folder_with_unique_names(tiny_bundle: Path,
                                                             synthetic_root: Path,
                                                             tmp_path: Path) -> None:
    images = _test_images(synthetic_root)  # test/<class>/00000.png: the same file name three times
    out = tmp_path / "heatmaps"
    assert cli.main(["explain", "--bundle", str(tiny_bundle), "-q", *map(str, images),
                     "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{'_'.join(label.split())}_{images[0].stem}.png" for label in LABELS)


def test_cli_errors(tiny_bundle: Path, synthetic_root: Path, tmp_path: Path, capsys) -> None:
    good = str(_test_images(synthetic_root)[0])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    # A bad input: an error line, the others still explained, exit 1.
    code = cli.main(["explain", "--bundle", str(tiny_bundle), "--json", str(bad), good])
    captured = capsys.readouterr()
    assert code == 1 and f"error: {bad}:" in captured.err
    first, second = (json.loads(line) for line in captured.out.splitlines())
    assert first["error"] and first["label"] is None and second["error"] is None
    # Bundle and usage errors: one line, exit 2.
    assert cli.main(["explain", "--bundle", str(tmp_path / "none"), good, "--json"]) == 2
    assert cli.main(["explain", "--bundle", str(tiny_bundle), good]) == 2  # neither -o nor --json
    assert cli.main(["explain", "--bundle", str(tiny_bundle), good, "--json",
                     "--target", "Flu"]) == 2
    assert cli.main(["explain", "--bundle", str(tiny_bundle), good,
                     "-o", str(tmp_path / "missing" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "Traceback" not in err


def test_the_artifact_not_the_manifest_decides_the_method(tiny_bundle: Path,
                                                         synthetic_root: Path, tmp_path: Path,
                                                         capsys) -> None:
    """The runtime looks for the rank-4 output in the model itself; the manifest only documents."""
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("explain")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    good = str(_test_images(synthetic_root)[0])
    assert cli.main(["explain", "--bundle", str(copy), "--json", good]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "cam"


# --- the finding's lung (slow: trains a model that has learnt the findings) -------------------------


def _one_sided_cases(count: int) -> list[tuple[str, bytes, bool, np.ndarray]]:
    """(label, PNG, finding on the image's left, lung mask of the healthy twin) per case.

    A slice and its Normal twin (same seed: same patient, scanner and noise; only the findings
    differ) show exactly where the finding is. Viral Pneumonia is often one-sided by itself;
    COVID-19 is bilateral, so one side of its slice is replaced by the healthy twin's.
    """
    from ct_edge.preprocess import preprocess
    from training.phantom import render_slice

    size, cases = 128, []
    half = np.arange(size)[None, :] < size // 2
    for seed in range(200):
        for label in ("Viral Pneumonia", "COVID-19"):
            if sum(c[0] == label for c in cases) >= count:
                continue
            normal = render_slice("Normal", np.random.default_rng([7, seed]), size)
            sick = render_slice(label, np.random.default_rng([7, seed]), size)
            if label == "COVID-19":
                keep = half if seed % 2 == 0 else ~half
                sick = np.where(keep, sick, normal).astype(np.uint8)
            finding = np.abs(sick.astype(int) - normal.astype(int)) > 25
            if finding.sum() < 300:
                continue  # subtle (under 2% of the slice): not "a finding in one lung" to point at
            left = float((np.nonzero(finding)[1] < size // 2).mean())
            if 0.1 < left < 0.9:
                continue  # both lungs
            lungs = lung_mask(preprocess(_png(normal))[:, :, 0])
            if lungs is None:
                continue
            cases.append((label, _png(sick), left > 0.5, lungs))
    return cases


@pytest.mark.slow
def test_heat_peak_lies_in_the_lung_with_the_finding(tmp_path: Path) -> None:
    from convert.pipeline import convert_model
    from training.synthetic import generate_dataset
    from training.train import TrainConfig, train

    # About 1.5 minutes on two cores: the 3-epoch tiny_model has not learnt the findings.
    data = generate_dataset(tmp_path / "data", train_per_class=120, test_per_class=10, size=128)
    train(TrainConfig(abstention_folds=0, data=str(data), out=str(tmp_path / "model"), epochs=25, patience=25,
                      cache=str(tmp_path / "cache")))
    convert_model(tmp_path / "model" / "model.keras", tmp_path / "bundle", formats=["tflite-int8"],
                  log=None)
    classifier = Classifier.from_bundle(tmp_path / "bundle")
    assert classifier.has_maps
    cases = _one_sided_cases(count=12)
    assert len(cases) == 24
    # Measured on 222 such cases with a model trained like this: cam 0.98-1.0, occlusion 0.99;
    # a model that has not learnt COVID-19 yet scores 0.16 on those (60 images per class, 15 epochs).
    for method, required in (("cam", 0.85), ("occlusion", 0.85)):
        hits = []
        for label, png, on_left, lungs in cases:
            e = explain(classifier, png, method=method, target=label)
            v, u = np.unravel_index(int(np.argmax(e.heatmap)), e.heatmap.shape)
            side = (np.arange(128) < 64) if on_left else (np.arange(128) >= 64)
            # That lung: the healthy twin's lung field on the finding's side, widened by the
            # heatmap's resolution (one feature-map cell is 16 px).
            near = np.zeros_like(lungs)
            near[max(0, v - 8) : v + 9, max(0, u - 8) : u + 9] = True
            hits.append(bool(side[u] and (lungs & near).any()))
        assert np.mean(hits) >= required, (method, hits)
