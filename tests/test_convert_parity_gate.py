"""make convert's parity gate fails when it must: int8 calibrated on noise, altered or broken
artifacts, every artifact failing (the old bundle kept, the rejected one beside it), and the
thresholds themselves."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import dim_noise, junk_table, leftovers, snapshot

from ct_edge.bundle import Bundle

# --- the gate fails when it must ------------------------------------------------------------------


def test_int8_calibrated_on_noise_fails_and_is_never_the_default(easy_model: Path,
                                                                 tmp_path: Path) -> None:
    from convert.pipeline import ParityError, convert_model

    out = tmp_path / "bundle"
    with pytest.raises(ParityError) as caught:
        convert_model(easy_model, out, formats=["tflite-int8", "tflite-fp32"],
                      calibration=dim_noise(), log=None)
    assert caught.value.reasons and all(r.startswith("tflite-int8") for r in caught.value.reasons)
    assert any("min_agreement" in r or "max_accuracy_drop" in r for r in caught.value.reasons)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == caught.value.manifest
    entries = {a["name"]: a for a in manifest["artifacts"]}
    assert entries["tflite-int8"]["status"] == "failed" and entries["tflite-int8"]["failures"]
    assert entries["tflite-fp32"]["status"] == "passed"
    assert manifest["default"] == "tflite-fp32"
    assert "FAILED" in (out / "parity.md").read_text()
    assert Bundle.load(out).select().name == "tflite-fp32"


def test_altered_or_broken_artifacts_fail_with_a_reason(easy_model: Path, tmp_path: Path) -> None:
    from convert import tflite_writer
    from convert.formats import FORMATS
    from convert.pipeline import convert_model

    def edit_fp32(ctx, edit) -> bytes:
        from tensorflow.lite.tools import flatbuffer_utils

        tree = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite_writer.write_fp32(ctx)))
        edit(tree, flatbuffer_utils)
        return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))

    def scale_largest_weights(tree, utils) -> None:
        from tensorflow.lite.python.schema_py_generated import TensorType

        floats = {t.buffer for t in tree.subgraphs[0].tensors if t.type == TensorType.FLOAT32}
        index = max(floats, key=lambda i: 0 if tree.buffers[i].data is None else tree.buffers[i].data.size)
        weights = tree.buffers[index].data.view(np.float32) * np.float32(1.5)
        tree.buffers[index].data = weights.view(np.uint8)

    def randomize_everything(tree, utils) -> None:
        utils.randomize_weights(tree, random_seed=1)  # also hits a Reshape's shape constant

    rows = {row.name: row for row in FORMATS}
    fp32 = rows["tflite-fp32"]
    table = (replace(fp32, writer=lambda ctx: edit_fp32(ctx, scale_largest_weights)),
             replace(fp32, name="tflite-random", file="model_random.tflite",
                     writer=lambda ctx: edit_fp32(ctx, randomize_everything)),
             replace(fp32, name="tflite-broken", file="model_broken.tflite",
                     writer=lambda ctx: b"not a model"),
             rows["onnx-fp32"])
    out = tmp_path / "bundle"
    manifest = convert_model(easy_model, out, table=table, log=None)  # tflite-int8 not asked for
    entries = {a["name"]: a for a in manifest["artifacts"]}
    assert entries["tflite-fp32"]["status"] == "failed"
    failures = entries["tflite-fp32"]["failures"]
    assert any("max_abs_diff" in reason for reason in failures), failures
    assert entries["tflite-random"]["status"] == "failed"
    assert entries["tflite-random"]["failures"][0].startswith("cannot run in the ct-edge runtime")
    assert entries["onnx-fp32"]["status"] == "passed" and manifest["default"] == "onnx-fp32"
    assert "tflite-broken" not in entries, "no file, so not a runtime artifact"
    (broken,) = manifest["failed_conversions"]
    assert broken["name"] == "tflite-broken" and broken["failures"][0].startswith("conversion failed")
    report = json.loads((out / "parity.json").read_text())
    assert {a["name"]: a["status"] for a in report["artifacts"]} == {
        "tflite-fp32": "failed", "tflite-random": "failed", "tflite-broken": "failed",
        "onnx-fp32": "passed"}


def test_every_artifact_failing_keeps_the_old_bundle_and_the_new_one_beside_it(
        converted, easy_model: Path, tmp_path: Path) -> None:
    from convert.pipeline import ParityError, convert_model

    out = tmp_path / "b"
    shutil.copytree(converted[0], out)
    before = snapshot(out)
    rejected = tmp_path / "b.rejected"
    for _attempt in range(2):  # the second run replaces the first run's rejected bundle
        with pytest.raises(ParityError) as caught:
            convert_model(easy_model, out, table=junk_table(), log=None)
        assert snapshot(out) == before, "the working bundle is untouched"
        assert Bundle.load(out).select().name == "tflite-int8"
        assert caught.value.folder == rejected  # a BundleRejected
        assert any(r.startswith("every artifact failed") for r in caught.value.reasons)
        assert f"{out} was left as it was" in str(caught.value)
        assert f"rejected bundle is at {rejected}" in str(caught.value)
        assert caught.value.manifest["default"] is None
        assert json.loads((rejected / "manifest.json").read_text()) == caught.value.manifest
        assert "FAILED" in (rejected / "parity.md").read_text()
        assert leftovers(out) == [] and leftovers(rejected) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.rejected"]
    # A later run that installs a bundle removes the stale rejected one: it was not this run's.
    from convert.formats import FORMATS

    lines: list[str] = []
    convert_model(easy_model, out, table=FORMATS[:1], log=lines.append)
    assert Bundle.load(out).select().name == FORMATS[0].name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert f"removed {rejected}: an earlier run's rejected bundle" in lines


def test_a_stale_rejected_bundle_that_cannot_be_removed_is_a_warning(
        converted, easy_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new bundle is installed by then: a failed removal must not turn into an error."""
    from convert.formats import FORMATS
    from convert.pipeline import convert_model

    out, rejected = tmp_path / "b", tmp_path / "b.rejected"
    shutil.copytree(converted[0], rejected)
    manifest = json.loads((rejected / "manifest.json").read_text())
    manifest["default"] = None
    (rejected / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(rejected)

    rename = os.rename

    def refuse_for_rejected(source: str | Path, target: str | Path) -> None:
        if Path(source) == rejected:
            raise PermissionError(1, "Operation not permitted")
        rename(source, target)

    monkeypatch.setattr(os, "rename", refuse_for_rejected)
    lines: list[str] = []
    convert_model(easy_model, out, table=FORMATS[:1], log=lines.append)
    assert Bundle.load(out).select().name == FORMATS[0].name
    assert f"warning: could not remove the stale {rejected} (Operation not permitted)" in lines
    assert snapshot(rejected) == before


def test_a_folder_of_another_kind_where_the_rejected_bundle_goes_is_refused_first(
        easy_model: Path, tmp_path: Path) -> None:
    from convert.pipeline import ConvertError, convert_model

    mine = tmp_path / "b.rejected"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match=f"refusing to replace {mine}: .* it holds notes.txt"):
        convert_model(easy_model, tmp_path / "b", table=junk_table(), log=None)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not (tmp_path / "b").exists()


def test_gate_thresholds() -> None:
    from convert.formats import FLOAT32_GATE, GATE
    from convert.parity import gate

    assert GATE.allowed_drop(60) == pytest.approx(1 / 60)  # one image is more than one point
    assert GATE.allowed_drop(1000) == pytest.approx(0.01)
    reference = {"test_images": 60, "accuracy": 0.95}
    ok = {"accuracy": 0.95 - 1 / 60, "agreement": 0.98, "disagreements": 1, "max_abs_diff": 1e-4}
    assert gate(ok, reference, FLOAT32_GATE) == []
    worse = {**ok, "accuracy": 0.95 - 2 / 60}
    assert ["max_accuracy_drop" in f for f in gate(worse, reference, GATE)] == [True]
    disagree = {**ok, "agreement": 0.97, "disagreements": 2}
    assert ["min_agreement" in f for f in gate(disagree, reference, GATE)] == [True]
    drift = {**ok, "max_abs_diff": 2e-4}
    assert gate(drift, reference, GATE) == []
    assert ["max_abs_diff" in f for f in gate(drift, reference, FLOAT32_GATE)] == [True]
    assert gate({**ok, "max_abs_diff": None, "finite": False}, reference, FLOAT32_GATE)


def test_a_removal_killed_after_its_rename_is_finished_not_undone(
        converted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between the rename and the removal leaves a leftover the next run deletes; had it
    been named a backup, `recover` would have put the stale rejected bundle back."""
    from convert import staging
    from training.folders import recover

    out, rejected = tmp_path / "b", tmp_path / "b.rejected"
    shutil.copytree(converted[0], rejected)
    manifest = json.loads((rejected / "manifest.json").read_text())
    manifest["default"] = None
    (rejected / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(staging.shutil, "rmtree", lambda path, ignore_errors=False: None)
    staging.drop_rejected(out)
    (leftover,) = tmp_path.iterdir()  # the kill: renamed, not yet removed
    monkeypatch.undo()
    recover(rejected)  # what the next run does first (this process counts as dead)
    assert list(tmp_path.iterdir()) == [], leftover
