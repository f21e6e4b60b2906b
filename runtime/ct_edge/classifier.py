"""The public API: `Classifier.from_bundle(...).predict("scan.png")`.

Thread safety: one Classifier may be shared between threads; calls into the engine are
serialised by the backend's lock, decoding runs in parallel.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import Backend, open_backend
from .bundle import Artifact, Bundle
from .dicom import INFO_KEY, DicomError, DicomInfo, header_check
from .domain import FeatureGate, metadata_reason
from .errors import REBUILD_BUNDLE, BundleError, InputError
from .preprocess import PreprocessSpec, Source, decode, fit

STATUSES = ("ok", "uncertain", "out_of_domain")
CHECK_OFF = "domain check off (research use): the label is forced"
# A bundle converted without domain statistics cannot tell an input unlike its training images:
# no answer of it is confident, so each is uncertain and says why.
NO_GATE = "this bundle has no domain gate: inputs unlike its training images are not detected"


class InferenceError(InputError):
    """The model gave no usable answer for one input (probabilities that are not finite)."""


@dataclass
class Prediction:
    """One classified input.

    `status` is "ok" (answered), "uncertain" (label given, confidence below the bundle's operating
    point) or "out_of_domain" (`label` None, `reason` says why). `error` is set (and `label` None,
    `status` None) when the input could not be read at all.
    """

    path: str
    label: str | None
    probabilities: dict[str, float]
    status: str | None = "ok"
    reason: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self) -> None:
        if self.error is not None:
            self.status = None

    @property
    def uncertain(self) -> bool:
        return self.status == "uncertain"

    @property
    def confidence(self) -> float | None:
        """The probability of the label; None when there is no label (out_of_domain, error)."""
        return self.probabilities[self.label] if self.label else None

    def ranked(self, top_k: int | None = None) -> list[tuple[str, float]]:
        """The top_k (label, probability) pairs, most probable first (ties in label order)."""
        return sorted(self.probabilities.items(), key=lambda item: -item[1])[:top_k]

    def to_dict(self, top_k: int | None = None) -> dict:
        """The JSON contract of one result (`classify --json`, the HTTP API, the store).

        `probabilities` keeps the bundle's label order; with `top_k` only the k most probable
        classes are listed (still in label order).
        """
        shown = {label for label, _ in self.ranked(top_k)}
        return {"path": self.path, "label": self.label,
                "confidence": None if self.confidence is None else round(self.confidence, 6),
                "status": self.status, "reason": self.reason,
                "probabilities": {label: round(p, 6) for label, p in self.probabilities.items()
                                  if label in shown},
                "timings_ms": {stage: round(ms, 3) for stage, ms in self.timings_ms.items()},
                "error": self.error}


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling on probabilities: softmax(log p / T) == softmax(z / T) for logits z.

    Also at T = 1 the rows are renormalised: an int8 output moves in steps of 1/256 and its
    dequantised probabilities need not sum to 1.
    """
    logits = np.log(np.clip(probabilities, 1e-7, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=-1, keepdims=True)).astype(np.float32)


def _check_contract(bundle: Bundle, artifact: Artifact, engine: Backend) -> None:
    """The model file must match the manifest's labels and input shape before it runs."""
    expected = (bundle.spec.size, bundle.spec.size, bundle.spec.channels)
    shape = getattr(engine, "input_shape", expected)
    if any(d not in (e, -1) for d, e in zip(shape, expected, strict=False)) or len(shape) != 3:
        raise BundleError(f"{artifact.path}: model input {shape} does not match the manifest's "
                          f"{expected}; {REBUILD_BUNDLE}")
    classes = getattr(engine, "num_classes", len(bundle.labels))
    if classes not in (len(bundle.labels), -1):
        raise BundleError(f"{artifact.path}: model has {classes} outputs but the manifest lists "
                          f"{len(bundle.labels)} labels; {REBUILD_BUNDLE}")


def _check_gate(artifact: Artifact, engine: Backend, gate: FeatureGate) -> None:
    """The artifact must export the features the bundle's domain statistics describe."""
    dim = getattr(engine, "feature_dim", None)
    if dim is None:
        raise BundleError(f"{artifact.path}: the bundle has a domain gate but this artifact exports "
                          "no features; convert the model again (or use domain_check=False)")
    if dim != gate.feature_dim:
        raise BundleError(f"{artifact.path}: the artifact exports {dim} features, the domain "
                          f"statistics describe {gate.feature_dim}; convert the model again")


class Classifier:
    """A bundle's artifact loaded into its engine, with the bundle's preprocessing and its domain
    gate (modality and feature statistics, when the bundle records them; see ct_edge.domain)."""

    def __init__(self, bundle: Bundle, artifact: Artifact, backend: Backend,
                 spec: PreprocessSpec | None = None, domain_check: bool = True) -> None:
        self.bundle = bundle
        self.artifact = artifact
        self.backend = backend
        self.labels = bundle.labels
        self.spec = spec or bundle.spec
        self.domain_check = domain_check
        self.gate: FeatureGate | None = bundle.feature_gate() if domain_check else None
        if self.gate is not None:
            _check_gate(artifact, backend, self.gate)

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, artifact: str | None = None,
                    backend: str | None = None, threads: int | None = None,
                    window: str | tuple[float, float] | None = None,
                    domain_check: bool = True) -> Classifier:
        """Load and verify a bundle; `backend` ('tflite'|'onnx') picks that format's best artifact.

        `domain_check=False` (research use) answers every input with a label, also inputs unlike
        the training images; each Prediction's reason says the check was off.
        """
        bundle = Bundle.load(path)
        chosen = bundle.select(artifact, backend)
        engine = open_backend(chosen.format, chosen.read_verified(), threads)
        _check_contract(bundle, chosen, engine)
        spec = bundle.spec.with_window(window) if window is not None else None
        return cls(bundle, chosen, engine, spec, domain_check)

    def predict_array(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, h, w, c) preprocessed inputs -> calibrated probabilities (n, classes)."""
        return apply_temperature(self.backend.predict(batch), self.bundle.temperature)

    def predict_scored(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities (n, classes) and domain scores (n,) from one run of the model;
        scores are None without a feature gate (old bundle, or domain_check=False)."""
        if self.gate is None:
            return self.predict_array(batch), None
        outputs = self.backend.run(batch, features=True)
        return (apply_temperature(outputs.probabilities, self.bundle.temperature),
                self.gate.scores(outputs.features))

    def decide(self, probabilities: np.ndarray, score: float | None = None,
               info: DicomInfo | None = None) -> tuple[str | None, str, str | None]:
        """(label, status, reason) for one input's calibrated probabilities, domain score and
        DICOM header: out_of_domain when the header or the score says so, else ok or uncertain."""
        if self.domain_check:
            reason = self.metadata_reason(info)
            if reason is None and score is not None and self.gate is not None:
                reason = self.gate.reason(float(score))
            if reason is not None:
                return None, "out_of_domain", reason
        best = int(np.argmax(probabilities))
        low = bool(probabilities[best] < self.bundle.uncertain_below)
        reasons = [f"confidence below {self.bundle.uncertain_below:.0%}"] if low else []
        if not self.domain_check:
            reasons.append(CHECK_OFF)
        elif self.no_gate_reason is not None:
            reasons.append(self.no_gate_reason)
        uncertain = low or self.no_gate_reason is not None
        return (self.labels[best], "uncertain" if uncertain else "ok",
                "; ".join(reasons) if reasons else None)

    @property
    def no_gate_reason(self) -> str | None:
        """NO_GATE when the domain check is on but the bundle has no feature gate: then no answer
        may be `ok` (a series result neither), else None."""
        return NO_GATE if self.domain_check and self.gate is None else None

    def metadata_reason(self, info: DicomInfo | None) -> str | None:
        """Why a DICOM header is foreign to this bundle (None: not foreign, or no header)."""
        if info is None or not self.domain_check:
            return None
        return metadata_reason(info, self.bundle.modality)

    def decode(self, source: Source) -> Image.Image:
        """`preprocess.decode` with this bundle's DICOM header rules applied first: a colour or
        foreign DICOM object raises DicomError (see `refusal`) before its pixels are decoded."""
        with header_check(self.metadata_reason):
            return decode(source, self.spec)

    def refusal(self, exc: DicomError) -> Prediction | None:
        """The out_of_domain result for a DICOM object with no image to classify whose header is
        foreign to the bundle (a report, a segmentation...); None: an input error after all."""
        reason = self.metadata_reason(exc.info)
        if reason is None:
            return None
        return Prediction(path=exc.path, label=None, probabilities={}, status="out_of_domain",
                          reason=reason)

    @property
    def has_maps(self) -> bool:
        """True when the artifact carries a class-activation-map output (see ct_edge.explain)."""
        return bool(getattr(self.backend, "has_maps", False))

    def predict_with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (n, classes) and raw class maps (n, h, w, classes). BundleError
        when the artifact has no map output (check `has_maps`)."""
        if not self.has_maps:
            raise BundleError(f"artifact {self.artifact.name!r} has no class-activation-map output; "
                              "use a bundle converted with class maps (on the build machine: "
                              "`make convert`, GAP models only) or use "
                              "occlusion")
        probabilities, maps = self.backend.predict_with_maps(batch)  # type: ignore[attr-defined]
        return apply_temperature(probabilities, self.bundle.temperature), maps

    def predict_with_maps_scored(self, batch: np.ndarray
                                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """predict_with_maps plus the domain scores (None without a gate), from one run."""
        if self.gate is None:
            return (*self.predict_with_maps(batch), None)
        if not self.has_maps:
            self.predict_with_maps(batch)  # raises the BundleError that explains what to do
        outputs = self.backend.run(batch, maps=True, features=True)
        return (apply_temperature(outputs.probabilities, self.bundle.temperature), outputs.maps,
                self.gate.scores(outputs.features))

    def _result(self, path: str, probabilities: np.ndarray, timings: dict[str, float],
                score: float | None = None, info: DicomInfo | None = None) -> Prediction:
        if not np.isfinite(probabilities).all():
            # NaN compares false with everything: argmax and the operating point would make a
            # label out of it, and JSON has no NaN to store or send.
            raise InferenceError(path, "the model's output for this input is not finite (NaN or "
                                       "infinity); there is no result to give")
        probs = {label: float(p) for label, p in zip(self.labels, probabilities, strict=True)}
        label, status, reason = self.decide(probabilities, score, info)
        return Prediction(path=path, label=label, probabilities=probs, status=status,
                          reason=reason, timings_ms=timings)

    def _run(self, x: np.ndarray, timings: dict[str, float]) -> tuple[np.ndarray, float | None]:
        start = time.perf_counter()
        probabilities, scores = self.predict_scored(x[None].astype(np.float32, copy=False))
        timings["inference"] = (time.perf_counter() - start) * 1e3
        return probabilities[0], None if scores is None else float(scores[0])

    def predict(self, source: Source | np.ndarray) -> Prediction:
        """Classify one file (path or bytes) or one preprocessed array. Raises InputError.

        A DICOM object whose header is foreign to the bundle (another modality, a report, a
        segmentation...) is out_of_domain without the model being run.
        """
        timings: dict[str, float] = {}
        if isinstance(source, np.ndarray):
            probabilities, score = self._run(source, timings)
            return self._result("<array>", probabilities, timings, score)
        name = "<bytes>" if isinstance(source, bytes) else str(source)
        t0 = time.perf_counter()
        try:
            image = self.decode(source)
        except DicomError as exc:
            refused = self.refusal(exc)
            if refused is None:
                raise
            refused.timings_ms["decode"] = (time.perf_counter() - t0) * 1e3
            return refused
        info = image.info.get(INFO_KEY)
        t1 = time.perf_counter()
        timings["decode"] = (t1 - t0) * 1e3
        reason = self.metadata_reason(info)
        if reason is not None:
            return Prediction(path=name, label=None, probabilities={}, status="out_of_domain",
                              reason=reason, timings_ms=timings)
        x = fit(image, self.spec)
        timings["preprocess"] = (time.perf_counter() - t1) * 1e3
        probabilities, score = self._run(x, timings)
        return self._result(name, probabilities, timings, score, info)

    def predict_many(self, sources: Iterable[Source]) -> Iterator[Prediction]:
        """Classify each input in turn; an unreadable one yields a Prediction with `error` set."""
        for source in sources:
            try:
                yield self.predict(source)
            except InputError as exc:
                yield Prediction(path=exc.path, label=None, probabilities={}, error=exc.problem)
