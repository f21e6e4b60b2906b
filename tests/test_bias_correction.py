"""Bias correction of full-int8 artifacts: found heads, measured offsets, weights restored."""

from __future__ import annotations

import numpy as np
import pytest


def _model(seed: int, size: int = 32):
    import keras

    from training.models import build_model

    keras.utils.set_random_seed(seed)
    model = build_model("edge-gap", (size, size, 3), 3)
    kernel, _ = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([kernel * 30, np.array([0.5, -0.5, 0.0], "f4")])
    return model


def test_heads_are_the_model_or_each_ensemble_member() -> None:
    from convert.bias_correction import heads
    from training.ensemble import merge

    single = _model(0)
    assert heads(single) == [single]
    ensemble = merge([_model(0), _model(1, 24)])
    assert [h.name for h in heads(ensemble)] == ["member0_edge-gap", "member1_edge-gap"]


def test_the_correction_removes_the_mean_int8_error_and_restores_the_weights() -> None:
    """Real conversions: after correcting, the int8 logits' mean error on the calibration images
    is smaller than before; outside the block the Keras weights are exactly the trained ones."""
    import keras

    from convert.bias_correction import LOGITS_LAYER, corrected, int8_outputs, offsets
    from convert.tflite_writer import full_int8

    model = _model(3)
    images = np.random.default_rng(0).random((40, 32, 32, 3), dtype=np.float32)
    logits = keras.Model(model.inputs, model.get_layer(LOGITS_LAYER).output)
    reference = logits.predict(images, verbose=0)
    found = offsets(model, images, full_int8)
    assert len(found) == 1 and found[0][1].shape == (3,)
    before = np.abs(found[0][1])
    saved = [w.copy() for w in model.get_layer(LOGITS_LAYER).get_weights()]
    with corrected(found):
        after = int8_outputs(full_int8(logits, images), images) - reference
    assert np.abs(after.mean(axis=0)).max() < before.max()
    for kept, now in zip(saved, model.get_layer(LOGITS_LAYER).get_weights(), strict=True):
        np.testing.assert_array_equal(kept, now)


def test_weights_are_restored_when_the_conversion_fails() -> None:
    from convert.bias_correction import LOGITS_LAYER, corrected

    model = _model(4)
    layer = model.get_layer(LOGITS_LAYER)
    saved = [w.copy() for w in layer.get_weights()]
    with pytest.raises(RuntimeError), corrected([(layer, np.ones(3, np.float32))]):
        assert not np.array_equal(layer.get_weights()[1], saved[1])
        raise RuntimeError("conversion failed")
    np.testing.assert_array_equal(layer.get_weights()[1], saved[1])


def test_the_head_error_tool_splits_the_error_into_offset_and_rest(tiny_model) -> None:
    from tools.int8_head_error import head_errors, main

    rows = head_errors(tiny_model / "model.keras")
    assert [r["images"] for r in rows] == ["calibration (training split)",
                                           "held out (validation + test)"]
    for r in rows:
        assert len(r["offset"]) == 3 and 0.0 <= r["rms_after_offset"] <= r["rms"] + 1e-9
    assert main(["--model", str(tiny_model / "nope.keras")]) == 2


def test_only_the_recipes_it_was_measured_to_help_are_corrected(tmp_path) -> None:
    import json

    from convert.bias_correction import wanted
    from convert.dataset import read_training_record

    assert wanted("probe") and wanted("mixture")
    assert not wanted("finetune") and not wanted(None)  # edge-gap: 248 -> 246 of 248 held out
    (tmp_path / "config.json").write_text(json.dumps({"recipe": "mixture", "seed": 0}))
    record = read_training_record(tmp_path)
    assert record is not None and record.recipe == "mixture"
