"""Model bundles for tests, their manifest.json written by the converter's own code.

The manifest comes from convert.manifest (artifact_entry, build_manifest), as `make convert` writes
it, so a change to the manifest schema reaches these bundles too; only the model bytes, the parity
figures and a few knobs are the test's own. Shared by several test files.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from convert.formats import FORMATS
from convert.manifest import UNCERTAIN_BELOW, artifact_entry, build_manifest, now, versions
from ct_edge import LABELS
from ct_edge.bundle import MANIFEST
from ct_edge.preprocess import PreprocessSpec

ROWS = {row.name: row for row in FORMATS}  # artifact name -> its row (file, format, engine, ...)


@functools.cache
def _versions() -> tuple[tuple[str, str | None], ...]:
    return tuple(versions().items())  # the same for every bundle of a session; ~10 ms to look up


def provenance_for(model_sha256: str, **extra: object) -> dict:
    """The provenance keys `make convert` always writes (the source model, package versions, when),
    plus `extra` (e.g. model_file, data_fingerprint)."""
    return {"model_sha256": model_sha256, **extra, "versions": dict(_versions()), "created": now()}


def manifest_for(models: dict[str, bytes], default: str | None, provenance: dict, *,
                 temperature: float = 1.0, uncertain_below: float = UNCERTAIN_BELOW,
                 parity: dict | None = None) -> dict:
    """The manifest `make convert` writes for these artifacts, {name in convert.formats.FORMATS:
    model bytes}, each with status 'passed' and the same `parity` figures.

    build_manifest always writes UNCERTAIN_BELOW; a test may ask for another threshold.
    """
    entries = [artifact_entry(ROWS[name], hashlib.sha256(data).hexdigest(), len(data), "passed", [],
                              dict(parity or {}))
               for name, data in models.items()]
    manifest = build_manifest(LABELS, PreprocessSpec(), temperature, entries, default, provenance)
    manifest["calibration"]["uncertain_below"] = uncertain_below
    return manifest


def write_bundle(root: Path, models: dict[str, bytes], manifest: dict | str) -> Path:
    """The model files (each under its FORMATS file name) and manifest.json (a dict, or raw text
    for tests of malformed manifests) in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in models.items():
        (root / ROWS[name].file).write_bytes(data)
    text = manifest if isinstance(manifest, str) else json.dumps(manifest, indent=2)
    (root / MANIFEST).write_text(text)
    return root
