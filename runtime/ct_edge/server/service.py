"""The work behind every endpoint: one Classifier, a bounded pool of worker threads, the store.

Decoding and preprocessing run in the workers in parallel, as far as their estimated memory fits
one decode budget (limits.DECODE_BUDGET_BYTES); the engine call is serialised by the backend's
own lock. A request that finds every worker busy and the queue full is refused at once
(`Busy` -> 503) rather than piling up; one that waits longer than the time limit gets `TimedOut`
(-> 504). A result is committed to the store inside the worker, before the caller answers.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from ..budget import ByteBudget, Hold
from ..classifier import Classifier, InferenceError, Prediction
from ..errors import InputError, UnsupportedFormat
from ..limits import DECODE_BUDGET_BYTES
from ..preprocess import decode_cost, is_dicom
from ..store import Store, sha256_bytes

T = TypeVar("T")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
HEATMAP_SIDE = 256  # px of the stored heatmap overlay


def display_name(value: object, fallback: str, limit: int) -> str:
    """A client-given name (?name=, an OIP tensor's name) as display text: printable characters
    only (no lone surrogate, which the store could not hold), at most `limit`. Never a path."""
    text = "".join(ch for ch in str(value) if ch.isprintable()).strip()
    return text[:limit] or fallback


class ClientError(Exception):
    """A request the server refuses: HTTP status and one line for `{"error": ...}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _refusal(exc: InputError, source: str) -> ClientError:
    """The answer to an input the classifier could not take: 415 for a format it does not
    support, 422 when the model gave no finite answer, else 400."""
    message = f"{source}: {exc.problem}"
    if isinstance(exc, InferenceError):  # a well-formed input the model cannot classify
        return ClientError(422, message)
    return ClientError(415 if isinstance(exc, UnsupportedFormat) else 400, message)


class Busy(ClientError):
    def __init__(self, retry_after_s: int = 1) -> None:
        super().__init__(503, "the server is busy (queue full); retry shortly",
                         {"Retry-After": str(retry_after_s)})


class TimedOut(ClientError):
    def __init__(self, limit_s: float) -> None:
        super().__init__(504, f"inference took longer than the {limit_s:g} s limit")


def sniff(data: bytes) -> str | None:
    """'png', 'jpeg' or 'dicom' from the first bytes; None for anything else."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if is_dicom(data):
        return "dicom"
    return None


@dataclass(frozen=True)
class Identity:
    """What answered: the bundle (sha256 of its manifest), the artifact that ran and its parity
    status (anything but "passed" means its answers may differ from the reference model)."""

    bundle_sha256: str
    artifact: str
    artifact_sha256: str
    artifact_format: str
    artifact_parity: str

    def to_dict(self) -> dict[str, str]:
        return {"bundle_sha256": self.bundle_sha256, "artifact": self.artifact,
                "artifact_sha256": self.artifact_sha256, "artifact_format": self.artifact_format,
                "artifact_parity": self.artifact_parity}


def overlay_png(image: np.ndarray, heatmap: np.ndarray, side: int = HEATMAP_SIDE) -> bytes:
    """The model-input image with the heatmap laid over it, as PNG bytes."""
    from ..explain import HEAT_ALPHA, colorize, resize

    gray = Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8), mode="L")
    base = np.asarray(gray.resize((side, side), Image.Resampling.BILINEAR).convert("RGB"),
                      np.float32)
    heat = resize(heatmap, side)
    alpha = (HEAT_ALPHA * heat)[..., None]
    over = np.rint(base * (1 - alpha) + colorize(heat) * alpha).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(over, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Service:
    """Classification for the HTTP front end: bounded, timed, stored."""

    def __init__(self, classifier: Classifier, store: Store, workers: int = 2,
                 queue_size: int = 16, timeout_s: float = 30.0,
                 decode_budget: int = DECODE_BUDGET_BYTES) -> None:
        self.classifier = classifier
        self.decode_room = ByteBudget(decode_budget)
        self.store = store
        self.timeout_s = timeout_s
        self.capacity = workers + queue_size
        artifact = classifier.artifact
        self.identity = Identity(classifier.bundle.manifest_sha256, artifact.name, artifact.sha256,
                                 artifact.format, artifact.status)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="ct-edge-worker")
        self._slots = threading.BoundedSemaphore(self.capacity)
        self._pending = 0
        self._pending_lock = threading.Lock()

    @property
    def queue_depth(self) -> int:
        """Requests admitted and not yet finished (running or waiting for a worker)."""
        return self._pending

    @property
    def full(self) -> bool:
        """True when a new request would be refused (every worker busy, the queue full)."""
        return self._pending >= self.capacity

    def run(self, work: Callable[..., T], *args: Any, hold: Hold | None = None) -> T:
        """Run `work(*args)` in a worker; Busy when the queue is full, TimedOut past the limit.

        `hold` (the upload's bytes) is kept until the work ends, even if the caller stops waiting.
        """
        if not self._slots.acquire(blocking=False):
            raise Busy()
        with self._pending_lock:
            self._pending += 1
        if hold is not None:
            hold.share()
        try:
            future = self._executor.submit(self._release_after, hold, work, *args)
        except BaseException:
            self._release(hold)
            raise
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            # The work still finishes (and is stored) in its worker; only the answer is lost.
            raise TimedOut(self.timeout_s) from None

    def _release_after(self, hold: Hold | None, work: Callable[..., T], *args: Any) -> T:
        try:
            return work(*args)
        finally:
            self._release(hold)

    def _release(self, hold: Hold | None) -> None:
        if hold is not None:
            hold.release()
        with self._pending_lock:
            self._pending -= 1
        self._slots.release()

    def close(self) -> None:
        """Wait for the work in flight, then stop the workers (the store is closed by its owner)."""
        self._executor.shutdown(wait=True)

    # --- the work (runs in a worker thread) ----------------------------------------------------

    @contextmanager
    def decoding(self, data: bytes, extra: int = 0) -> Iterator[None]:
        """Hold the decode budget for what decoding `data` is estimated to cost (from its
        header; the whole budget when it cannot be read) plus `extra` bytes the caller keeps in
        memory meanwhile, waiting for room. `data` itself is counted with its upload."""
        cost = decode_cost(data, self.classifier.spec)
        limit = self.decode_room.limit
        with self.decode_room.holding(min((cost if cost is not None else limit) + extra, limit)):
            yield

    def predict_encoded(self, data: bytes, source: str, extra: int = 0) -> Prediction:
        """One encoded file -> its prediction (not stored); ClientError for a file it cannot read.
        `extra`: bytes besides the upload's held meanwhile (see `decoding`)."""
        with self.decoding(data, extra):
            return self._predict_bytes(data, source)

    def _predict_bytes(self, data: bytes, source: str) -> Prediction:
        if sniff(data) is None:
            raise ClientError(415, f"{source}: not a PNG, JPEG or DICOM file (the body is "
                                   "sniffed, whatever its Content-Type)")
        try:
            prediction = self.classifier.predict(data)
        except InputError as exc:
            raise _refusal(exc, source) from None
        prediction.path = source
        return prediction

    def predict_array(self, x: np.ndarray, source: str) -> Prediction:
        """One preprocessed input -> its prediction (not stored); ClientError (422) when the model
        gives no finite answer."""
        try:
            prediction = self.classifier.predict(x)
        except InputError as exc:
            raise _refusal(exc, source) from None
        prediction.path = source
        return prediction

    def classify_bytes(self, data: bytes, source: str, explain: bool = False,
                       origin: str = "http") -> dict[str, Any]:
        """One encoded file -> the `ct-edge classify --json` object plus the stored row's id."""
        with self.decoding(data):  # one hold for both decodes: nested holds could deadlock
            prediction = self._predict_bytes(data, source)
            heatmap = self._heatmap(data) if explain and prediction.label is not None else None
        row_id = self.record(prediction, origin, sha256_bytes(data), heatmap)
        result = prediction.to_dict()
        result["id"] = row_id
        if explain:
            result["heatmap"] = f"/v1/results/{row_id}/heatmap.png" if heatmap else None
        return result

    def _heatmap(self, data: bytes) -> bytes | None:
        from ..explain import explain

        try:
            explanation = explain(self.classifier, data)
        except InputError:
            return None
        return overlay_png(explanation.image, explanation.heatmap)

    def record_all(self, answered: list[tuple[Prediction, str]], origin: str) -> list[int]:
        """Commit (prediction, input sha256) pairs in one transaction, all or none; the row ids."""
        return self.store.add_predictions(
            answered, origin=origin, bundle_sha256=self.identity.bundle_sha256,
            artifact=self.identity.artifact, artifact_sha256=self.identity.artifact_sha256,
            artifact_parity=self.identity.artifact_parity)

    def record(self, prediction: Prediction, origin: str, sha256: str,
               heatmap: bytes | None = None) -> int:
        """Commit one prediction to the store with this server's bundle identity; the row id."""
        return self.store.add_prediction(
            prediction, origin=origin, sha256=sha256, heatmap_png=heatmap,
            bundle_sha256=self.identity.bundle_sha256, artifact=self.identity.artifact,
            artifact_sha256=self.identity.artifact_sha256,
            artifact_parity=self.identity.artifact_parity)
