"""Regression tests for defects found walking through ct-edge as a new user (one section each)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import GOOD
from PIL import Image

from ct_edge import cli
from ct_edge import explain as explain_module
from ct_edge.classifier import Classifier
from ct_edge.errors import EMPTY_PATH, BundleError, InputError
from ct_edge.limits import MAX_PIXELS, MEMORY_BOUND_MB, STRIP_ROWS
from ct_edge.preprocess import (
    PreprocessSpec,
    check_window,
    decode,
    parse_window,
    to_gray,
)

# --- --window: one validator for the CLI, parse_window and PreprocessSpec ---------------------

BAD_WINDOWS = ["inf,0", "400,inf", "1e400,0", "nan,0", "400,nan", "-inf,0", "0,40", "0.5,40",
               "1e9,0", "400,1e9"]


@pytest.mark.parametrize("text", BAD_WINDOWS)
def test_window_not_finite_or_out_of_range_is_refused_by_both(text: str) -> None:
    with pytest.raises(ValueError, match="window") as parsed:
        parse_window(text)
    width, level = (float(part) for part in text.split(","))
    with pytest.raises(ValueError, match="window") as built:
        PreprocessSpec(window=(width, level))
    assert str(parsed.value) == str(built.value)  # the same validator said it


def test_window_limits_are_inclusive_and_sane() -> None:
    assert check_window(1.0, 0.0) == (1.0, 0.0)
    assert check_window(65_536.0, -65_536.0) == (65_536.0, -65_536.0)
    with pytest.raises(ValueError, match="window"):
        check_window(65_537.0, 0.0)
    assert parse_window("4000,-1024") == (4000.0, -1024.0)
    assert PreprocessSpec(window=(1500.0, -600.0)).window == (1500.0, -600.0)


@pytest.mark.parametrize("command", ["classify", "explain", "batch"])
@pytest.mark.parametrize("window", ["inf,0", "400,inf", "1e400,0"])
def test_cli_window_infinite_is_a_usage_error(capsys, bundle: Path, tmp_path: Path,
                                              command: str, window: str) -> None:
    extra = {"classify": [], "explain": ["--json"], "batch": ["--out", str(tmp_path / "out")]}
    code = cli.main([command, f"--window={window}", "--bundle", str(bundle), *extra[command],
                     str(GOOD[0])])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    assert "window" in err.splitlines()[-1] and len(err.splitlines()) <= 2


# --- explain: the peak in the input image's own pixels, also for draft-decoded JPEGs ----------


def _blob_image(width: int, height: int, centre: tuple[int, int]) -> Image.Image:
    """A dark image with one smooth bright blob at `centre` (x, y)."""
    yy, xx = np.mgrid[0:height, 0:width]
    blob = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * 40.0**2))
    return Image.fromarray(np.rint(40 + 200 * blob).astype(np.uint8), mode="L")


def test_explain_peak_is_in_real_pixels_for_a_large_jpeg(bundle: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The heat is the model input itself, so the peak is where the blob is.
    monkeypatch.setattr(explain_module, "occlusion_heatmap", lambda c, x, i: x[:, :, 0].copy())
    classifier = Classifier.from_bundle(bundle)
    image, centre = _blob_image(1944, 1708, (1500, 400)), (1500, 400)
    image.save(tmp_path / "film.png")
    image.save(tmp_path / "film.jpg", quality=95)
    rotated = tmp_path / "rotated.jpg"  # stored 1708 x 1944, shown 1944 x 1708 (EXIF 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.transpose(Image.Transpose.ROTATE_90).save(rotated, quality=95, exif=exif)
    assert decode(tmp_path / "film.jpg", classifier.spec).size[0] < 1944 / 4  # draft-decoded
    # A model pixel spans 13 input pixels here, and the draft's centre crop is rounded in 1/8-scale
    # pixels: the two files' model inputs differ by that much, no more.
    one_model_pixel = 1708 / classifier.spec.size + 8
    peaks = {}
    for name in ("film.png", "film.jpg", "rotated.jpg"):
        e = explain_module.explain(classifier, tmp_path / name, method="occlusion")
        assert e.source_size == (1944, 1708)
        peaks[name] = (e.peak["x"], e.peak["y"])
        assert peaks[name] == pytest.approx(centre, abs=one_model_pixel)
        assert (e.peak["x_rel"], e.peak["y_rel"]) == pytest.approx((1500 / 1944, 400 / 1708),
                                                                  abs=0.01)
    assert peaks["film.jpg"] == pytest.approx(peaks["film.png"], abs=one_model_pixel)


# --- memory: any accepted input stays within MEMORY_BOUND_MB of peak RSS -------------------------


def test_gray_conversion_in_strips_is_exact() -> None:
    rng = np.random.default_rng(0)
    rows = STRIP_ROWS * 2 + 37  # several strips and a short last one
    deep = rng.integers(0, 4096, (rows, 300), dtype=np.uint16)
    expected = np.clip(deep.astype(np.float32) / (2.0**12 - 1.0), 0.0, 1.0)
    np.testing.assert_array_equal(np.asarray(to_gray(Image.fromarray(deep))), expected)
    rgba = Image.fromarray(rng.integers(0, 256, (rows, 300, 4), dtype=np.uint8), "RGBA")
    over_black = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    np.testing.assert_array_equal(np.asarray(to_gray(rgba)), np.asarray(over_black.convert("L")))
    rgb = rgba.convert("RGB")
    np.testing.assert_array_equal(np.asarray(to_gray(rgb)), np.asarray(rgb.convert("L")))


def test_the_pixel_limit_covers_the_largest_detectors_only() -> None:
    assert 4300 * 4300 <= MAX_PIXELS < 7990 * 7990  # CR/DX panels fit; the 926 MB file does not


@pytest.mark.parametrize("kind", ["png-16bit", "dicom-ct",  # the two largest peaks
                                  pytest.param("png-rgba", marks=pytest.mark.slow)])
def test_peak_rss_of_the_largest_accepted_input_is_within_the_bound(
        bundle: Path, tmp_path: Path, kind: str) -> None:
    from benchmarks.memory import artifact_memory, limit_input

    image = limit_input(tmp_path, kind)
    # onnxruntime starts ~18 MB above LiteRT: the heavier engine when the bundle has it.
    onnx = (bundle / "model_fp32.onnx").is_file()
    measured = artifact_memory(bundle, "onnx-fp32" if onnx else "tflite-fp32", image)
    assert measured["label"] is not None
    assert measured["peak_rss_mb"] <= MEMORY_BOUND_MB, measured


# --- files written through a temp file + rename get the umask's mode, not mkstemp's 0600 -------


def _expected_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def test_saved_heatmap_is_readable_by_others(bundle: Path, tmp_path: Path) -> None:
    e = explain_module.explain(Classifier.from_bundle(bundle), GOOD[0], method="occlusion")
    path = explain_module.save(e, tmp_path / "heat.png")
    assert stat.S_IMODE(path.stat().st_mode) == _expected_mode()


def test_training_and_convert_outputs_are_readable_by_others(tiny_model: Path,
                                                            tiny_bundle: Path) -> None:
    files = [path for path in tiny_model.iterdir() if path.is_file()]
    assert {"model.keras", "metrics.json", "config.json"} <= {path.name for path in files}
    files += [path for path in tiny_bundle.iterdir() if path.is_file()]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == _expected_mode(), path.name
    assert stat.S_IMODE(tiny_bundle.stat().st_mode) & 0o555 == 0o555  # others may list it


# --- bundle errors on a device say what to do there (a device has no Makefile) ---------------


def test_a_tampered_bundle_says_what_to_do_on_a_device(bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    model = next(copy.glob("*.tflite"))
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError) as error:
        Classifier.from_bundle(copy, artifact="tflite-fp32")
    assert "re-copy the bundle" in str(error.value)
    assert "on the build machine: `make convert`" in str(error.value)


def test_no_runtime_message_sends_a_device_user_to_make() -> None:
    runtime = Path(cli.__file__).resolve().parents[1]
    for path in runtime.rglob("*.py"):
        text = path.read_text()
        for found in re.finditer(r"`make ", text):
            before = text[max(0, found.start() - 90) : found.start()]
            assert "build machine" in before, f"{path.name}: ...{before}{text[found.start():][:20]}"


# --- CLI -----------------------------------------------------------------------------------------


def test_explain_several_inputs_with_a_png_output_is_a_usage_error(capsys, bundle: Path,
                                                                   tmp_path: Path) -> None:
    target = tmp_path / "two.png"
    code = cli.main(["explain", "--bundle", str(bundle), str(GOOD[0]), str(GOOD[1]),
                     "-o", str(target)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and not target.exists()
    assert len(err.splitlines()) == 1 and "folder" in err and "two.png" in err


@pytest.mark.parametrize("command", ["classify", "explain"])
def test_an_empty_path_is_named_as_empty(capsys, bundle: Path, command: str) -> None:
    code = cli.main([command, "--json", "--bundle", str(bundle), ""])
    _, err = capsys.readouterr()
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "empty path" in lines[0] and "is a folder" not in lines[0]


def test_batch_reports_missing_and_empty_paths_without_starting_ray(
        bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyarrow", reason="ct-edge batch needs the [ray] extra")
    from ct_edge import batch

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started for inputs that were known bad")

    monkeypatch.setattr(batch, "ray_cluster", no_ray)
    missing = str(tmp_path / "missing.png")
    result = batch.run_batch([missing, ""], tmp_path / "out", bundle=bundle, artifact="tflite-fp32")
    assert (result.rows, result.errors, result.actors) == (2, 2, 0)
    assert dict(result.error_samples) == {missing: "no such file", "": EMPTY_PATH}


def _error_and_ok_part(out: Path, bundle_dir: Path):
    from ct_edge.batch.parts import PartWriter
    from ct_edge.batch.payload import ModelPayload, error_row, rows_to_table

    payload = ModelPayload.from_bundle(bundle_dir, "tflite-fp32")
    ok = {**error_row("/y.png", "x", payload), "error": None, "label": payload.labels[0],
          "status": "ok"}
    out.mkdir()
    PartWriter(out, "run").write(rows_to_table(
        [error_row("/x.png", "no such file", payload), ok], payload.labels))
    return payload


def test_batch_error_rows_are_not_done_and_are_dropped_before_a_retry(
        bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="ct-edge batch needs the [ray] extra")
    from ct_edge.batch import parts

    payload = _error_and_ok_part(tmp_path / "out", bundle)
    assert parts.read_done(tmp_path / "out", payload) == {"/y.png"}
    assert parts.drop_error_rows(tmp_path / "out", {"/x.png", "/y.png"}) == 1
    assert [row["path"] for row in parts.read_results(tmp_path / "out").to_pylist()] == ["/y.png"]


@pytest.mark.ray
def test_batch_rerun_retries_a_file_fixed_after_an_error(bundle: Path,
                                                         tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from ct_edge import batch
    from ct_edge.batch import parts

    image = tmp_path / "scan.png"
    image.write_bytes(b"not yet an image")
    out = tmp_path / "out"
    first = batch.run_batch([str(image)], out, bundle=bundle, artifact="tflite-fp32", actors=1)
    assert (first.rows, first.errors) == (1, 1)
    shutil.copyfile(GOOD[0], image)  # the file is fixed
    again = batch.run_batch([str(image)], out, bundle=bundle, artifact="tflite-fp32", actors=1)
    assert (again.rows, again.errors, again.skipped) == (1, 0, 0)
    rows = parts.read_results(out).to_pylist()
    assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["label"] is not None


# --- docs match what the code does ---------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_docs_and_code_agree_that_bmp_and_tiff_are_refused(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 5).save(buffer, format=fmt)
    with pytest.raises(InputError, match=f"unsupported image format {fmt}"):
        decode(buffer.getvalue())
    text = " ".join((DOCS / "inputs.md").read_text().split())
    assert "BMP, TIFF, GIF, WebP and every other format are refused" in text
    assert "decoded when named explicitly" not in text


def test_explain_json_example_in_the_docs_has_todays_fields(capsys, bundle: Path) -> None:
    example = next(line for line in (DOCS / "explain.md").read_text().splitlines()
                   if line.startswith('{"path"'))
    assert cli.main(["explain", "--json", "-q", "--bundle", str(bundle), str(GOOD[0])]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert list(json.loads(example)) == list(record)
    assert list(json.loads(example)["peak"]) == list(record["peak"])
