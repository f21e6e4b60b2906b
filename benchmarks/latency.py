"""Load time, batch-1 latency percentiles and batch throughput of artifacts, through ct_edge.

Runs inside a worker process (see benchmarks.worker); never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Sequence

import numpy as np

THROUGHPUT_BATCHES = (16, 32)


def summarize(samples_s: Sequence[float]) -> dict:
    """Seconds per call -> percentiles in milliseconds."""
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    return {"runs": len(ms),
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 95, 99)},
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "max_ms": float(ms.max())}


def time_calls(call: Callable[[], object], runs: int, warmup: int) -> dict:
    """Call `call` warmup times untimed, then `runs` times timed one by one."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return summarize(samples)


def throughput(call: Callable[[np.ndarray], object], sample: np.ndarray, batch: int,
               batches: int) -> dict:
    """Images per second at a batch size; one untimed batch first (it may resize the engine)."""
    x = np.repeat(sample, batch, axis=0)
    try:
        call(x)
        start = time.perf_counter()
        for _ in range(batches):
            call(x)
        elapsed = time.perf_counter() - start
    except Exception as exc:  # an engine that cannot batch raises its own types
        return {"batch": batch, "images_per_s": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"batch": batch, "batches": batches, "images_per_s": batch * batches / elapsed,
            "batch_ms": elapsed / batches * 1e3}


def sample_input(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A deterministic (1, h, w, c) float32 input in [0, 1]."""
    rng = np.random.default_rng(seed)
    return rng.random((1, *shape[1:]), dtype=np.float32)


def measure_artifact(bundle_dir: str, name: str, threads: Sequence[int], runs: int, warmup: int,
                     batches: int, throughput_threads: int | None) -> dict:
    """One artifact: per thread count load time, first call and latency; throughput at one count."""
    from ct_edge.classifier import Classifier

    result: dict = {"name": name, "threads": {}, "throughput": []}
    for count in threads:
        start = time.perf_counter()
        classifier = Classifier.from_bundle(bundle_dir, artifact=name, threads=count)
        load_s = time.perf_counter() - start
        x = sample_input(classifier.bundle.manifest["input"]["shape"])
        start = time.perf_counter()
        classifier.predict_array(x)
        first_s = time.perf_counter() - start
        stats = time_calls(lambda c=classifier, x=x: c.predict_array(x), runs, warmup)
        result["threads"][str(count)] = {"threads": count, "load_ms": load_s * 1e3,
                                         "first_inference_ms": first_s * 1e3, **stats}
        if count == throughput_threads:
            result["throughput"] = [throughput(classifier.predict_array, x, b, batches)
                                    for b in THROUGHPUT_BATCHES]
        del classifier
    return result


def _import_engines() -> None:
    """Import the engines up front so the first artifact's load time does not include it."""
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "onnxruntime"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def measure_artifacts(bundle_dir: str, names: Sequence[str], threads: Sequence[int], runs: int,
                      warmup: int, batches: int, throughput_threads: int | None) -> dict:
    """Every named artifact in turn; a failure is recorded against that artifact only."""
    _import_engines()
    out: dict = {}
    for name in names:
        try:
            out[name] = measure_artifact(bundle_dir, name, threads, runs, warmup, batches,
                                         throughput_threads)
        except Exception as exc:  # one broken artifact must not hide the others' figures
            out[name] = {"name": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return out
