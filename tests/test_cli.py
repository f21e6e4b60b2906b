"""`ct-edge` CLI contract: output formats, exit codes, bad inputs, bundle errors, help and info.

Most tests call `cli.main(argv)` in-process (fast); a few run the real console script or a fresh
interpreter where the process boundary is the point (no traceback, no TensorFlow imported).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_helpers import manifest_for, provenance_for, write_bundle

from ct_edge import DISCLAIMER, LABELS, __version__, cli
from ct_edge.cli import classify as classify_command
from ct_edge.cli import common
from ct_edge.preprocess import PreprocessSpec

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD = sorted(p for p in FIXTURES.iterdir() if p.suffix in (".png", ".jpg", ".dcm"))
JSON_KEYS = {"path", "label", "confidence", "status", "reason", "probabilities", "timings_ms",
             "error"}
SHARED_BUNDLE = os.environ.get("CT_EDGE_TEST_SHARED_BUNDLE") == "1"


# --- a bundle for the tests ----------------------------------------------------------------


def make_test_bundle(root: Path, uncertain_below: float = 0.5) -> Path:
    """A real, tiny bundle in `root`: an untrained Keras CNN (fixed seed) converted to fp32 TFLite,
    plus a hand-built ONNX model when `onnx` is installed, and the manifest `make convert` writes.

    Stands in for conftest's `tiny_bundle` (a trained one, ~1 minute to build); set
    CT_EDGE_TEST_SHARED_BUNDLE=1 to run these tests on that one instead.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    spec = PreprocessSpec()
    keras.utils.set_random_seed(7)
    # Large dense weights, so random features still give confident, image-dependent answers.
    model = keras.Sequential([
        keras.Input((spec.size, spec.size, spec.channels)),
        keras.layers.Conv2D(8, 5, strides=4, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(LABELS), activation="softmax",
                           kernel_initializer=keras.initializers.RandomNormal(stddev=20.0, seed=7)),
    ])
    models = {"tflite-fp32": tf.lite.TFLiteConverter.from_keras_model(model).convert()}
    with contextlib.suppress(ImportError):  # no ONNX artifact without `onnx`
        models["onnx-fp32"] = _onnx_model(np.random.default_rng(7))
    manifest = manifest_for(
        models, "tflite-fp32",
        provenance_for(hashlib.sha256(models["tflite-fp32"]).hexdigest(),
                       data_fingerprint="none (untrained test model)"),
        uncertain_below=uncertain_below,
        parity={"test_images": 12, "accuracy": 1.0, "agreement": 1.0, "max_abs_diff": 0.0})
    return write_bundle(root, models, manifest)


def _onnx_model(rng) -> bytes:
    """mean and mean square of the image -> linear -> softmax, as a hand-built ONNX graph."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = rng.normal(0.0, 8.0, (2, len(LABELS))).astype(np.float32)
    bias = rng.normal(0.0, 1.0, (len(LABELS),)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["mean4"], keepdims=1),
        helper.make_node("Flatten", ["mean4"], ["mean"], axis=1),
        helper.make_node("Mul", ["image", "image"], ["square"]),
        helper.make_node("ReduceMean", ["square", "axes"], ["square4"], keepdims=1),
        helper.make_node("Flatten", ["square4"], ["mean_square"], axis=1),
        helper.make_node("Concat", ["mean", "mean_square"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "w", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "ct_edge_test",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 128, 128, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", len(LABELS)])],
        [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
         numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                             ir_version=8).SerializeToString()


@pytest.fixture(scope="session")
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle every test reads (never modified; copy it with `bundle_copy` to tamper)."""
    if SHARED_BUNDLE:
        return request.getfixturevalue("tiny_bundle")
    return make_test_bundle(tmp_path_factory.mktemp("cli") / "bundle")


@pytest.fixture
def bundle_copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


@pytest.fixture
def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """`ct-edge ARGV` in-process -> (exit code, stdout, stderr)."""
    code = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def without_warnings(err: str) -> list[str]:
    """stderr lines, less `warning:` ones (a bundle whose artifact missed parity adds one)."""
    return [line for line in err.splitlines() if not line.startswith("warning: ")]


# --- classify: output contracts ------------------------------------------------------------


def test_json_lines_contract(capsys, bundle: Path, manifest: dict) -> None:
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, *GOOD)
    assert code == 0, err
    rows = records(out)
    assert [row["path"] for row in rows] == [str(p) for p in GOOD]
    for row in rows:
        assert set(row) == JSON_KEYS
        assert row["error"] is None
        assert set(row["probabilities"]) == set(manifest["labels"])
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
        assert row["confidence"] == row["probabilities"][row["label"]]
        assert row["status"] in ("ok", "uncertain", "out_of_domain")
        # Label order, whatever the probabilities (scripts can zip them with the labels).
        assert list(row["probabilities"]) == manifest["labels"]
    assert DISCLAIMER in err  # stdout stays pure JSON


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_every_format_fixture_classifies(capsys, bundle: Path, path: Path) -> None:
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, path)
    assert code == 0 and without_warnings(err) == [DISCLAIMER]
    (row,) = records(out)
    assert row["error"] is None and row["label"] in LABELS


def test_human_table(capsys, bundle: Path) -> None:
    code, out, err = run(capsys, "classify", "--bundle", bundle, *GOOD)
    assert code == 0 and without_warnings(err) == []
    lines = out.splitlines()
    assert lines[0].split() == ["FILE", "LABEL", "CONF", "STATUS", "OTHERS", "/", "REASON"]
    assert lines[-1] == DISCLAIMER
    rows = lines[1:1 + len(GOOD)]
    for path, line in zip(GOOD, rows, strict=True):
        assert line.startswith(str(path))
        assert line.split()[1].rstrip("?") in LABELS or line.split()[2].rstrip("?") in LABELS
        assert "%" in line
    # Aligned: the confidence column ends at the same place on every row.
    ends = {line.index("%") for line in rows}
    assert len(ends) == 1


def test_top_k(capsys, bundle: Path) -> None:
    code, out, _ = run(capsys, "classify", "--json", "--top-k", "1", "--bundle", bundle, GOOD[0])
    (row,) = records(out)
    assert code == 0 and list(row["probabilities"]) == [row["label"]]
    code, out, _ = run(capsys, "classify", "--json", "--top-k", "2", "--bundle", bundle, GOOD[0])
    (row,) = records(out)
    assert len(row["probabilities"]) == 2 and row["label"] in row["probabilities"]
    assert list(row["probabilities"]) == [label for label in LABELS if label in row["probabilities"]]
    _, out, _ = run(capsys, "classify", "--json", "--bundle", bundle, GOOD[0])
    (everything,) = records(out)
    top_two = sorted(everything["probabilities"], key=everything["probabilities"].get)[-2:]
    assert set(row["probabilities"]) == set(top_two)
    # Table: the label plus K-1 others; K larger than the number of classes means all of them.
    _, out, _ = run(capsys, "classify", "--top-k", "2", "--bundle", bundle, GOOD[0])
    assert out.splitlines()[1].count("%") == 2
    _, out, _ = run(capsys, "classify", "--top-k", "99", "--bundle", bundle, GOOD[0])
    assert out.splitlines()[1].count("%") == len(LABELS)
    _, out, _ = run(capsys, "classify", "--top-k", "1", "--bundle", bundle, GOOD[0])
    assert out.splitlines()[0].split()[:4] == ["FILE", "LABEL", "CONF", "STATUS"]


def test_csv(capsys, bundle: Path, manifest: dict, tmp_path: Path) -> None:
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    code, out, _ = run(capsys, "classify", "--csv", "--bundle", bundle, GOOD[0], bad)
    assert code == 1
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == ["path", "label", "confidence", "status", "reason", *manifest["labels"],
                        "error"]
    ok, failed = (dict(zip(table[0], row, strict=True)) for row in table[1:])
    assert ok["path"] == str(GOOD[0]) and ok["label"] in LABELS and ok["error"] == ""
    assert float(ok["confidence"]) == pytest.approx(max(float(ok[label]) for label in LABELS))
    assert ok["status"] in ("ok", "uncertain", "out_of_domain")
    assert failed["label"] == "" and failed["error"] == "empty file"
    # --top-k leaves the other classes' cells empty, the columns stay the same.
    _, out, _ = run(capsys, "classify", "--csv", "--top-k", "1", "--bundle", bundle, GOOD[0])
    header, row = list(csv.reader(io.StringIO(out)))
    assert header == table[0] and sum(cell != "" for cell in row[5:-1]) == 1


def test_quiet(capsys, bundle: Path) -> None:
    code, out, err = run(capsys, "classify", "--quiet", "--bundle", bundle, *GOOD[:2])
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 2 and DISCLAIMER not in out
    code, out, err = run(capsys, "classify", "-q", "--json", "--bundle", bundle, GOOD[0])
    assert code == 0 and err == "" and len(records(out)) == 1


def test_uncertain_results_are_marked(capsys, bundle_copy: Path) -> None:
    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["calibration"]["uncertain_below"] = 1.0  # nothing is ever that sure
    manifest_path.write_text(json.dumps(manifest))
    _, out, _ = run(capsys, "classify", "--json", "--bundle", bundle_copy, GOOD[0])
    (row,) = records(out)
    assert row["status"] == "uncertain" and row["label"] in LABELS
    assert row["reason"].split("; ")[0] == "confidence below 100%"
    _, out, _ = run(capsys, "classify", "--bundle", bundle_copy, GOOD[0])
    lines = out.splitlines()
    assert "uncertain" in lines[1].split()
    assert lines[-2].startswith("uncertain: a label is given but confidence below 100%")


def test_onnx_backend_and_artifact_choice(capsys, bundle: Path, manifest: dict) -> None:
    formats = {a["format"]: a["name"] for a in manifest["artifacts"]}
    if "onnx" not in formats:
        pytest.skip("bundle has no ONNX artifact (onnx not installed)")
    code, out, err = run(capsys, "classify", "--json", "--backend", "onnx", "--threads", "1",
                         "--bundle", bundle, *GOOD)
    assert code == 0, err
    assert all(row["error"] is None for row in records(out))
    code, out, _ = run(capsys, "classify", "--json", "--artifact", formats["onnx"],
                       "--bundle", bundle, GOOD[0])
    assert code == 0 and records(out)[0]["label"] in LABELS
    code, _, err = run(capsys, "classify", "--artifact", formats["tflite"], "--backend", "onnx",
                       "--bundle", bundle, GOOD[0])
    assert code == 2 and len(err.splitlines()) == 1 and "drop --backend" in err


def test_window_option_reaches_dicom(capsys, bundle: Path) -> None:
    dicom = FIXTURES / "ct_small.dcm"
    outputs = {}
    for window in ("lung", "mediastinum", "400,40"):
        code, out, err = run(capsys, "classify", "--json", "--window", window, "--bundle", bundle,
                             dicom)
        assert code == 0, err
        outputs[window] = records(out)[0]["probabilities"]
    assert outputs["lung"] != outputs["mediastinum"]


# --- classify: inputs ----------------------------------------------------------------------


def _tree(root: Path) -> dict[str, Path]:
    """A folder with nested images, a hidden file, a non-image and an extensionless DICOM."""
    (root / "a" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = {
        "png": root / "a" / "scan.png",
        "jpg": root / "a" / "deep" / "scan.JPG",
        "dcm": root / "a" / "deep" / "IM0001",
    }
    shutil.copy(FIXTURES / "gray8.png", files["png"])
    shutil.copy(FIXTURES / "rgb.jpg", files["jpg"])
    shutil.copy(FIXTURES / "ct_small.dcm", files["dcm"])
    shutil.copy(FIXTURES / "gray8.png", root / ".hidden" / "skip.png")
    (root / "a" / "._scan.png").write_bytes(b"\0\5\26\7 mac resource fork")
    (root / "a" / "notes.txt").write_text("not an image")
    os.mkfifo(root / "a" / "fifo")  # no suffix: sniffed for DICOM, and must not block the walk
    return files


def test_folders_are_searched_recursively(capsys, bundle: Path, tmp_path: Path) -> None:
    files = _tree(tmp_path / "scans")
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, tmp_path / "scans")
    assert code == 0, err
    assert sorted(row["path"] for row in records(out)) == sorted(map(str, files.values()))


def test_globs_are_expanded(capsys, bundle: Path, tmp_path: Path) -> None:
    files = _tree(tmp_path / "scans")
    code, out, _ = run(capsys, "classify", "--json", "--bundle", bundle,
                       f"{tmp_path}/scans/**/*.png", f"{tmp_path}/scans/a/deep/*.JPG")
    assert code == 0
    assert [row["path"] for row in records(out)] == [str(files["png"]), str(files["jpg"])]
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, f"{tmp_path}/*.nothing")
    assert code == 1 and error_lines(err) == [f"error: {tmp_path}/*.nothing: no files match this pattern"]


def test_duplicates_are_classified_once(capsys, bundle: Path) -> None:
    _, out, _ = run(capsys, "classify", "--json", "--bundle", bundle, GOOD[0], GOOD[0], FIXTURES)
    paths = [row["path"] for row in records(out)]
    assert len(paths) == len(set(paths)) == len(GOOD)


def test_empty_folder_is_an_input_error_and_others_still_run(capsys, bundle: Path,
                                                             tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, empty, GOOD[0])
    assert code == 1
    assert error_lines(err) == [f"error: {empty}: folder contains no PNG, JPEG or DICOM images"]
    bad, good = records(out)
    assert bad == {"path": str(empty), "label": None, "confidence": None, "status": None,
                   "reason": None, "probabilities": {}, "timings_ms": {},
                   "error": "folder contains no PNG, JPEG or DICOM images"}
    assert good["label"] in LABELS


def test_dicom_without_an_image_is_out_of_domain_not_an_error(capsys, bundle: Path,
                                                               tmp_path: Path) -> None:
    """A well-formed DICOM object with no pixels (a report, a plan) is refused, with a reason."""
    from test_preprocess import BAD_INPUTS

    make, _ = BAD_INPUTS["dicom without pixel data"]
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, make(tmp_path))
    (row,) = records(out)
    assert code == 0 and error_lines(err) == []
    assert row["status"] == "out_of_domain" and row["label"] is None and row["reason"]


@pytest.mark.parametrize("case", ["empty file", "truncated png", "truncated jpeg", "text named .png",
                                  "png bomb 50000x50000",
                                  "png over own limit", "missing path", "fifo", "gif"])
def test_bad_input_is_one_line_and_exit_1(capsys, bundle: Path, tmp_path: Path, case: str) -> None:
    from test_preprocess import BAD_INPUTS

    make, fragment = BAD_INPUTS[case]
    bad = make(tmp_path)
    for fmt in ("--json", "--csv", None):
        argv = ["classify", "--bundle", bundle, GOOD[0], bad, GOOD[1]]
        code, out, err = run(capsys, *argv, *([fmt] if fmt else []))
        assert code == 1
        (line,) = error_lines(err)
        assert line.startswith(f"error: {bad}: ") and fragment in line
        assert "Traceback" not in err
        if fmt == "--json":
            good1, failed, good2 = records(out)
            assert good1["label"] in LABELS and good2["label"] in LABELS
            assert failed["error"] and failed["label"] is None
        elif fmt is None:  # the table still lists both good files, and says one failed
            assert str(GOOD[0]) in out and str(GOOD[1]) in out
            assert "1 of 3 inputs could not be classified" in out


def test_permission_denied_is_one_line(capsys, bundle: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked.png"
    shutil.copy(FIXTURES / "gray8.png", locked)
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads any file: make the read fail the way chmod 000 would
        real = Path.read_bytes

        def read_bytes(self: Path) -> bytes:
            if self.name == "locked.png":
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, locked, GOOD[0])
    assert code == 1 and error_lines(err) == [f"error: {locked}: permission denied"]
    assert records(out)[1]["label"] in LABELS


def test_unexpected_exception_for_one_file_does_not_stop_the_batch(
        capsys, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ct_edge import classifier as module

    real = module.decode

    def decode(source, spec):
        if str(source).endswith("gray8.png"):
            raise RuntimeError("a bug")
        return real(source, spec)

    monkeypatch.setattr(module, "decode", decode)
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, *GOOD)
    assert code == 1
    (line,) = error_lines(err)
    assert "gray8.png: unexpected RuntimeError: a bug" in line
    assert sum(row["error"] is None for row in records(out)) == len(GOOD) - 1


# --- bundle errors: exit 2, one line, the model never runs ----------------------------------


def _no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from ct_edge import classifier

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an engine was opened on a bundle that should have been refused")

    monkeypatch.setattr(classifier, "open_backend", refuse)


def test_missing_bundle(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CT_EDGE_BUNDLE", raising=False)
    code, out, err = run(capsys, "classify", GOOD[0])
    assert code == 2 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith("error: no model bundle at")
    assert "--bundle" in err and "CT_EDGE_BUNDLE" in err
    code, _, err = run(capsys, "info", "--bundle", tmp_path / "nowhere")
    assert code == 2 and err.startswith("error: no model bundle at")


def test_unknown_schema_version(capsys, bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_engine(monkeypatch)
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    for command in ("classify", "info"):
        code, out, err = run(capsys, command, "--bundle", bundle_copy,
                             *([GOOD[0]] if command == "classify" else []))
        assert code == 2 and out == ""
        assert len(err.splitlines()) == 1 and "unknown schema_version 99" in err
        assert "upgrade ct-edge or rebuild" in err


def test_tampered_model_is_never_run(capsys, bundle_copy: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from ct_edge.bundle import Bundle

    default = Bundle.load(bundle_copy).select()  # what `classify` would run
    _no_engine(monkeypatch)
    model = default.path
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    model.write_bytes(bytes(data))
    code, out, err = run(capsys, "classify", "--bundle", bundle_copy, GOOD[0])
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert "does not match its sha256" in err and "will not be run" in err and "re-copy" in err
    # info shows which file is bad, and fails too.
    code, out, err = run(capsys, "info", "--bundle", bundle_copy)
    assert code == 2 and "sha256 mismatch" in out
    assert error_lines(err) == [err.strip()] and default.name in err


@pytest.mark.parametrize("change", [{"bytes": float("inf")}, {"file": "domain\x00.npz"}],
                         ids=["bytes 1e999", "NUL in file"])
def test_a_malformed_domain_section_is_one_line_and_exit_2(capsys, bundle_copy: Path,
                                                          change: dict) -> None:
    """Both were a traceback and exit 1 (OverflowError; ValueError from os.open)."""
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["domain"] = {"modality": "xray", "method": "max_logit", "threshold": 3.0,
                          "file": "domain.npz", "sha256": "0" * 64, "bytes": 100, **change}
    path.write_text(json.dumps(manifest))
    for argv in (["classify", GOOD[0]], ["info"]):
        code, _, err = run(capsys, *argv, "--bundle", bundle_copy)
        assert code == 2, argv
        assert error_lines(err) == [err.strip()] and str(path) in err and "\x00" not in err


def test_each_command_that_runs_an_artifact_warns_when_it_missed_parity(
        capsys, bundle_copy: Path) -> None:
    """classify warned; explain ran such an artifact silently (so did listen and serve)."""
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = next(a for a in manifest["artifacts"] if a["name"] == manifest["default"])
    entry["status"] = "failed"
    path.write_text(json.dumps(manifest))
    warning = (f"warning: artifact {entry['name']!r} has parity status 'failed'; its answers "
               "may differ from the reference model")
    for command in (["classify"], ["explain", "--json", "--method", "occlusion"]):
        code, _, err = run(capsys, *command, "--bundle", bundle_copy, GOOD[0])
        assert code == 0 and warning in err.splitlines(), command
        code, _, err = run(capsys, *command, "--quiet", "--bundle", bundle_copy, GOOD[0])
        assert code == 0 and warning not in err, command


def test_bundle_from_environment_then_default_folder(capsys, bundle: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CT_EDGE_BUNDLE", str(bundle))
    code, out, _ = run(capsys, "classify", "--json", GOOD[0])
    assert code == 0 and records(out)[0]["label"] in LABELS
    monkeypatch.delenv("CT_EDGE_BUNDLE")
    shutil.copytree(bundle, tmp_path / "artifacts" / "bundle")
    code, out, _ = run(capsys, "classify", "--json", GOOD[0])
    assert code == 0 and records(out)[0]["label"] in LABELS


# --- usage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    [], ["classify"], ["classify", "--top-k", "0", "x.png"], ["classify", "--threads", "two", "x.png"],
    ["classify", "--window", "bone", "x.png"], ["classify", "--json", "--csv", "x.png"],
    ["classify", "--backend", "tensorrt", "x.png"], ["frobnicate"], ["info", "extra"],
])
def test_usage_errors_exit_2_with_one_line(capsys, argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert "error:" in err.splitlines()[-1] and "Traceback" not in err
    assert len(err.splitlines()) <= 2  # `ct-edge` alone also prints the usage line


def test_unknown_artifact(capsys, bundle: Path) -> None:
    code, _, err = run(capsys, "classify", "--artifact", "nope", "--bundle", bundle, GOOD[0])
    assert code == 2 and len(err.splitlines()) == 1 and "choose one of" in err


def test_version(capsys) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"ct-edge {__version__}"


@pytest.mark.parametrize("command", [[], ["classify"], ["explain"], ["info"], ["batch"],
                                     ["serve"], ["listen"], ["results"]])
def test_help_has_examples_and_every_default(capsys, command: list[str]) -> None:
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0 and "examples:" in out and "ct-edge " in out
    parser = cli.build_parser()
    if command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)) \
            .choices[command[0]]
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "version") \
                and not action.required:
            assert "default" in action.help, action.option_strings


# --- info ----------------------------------------------------------------------------------


def test_info_text(capsys, bundle: Path, manifest: dict) -> None:
    code, out, err = run(capsys, "info", "--bundle", bundle)
    assert code == 0 and err == ""
    assert ", ".join(manifest["labels"]) in out
    assert "128x128" in out and "float32" in out and "NHWC" in out
    assert "1500,-600" in out and "lung" in out
    assert f"default       {manifest['default'] or '(none'}" in out
    explain = "cam from the" if manifest.get("explain") else "not recorded (explain uses class"
    assert f"explain       {explain}" in out
    for artifact in manifest["artifacts"]:
        (line,) = [row for row in out.splitlines() if row.startswith(artifact["name"] + " ")]
        assert artifact["format"] in line and artifact["status"] in line and " ok " in line
        assert any(unit in line for unit in (" B ", "KiB", "MiB"))
        assert f"(on {artifact['parity']['test_images']} test images)" in line
    assert "provenance" in out
    for value in manifest.get("provenance", {}).values():
        if isinstance(value, str):
            assert value in out


def test_info_json(capsys, bundle: Path, manifest: dict) -> None:
    code, out, _ = run(capsys, "info", "--json", "--bundle", bundle)
    data = json.loads(out)
    assert code == 0 and data["manifest"] == manifest
    assert data["checks"] == {a["name"]: "ok" for a in manifest["artifacts"]}
    assert data["domain_gate"] == ("ok" if "method" in manifest.get("domain", {}) else None)
    assert data["problems"] == {}


def test_info_checks_the_domain_gate_file_as_classify_does(capsys, tiny_bundle: Path,
                                                           tmp_path: Path) -> None:
    """A damaged domain.npz made classify refuse the bundle while info said every file was ok."""
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    gate = copy / json.loads((copy / "manifest.json").read_text())["domain"]["file"]
    data = bytearray(gate.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gate.write_bytes(bytes(data))
    code, out, err = run(capsys, "info", "--bundle", copy)
    assert code == 2 and "does not match its sha256" in err and len(err.splitlines()) == 1
    assert f"{gate.name}: sha256 mismatch" in out
    code, out, _ = run(capsys, "info", "--json", "--bundle", copy)
    data = json.loads(out)
    assert code == 2 and data["domain_gate"] == "sha256 mismatch"
    assert "does not match its sha256" in data["problems"][gate.name]


# --- the real process ----------------------------------------------------------------------


def _console_script() -> str:
    script = Path(sys.executable).with_name("ct-edge")
    if not script.exists():
        pytest.skip("ct-edge console script not installed next to this interpreter")
    return str(script)


def test_console_script_end_to_end(bundle: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    result = subprocess.run([_console_script(), "classify", "--bundle", str(bundle),
                             str(GOOD[0]), str(empty)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert without_warnings(result.stderr) == [f"error: {empty}: empty file"]  # no engine INFO
    assert result.stdout.splitlines()[-1] == DISCLAIMER
    result = subprocess.run([_console_script(), "classify", "--bundle", str(tmp_path), str(GOOD[0])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_classification_never_imports_tensorflow(bundle: Path) -> None:
    code = (
        "import sys\n"
        "from ct_edge.classifier import Classifier\n"
        f"c = Classifier.from_bundle({str(bundle)!r})\n"
        f"p = c.predict({str(GOOD[0])!r})\n"
        "assert p.label\n"
        "from ct_edge import cli\n"
        f"assert cli.main(['classify', '-q', '--bundle', {str(bundle)!r}, {str(FIXTURES)!r}]) == 0\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False False"


def test_help_starts_without_numpy() -> None:
    code = ("import sys\nfrom ct_edge import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('numpy', 'PIL', 'ai_edge_litert', 'onnxruntime') "
            "if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[-1] == "[]"


# --- the progress bar ----------------------------------------------------------------------


def test_progress_bar_draws_and_clears() -> None:
    stream = io.StringIO()
    bar = common.Progress(40, stream, enabled=True, interval=0.0)
    for _ in range(20):
        bar.update()
    assert "20/40" in stream.getvalue() and "#" * 12 in stream.getvalue()
    bar.clear()
    assert stream.getvalue().endswith("\r")
    bar.update(20)
    bar.close()
    assert "40/40" in stream.getvalue() and stream.getvalue().endswith("\r")
    quiet = io.StringIO()
    off = common.Progress(40, quiet, enabled=False)
    off.update(40)
    off.close()
    assert quiet.getvalue() == ""


def test_progress_only_on_a_terminal_with_many_files(capsys, bundle: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(common.PROGRESS_MIN_FILES + 1):
        shutil.copy(FIXTURES / "gray8.png", tmp_path / f"{i:03}.png")
    drawn = []
    monkeypatch.setattr(common.Progress, "draw", lambda self, now=None: drawn.append(self.done))
    monkeypatch.setattr(classify_command, "isatty", lambda stream: stream is sys.stderr)
    code, _, _ = run(capsys, "classify", "--json", "--bundle", bundle, tmp_path)
    assert code == 0 and drawn and drawn[-1] == common.PROGRESS_MIN_FILES + 1
    drawn.clear()
    run(capsys, "classify", "--json", "--quiet", "--bundle", bundle, tmp_path)
    run(capsys, "classify", "--json", "--bundle", bundle, *GOOD)  # too few files
    assert drawn == []


# --- results -------------------------------------------------------------------------------


def stored_results(data_dir: Path) -> Path:
    """A results store in `data_dir` with one answered row."""
    from ct_edge.store import Store

    with Store(data_dir) as store:
        store.add(source="scan.png", origin="test", status="ok", label="Normal",
                  probabilities={"COVID-19": 0.1, "Normal": 0.8, "Viral Pneumonia": 0.1})
    return data_dir


def test_results_table_is_followed_by_the_disclaimer(capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "results", "--data-dir", stored_results(tmp_path))
    assert code == 0 and "Normal 80.0%" in out
    assert out.splitlines()[-2:] == ["1 of 1 shown, newest first", DISCLAIMER] and not err


def test_results_json_stays_one_row_per_line_with_the_disclaimer_on_stderr(
        capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "results", "--data-dir", stored_results(tmp_path), "--json")
    (row,) = records(out)
    assert code == 0 and row["label"] == "Normal" and "disclaimer" not in row
    assert err.splitlines() == [DISCLAIMER]


def test_results_filters_default_to_everything() -> None:
    results = cli.build_parser().parse_args(["results"])
    assert (results.status, results.label, results.series) == (None, None, False)


# --- paths that are not valid UTF-8 -----------------------------------------------------------


def _undecodable_copy(folder: Path) -> str:
    """A copy of gray8.png whose name holds a byte that is not UTF-8 (b'bad\\xff.png')."""
    path = os.fsdecode(os.path.join(os.fsencode(folder), b"bad\xff.png"))
    try:
        shutil.copy(FIXTURES / "gray8.png", path)
    except (OSError, UnicodeError):
        pytest.skip("this file system only takes UTF-8 names")
    return path


def test_undecodable_file_names_are_escaped_in_every_format(capsys, bundle: Path,
                                                            tmp_path: Path) -> None:
    bad = _undecodable_copy(tmp_path)
    shown = f"{tmp_path}/bad\\xff.png"
    code, out, err = run(capsys, "classify", "--json", "--bundle", bundle, bad, GOOD[0])
    assert code == 0, err
    first, second = (json.loads(line) for line in out.encode("utf-8").splitlines())
    assert first["path"] == shown and first["error"] is None and second["path"] == str(GOOD[0])
    code, out, _ = run(capsys, "classify", "--csv", "--bundle", bundle, bad, GOOD[0])
    rows = list(csv.reader(io.StringIO(out)))
    assert code == 0 and [row[0] for row in rows[1:]] == [shown, str(GOOD[0])]
    code, out, _ = run(capsys, "classify", "--bundle", bundle, bad, GOOD[0])
    lines = out.splitlines()
    assert code == 0 and lines[1].startswith(shown) and lines[2].startswith(str(GOOD[0]))
    code, out, _ = run(capsys, "explain", "--json", "--bundle", bundle, bad)
    assert code == 0 and records(out)[0]["path"] == shown


# --- explain: where figures go -------------------------------------------------------------


def test_explain_refuses_an_output_that_would_replace_an_input(capsys, bundle: Path,
                                                                tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = scans / "gray8.png"
    shutil.copy(FIXTURES / "gray8.png", scan)
    original = scan.read_bytes()
    (tmp_path / "link.png").symlink_to(scan)
    for argv in ([scans, "-o", f"{scans}/"], [scan, "-o", scan], [scan, "-o", tmp_path / "link.png"]):
        code, out, err = run(capsys, "explain", "--json", "--bundle", bundle, *argv)
        assert code == 2 and out == "" and "Traceback" not in err
        (line,) = error_lines(err)
        assert f"would replace the input {scan}" in line and "choose another -o" in line
    assert scan.read_bytes() == original and sorted(p.name for p in scans.iterdir()) == [scan.name]


def test_explain_never_replaces_anything_but_a_regular_file(capsys, bundle: Path,
                                                           tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.png"  # stands in for a device: both are special files
    os.mkfifo(fifo)
    code, out, err = run(capsys, "explain", "--json", "--bundle", bundle, GOOD[0], "-o", fifo)
    assert code == 2 and out == ""
    assert error_lines(err) == [f"error: -o {fifo} exists and is not a regular file; "
                                "choose another -o"]
    assert fifo.is_fifo()


def test_explain_usage_errors_create_no_output_folder(capsys, bundle: Path, tmp_path: Path) -> None:
    new = tmp_path / "heatmaps"
    for options in (["--target", "Flu", "--bundle", bundle], ["--bundle", tmp_path / "none"]):
        code, _, err = run(capsys, "explain", *options, GOOD[0], GOOD[1], "-o", f"{new}/")
        assert code == 2 and len(error_lines(err)) == 1
        assert not new.exists()


def test_explain_goes_on_when_one_figure_cannot_be_written(capsys, bundle: Path,
                                                           tmp_path: Path) -> None:
    scans, out_dir = tmp_path / "in", tmp_path / "out"
    scans.mkdir()
    (out_dir / "a.png").mkdir(parents=True)  # where a.png's figure should go
    os.mkfifo(out_dir / "c.png")
    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(FIXTURES / "gray8.png", scans / name)
    code, out, err = run(capsys, "explain", "--json", "--bundle", bundle, scans, "-o", f"{out_dir}/")
    assert code == 1 and "Traceback" not in err
    assert error_lines(err) == [f"error: {scans / name}: cannot write {out_dir / name}: it exists "
                                "and is not a regular file" for name in ("a.png", "c.png")]
    a, b, c = records(out)
    assert a["output"] is None and a["error"] and c["output"] is None and c["error"]
    assert b["output"] == str(out_dir / "b.png") and b["error"] is None
    assert (out_dir / "b.png").is_file() and (out_dir / "a.png").is_dir() and (out_dir / "c.png").is_fifo()
    # Text: a line for the written figure only, and the exit code `explain --help` gives for it.
    code, out, err = run(capsys, "explain", "-q", "--bundle", bundle, scans, "-o", f"{out_dir}/")
    assert code == 1 and len(error_lines(err)) == 2
    (line,) = out.splitlines()
    assert line.startswith(f"{out_dir / 'b.png'}: ")
    _, out, _ = run(capsys, "explain", "--help")
    assert "1 some inputs failed: unreadable, or their figure could not be" in out


# --- output that cannot be written ---------------------------------------------------------


def test_full_disk_on_stdout_is_one_line(bundle: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        result = subprocess.run([_console_script(), "classify", "--json", "--bundle", str(bundle),
                                 str(GOOD[0])], stdout=full, stderr=subprocess.PIPE, text=True,
                                timeout=120)
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: cannot write output: No space left on device"]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_closed_stdout_is_one_line(bundle: Path) -> None:
    result = subprocess.run([_console_script(), "classify", "--bundle", str(bundle), str(GOOD[0])],
                            stderr=subprocess.PIPE, text=True, timeout=120,
                            preexec_fn=lambda: os.close(1))  # as `ct-edge classify x.png >&-`
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: cannot write output: Bad file descriptor"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["classify", "explain"])
def test_an_image_past_pillows_warning_size_is_one_error_line(bundle: Path, tmp_path: Path,
                                                              command: str) -> None:
    """Over Pillow's warning threshold (89.5 M pixels) but under its hard limit: ct-edge refuses it
    by its own limit, and Pillow's two-line DecompressionBombWarning must not come with it."""
    from tools.fuzz.images import png_image

    big = tmp_path / "big.png"
    big.write_bytes(png_image(10_098, 10_098))  # 102 M pixels, a header and no data
    result = subprocess.run([_console_script(), command, "--quiet", "--json", "--bundle",
                             str(bundle), str(big)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {big}: ") and "pixel limit" in line


def test_serve_with_stdout_closed_stops_cleanly(bundle: Path, tmp_path: Path) -> None:
    """Its first line cannot be written: one error line, and the server and store are closed."""
    result = subprocess.run([_console_script(), "serve", "--bundle", str(bundle), "--port", "0",
                             "--data-dir", str(tmp_path / "data")], stderr=subprocess.PIPE,
                            text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: cannot write output: Bad file descriptor"]
    assert "ct-edge serve: stopping" in result.stderr and "Traceback" not in result.stderr
