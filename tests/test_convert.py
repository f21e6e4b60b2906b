"""make convert: a tiny trained model becomes a bundle whose every artifact is proven by the runtime."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from easy_images import write_easy_images

from ct_edge import LABELS
from ct_edge.bundle import Bundle
from ct_edge.errors import BundleError

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # model input side: small enough to train and convert in seconds
ALL = ("tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8", "onnx-fp32", "onnx-int8")


@pytest.fixture(scope="module")
def easy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.keras + config.json from a ~3 s training run (reference CNN, 32 px, no augmentation)."""
    from ct_edge.preprocess import PreprocessSpec
    from training.train import TrainConfig, train

    base = tmp_path_factory.mktemp("convert")
    data = write_easy_images(base / "data", train_per_class=30, test_per_class=20)
    out = base / "model"
    train(TrainConfig(data=str(data), out=str(out), arch="reference", epochs=10, patience=10,
                      augment=False, cache=str(base / "cache"),
                      spec=PreprocessSpec(size=SIZE).to_dict()))
    return out / "model.keras"


@pytest.fixture(scope="module")
def converted(easy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """All six formats converted once; (bundle folder, returned manifest)."""
    from convert.pipeline import convert_model

    out = tmp_path_factory.mktemp("bundles") / "bundle"
    manifest = convert_model(easy_model, out)
    return out, manifest


def _dim_noise(n: int = 64) -> np.ndarray:
    """Noise far darker than any scan: calibration ranges too narrow for real inputs."""
    return np.random.default_rng(0).uniform(0.0, 0.1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


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
    assert _leftovers(out) == [], "no staging or backup folder is left beside the bundle"
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


# --- the gate fails when it must ------------------------------------------------------------------


def test_int8_calibrated_on_noise_fails_and_is_never_the_default(easy_model: Path,
                                                                 tmp_path: Path) -> None:
    from convert.pipeline import ParityError, convert_model

    out = tmp_path / "bundle"
    with pytest.raises(ParityError) as caught:
        convert_model(easy_model, out, formats=["tflite-int8", "tflite-fp32"],
                      calibration=_dim_noise(), log=None)
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


def _junk_table() -> tuple:
    """Two rows whose files convert but fail parity (as a broken converter release would)."""
    from convert.formats import FORMATS

    return tuple(replace(row, writer=lambda ctx: b"junk") for row in FORMATS[:2])


def test_every_artifact_failing_keeps_the_old_bundle_and_the_new_one_beside_it(
        converted, easy_model: Path, tmp_path: Path) -> None:
    from convert.pipeline import ParityError, convert_model

    out = tmp_path / "b"
    shutil.copytree(converted[0], out)
    before = _snapshot(out)
    rejected = tmp_path / "b.rejected"
    for _attempt in range(2):  # the second run replaces the first run's rejected bundle
        with pytest.raises(ParityError) as caught:
            convert_model(easy_model, out, table=_junk_table(), log=None)
        assert _snapshot(out) == before, "the working bundle is untouched"
        assert Bundle.load(out).select().name == "tflite-int8"
        assert caught.value.folder == rejected  # a BundleRejected
        assert any(r.startswith("every artifact failed") for r in caught.value.reasons)
        assert f"{out} was left as it was" in str(caught.value)
        assert f"rejected bundle is at {rejected}" in str(caught.value)
        assert caught.value.manifest["default"] is None
        assert json.loads((rejected / "manifest.json").read_text()) == caught.value.manifest
        assert "FAILED" in (rejected / "parity.md").read_text()
        assert _leftovers(out) == [] and _leftovers(rejected) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.rejected"]


def test_a_folder_of_another_kind_where_the_rejected_bundle_goes_is_refused_first(
        easy_model: Path, tmp_path: Path) -> None:
    from convert.pipeline import ConvertError, convert_model

    mine = tmp_path / "b.rejected"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match=f"refusing to replace {mine}: .* it holds notes.txt"):
        convert_model(easy_model, tmp_path / "b", table=_junk_table(), log=None)
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


# --- atomicity ----------------------------------------------------------------------------------


def test_interrupted_convert_leaves_the_previous_bundle(converted, easy_model: Path,
                                                       tmp_path: Path) -> None:
    from convert.formats import FORMATS
    from convert.pipeline import convert_model

    out = tmp_path / "bundle"
    shutil.copytree(converted[0], out)
    before = _snapshot(out)

    def interrupted(ctx) -> bytes:
        raise KeyboardInterrupt

    table = (FORMATS[4], replace(FORMATS[5], writer=interrupted))  # after onnx-fp32 is staged
    with pytest.raises(KeyboardInterrupt):
        convert_model(easy_model, out, table=table, log=None)
    assert _snapshot(out) == before
    assert _leftovers(out) == []
    Bundle.load(out).artifacts["tflite-int8"].read_verified()


def test_failed_swap_puts_the_previous_bundle_back(tmp_path: Path, monkeypatch) -> None:
    from convert import staging
    from training import folders

    out = tmp_path / "bundle"
    out.mkdir()
    old = json.dumps(dict.fromkeys(staging.MANIFEST_KEYS))
    (out / "manifest.json").write_text(old)
    staged = staging.prepare(out)
    (staged / "manifest.json").write_text('{"new": true}')
    real_rename = os.rename

    def rename(src, dst) -> None:
        if Path(src) == staged:
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(folders.os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        folders.install(staged, out)
    assert (out / "manifest.json").read_text() == old


def test_a_backup_orphaned_by_a_killed_swap_is_restored(tmp_path: Path) -> None:
    from convert import staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    out = tmp_path / "bundle"
    backup = tmp_path / f".bundle.old-{pid}-abcd"
    backup.mkdir()
    (backup / "manifest.json").write_text("{}")
    stale = tmp_path / f".bundle.convert-{pid}-xyz"
    stale.mkdir()
    staged = staging.prepare(out)
    assert (out / "manifest.json").read_text() == "{}"
    assert not backup.exists() and not stale.exists()
    shutil.rmtree(staged)


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(easy_model: Path, tmp_path: Path) -> None:
    from convert.pipeline import ConvertError, convert_model

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not a ct-edge bundle"):
        convert_model(easy_model, tmp_path, formats=["onnx-fp32"], log=None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _web_app(folder: Path, bundle: Path) -> None:
    """A web app: its manifest.json is no bundle's."""
    (folder / "manifest.json").write_text(json.dumps({"name": "My PWA", "start_url": "/"}))
    (folder / "index.html").write_text("<h1>precious</h1>")
    (folder / "assets").mkdir()
    (folder / "assets" / "app.js").write_text("")


def _bundle_and_a_note(folder: Path, bundle: Path) -> None:
    shutil.copytree(bundle, folder, dirs_exist_ok=True)
    (folder / "notes.txt").write_text("mine")


def _bundle_and_a_folder(folder: Path, bundle: Path) -> None:
    shutil.copytree(bundle, folder, dirs_exist_ok=True)
    (folder / "model_weights").mkdir()
    (folder / "model_weights" / "mine.bin").write_text("mine")


@pytest.mark.parametrize(("make", "holds"), [
    (_web_app, "it holds assets/, index.html, manifest.json;"),
    (lambda folder, bundle: (folder / "manifest.json").write_text("[1, 2]"), "manifest.json"),
    (lambda folder, bundle: (folder / "manifest.json").write_text("{not json"), "manifest.json"),
    (lambda folder, bundle: (folder / "parity.md").write_text("# mine"), "parity.md"),
    (_bundle_and_a_note, "it holds notes.txt, domain.npz, manifest.json, model_dynamic.tflite, "
                         "model_fp16.tflite and 6 more;"),
    (_bundle_and_a_folder, "it holds model_weights/, domain.npz,"),
], ids=["web-app", "manifest-not-an-object", "manifest-not-json", "no-manifest",
        "bundle-and-a-note", "bundle-and-a-folder"])
def test_only_a_folder_convert_wrote_is_replaced(converted, tmp_path: Path, make,
                                                 holds: str) -> None:
    from convert import staging
    from convert.pipeline import ConvertError

    site = tmp_path / "site"
    site.mkdir()
    make(site, converted[0])
    before = _tree(site)
    with pytest.raises(ConvertError) as caught:
        staging.prepare(site)
    message = str(caught.value)
    assert message.startswith(f"refusing to replace {site}: it is not empty and not a ct-edge "
                              "bundle"), message
    assert holds in message and "\n" not in message, message
    assert _tree(site) == before
    assert [p.name for p in tmp_path.iterdir()] == ["site"], "no staging folder was made"


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_a_format_file_not_named_as_a_bundle_file_is_refused(tmp_path: Path) -> None:
    from convert.formats import FORMATS
    from convert.pipeline import ConvertError, convert_model

    table = (replace(FORMATS[0], file="weights.tflite"),)
    with pytest.raises(ConvertError, match=r"'weights\.tflite' must be model_"):
        convert_model(tmp_path / "model.keras", tmp_path / "b", table=table, log=None)
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_bundle_and_a_bare_bundle_manifest_may_be_replaced(converted,
                                                                      tmp_path: Path) -> None:
    from convert import staging

    bundle = tmp_path / "bundle"
    shutil.copytree(converted[0], bundle)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps(dict.fromkeys(staging.MANIFEST_KEYS)))
    for out in (bundle, bare):
        shutil.rmtree(staging.prepare(out))  # no ConvertError


@pytest.mark.slow
def test_sigkilled_convert_leaves_the_previous_bundle(converted, easy_model: Path,
                                                     tmp_path: Path) -> None:
    from convert.pipeline import convert_model

    out = tmp_path / "bundle"
    shutil.copytree(converted[0], out)
    before = _snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "convert", "--model", str(easy_model),
                                "--out", str(out)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            staged = list(tmp_path.glob(".bundle.convert-*/model_*"))
            if staged:
                break
            time.sleep(0.05)
        assert process.poll() is None, "convert finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert _snapshot(out) == before
    assert _leftovers(out), "the killed run's staging folder is still there"
    convert_model(easy_model, out, formats=["onnx-fp32"], log=None)
    assert _leftovers(out) == [], "the next run cleans up after the killed one"
    assert [a["name"] for a in Bundle.load(out).manifest["artifacts"]] == ["onnx-fp32"]


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_missing_model_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    from convert.__main__ import main

    assert main(["--model", str(tmp_path / "none.keras"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: no model at {tmp_path / 'none.keras'}; run make train first"
    assert not (tmp_path / "b").exists()


def test_cli_unknown_format_is_exit_2(easy_model: Path, tmp_path: Path, capsys) -> None:
    from convert.__main__ import main

    assert main(["--model", str(easy_model), "--out", str(tmp_path / "b"),
                 "--formats", "tflite-int8,coreml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown format(s) coreml") and err.count("\n") == 1


def test_cli_help_shows_every_default(capsys) -> None:
    from convert.__main__ import build_parser

    text = build_parser().format_help()
    for flag in ("--model", "--out", "--data", "--formats", "--calibration-images", "--threads"):
        assert flag in text
    assert text.count("(default:") == 6


def test_cli_prints_the_table_and_exits_0(easy_model: Path, tmp_path: Path, capsys) -> None:
    from convert.__main__ import main

    out = tmp_path / "b"
    assert main(["--model", str(easy_model), "--out", str(out), "--formats", "onnx-fp32"]) == 0
    captured = capsys.readouterr()
    assert "| onnx-fp32 " in captured.out and f"wrote {out}" in captured.out
    assert "[1/1] onnx-fp32" in captured.err and "Traceback" not in captured.err


def test_cli_exits_1_naming_the_threshold_when_int8_fails(easy_model: Path, tmp_path: Path,
                                                          capsys, monkeypatch) -> None:
    from convert import dataset
    from convert.__main__ import main

    monkeypatch.setattr(dataset, "calibration_arrays", lambda *args: _dim_noise())
    out = tmp_path / "b"
    assert main(["--model", str(easy_model), "--out", str(out),
                 "--formats", "tflite-int8,onnx-fp32"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert any("tflite-int8" in line and "min_agreement" in line for line in errors)
    assert "FAILED" in captured.out and (out / "parity.md").is_file()
    assert Bundle.load(out).select().name == "onnx-fp32", "installed with the passing artifact"


def _model_folder(tmp_path: Path, config: dict, model: bytes | None = None) -> Path:
    """model.keras (a zip, or the bytes given) and config.json; no data needed to fail early."""
    import zipfile

    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.keras"
    if model is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", "{}")
    else:
        path.write_bytes(model)
    (folder / "config.json").write_text(json.dumps({"data": str(tmp_path), **config}))
    return path


@pytest.mark.parametrize(("config", "problem"), [
    ({"test_fraction": 1}, "each must be in [0, 1)"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "their sum below 1"),
    ({"seed": float("inf")}, "seed inf is not a whole number"),
    ({"seed": -3}, "seed -3 is not a whole number"),
])
def test_cli_unusable_split_settings_are_one_line_and_exit_2(config: dict, problem: str,
                                                             tmp_path: Path, capsys) -> None:
    from convert.__main__ import main

    model = _model_folder(tmp_path, config)
    assert main(["--model", str(model), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model.parent / 'config.json'}: unreadable training config")
    assert problem in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_cli_corrupt_model_is_named_as_such(tmp_path: Path, capsys) -> None:
    from convert.__main__ import main

    model = _model_folder(tmp_path, {}, model=b"\x00" * 64)
    assert main(["--model", str(model), "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == (f"error: {model}: not a Keras .keras archive (corrupt or "
                                       "another format)\n")


def test_cli_every_artifact_failing_exits_1_and_keeps_the_old_bundle(
        converted, easy_model: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from convert import pipeline
    from convert.__main__ import main

    out = tmp_path / "b"
    shutil.copytree(converted[0], out)
    before = _snapshot(out)
    monkeypatch.setattr(pipeline, "select", lambda names, table: _junk_table())
    assert main(["--model", str(easy_model), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    rejected = tmp_path / "b.rejected"
    assert f"wrote {rejected}/" in captured.out and "FAILED" in captured.out
    assert f"error: nothing installed: {out} was left as it was" in captured.err
    assert "Traceback" not in captured.err
    assert _snapshot(out) == before and (rejected / "parity.md").is_file()


def test_cli_a_corrupt_decode_cache_is_decoded_again(easy_model: Path, tmp_path: Path,
                                                     capsys) -> None:
    from convert.__main__ import main

    model = tmp_path / "model"
    shutil.copytree(easy_model.parent, model, ignore=shutil.ignore_patterns("cache"))
    config = json.loads((model / "config.json").read_text())
    shutil.copytree(config["cache"], tmp_path / "cache")
    (model / "config.json").write_text(json.dumps({**config, "cache": str(tmp_path / "cache")}))
    entries = sorted((tmp_path / "cache").rglob("*.npy"))
    assert entries
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:90])  # as a disk-full or killed write leaves them
    assert main(["--model", str(model / "model.keras"), "--out", str(tmp_path / "b"),
                 "--formats", "onnx-fp32"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_cli_an_unexpected_error_keeps_its_traceback_and_is_not_exit_1(tmp_path: Path, capsys,
                                                                      monkeypatch) -> None:
    import convert.__main__ as cli

    def bug(*args, **kwargs) -> dict:
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "convert_model", bug)
    assert cli.main(["--out", str(tmp_path / "b")]) == cli.EXIT_BUG != 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: a bug" in err
    assert err.rstrip().splitlines()[-1].startswith("error: convert failed unexpectedly (a bug")
