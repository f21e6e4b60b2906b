"""The bundle's manifest.json, exactly as ct_edge.bundle reads it, and the record in each model file."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

from ct_edge.bundle import SCHEMA_VERSION
from ct_edge.preprocess import PreprocessSpec

from .formats import Format

# The fallback when training recorded no operating point (training.abstention chooses one from
# held-out predictions): not chosen from data, and the manifest says so.
UNCERTAIN_BELOW = 0.6
FIXED_OPERATING_POINT = {"method": "fixed default",
                         "data": "none: the training record holds no operating point; retrain "
                                 "to choose it from held-out predictions"}
MODEL_METADATA_SCHEMA = "ct_edge.model/1"

# Provenance key -> distributions that may provide it (first installed wins).
PACKAGES: dict[str, tuple[str, ...]] = {
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "keras": ("keras",),
    "tf2onnx": ("tf2onnx",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime",),
    "ai-edge-litert": ("ai-edge-litert",),
    "numpy": ("numpy",),
    "pillow": ("pillow",),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for key, distributions in PACKAGES.items():
        found[key] = None
        for name in distributions:
            try:
                found[key] = importlib_metadata.version(name)
                break
            except importlib_metadata.PackageNotFoundError:
                continue
    return found


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def input_contract(spec: PreprocessSpec) -> dict:
    """What every backend's predict() takes: the runtime quantizes for integer models itself."""
    return {"shape": [1, spec.size, spec.size, spec.channels], "dtype": "float32",
            "layout": "NHWC", "range": [0.0, 1.0], "color": "gray replicated"}


def calibration_section(temperature: float, uncertain_below: float | None = None,
                        operating_point: dict | None = None) -> dict:
    """Temperature, the uncertain threshold and how the threshold was chosen."""
    if uncertain_below is None:
        return {"temperature": temperature, "uncertain_below": UNCERTAIN_BELOW,
                "operating_point": dict(FIXED_OPERATING_POINT)}
    return {"temperature": temperature, "uncertain_below": uncertain_below,
            "operating_point": dict(operating_point or {})}


def model_metadata(row: Format, labels: tuple[str, ...], spec: PreprocessSpec, temperature: float,
                   model_sha256: str, created: str, *, uncertain_below: float | None = None,
                   operating_point: dict | None = None) -> dict:
    """Embedded in the model file itself, so a lone file stays self-describing."""
    return {"schema": MODEL_METADATA_SCHEMA, "name": row.name, "format": row.format,
            "precision": row.precision, "labels": list(labels), "input": input_contract(spec),
            "output": {"shape": [1, len(labels)], "meaning": "softmax probabilities in label order"},
            "preprocess": spec.to_dict(),
            "calibration": calibration_section(temperature, uncertain_below, operating_point),
            "source_model_sha256": model_sha256, "created": created}


def artifact_entry(row: Format, sha256: str, size: int, status: str, failures: list[str],
                   parity: dict) -> dict:
    return {"name": row.name, "file": row.file, "format": row.format, "precision": row.precision,
            "engine": row.engine, "sha256": sha256, "bytes": size, "status": status,
            "failures": list(failures), "parity": parity}


def build_manifest(labels: tuple[str, ...], spec: PreprocessSpec, temperature: float,
                   artifacts: list[dict], default: str | None, provenance: dict,
                   failed_conversions: list[dict] | None = None,
                   explain: dict | None = None, *, uncertain_below: float | None = None,
                   operating_point: dict | None = None, domain: dict | None = None) -> dict:
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "labels": list(labels),
        "input": input_contract(spec),
        "preprocess": spec.to_dict(),
        "calibration": calibration_section(temperature, uncertain_below, operating_point),
        "artifacts": artifacts,
        "default": default,
        "provenance": provenance,
    }
    if explain:
        # How `ct-edge explain` makes heatmaps with these artifacts (training.gradcam.describe).
        manifest["explain"] = explain
    if domain:
        # What the model was trained on and its feature gate (ct_edge.domain, convert.domain_fit).
        manifest["domain"] = domain
    if failed_conversions:
        # No file, so not an artifact the runtime could list; kept so the failure is on record.
        manifest["failed_conversions"] = failed_conversions
    return manifest
