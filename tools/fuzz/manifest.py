"""Bundle-manifest cases: stand-in model files, manifest mutation, folder layouts, running one."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .cases import Case, mutate_bytes

FUZZED_ARTIFACTS = ("tflite-int8", "tflite-fp32", "onnx-fp32")  # names from convert.formats
OUTSIDE = "outside.bin"  # beside the bundle folder; holds the bytes of model_int8.tflite
OUTSIDE_ABS = "@OUTSIDE@"  # replaced by the absolute path of OUTSIDE in the worker
DOMAIN_FILE = "domain.npz"  # ct_edge.domain.DOMAIN_FILE, as convert writes it
OUTSIDE_DOMAIN = "outside.npz"  # beside the bundle folder; holds the bytes of DOMAIN_FILE


def artifact_bytes(file: str) -> bytes:
    """The stand-in model file content (Bundle.load never parses a model)."""
    return hashlib.sha256(file.encode()).digest() * 64


def domain_bytes() -> bytes:
    """A stand-in domain statistics file the gate accepts (max_logit over 4 features), the same
    bytes in every process: np.savez would stamp the zip entries with the current time."""
    arrays = {"weights": np.eye(4, 3, dtype=np.float32), "bias": np.zeros(3, np.float32)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for key, value in arrays.items():
            npy = io.BytesIO()
            np.lib.format.write_array(npy, value)
            archive.writestr(zipfile.ZipInfo(f"{key}.npy", (1980, 1, 1, 0, 0, 0)), npy.getvalue())
    return buffer.getvalue()


def domain_section() -> dict:
    """The manifest's domain section for `domain_bytes` (the keys ct_edge.domain reads)."""
    data = domain_bytes()
    return {"modality": "xray", "method": "max_logit", "threshold": 3.0, "file": DOMAIN_FILE,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def model_files() -> dict[str, str]:
    """Artifact name -> file name, as convert.formats names them."""
    from convert.formats import FORMATS

    return {row.name: row.file for row in FORMATS if row.name in FUZZED_ARTIFACTS}


def base_manifest() -> dict:
    """A valid manifest, written by the converter's own code, over stand-in model files."""
    from convert.formats import FORMATS
    from convert.manifest import artifact_entry, build_manifest
    from ct_edge import LABELS
    from ct_edge.preprocess import PreprocessSpec

    artifacts = []
    for row in FORMATS:
        if row.name in FUZZED_ARTIFACTS:
            data = artifact_bytes(row.file)
            artifacts.append(artifact_entry(
                row, hashlib.sha256(data).hexdigest(), len(data), "passed", [],
                {"accuracy": 0.9, "agreement": 1.0, "max_abs_diff": 1e-6}))
    return build_manifest(LABELS, PreprocessSpec(), 0.91, artifacts, "tflite-int8",
                          {"model_sha256": "0" * 64, "created": "2026-01-01T00:00:00+00:00"},
                          domain=domain_section())


JSON_VALUES: list = [None, True, False, 0, -1, 1, 2, 3, 2**31, 2**63, 2**64 + 1, 1e308, -1e308,
                     float("nan"), float("inf"), float("-inf"), 0.5, 1e-320, "", "1", "..", "a" * 300,
                     "\x00", "ü", "NaN", [], {}, [1], [0, 0], [1, 2, 3, 4], [[1]], {"a": 1},
                     ["x", "y"], "@BIGINT@", "@DEEP@"]
FILE_ATTACKS = ["../outside.bin", OUTSIDE_ABS, "/etc/hostname", "sub/model_int8.tflite", "", ".", "..",
                "./model_int8.tflite", "model_int8.tflite/", "model\x00.tflite", "a" * 300, "~",
                "..\\outside.bin", "model_fp32.onnx", "manifest.json", "../bundle/model_int8.tflite",
                "//outside.bin", "model_int8.tflite/..", "nonexistent.tflite", 5, None, ["a"]]
FS_LAYOUTS = ["plain"] * 6 + ["symlink-out", "symlink-in", "symlink-chain-out", "symlink-loop",
                              "dangling", "fifo", "directory", "sparse-huge", "missing",
                              "manifest-huge", "manifest-fifo", "manifest-symlink-out",
                              "domain-symlink-out", "domain-fifo", "domain-missing"]
# Values for the keys of the domain section (ct_edge.domain.gate_entry), besides JSON_VALUES.
DOMAIN_VALUES: dict[str, list] = {
    "method": ["telepathy", "combined", "knn", "mahalanobis", "energy"],
    "threshold": [float("nan"), float("inf"), "3", 1e308, 10**400],
    "bytes": [1e999, -1, 0, 10**30, 2**31, "1", 64 * 1024 * 1024 + 1],
    "sha256": ["0" * 64, "", "@BIGINT@"],
    "modality": ["ct", "xray", "mri", "", None],
}


def _paths(node, prefix=()) -> Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _set(root, path: tuple, value) -> object:
    if not path:
        return value
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return root


def _pick(rng: np.random.Generator, values: list):
    """A fresh copy of one of `values` (a shared list inserted twice could become a cycle)."""
    return copy.deepcopy(values[int(rng.integers(len(values)))])


def gen_manifest(rng: np.random.Generator, base: dict) -> Case:
    manifest = copy.deepcopy(base)
    for _ in range(int(rng.integers(1, 4))):
        paths = list(_paths(manifest))
        path = paths[int(rng.integers(len(paths)))]
        op = int(rng.integers(11))
        if op <= 3:
            manifest = _set(manifest, path, _pick(rng, JSON_VALUES))
        elif op == 4 and path:
            parent = manifest
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
        elif op in (5, 6) and isinstance(manifest, dict) and isinstance(manifest.get("artifacts"), list) \
                and manifest["artifacts"] and isinstance(manifest["artifacts"][0], dict):
            i = int(rng.integers(len(manifest["artifacts"])))
            entry = manifest["artifacts"][i]
            if isinstance(entry, dict):
                key = "file" if op == 5 else str(rng.choice(["bytes", "sha256", "name", "format",
                                                             "precision", "status", "parity"]))
                entry[key] = _pick(rng, FILE_ATTACKS if op == 5 else JSON_VALUES)
        elif op == 7 and isinstance(manifest, dict):
            key = str(rng.choice(["schema_version", "default", "labels", "input", "preprocess",
                                  "calibration"]))
            options = {"schema_version": [0, 2, -1, "1", 1.0, True, None, 10**30, [1]],
                             "default": ["onnx-fp32", "nope", "", None, 0, ["tflite-int8"], {}],
                             "labels": [["a"], ["a", "b"], list(range(1001)), "ab", [None, 1]],
                             "input": [{"shape": [1, 64, 64, 3]}, {"shape": [1, 128, 128]},
                                       {"shape": "1,128,128,3"}, {"shape": [1, 1e400, 128, 3]}],
                             "preprocess": [{"size": 4}, {"size": 1e300}, {"size": 128, "window": [1]},
                                            {"size": 128, "window": [0, 0]},
                                            {"size": 128, "window": ["nan", 0]},
                                            {"size": 128, "aspect": "zoom"}, {"size": "128"}],
                             "calibration": [{"temperature": 0}, {"temperature": 1e999},
                                             {"temperature": "x"}, {"uncertain_below": float("nan")},
                                             {"temperature": 10**400}]}[key]
            manifest[key] = _pick(rng, options)
        elif op == 8 and isinstance(manifest, dict):
            manifest[f"unknown_{int(rng.integers(100))}"] = _pick(rng, JSON_VALUES)
        elif op == 9 and isinstance(manifest, dict) and isinstance(manifest.get("artifacts"), list):
            manifest["artifacts"] = copy.deepcopy(manifest["artifacts"] * int(rng.choice([0, 2, 50])))
        elif op == 10 and isinstance(manifest, dict):
            _mutate_domain(rng, manifest)
    try:
        text = json.dumps(manifest, indent=int(rng.choice([0, 2])))
    except (ValueError, OverflowError):
        text = json.dumps(base)
    text = text.replace('"@BIGINT@"', "9" * int(rng.choice([20, 400, 5000, 100_000])))
    depth = int(rng.choice([10, 900, 5000, 1_000_000]))
    text = text.replace('"@DEEP@"', "[" * depth + "]" * depth)
    data = text.encode()
    if rng.random() < 0.15:
        data = mutate_bytes(rng, data, [])
    fs = FS_LAYOUTS[int(rng.integers(len(FS_LAYOUTS)))]
    return Case("manifest", "manifest", data, fs=fs)


def _mutate_domain(rng: np.random.Generator, manifest: dict) -> None:
    """One change to the domain section: a hostile file name, a bad value, or the whole section."""
    section = manifest.get("domain")
    if not isinstance(section, dict) or rng.random() < 0.1:
        manifest["domain"] = _pick(rng, [None, [], "xray", {}, {"modality": "mri"},
                                         {"method": "max_logit"}, domain_section()])
        return
    key = str(rng.choice(["file", *DOMAIN_VALUES]))
    if rng.random() < 0.15:
        section.pop(key, None)
    elif key == "file":
        section[key] = _pick(rng, [*FILE_ATTACKS, "../" + OUTSIDE_DOMAIN])
    else:
        section[key] = _pick(rng, DOMAIN_VALUES[key] + JSON_VALUES)


def manifest_cases(rng: np.random.Generator, count: int) -> Iterator[Case]:
    base = base_manifest()
    plain = json.dumps(base).encode()
    for fs in dict.fromkeys(FS_LAYOUTS):  # each layout at least once, with a sound manifest
        yield Case("manifest", "layout", plain, fs=fs)
    for _ in range(count):
        yield gen_manifest(rng, base)


# --------------------------------------------------------------------------------------------
# Running a manifest case (in the worker)
# --------------------------------------------------------------------------------------------

def write_bundle_layout(root: Path, manifest: bytes, fs: str) -> None:
    """A bundle folder at `root` holding `manifest` and the stand-in models, laid out as `fs`."""
    outside = root.parent / OUTSIDE
    int8 = model_files()["tflite-int8"]
    outside.write_bytes(artifact_bytes(int8))
    root.mkdir()
    for file in model_files().values():
        (root / file).write_bytes(artifact_bytes(file))
    text = manifest.replace(OUTSIDE_ABS.encode(), str(outside).encode())
    (root / "manifest.json").write_bytes(text)
    _domain_layout(root, fs)
    target = root / int8
    if fs in ("symlink-out", "symlink-chain-out", "symlink-loop", "dangling", "symlink-in", "fifo",
              "directory", "missing"):
        target.unlink()
    if fs == "symlink-out":
        target.symlink_to(outside)  # bytes match the manifest: only the path check stops it
    elif fs == "symlink-chain-out":
        (root / "link.tflite").symlink_to(outside)
        target.symlink_to("link.tflite")
    elif fs == "symlink-loop":
        (root / "loop.tflite").symlink_to(int8)
        target.symlink_to("loop.tflite")
    elif fs == "dangling":
        target.symlink_to(root / "nowhere")
    elif fs == "symlink-in":
        (root / "real_int8.tflite").write_bytes(artifact_bytes(int8))
        target.symlink_to("real_int8.tflite")
    elif fs == "fifo":
        os.mkfifo(target)
    elif fs == "directory":
        target.mkdir()
    elif fs == "sparse-huge":
        with target.open("r+b") as handle:
            handle.truncate(8 << 30)  # 8 GiB, sparse: reading it all would exhaust memory
    elif fs == "manifest-huge":
        with (root / "manifest.json").open("r+b") as handle:
            handle.truncate(1 << 30)
    elif fs == "manifest-fifo":
        (root / "manifest.json").unlink()
        os.mkfifo(root / "manifest.json")
    elif fs == "manifest-symlink-out":
        outside_manifest = root.parent / "outside.json"
        (root / "manifest.json").rename(outside_manifest)
        (root / "manifest.json").symlink_to(outside_manifest)


def _domain_layout(root: Path, fs: str) -> None:
    """The domain statistics file in `root`, and beside the folder (for links and ../ names)."""
    data = domain_bytes()
    outside = root.parent / OUTSIDE_DOMAIN
    outside.write_bytes(data)
    target = root / DOMAIN_FILE
    if fs == "domain-symlink-out":
        target.symlink_to(outside)  # bytes match the manifest: only the path check stops it
    elif fs == "domain-fifo":
        os.mkfifo(target)
    elif fs != "domain-missing":
        target.write_bytes(data)


def accepted_problem(bundle, root: Path) -> str | None:
    """What a loaded bundle should not have accepted (the manifest rules of DESIGN.md)."""
    raw = bundle.manifest
    version = raw.get("schema_version")
    if type(version) is not int or version != 1:
        return f"accepted schema_version {version!r}"
    for artifact in bundle.artifacts.values():
        if artifact.path.parent != root or artifact.path.name in ("", ".", ".."):
            return f"accepted artifact file {artifact.file!r}"
        if not 0 < artifact.bytes <= 256 * 1024 * 1024:
            return f"accepted artifact size {artifact.bytes}"
    if not 2 <= len(bundle.labels) <= 1000:
        return f"accepted {len(bundle.labels)} labels"
    if not (math.isfinite(bundle.temperature) and 0.01 <= bundle.temperature <= 100):
        return f"accepted temperature {bundle.temperature}"
    if not (math.isfinite(bundle.uncertain_below) and 0 <= bundle.uncertain_below <= 1):
        return f"accepted uncertain_below {bundle.uncertain_below}"
    width, level = bundle.spec.window
    if not (math.isfinite(width) and width > 0 and math.isfinite(level)):
        return f"accepted window {bundle.spec.window}"
    shape = [int(d) for d in raw["input"]["shape"]]
    if shape[1:] != [bundle.spec.size, bundle.spec.size, bundle.spec.channels]:
        return f"accepted input shape {shape}"
    if bundle.default is not None and bundle.default not in bundle.artifacts:
        return f"accepted default {bundle.default!r}"
    return None


def run_manifest(data: bytes, fs: str, scratch: Path, counter: int) -> tuple[str, str]:
    """Load, check, read and select a bundle around `data`: (outcome, detail)."""
    import shutil

    from ct_edge.bundle import Bundle
    from ct_edge.errors import BundleError

    case_dir = scratch / f"m{counter}"
    case_dir.mkdir()
    root = case_dir / "bundle"
    try:
        write_bundle_layout(root, data, fs)
        try:
            bundle = Bundle.load(root)
        except BundleError as exc:
            return "error", str(exc)[:300]
        problem = accepted_problem(bundle, root)
        if problem:
            return "invalid", problem
        inside = root.resolve()
        if (root / "manifest.json").resolve().parent != inside:
            return "invalid", "read a manifest from outside the bundle"
        for artifact in bundle.artifacts.values():
            try:
                artifact.read_verified()
            except BundleError:
                continue
            if artifact.path.resolve().parent != inside:
                return "invalid", f"read {artifact.file!r} from outside the bundle"
        for fmt in (None, "tflite", "onnx"):
            with contextlib.suppress(BundleError):
                bundle.select(fmt=fmt)
        try:
            bundle.gate_with_data()
        except BundleError:
            return "valid", ""
        file = root / str(bundle.domain.get("file"))
        if "method" in bundle.domain and file.resolve().parent != inside:
            return "invalid", f"read domain file {bundle.domain.get('file')!r} from outside the bundle"
        return "valid", ""
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)
