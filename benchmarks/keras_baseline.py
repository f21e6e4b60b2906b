"""The baseline a user would otherwise pick: the Keras model, `model(x)` and `model.predict(x)`.

Runs inside a worker process: TensorFlow fixes its thread pools when it initialises, so each
thread setting needs its own process.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .latency import THROUGHPUT_BATCHES, sample_input, throughput, time_calls
from .memory import peak_rss_mb


def naive_input(path: str, size: int) -> np.ndarray:
    """What a user writes without ct-edge: full decode with Pillow (pydicom for DICOM), resize, scale."""
    if path.lower().endswith((".dcm", ".dicom")):
        import pydicom

        pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
        span = max(float(pixels.max() - pixels.min()), 1.0)
        image = Image.fromarray(((pixels - pixels.min()) / span * 255.0).astype(np.uint8))
    else:
        image = Image.open(path)
    image = image.convert("RGB").resize((size, size))
    return (np.asarray(image, dtype=np.float32) / 255.0)[None]


def naive_per_image(model, inputs: dict[str, str], size: int, repeats: int) -> dict:
    """Median decode+resize, predict and total time per input, after one untimed pass."""
    out: dict = {}
    for name, path in inputs.items():
        try:
            model.predict(naive_input(path, size), verbose=0)
            decode, infer, total = [], [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                x = naive_input(path, size)
                t1 = time.perf_counter()
                model.predict(x, verbose=0)
                t2 = time.perf_counter()
                decode.append(t1 - t0)
                infer.append(t2 - t1)
                total.append(t2 - t0)
            out[name] = {"decode_resize_ms": statistics.median(decode) * 1e3,
                         "inference_ms": statistics.median(infer) * 1e3,
                         "total_ms": statistics.median(total) * 1e3, "repeats": repeats}
        except Exception as exc:  # a format the naive path cannot read is a finding, not a crash
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def measure_keras(model_path: str, threads: int, runs: int, warmup: int, batches: int,
                  naive_inputs: dict[str, str] | None = None, repeats: int = 3,
                  memory_image: str | None = None, with_throughput: bool = True) -> dict:
    """Import, load, (one naive classification for memory), latency, throughput, naive per image."""
    start = time.perf_counter()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    with contextlib.suppress(ImportError):
        import training.models  # noqa: F401  (registers any custom layers the model may use)
    import_s = time.perf_counter() - start

    start = time.perf_counter()
    model = keras.saving.load_model(model_path, compile=False)
    load_s = time.perf_counter() - start
    shape = [1, *(int(d) for d in model.input_shape[1:])]
    result: dict = {"threads": threads, "tensorflow": tf.__version__, "keras": keras.__version__,
                    "import_s": import_s, "load_ms": load_s * 1e3,
                    "size_bytes": Path(model_path).stat().st_size}
    if memory_image:
        model.predict(naive_input(memory_image, shape[1]), verbose=0)
        result["memory"] = {"peak_rss_mb": peak_rss_mb()}

    x = sample_input(shape)
    result["call"] = time_calls(lambda: np.asarray(model(x, training=False)), runs, warmup)
    result["predict"] = time_calls(lambda: model.predict(x, verbose=0), runs, warmup)
    if with_throughput:
        result["call"]["throughput"] = [
            throughput(lambda b: np.asarray(model(b, training=False)), x, size, batches)
            for size in THROUGHPUT_BATCHES]
        result["predict"]["throughput"] = [
            throughput(lambda b, n=size: model.predict(b, batch_size=n, verbose=0), x, size, batches)
            for size in THROUGHPUT_BATCHES]
    if naive_inputs:
        result["naive"] = naive_per_image(model, naive_inputs, shape[1], repeats)
    return result
