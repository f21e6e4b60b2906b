"""convert_model: Keras model -> staged bundle -> parity through the runtime -> gate -> swap in.

A bundle with no passing artifact is not swapped in: it is kept beside `out` (`<out>.rejected`)
and the bundle at `out` stays as it was."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ct_edge import LABELS
from ct_edge.bundle import MANIFEST, Bundle
from ct_edge.domain import DOMAIN_FILE
from ct_edge.preprocess import PreprocessSpec
from training.data import check_keras_archive
from training.folders import discard, install
from training.gradcam import describe

from . import bias_correction, dataset, domain_fit, parity, report, staging
from .errors import ConvertError, ParityError
from .formats import (
    DEFAULT_ARTIFACT,
    EMBEDDERS,
    FORMATS,
    PRECISION_ORDER,
    Format,
    WriteContext,
    select,
)
from .manifest import (
    artifact_entry,
    build_manifest,
    model_metadata,
    now,
    sha256_file,
    versions,
)
from .quiet import quiet
from .staging import PARITY_JSON, PARITY_MD

__all__ = ["BundleRejected", "ConvertError", "ParityError", "convert_model"]

DEFAULT_CALIBRATION_IMAGES = 300

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class BundleRejected(ParityError):
    """No artifact passed: the bundle and its reports are in `folder`, not at --out."""

    def __init__(self, reasons: list[str], manifest: dict, folder: Path) -> None:
        super().__init__(reasons, manifest)
        self.folder = folder


@dataclass
class Outcome:
    """One row's result: its file (None when conversion failed), figures and failures."""

    row: Format
    data: bytes | None = None
    sha256: str = ""
    convert_seconds: float = 0.0
    parity_seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "failed" if self.failures else "passed"

    def parity(self) -> dict:
        return {**self.figures, "bytes": len(self.data) if self.data is not None else None,
                "convert_seconds": round(self.convert_seconds, 3),
                "parity_seconds": round(self.parity_seconds, 3),
                "thresholds": self.row.thresholds.to_dict()}


def convert_model(model: Path, out: Path, data: Path | None = None,
                  formats: Sequence[str] | None = None,
                  calibration_images: int = DEFAULT_CALIBRATION_IMAGES, *,
                  threads: int | None = None, calibration: np.ndarray | None = None,
                  table: Sequence[Format] = FORMATS, log: Log | None = _stderr) -> dict:
    """Convert `model` into a verified bundle at `out`; returns the manifest written.

    `data` overrides the data folder recorded in the model's config.json; `formats` picks rows of
    the format table by name. `calibration` (float32 NHWC images) replaces the training images
    for int8 calibration and `table` the format table: both for tests. Raises ParityError, after
    the bundle and its reports are in place, when tflite-int8 fails the gate; BundleRejected (a
    ParityError) when every artifact fails: `out` is then left as it was and the bundle is at
    `<out>.rejected`; ConvertError/DataError when nothing could be written.
    """
    log = log or (lambda line: None)
    model, shown_out = Path(model), Path(out)
    out = Path(os.path.abspath(out))  # '.', '..' and 'x/' have a usable name and parent
    rows = select(formats, table)
    for row in rows:
        staging.check_artifact_file(row.file)
    if not model.is_file():
        raise ConvertError(f"no model at {model}; run make train first")
    check_keras_archive(model)  # before the data is read; Keras calls it "File not found"
    staging.check_destinations(out)
    record, root = dataset.resolve_record(model, Path(data) if data is not None else None)
    splits = dataset.load_splits(record, root)
    if record.data_fingerprint and splits.fingerprint() != record.data_fingerprint:
        log(f"warning: the data in {root} is not what the model was trained on (fingerprint "
            f"{splits.fingerprint()}, training saw {record.data_fingerprint}); the test split "
            "may contain training images")
    x_test, y_test = dataset.held_out_arrays(record, splits)
    images = np.zeros((0, *x_test.shape[1:]), np.float32)
    calibration_note = "none needed"
    if any(row.calibrated for row in rows):
        if calibration is not None:
            images, calibration_note = np.asarray(calibration, np.float32), "injected images"
        else:
            images = dataset.calibration_arrays(record, splits, calibration_images)
            calibration_note = f"training split ({len(images)} of {len(splits.train)} images)"
        if images.shape[1:] != x_test.shape[1:]:
            raise ConvertError(f"calibration images have shape {images.shape[1:]}, the model "
                               f"takes {x_test.shape[1:]}")
    keras_model = _load_keras(model, record.spec)
    # CAM-ready head: every artifact also outputs class-activation maps (GAP heads only); parity
    # still compares the probabilities with the plain model's.
    # ...and the pooled features for the domain gate (convert.domain_fit).
    export, maps_model = domain_fit.export_model(keras_model)
    reference = parity.Reference(_keras_predict(keras_model, x_test), y_test, LABELS)
    log(f"converting {model} -> {shown_out}: {len(rows)} format(s); test split {len(y_test)} images "
        f"({splits.test_source}) from {root}; int8 calibration: {calibration_note}")

    model_sha = sha256_file(model)
    created = now()
    provenance = {
        "model_file": model.name, "model_sha256": model_sha,
        "data": str(root), "data_fingerprint": splits.fingerprint(),
        "training_data_fingerprint": record.data_fingerprint,
        "test_split": splits.test_source, "test_images": len(y_test),
        "calibration": {"source": calibration_note, "images": len(images)},
        "versions": versions(), "created": created,
    }
    build = _Build(rows, record.spec, record.temperature, provenance, x_test, reference, threads,
                   log, explain=describe(keras_model, maps_model),
                   uncertain_below=record.uncertain_below, operating_point=record.operating_point)
    build.domain, domain_data = _fit_domain(keras_model, export, record, splits, images, log)
    if domain_data is not None:
        build.reference_features = domain_fit.keras_outputs(export, x_test)[1]
    staged = staging.prepare(out)
    try:
        # Scratch beside the bundle too, so the next run also clears a killed run's scratch.
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.convert-{os.getpid()}-work-",
                                         dir=out.parent) as work:
            if domain_data is not None:
                staging.write_file(staged / DOMAIN_FILE, domain_data)
            context = WriteContext(export, images, Path(work),
                                   bias_correction=bias_correction.wanted(record.recipe))
            for index, row in enumerate(rows, 1):
                meta = model_metadata(row, LABELS, record.spec, record.temperature, model_sha,
                                      created, uncertain_below=record.uncertain_below,
                                      operating_point=record.operating_point)
                build.add(index, row, context, meta, staged)
        manifest = build.finish(staged, model.stat().st_size)
        _verify(staged)
        rejected = None
        if manifest["default"] is None:  # nothing in it can run: never in place of a bundle
            rejected = staging.keep_rejected(staged, out)
        else:
            install(staged, out)
    except BaseException:
        discard(staged)
        raise
    if rejected is None and (line := staging.drop_rejected(out)) is not None:
        log(line)
    reasons = gate_reasons(build.outcomes)
    if rejected is not None:
        raise BundleRejected([*reasons, f"nothing installed: {shown_out} was left as it was; the "
                              f"rejected bundle is at {rejected} for inspection"], manifest,
                             rejected)
    if reasons:
        raise ParityError(reasons, manifest)
    return manifest


class _Build:
    """Accumulates outcomes; the staged manifest is rewritten after every artifact."""

    def __init__(self, rows: Sequence[Format], spec: PreprocessSpec, temperature: float,
                 provenance: dict, x_test: np.ndarray, reference: parity.Reference,
                 threads: int | None, log: Log, explain: dict | None = None, *,
                 uncertain_below: float | None = None, operating_point: dict | None = None) -> None:
        self.rows, self.spec, self.temperature = rows, spec, temperature
        self.uncertain_below, self.operating_point = uncertain_below, operating_point
        self.explain = explain
        self.provenance, self.threads, self.log = provenance, threads, log
        self.x_test, self.reference = x_test, reference
        self.reference_figures = reference.figures()
        self.outcomes: list[Outcome] = []
        self.domain: dict | None = None  # the manifest's domain section
        self.reference_features: np.ndarray | None = None  # Keras features of the test split

    def add(self, index: int, row: Format, context: WriteContext, meta: dict, staged: Path) -> None:
        outcome = Outcome(row)
        self.outcomes.append(outcome)
        start = time.perf_counter()
        try:
            outcome.data = EMBEDDERS[row.format](row.writer(context), meta)
            outcome.sha256 = hashlib.sha256(outcome.data).hexdigest()
        except Exception as exc:  # a converter's failure is a failed artifact, not a failed run
            outcome.failures = [f"conversion failed: {_one_line(exc)}"]
        outcome.convert_seconds = time.perf_counter() - start
        if outcome.data is not None:
            staging.write_file(staged / row.file, outcome.data)
            self._write_manifest(staged, default=None)
            start = time.perf_counter()
            try:
                probabilities, status_figures = parity.run_with_status(
                    staged, row.name, self.x_test, self.reference, self.reference_features,
                    self.threads)
            except Exception as exc:  # whatever the runtime raises, this artifact cannot ship
                outcome.failures = [f"cannot run in the ct-edge runtime: {_one_line(exc)}"]
            else:
                outcome.figures = {**parity.figures(probabilities, self.reference), **status_figures}
                outcome.failures = parity.gate(outcome.figures, self.reference_figures,
                                               row.thresholds)
            outcome.parity_seconds = time.perf_counter() - start
        self.log(_progress(index, len(self.rows), outcome))

    def default(self) -> str | None:
        passed = [o for o in self.outcomes if o.status == "passed"]
        if any(o.row.name == DEFAULT_ARTIFACT for o in passed):
            return DEFAULT_ARTIFACT
        order = {o.row.name: i for i, o in enumerate(self.outcomes)}
        best = min(passed, default=None,
                   key=lambda o: (PRECISION_ORDER.get(o.row.precision, 9), order[o.row.name]))
        return best.row.name if best else None

    def _entries(self, final: bool) -> tuple[list[dict], list[dict]]:
        written, missing = [], []
        for o in self.outcomes:
            if o.data is None:
                missing.append({"name": o.row.name, "file": o.row.file, "format": o.row.format,
                                "precision": o.row.precision, "status": "failed",
                                "failures": o.failures})
                continue
            status = o.status if final else "pending"
            written.append(artifact_entry(o.row, o.sha256, len(o.data), status,
                                          o.failures if final else [], o.parity()))
        return written, missing

    def _write_manifest(self, staged: Path, default: str | None, final: bool = False) -> dict:
        written, missing = self._entries(final)
        manifest = build_manifest(LABELS, self.spec, self.temperature, written, default,
                                  self.provenance, missing, explain=self.explain,
                                  uncertain_below=self.uncertain_below,
                                  operating_point=self.operating_point, domain=self.domain)
        _write_json(staged / MANIFEST, manifest)
        return manifest

    def finish(self, staged: Path, keras_bytes: int) -> dict:
        """Final manifest (returned), parity.json and parity.md."""
        default = self.default()
        manifest = self._write_manifest(staged, default, final=True)
        parity_report = {
            "test_images": self.reference.n, "test_split": self.provenance["test_split"],
            "data": self.provenance["data"], "data_fingerprint": self.provenance["data_fingerprint"],
            "keras": {"file": self.provenance["model_file"], "bytes": keras_bytes,
                      "sha256": self.provenance["model_sha256"], **self.reference_figures},
            "artifacts": [{"name": o.row.name, "file": o.row.file, "format": o.row.format,
                           "precision": o.row.precision, "engine": o.row.engine,
                           "status": o.status, "failures": o.failures, **o.parity()}
                          for o in self.outcomes],
            "default": default,
            "gate": {"passed": not gate_reasons(self.outcomes), "reasons": gate_reasons(self.outcomes)},
            "created": self.provenance["created"],
        }
        _write_json(staged / PARITY_JSON, parity_report)
        (staged / PARITY_MD).write_text(report.markdown(parity_report), encoding="utf-8")
        return manifest


def _fit_domain(model: Any, export: Any, record: dataset.TrainingRecord, splits: Any,
                calibration: np.ndarray, log: Log) -> tuple[dict | None, bytes | None]:
    """The manifest's domain section and the statistics file it covers (None when not fitted)."""
    modality = record.modality
    if modality is None:
        log("warning: the training record names no modality (trained before it was recorded); "
            "DICOM headers will not be checked - retrain with --modality ct|xray")
    fitted = domain_fit.fit_domain(model, export, record, splits, modality, calibration)
    if fitted is None:
        log("warning: no domain gate: the model exports no pooled features or there is no "
            "validation split; inputs unlike the training images will not be flagged")
        return ({"modality": modality} if modality else None), None
    section = fitted.section
    log(f"domain gate: modality {modality or 'unknown'}; {section['method']} on "
        f"{section['features']['dim']} pooled features, threshold {section['threshold']:.3g} "
        f"({section['fitted_on']['threshold']}; {section['validation_flagged']:.1%} of them "
        "above it)")
    return section, fitted.data


def gate_reasons(outcomes: Sequence[Outcome]) -> list[str]:
    """Why the run must exit non-zero: tflite-int8 failed, or every artifact did. Empty: fine."""
    reasons = []
    for o in outcomes:
        if o.row.name == DEFAULT_ARTIFACT and o.failures:
            reasons += [f"{o.row.name} cannot be the default: {f}" for f in o.failures]
    if outcomes and all(o.failures for o in outcomes):
        reasons += [f"{o.row.name}: {f}" for o in outcomes if o.row.name != DEFAULT_ARTIFACT
                    for f in o.failures]
        reasons.append("every artifact failed its parity check; the bundle has no default")
    return reasons


def _load_keras(path: Path, spec: PreprocessSpec) -> Any:
    try:
        with quiet():
            from training.models import load_keras_model

            model = load_keras_model(path)
    except Exception as exc:  # Keras raises many types for an unreadable file
        raise ConvertError(f"cannot load the Keras model {path}: {_one_line(exc)}") from None
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    if shape != (spec.size, spec.size, spec.channels):
        raise ConvertError(f"{path} takes {shape} inputs but its config.json preprocessing makes "
                           f"{(spec.size, spec.size, spec.channels)}; retrain or fix config.json")
    classes = int(model.outputs[0].shape[-1])
    if classes != len(LABELS):
        raise ConvertError(f"{path} has {classes} outputs, expected {len(LABELS)} ({LABELS})")
    return model


def _keras_predict(model: Any, x: np.ndarray) -> np.ndarray:
    with quiet():
        return np.asarray(model.predict(x, batch_size=parity.BATCH, verbose=0), np.float64)


def _verify(staged: Path) -> None:
    """The staged bundle loads and every file matches its hash: the runtime will accept it."""
    bundle = Bundle.load(staged)
    for artifact in bundle.artifacts.values():
        artifact.read_verified()


def _progress(index: int, total: int, o: Outcome) -> str:
    head = f"[{index}/{total}] {o.row.name:<15}"
    if o.data is None:
        return f"{head} FAILED after {o.convert_seconds:.1f} s: {'; '.join(o.failures)}"
    f = o.figures
    figures = ""
    if f:
        diff = "—" if f["max_abs_diff"] is None else f"{f['max_abs_diff']:.1e}"
        figures = (f"  accuracy {f['accuracy']:.1%}  agreement {f['agreement']:.1%}  "
                   f"max |Δp| {diff}")
        if "status_agreement" in f:
            figures += f"  status agreement {f['status_agreement']:.1%}"
    verdict = "passed" if not o.failures else "FAILED: " + "; ".join(o.failures)
    return (f"{head} {report.human_size(len(o.data)):>9}  converted {o.convert_seconds:5.1f} s  "
            f"parity {o.parity_seconds:4.1f} s{figures}  {verdict}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"


def _write_json(path: Path, data: object) -> None:
    staging.write_file(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())
