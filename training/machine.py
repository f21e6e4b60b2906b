"""What a measurement was made on: CPU, cores, threads, memory, load, Python and package versions.

Used by training.evaluate and training.distill and by the benchmarks (which depend on training,
not the other way round)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

from ct_edge.batch.cluster import available_cpus

# Thread counts set from outside: TensorFlow's op determinism holds for one thread count only.
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
PACKAGES = ("ct-edge", "ai-edge-litert", "tflite-runtime", "onnxruntime", "tensorflow",
            "tensorflow-cpu", "keras", "numpy", "pillow", "pydicom", "matplotlib")


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe() -> dict:
    memory = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "cores_available": available_cpus(),
        "thread_settings": {name: os.environ[name] for name in THREAD_VARIABLES
                            if name in os.environ},
        "memory_total_mb": round(int(memory.split()[0]) / 1024) if memory else None,
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": versions(),
        "load_average_start": load_average(),
    }
