"""The public API: `Classifier.from_bundle(...).predict("scan.png")`.

Thread safety: one Classifier may be shared between threads; calls into the engine are
serialised by the backend's lock, decoding runs in parallel.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .backends import Backend, open_backend
from .bundle import Artifact, Bundle
from .errors import BundleError, InputError
from .preprocess import PreprocessSpec, Source, decode, fit

if TYPE_CHECKING:
    from .explain import Explanation


STATUSES = ("ok", "uncertain", "out_of_domain")


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
    def confidence(self) -> float:
        return self.probabilities[self.label] if self.label else 0.0

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
                "confidence": round(self.confidence, 6) if self.error is None else None,
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
                          f"{expected}; rebuild the bundle with `make convert`")
    classes = getattr(engine, "num_classes", len(bundle.labels))
    if classes not in (len(bundle.labels), -1):
        raise BundleError(f"{artifact.path}: model has {classes} outputs but the manifest lists "
                          f"{len(bundle.labels)} labels; rebuild the bundle with `make convert`")


class Classifier:
    """A bundle's artifact loaded into its engine, with the bundle's preprocessing."""

    def __init__(self, bundle: Bundle, artifact: Artifact, backend: Backend,
                 spec: PreprocessSpec | None = None) -> None:
        self.bundle = bundle
        self.artifact = artifact
        self.backend = backend
        self.labels = bundle.labels
        self.spec = spec or bundle.spec

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, artifact: str | None = None,
                    backend: str | None = None, threads: int | None = None,
                    window: str | tuple[float, float] | None = None) -> Classifier:
        """Load and verify a bundle; `backend` ('tflite'|'onnx') picks that format's best artifact."""
        bundle = Bundle.load(path)
        chosen = bundle.select(artifact, backend)
        engine = open_backend(chosen.format, chosen.read_verified(), threads)
        _check_contract(bundle, chosen, engine)
        spec = bundle.spec.with_window(window) if window is not None else None
        return cls(bundle, chosen, engine, spec)

    def predict_array(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, h, w, c) preprocessed inputs -> calibrated probabilities (n, classes)."""
        return apply_temperature(self.backend.predict(batch), self.bundle.temperature)

    @property
    def has_maps(self) -> bool:
        """True when the artifact carries a class-activation-map output (see ct_edge.explain)."""
        return bool(getattr(self.backend, "has_maps", False))

    def predict_with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (n, classes) and raw class maps (n, h, w, classes). BundleError
        when the artifact has no map output (check `has_maps`)."""
        if not self.has_maps:
            raise BundleError(f"artifact {self.artifact.name!r} has no class-activation-map output; "
                              "rebuild the bundle with `make convert` (GAP models only) or use "
                              "occlusion")
        probabilities, maps = self.backend.predict_with_maps(batch)  # type: ignore[attr-defined]
        return apply_temperature(probabilities, self.bundle.temperature), maps

    def explain(self, source: Source, method: str | None = None,
                target: str | None = None) -> Explanation:
        """A heatmap of where the answer comes from; see `ct_edge.explain.explain`."""
        from .explain import explain

        return explain(self, source, method=method, target=target)

    def _result(self, path: str, probabilities: np.ndarray, timings: dict[str, float]) -> Prediction:
        best = int(np.argmax(probabilities))
        probs = {label: float(p) for label, p in zip(self.labels, probabilities, strict=True)}
        uncertain = bool(probabilities[best] < self.bundle.uncertain_below)
        return Prediction(path=path, label=self.labels[best], probabilities=probs,
                          status="uncertain" if uncertain else "ok",
                          reason=(f"confidence below {self.bundle.uncertain_below:.0%}"
                                  if uncertain else None),
                          timings_ms=timings)

    def predict(self, source: Source | np.ndarray) -> Prediction:
        """Classify one file (path or bytes) or one preprocessed array. Raises InputError."""
        if isinstance(source, np.ndarray):
            start = time.perf_counter()
            probabilities = self.predict_array(source[None].astype(np.float32))[0]
            return self._result("<array>", probabilities,
                                {"inference": (time.perf_counter() - start) * 1e3})
        name = "<bytes>" if isinstance(source, bytes) else str(source)
        t0 = time.perf_counter()
        image = decode(source, self.spec)
        t1 = time.perf_counter()
        x = fit(image, self.spec)
        t2 = time.perf_counter()
        probabilities = self.predict_array(x[None])[0]
        t3 = time.perf_counter()
        return self._result(name, probabilities, {"decode": (t1 - t0) * 1e3,
                                                  "preprocess": (t2 - t1) * 1e3,
                                                  "inference": (t3 - t2) * 1e3})

    def predict_many(self, sources: Iterable[Source]) -> Iterator[Prediction]:
        """Classify each input in turn; an unreadable one yields a Prediction with `error` set."""
        for source in sources:
            try:
                yield self.predict(source)
            except InputError as exc:
                yield Prediction(path=exc.path, label=None, probabilities={}, error=exc.problem)
