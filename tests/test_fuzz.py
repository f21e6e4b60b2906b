"""Fuzzing the untrusted inputs: image/DICOM files and the bundle manifest (issue 8).

The fast suite runs a short, fixed-seed campaign of tools/fuzz/ (a few hundred cases, each in a
separate worker process with a time limit and a memory bound), replays every saved regression
input in tests/fixtures/fuzz/, and runs hypothesis properties in-process. `make fuzz` runs the
long campaign (over 10,000 cases). docs/robustness.md has the figures.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bundle_helpers import write_bundle  # noqa: E402

from ct_edge.bundle import Bundle  # noqa: E402
from ct_edge.dicom_node.header import read_header  # noqa: E402
from ct_edge.errors import BundleError, InputError  # noqa: E402
from ct_edge.limits import MAX_PIXELS, MAX_SIDE  # noqa: E402
from ct_edge.preprocess import PreprocessSpec, preprocess  # noqa: E402
from tools.fuzz.campaign import MAGICS, build_cases  # noqa: E402
from tools.fuzz.cases import REGRESSIONS, SPEC_ARGS, Case, load_case, regression_cases, save_case  # noqa: E402
from tools.fuzz.dicom import DicomBase, dicom_file  # noqa: E402
from tools.fuzz.images import png_image, zlib_bomb  # noqa: E402
from tools.fuzz.manifest import (  # noqa: E402
    accepted_problem,
    artifact_bytes,
    base_manifest,
    model_files,
    write_bundle_layout,
)
from tools.fuzz.runner import Result, Runner, run_campaign  # noqa: E402
from tools.fuzz.worker import check_array  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
SEED = int(os.environ.get("CT_EDGE_FUZZ_SEED", "8"))
SEEDS = {p.name: p.read_bytes() for p in sorted(FIXTURES.glob("*")) if p.suffix in (".png", ".jpg", ".dcm")}


def _describe(results: list[Result]) -> str:
    return "\n".join(f"{r.outcome}: {r.case.label()}: {r.detail[-500:]}" for r in results[:10])


# --- the harness itself ----------------------------------------------------------------------

def test_the_harness_catches_each_kind_of_failure() -> None:
    """A stray exception, a hang, a dead worker and a memory hog are each reported as such."""
    runner = Runner(time_limit=3.0, memory_bound_mb=256)
    try:
        outcomes = {action: runner.run(Case("selftest", "selftest", action.encode())).outcome
                    for action in ("raise", "hang", "die", "memory", "fine")}
    finally:
        runner.stop()
    assert outcomes == {"raise": "crash", "hang": "hang", "die": "died", "memory": "memory",
                        "fine": "valid"}


def test_short_campaign_has_no_failures(tmp_path: Path) -> None:
    """What CI runs: bombs, a truncation sweep, ~300 generated inputs and ~100 manifests."""
    cases = build_cases(300, 100, SEED, quick=True)
    report = run_campaign(iter(cases), save=tmp_path / "found")
    summary = report.summary()
    print(json.dumps({k: summary[k] for k in ("cases", "valid", "clean_errors", "crashes", "hangs",
                                              "memory", "seconds", "peak_rss_growth_mb")}))
    assert not report.failures, _describe(report.failures)
    assert summary["cases"] >= 500
    assert summary["valid"] > 50 and summary["clean_errors"] > 50  # both paths really exercised
    assert set(summary["by_target"]) == {"input", "manifest"}


def test_saved_regression_inputs_stay_fixed() -> None:
    """Every input a campaign once failed on (tests/fixtures/fuzz/) now ends cleanly."""
    cases = regression_cases(REGRESSIONS)
    assert len(cases) >= 10
    report = run_campaign(iter(cases))
    assert not report.failures, _describe(report.failures)


def test_regression_files_round_trip(tmp_path: Path) -> None:
    case = Case("input", "mutate:gray8.png", b"\x89PNG...", ".dcm", 2)
    assert load_case(save_case(case, tmp_path)).data == case.data
    loaded = load_case(save_case(case, tmp_path))
    assert (loaded.suffix, loaded.spec) == (".dcm", 2)
    manifest = Case("manifest", "manifest", b'{"a": 1}', fs="fifo")
    loaded = load_case(save_case(manifest, tmp_path))
    assert (loaded.target, loaded.data, loaded.fs) == ("manifest", b'{"a": 1}', "fifo")


def test_campaigns_are_reproducible_from_their_seed() -> None:
    first = [c.digest() for c in build_cases(40, 20, 3, quick=True)]
    assert first == [c.digest() for c in build_cases(40, 20, 3, quick=True)]
    assert first != [c.digest() for c in build_cases(40, 20, 4, quick=True)]


# --- the bugs the fuzzer found, as plain tests -------------------------------------------------

def test_contrast_stretch_returns_float32() -> None:
    """Found: contrast='stretch' returned float64 (numpy's percentiles are float64)."""
    for name in ("gray8.png", "rgb.jpg", "ct_small.dcm"):
        array = preprocess(FIXTURES / name, PreprocessSpec(contrast="stretch", size=32))
        assert array.dtype == np.float32


def test_float_tiff_with_nan_is_an_input_error() -> None:
    """Found: a float TIFF holding NaN became a NaN model input. TIFF is now refused outright."""
    from PIL import Image

    pixels = np.full((16, 16), 0.5, np.float32)
    pixels[3, 4] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "TIFF")
    with pytest.raises(InputError, match="unsupported image format TIFF"):
        preprocess(buffer.getvalue())


def test_a_very_long_side_is_refused_before_decoding() -> None:
    """Found: a 72-byte PNG claiming 1 x 64,000,000 pixels took 5 s and 1.3 GB to decode."""
    data = png_image(1, MAX_PIXELS, 8, 2, b"")  # within the pixel limit
    start = time.perf_counter()
    with pytest.raises(InputError, match="side is over"):
        preprocess(data)
    assert time.perf_counter() - start < 1.0
    assert preprocess(png_image(MAX_SIDE, 2, 8, 0, bytes((MAX_SIDE + 1) * 2))).shape == (128, 128, 3)


def test_deflated_dicom_bomb_is_refused_and_a_small_one_decodes() -> None:
    """Found: pydicom inflated a 1 MiB deflated DICOM to 1 GiB in memory before any check."""
    base = DicomBase(SEEDS["ct_small.dcm"])
    small = dicom_file(dict(base.elements), "deflate")
    plain = preprocess(dicom_file(dict(base.elements), "explicit"))
    assert np.array_equal(preprocess(small), plain)
    bomb = dicom_file(dict(base.elements), "deflate", deflate_zeros=600 << 20)
    assert len(bomb) < 1 << 20
    with pytest.raises(InputError, match="decompression bomb guard"):
        preprocess(bomb)


def test_the_dicom_nodes_header_reader_refuses_the_same_bomb(tmp_path: Path) -> None:
    """The node checks a received file on disk with the same guard as `preprocess` does bytes."""
    import pydicom

    small = Path(pydicom.__file__).parent / "data" / "test_files" / "image_dfl.dcm"  # real, deflated
    assert read_header(small, deflated=True)["SOPInstanceUID"]
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(dicom_file(dict(DicomBase(SEEDS["ct_small.dcm"]).elements), "deflate",
                                deflate_zeros=600 << 20))
    with pytest.raises(InputError, match="decompression bomb guard") as refused:
        read_header(bomb, deflated=True)
    assert refused.value.path == str(bomb)


# tools/fuzz/manifest.py's stand-in model files, by artifact name (Bundle.load never parses a model).
MODELS = {name: artifact_bytes(file) for name, file in model_files().items()}


def _manifest() -> dict:
    """The fuzzer's valid starting manifest (written by convert.manifest; a fresh copy to edit)."""
    return base_manifest()


def test_the_fuzzers_base_manifest_loads_and_every_artifact_verifies(tmp_path: Path) -> None:
    """Else every manifest case would be a 'clean error' and the campaign green for nothing."""
    bundle = Bundle.load(_bundle(tmp_path, _manifest()))
    assert sorted(bundle.artifacts) == sorted(MODELS)
    for artifact in bundle.artifacts.values():
        assert artifact.read_verified() == MODELS[artifact.name]


def _bundle(tmp_path: Path, manifest: dict | str) -> Path:
    return write_bundle(tmp_path / "bundle", MODELS, manifest)


@pytest.mark.parametrize("change", [
    {"schema_version": True}, {"schema_version": 1.0}, {"schema_version": "1"},
    {"schema_version": 2}, {"default": ["tflite-int8"]}, {"labels": "ab"},
    {"calibration": {"uncertain_below": float("nan")}},
    {"calibration": {"temperature": 10**400}},
    {"preprocess": {**PreprocessSpec().to_dict(), "window": [1]}},
    {"preprocess": {**PreprocessSpec().to_dict(), "window": [float("nan"), 0]}},
    {"input": {"shape": [1, float("inf"), 128, 3]}},
], ids=lambda change: json.dumps(change, default=str)[:60])
def test_malformed_manifest_values_are_bundle_errors(tmp_path: Path, change: dict) -> None:
    manifest = {**_manifest(), **change}
    with pytest.raises(BundleError):
        Bundle.load(_bundle(tmp_path, json.dumps(manifest)))


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, '{"schema_version": ' + "9" * 5000 + "}",
                                  '{"a": NaN', "\udcff"])
def test_unparseable_manifests_are_bundle_errors(tmp_path: Path, text: str) -> None:
    root = _bundle(tmp_path, "{}")
    (root / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(BundleError):
        Bundle.load(root)


@pytest.mark.parametrize("layout", ["fifo", "sparse-huge", "symlink-loop", "symlink-out",
                                    "symlink-chain-out", "directory"])
def test_hostile_artifact_files_are_bundle_errors(tmp_path: Path, layout: str) -> None:
    """A FIFO once hung read_verified, a sparse 8 GiB file exhausted memory, a loop raised."""
    root = tmp_path / "b" / "bundle"
    root.parent.mkdir()
    write_bundle_layout(root, json.dumps(_manifest()).encode(), layout)
    start = time.perf_counter()
    with pytest.raises(BundleError):  # from load (a link out or a loop) or from read_verified
        Bundle.load(root).artifacts["tflite-int8"].read_verified()
    assert time.perf_counter() - start < 2.0
    if layout in ("fifo", "sparse-huge", "directory"):
        Bundle.load(root).artifacts["onnx-fp32"].read_verified()  # the others still verify


def test_artifact_names_cannot_leave_the_bundle(tmp_path: Path) -> None:
    for file in ("../outside.bin", str(tmp_path / "outside.bin"), "sub/x.tflite", "..", "",
                 "a\x00b", "x" * 300):
        manifest = _manifest()
        manifest["artifacts"][0]["file"] = file
        with pytest.raises(BundleError):
            bundle = Bundle.load(_bundle(tmp_path, manifest))
            bundle.artifacts["tflite-int8"].read_verified()


# --- hypothesis: properties in-process ---------------------------------------------------------

def _clean_or_valid(source: bytes | Path, spec: PreprocessSpec) -> None:
    try:
        array = preprocess(source, spec)
    except InputError:
        return
    assert check_array(array, spec) is None


SPECS = st.sampled_from([PreprocessSpec(**args) for args in SPEC_ARGS])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096), magic=st.sampled_from(MAGICS), spec=SPECS)
def test_any_bytes_give_an_array_or_an_input_error(data: bytes, magic: bytes,
                                                   spec: PreprocessSpec) -> None:
    _clean_or_valid(magic + data, spec)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(SEEDS)), spec=SPECS,
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
       cut=st.none() | st.floats(0, 1))
def test_edited_fixtures_give_an_array_or_an_input_error(name: str, spec: PreprocessSpec,
                                                         edits: list, cut: float | None) -> None:
    data = bytearray(SEEDS[name])
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[:int(cut * len(data))]
    _clean_or_valid(bytes(data), spec)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(0, 2**32 - 1), height=st.integers(0, 2**32 - 1),
       mode=st.sampled_from([(8, 0), (16, 0), (8, 2), (8, 6), (1, 0)]))
def test_png_headers_claiming_any_size_are_refused_or_decoded(width: int, height: int,
                                                              mode: tuple[int, int]) -> None:
    data = png_image(width, height, *mode, rows=b"\x00" * 64)
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        with pytest.raises(InputError):
            preprocess(data)
    else:
        _clean_or_valid(data, PreprocessSpec())


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
KEYS = st.sampled_from(["schema_version", "labels", "input", "preprocess", "calibration",
                        "artifacts", "default"])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(KEYS, JSON, max_size=3), entry=st.dictionaries(
    st.sampled_from(["name", "file", "format", "bytes", "sha256", "status", "parity"]), JSON, max_size=2))
def test_manifest_with_any_values_loads_or_is_a_bundle_error(tmp_path: Path, changes: dict,
                                                             entry: dict) -> None:
    manifest = _manifest()
    manifest["artifacts"][0].update(entry)
    manifest.update(changes)
    root = _bundle(tmp_path, json.dumps(manifest))
    try:
        bundle = Bundle.load(root)
    except BundleError:
        return
    assert accepted_problem(bundle, root) is None
    for artifact in bundle.artifacts.values():
        try:
            artifact.read_verified()
        except BundleError:
            continue
        assert artifact.path.resolve().parent == root.resolve()


def test_png_builder_makes_real_pngs() -> None:
    """The harness's PNG writer: valid CRCs, so its mutations reach the decoder proper."""
    rows = b"".join(b"\x00" + bytes(range(16)) for _ in range(8))
    array = preprocess(png_image(16, 8, 8, 0, rows), PreprocessSpec(aspect="stretch", size=16))
    assert array.shape == (16, 16, 3) and array.max() > 0
    assert struct.unpack(">I", png_image(3, 3)[16:20]) == (3,)
    assert zlib.decompress(zlib_bomb((3 << 20) + 5)) == bytes((3 << 20) + 5)
