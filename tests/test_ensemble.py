"""Ensembles merged into one graph: mean probabilities, mean class map, mixed input sizes, convert."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def _members(sizes: tuple[int, ...]) -> list:
    import keras

    from training.models import build_model

    models = []
    for seed, size in enumerate(sizes):
        keras.utils.set_random_seed(seed)
        model = build_model("edge-gap", (size, size, 3), 3)
        # Random but not uniform: a non-zero logits bias makes the members disagree clearly.
        kernel, _ = model.get_layer("logits").get_weights()
        model.get_layer("logits").set_weights([kernel * 20, np.array([seed, -seed, 0.5], "f4")])
        models.append(model)
    return models


def test_mixed_sizes_average_probabilities_and_class_maps(tmp_path: Path) -> None:
    import keras
    import tensorflow as tf

    from training.ensemble import ensemble_cam_model, ensemble_export_model, merge, predict_mean
    from training.gradcam import MAPS_LAYER, cam_model

    members = _members((64, 32, 64))
    ensemble = merge(members)
    assert ensemble.input_shape == (None, 64, 64, 3) and ensemble.output_shape == (None, 3)
    x = np.random.default_rng(1).random((4, 64, 64, 3), dtype=np.float32)
    probabilities = ensemble.predict(x, verbose=0)
    np.testing.assert_allclose(probabilities, predict_mean(members, x), atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(members[0].predict(x, verbose=0) - probabilities).max() > 1e-3

    ensemble.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), probabilities, atol=1e-6)
    # The converter's hook: the loaded ensemble gains the mean class map, same probabilities.
    maps_model = cam_model(loaded)
    assert maps_model is not None and maps_model.output_names == ["probabilities", MAPS_LAYER]
    p, maps = maps_model.predict(x, verbose=0)
    np.testing.assert_allclose(p, probabilities, atol=1e-6)
    assert maps.shape == (4, 4, 4, 3)  # the finest grid: 64 px / 16
    small = tf.image.resize(x, (32, 32)).numpy()  # what the graph gives the 32 px member
    member_maps = [cam_model(m).predict(small if i == 1 else x, verbose=0)[1]
                   for i, m in enumerate(members)]
    expected = (member_maps[0] + tf.image.resize(member_maps[1], (4, 4)).numpy()
                + member_maps[2]) / 3
    np.testing.assert_allclose(maps, expected, atol=1e-4)
    assert ensemble_cam_model(members[0]) is None  # a plain model is not an ensemble
    # The domain gate's features: the first member's pooled features, the input of its head.
    export = ensemble_export_model(loaded)
    assert export.output_names == ["probabilities", MAPS_LAYER, "features"]
    exported = export.predict(x, verbose=0)
    first = keras.Model(members[0].inputs, members[0].get_layer("logits").input)
    np.testing.assert_allclose(exported[2], first.predict(x, verbose=0), atol=1e-5)
    np.testing.assert_allclose(exported[0], probabilities, atol=1e-6)
    assert ensemble_export_model(members[0]) is None


def test_flip_tta_averages_each_member_over_the_mirror_and_reloads(tmp_path: Path) -> None:
    import keras

    from training.ensemble import ensemble_cam_model, ensemble_export_model, has_flip_tta, merge, predict_mean
    from training.gradcam import MAPS_LAYER, cam_model
    from training.models import load_keras_model

    members = _members((64, 32))
    ensemble = merge(members, flip_tta=True)
    x = np.random.default_rng(2).random((3, 64, 64, 3), dtype=np.float32)
    probabilities = ensemble.predict(x, verbose=0)
    np.testing.assert_allclose(probabilities, predict_mean(members, x, flip_tta=True), atol=1e-5)
    # Mirror-invariant: the image and its mirror get the same answer, unlike the plain mean.
    np.testing.assert_allclose(ensemble.predict(x[:, :, ::-1], verbose=0), probabilities,
                               atol=1e-5)
    assert np.abs(merge(members).predict(x, verbose=0) - probabilities).max() > 1e-4

    ensemble.save(tmp_path / "model.keras")
    loaded = load_keras_model(tmp_path / "model.keras")
    assert has_flip_tta(loaded) and not has_flip_tta(merge(members))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), probabilities, atol=1e-6)
    p, maps = ensemble_cam_model(loaded).predict(x, verbose=0)
    np.testing.assert_allclose(p, probabilities, atol=1e-6)
    # The mirrored pass's class map is mirrored back: the map of the mirror is the mirror's map.
    _, maps_of_mirror = cam_model(loaded).predict(x[:, :, ::-1], verbose=0)
    np.testing.assert_allclose(maps_of_mirror, maps[:, :, ::-1], atol=1e-5)
    export = ensemble_export_model(loaded)
    assert export.output_names == ["probabilities", MAPS_LAYER, "features"]
    first = keras.Model(members[0].inputs, members[0].get_layer("logits").input)
    # The gate's features stay the unmirrored image's.
    np.testing.assert_allclose(export.predict(x, verbose=0)[2], first.predict(x, verbose=0),
                               atol=1e-5)


def test_a_flip_graph_saved_with_two_passes_still_loads_and_is_rebuilt(tmp_path: Path) -> None:
    """Flip graphs saved before the batch of two (a HorizontalFlip input, two passes through each
    member) load, answer as before, and export as the batch-of-two graph with the same answers."""
    import keras
    from keras import layers

    from training.ensemble import FLIP_LAYER, ensemble_export_model, ensemble_members, has_flip_tta, merge
    from training.models import HorizontalFlip, load_keras_model

    new = merge(_members((64, 32)), flip_tta=True)
    inputs = keras.Input((64, 64, 3), name="image")
    mirror = HorizontalFlip(name=FLIP_LAYER)(inputs)
    answers = []
    for index, member in enumerate(ensemble_members(new)):
        for view, x in enumerate((inputs, mirror)):
            if index:
                x = layers.Resizing(32, 32, name=f"resize{index}_{view}")(x)
            answers.append(member(x)[0])
    old = keras.Model(inputs, layers.Activation("linear", name="probabilities")(
        layers.Average(name="mean_probabilities")(answers)))
    old.save(tmp_path / "old.keras")
    loaded = load_keras_model(tmp_path / "old.keras")
    x = np.random.default_rng(4).random((2, 64, 64, 3), dtype=np.float32)
    expected = new.predict(x, verbose=0)
    assert has_flip_tta(loaded)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-5)
    export = ensemble_export_model(loaded)
    assert any(layer.name.startswith("views") for layer in export.layers)  # the batch of two
    np.testing.assert_allclose(export.predict(x, verbose=0)[0], expected, atol=1e-5)


def test_members_must_agree_on_channels() -> None:
    from training.ensemble import merge
    from training.models import build_model

    with pytest.raises(ValueError, match="channels"):
        merge([build_model("edge-gap", (32, 32, 3)), build_model("edge-gap", (32, 32, 1))])
    with pytest.raises(ValueError, match="at least one"):
        merge([])


def test_cli_reports_a_missing_member_in_one_line(tmp_path: Path, capsys) -> None:
    from training.ensemble import main

    assert main(["--members", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nope' / 'model.keras'}")


def test_cli_names_a_member_that_is_no_keras_archive(tmp_path: Path, capsys) -> None:
    from training.ensemble import main

    member = tmp_path / "member"
    member.mkdir()
    (member / "model.keras").write_text("not a zip")
    assert main(["--members", f"{member},{member}", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: {member / 'model.keras'}: not a Keras .keras "
                                       "archive (corrupt or another format)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flip_tta", [False, True], ids=["plain", "flip-tta"])
def test_merged_ensemble_converts_with_class_maps(tiny_model: Path, tmp_path: Path,
                                                  flip_tta: bool) -> None:
    """Copies of one trained model (so parity is that model's) through the real converter; with
    flip_tta the mirrored pass goes through every writer too."""
    from convert.pipeline import ParityError, convert_model
    from ct_edge.classifier import Classifier
    from training.ensemble import build, main

    assert main(["--members", ",".join([str(tiny_model)] * 3), "--out", str(tmp_path / "e")]) == 0
    info = build([tiny_model] * 2, tmp_path / "ens", flip_tta=flip_tta)
    assert info["members"] == 2 and info["class_maps"]
    config = json.loads((tmp_path / "ens" / "config.json").read_text())
    assert config["arch"] == "ensemble" and config["seed"] == 0
    bundle = tmp_path / "bundle"
    try:
        manifest = convert_model(tmp_path / "ens" / "model.keras", bundle)
    except ParityError as exc:  # a tiny model: its manifest is the result, wherever it went
        manifest = exc.manifest
    assert manifest["explain"]["method"] == "cam"
    # ...and the first member's domain gate, so a foreign input is refused by the ensemble too
    assert manifest["domain"]["method"] == "mahalanobis" and (bundle / "domain.npz").is_file()
    statuses = {a["name"]: a["status"] for a in manifest["artifacts"]}
    assert statuses.get("onnx-fp32") == "passed" and statuses.get("tflite-fp32") == "passed"
    if flip_tta:  # every writer handles the mirror (TFLite REVERSE_V2, its ONNX form), int8 too
        assert set(statuses) >= {"tflite-int8", "onnx-int8", "tflite-fp16", "tflite-dynamic"}
        assert statuses["tflite-int8"] == "passed", statuses
    classifier = Classifier.from_bundle(bundle, artifact="onnx-fp32", threads=1)
    x = np.random.default_rng(0).random((1, 128, 128, 3), dtype=np.float32)
    p, maps = classifier.backend.predict_with_maps(x)
    assert p.shape == (1, 3) and maps.shape[0] == 1 and maps.shape[-1] == 3


def test_the_mixture_recipe_refuses_an_architecture(capsys) -> None:
    from training.train import main

    with pytest.raises(SystemExit):
        main(["--recipe", "mixture", "--arch", "edge-gap"])
    assert "drop --arch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--flip-tta"])  # flip averaging belongs to the one graph of a mixture
    assert "needs --recipe mixture" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--probe-uses-val"])  # edge-gap's validation split drives early stopping
    assert "needs --recipe probe or mixture" in capsys.readouterr().err


def test_a_mixture_member_cannot_be_a_mixture() -> None:
    from training.ensemble import fit_mixture
    from training.train import TrainConfig, fit_model

    config = TrainConfig(recipe="mixture", mixture_members=[{"recipe": "mixture"}])
    x, y = np.zeros((3, 32, 32, 3), np.float32), np.arange(3)
    with pytest.raises(ValueError, match="cannot itself be a mixture"):
        fit_mixture(fit_model, config, x, y, x, y)


@pytest.mark.slow
def test_the_mixture_recipe_trains_merges_calibrates_and_converts(synthetic_root: Path,
                                                                  tmp_path: Path) -> None:
    """`make train --recipe mixture` end to end, with two small members: one graph, its own
    temperature, the members' folders, the six artifacts (onnx-int8 of a graph that resizes
    inside included)."""
    import keras

    from convert.pipeline import ParityError, convert_model
    from training.ensemble import ensemble_members
    from training.train import TrainConfig, train

    out = tmp_path / "mixture"
    metrics = train(TrainConfig(
        data=str(synthetic_root), out=str(out), epochs=2, patience=2, cache=str(tmp_path / "cache"),
        recipe="mixture", arch="mixture", spec={"size": 96, "channels": 3}, abstention_folds=0,
        mixture_members=[{"arch": "edge-gap-resize128"}, {"arch": "edge-gap", "seed": 7}]))
    assert metrics["architecture"] == "mixture"
    assert {p.name for p in out.glob("member*")} == {"member0-edge-gap-resize128", "member1-edge-gap"}
    assert (out / "learning_curves.png").is_file() and (out / "gradcam.png").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "mixture" and config["calibration"]["fitted_on"] == "validation split"
    model = keras.models.load_model(out / "model.keras", compile=False)
    members = ensemble_members(model)
    assert [m.name for m in members] == ["member0_edge-gap-resize128", "member1_edge-gap"]
    assert model.input_shape == (None, 96, 96, 3)
    bundle = tmp_path / "bundle"
    try:
        manifest = convert_model(out / "model.keras", bundle)
    except ParityError as exc:  # a tiny model: its manifest is the result, wherever it went
        manifest = exc.manifest
    converted = {a["name"] for a in manifest["artifacts"] if a.get("sha256")}  # parity aside
    assert converted == {"tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8",
                         "onnx-fp32", "onnx-int8"}, manifest["artifacts"]
    # the domain gate reads the first member's pooled features, and the manifest says so
    assert manifest["domain"]["features"]["layer"] == \
        "input of 'logits' of member 'member0_edge-gap-resize128'"


# --- the output folder: replaced whole or not at all ------------------------------------------

@pytest.fixture
def member(tmp_path: Path) -> Path:
    """A model folder as training leaves it (model.keras, config.json), with a tiny model."""
    from training.models import build_model

    folder = tmp_path / "mem"
    folder.mkdir()
    build_model("edge-gap", (32, 32, 3), 3).save(folder / "model.keras")
    (folder / "config.json").write_text(json.dumps({"arch": "edge-gap", "seed": 0}))
    return folder


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_a_failed_build_leaves_the_earlier_ensemble_as_it_was(member: Path, tmp_path: Path,
                                                              capsys) -> None:
    """Its config.json made a folder: refused in one line, before model.keras is touched."""
    from training.ensemble import main

    out = tmp_path / "ens"
    assert main(["--members", str(member), "--out", str(out)]) == 0
    (out / "config.json").unlink()
    (out / "config.json").mkdir()
    before = _snapshot(out)
    assert main(["--members", f"{member},{member}", "--out", str(out)]) == 2
    assert _snapshot(out) == before
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: refusing to replace {out}") and "\n" not in err


def test_an_earlier_ensemble_is_replaced_whole_and_nothing_is_left_beside_it(
        member: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training import data as data_mod
    from training.ensemble import build

    out = tmp_path / "ens"
    build([member], out)
    before = _snapshot(out)

    def disk_full(path: Path, data: object) -> None:
        raise OSError(28, "No space left on device", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(data_mod, "write_json", disk_full)
        with pytest.raises(OSError, match="No space"):
            build([member, member], out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens", "mem"]
    info = build([member, member], out)
    assert info["members"] == 2 and sorted(p.name for p in out.iterdir()) == ["config.json",
                                                                             "model.keras"]
    assert json.loads((out / "config.json").read_text())["members"] == [str(member)] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens", "mem"]


def test_a_folder_that_is_not_an_ensemble_is_not_replaced(member: Path, capsys) -> None:
    from training.ensemble import main

    before = _snapshot(member)
    assert main(["--members", str(member), "--out", str(member)]) == 2
    assert "not an earlier ensemble" in capsys.readouterr().err
    assert _snapshot(member) == before


def test_an_ensemble_folder_holding_anything_else_is_not_replaced(member: Path, tmp_path: Path,
                                                                 capsys) -> None:
    from training.ensemble import build, main

    out = tmp_path / "ens"
    build([member], out)
    (out / "notes.txt").write_text("kept: --out would delete it with the folder")
    before = _snapshot(out)
    assert main(["--members", str(member), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not an earlier ensemble" in err and "it holds notes.txt" in err
    assert _snapshot(out) == before
