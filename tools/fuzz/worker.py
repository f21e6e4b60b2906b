"""The worker process: runs one case at a time and reports its outcome, time and peak memory."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .cases import FIXTURES, SPEC_ARGS
from .manifest import run_manifest

ADDRESS_SPACE_HEADROOM = 6 << 30  # RLIMIT_AS of the worker above its start: a safety net only


def _status_kb(key: str) -> int:
    """A kB figure of this process from /proc/self/status (VmRSS, VmHWM, VmSize), or 0."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def check_array(array, spec) -> str | None:
    """Why `array` is not a valid model input for `spec`, or None."""
    if not isinstance(array, np.ndarray):
        return f"returned {type(array).__name__}, not an array"
    if array.dtype != np.float32:
        return f"dtype {array.dtype}"
    if array.shape != (spec.size, spec.size, spec.channels):
        return f"shape {array.shape}"
    if not np.isfinite(array).all():
        return "non-finite values"
    if array.min() < 0.0 or array.max() > 1.0:
        return f"values outside [0, 1]: {array.min()}..{array.max()}"
    return None


def run_input(data: bytes, suffix: str, spec_index: int, scratch: Path) -> tuple[str, str]:
    """Preprocess `data` (as bytes, or as a file with `suffix`): (outcome, detail)."""
    from ct_edge.errors import InputError
    from ct_edge.preprocess import PreprocessSpec, preprocess

    spec = PreprocessSpec(**SPEC_ARGS[spec_index])
    source: bytes | Path = data
    if suffix:
        source = scratch / f"case{suffix}"
        source.write_bytes(data)
    try:
        array = preprocess(source, spec)
    except InputError as exc:
        if "not enough memory" in exc.problem:
            return "memory", exc.problem
        return "error", exc.problem
    problem = check_array(array, spec)
    return ("invalid", problem) if problem else ("valid", "")


def run_selftest(action: bytes) -> tuple[str, str]:
    """Misbehaviours on purpose, so tests can show the harness catches each kind."""
    if action == b"raise":
        raise KeyError("a stray exception")
    if action == b"hang":
        time.sleep(3600)
    if action == b"die":
        os.abort()
    if action == b"memory":
        hog = bytearray(512 << 20)
        hog[::4096] = b"\x01" * len(hog[::4096])  # touch every page
        return "valid", ""
    return "valid", ""


def worker_main(read_fd: int, write_fd: int) -> None:
    """The worker loop: receive a case, run it, answer with its outcome, time and peak memory."""
    import faulthandler
    import resource
    import traceback
    import warnings
    from multiprocessing.connection import Connection

    faulthandler.enable()  # a segfault in a decoder leaves its stack on stderr
    incoming, conn = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    warnings.simplefilter("ignore")  # library warnings about damaged files are expected
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import PIL.Image  # noqa: F401  (imported before measuring the baseline)
    import pydicom  # noqa: F401

    import ct_edge.bundle
    import ct_edge.dicom  # noqa: F401
    from ct_edge.preprocess import preprocess

    for path in FIXTURES.glob("*.*"):  # warm up every decoder once
        if path.suffix in (".png", ".jpg", ".dcm"):
            preprocess(path)
    limit = _status_kb("VmSize") * 1024 + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    peak_resets = _reset_peak()
    conn.send({"rss_mb": _status_kb("VmRSS") / 1024})
    counter = 0
    with tempfile.TemporaryDirectory(prefix="ct-edge-fuzz-") as tmp:
        scratch = Path(tmp)
        while True:
            try:
                message = incoming.recv()
            except EOFError:
                return
            if message is None:
                return
            target, data, suffix, spec, fs = message
            counter += 1
            before = _status_kb("VmRSS")
            before_peak = _status_kb("VmHWM")
            if peak_resets:
                _reset_peak()
            start = time.perf_counter()
            try:
                if target == "input":
                    outcome, detail = run_input(data, suffix, spec, scratch)
                elif target == "selftest":
                    outcome, detail = run_selftest(data)
                else:
                    outcome, detail = run_manifest(data, fs, scratch, counter)
            except BaseException as exc:  # anything else is the finding
                outcome = "crash"
                detail = "".join(traceback.format_exception(exc))[-3000:]
            seconds = time.perf_counter() - start
            peak = _status_kb("VmHWM")
            growth = (peak - before) if peak_resets else max(0, peak - before_peak)
            conn.send({"outcome": outcome, "detail": detail, "seconds": seconds,
                       "growth_mb": growth / 1024})
