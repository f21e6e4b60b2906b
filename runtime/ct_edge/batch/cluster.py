"""Reaching Ray for a batch job: a private local cluster or a running one, and Ray's own output
kept off ct-edge's stderr."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import one_line
from .payload import BatchError


def require_ray() -> None:
    """Fail early, before --out is touched, when the [ray] extra is not installed (cheap)."""
    import importlib.util

    for module in ("ray", "pyarrow"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # e.g. sys.modules[module] is None
            found = False
        if not found:
            raise BatchError("ct-edge batch needs Ray: pip install 'ct-edge[ray]' "
                             "(ray[data] and pyarrow)")


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise BatchError("ct-edge batch needs Ray: pip install 'ct-edge[ray]' "
                         "(ray[data] and pyarrow)") from None
    return ray


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class Cluster:
    """How this job reached Ray: started a local cluster (and owns it) or joined one."""

    started: bool
    seconds: float
    address: str | None
    cpus: int
    temp_dir: str | None = None


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None,
                runtime_env: dict | None = None, verbose: bool = False) -> Iterator[Cluster]:
    """Start a private local Ray cluster (no address) or join one (`auto`, `ray://host:port`).

    A local cluster gets its own temp folder and, unless $RAY_AUTH_MODE says otherwise, token
    authentication with a fresh random token held in the environment only (left alone, Ray 2.60
    would write a token to ~/.ray). Both go away with the cluster. When Ray is already
    initialised in this process (a test, a notebook), that connection is used as it is.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        yield Cluster(started=False, seconds=0.0, address=None, cpus=_cluster_cpus(ray))
        return
    start = time.perf_counter()
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    temp_dir = None
    kwargs: dict[str, Any] = {"log_to_driver": verbose,
                              "logging_level": "INFO" if verbose else "WARNING"}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if address is None:
        # "local": a new cluster even when $RAY_ADDRESS names one (joining takes --address).
        kwargs.update(address="local", include_dashboard=False)
        if "RAY_AUTH_MODE" not in os.environ:
            set_auth_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _process_token()})
        if not os.environ.get("RAY_TMPDIR"):
            # Short on purpose: Ray's socket paths under it must stay below ~107 characters.
            temp_dir = tempfile.mkdtemp(prefix="ct-edge-ray-",
                                        dir="/tmp" if os.path.isdir("/tmp") else None)
            kwargs["_temp_dir"] = temp_dir
        kwargs["num_cpus"] = num_cpus or available_cpus()
    else:
        kwargs["address"] = address
    try:
        ray = import_ray()
        try:
            ray.init(**kwargs)
        except BaseException as exc:
            # ray.init may have started processes before it failed or Ctrl-C came: stop them.
            with contextlib.suppress(Exception):
                shutdown(ray, local=address is None)
            if temp_dir:
                kill_strays(temp_dir)
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
                raise
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise BatchError(f"cannot start or reach {where}: {one_line(exc)}") from None
        try:
            yield Cluster(started=address is None, seconds=time.perf_counter() - start,
                          address=address, cpus=_cluster_cpus(ray), temp_dir=temp_dir)
        finally:
            shutdown(ray, local=address is None)
    finally:
        if saved != {key: os.environ.get(key) for key in saved}:
            set_auth_env(saved)
        if temp_dir:
            for _ in range(10):  # a dying worker may still write a log line
                shutil.rmtree(temp_dir, ignore_errors=True)
                if not os.path.exists(temp_dir):
                    break
                time.sleep(0.2)


def shutdown(ray: Any, local: bool) -> None:
    """Disconnect from Ray; for a local cluster also wait for its raylet & co to exit, so none
    writes into its temp folder after."""
    if not local:
        ray.shutdown()
        return
    try:
        ray.shutdown(wait_for_processes=True)
    except TypeError:  # an older Ray
        ray.shutdown()


def kill_strays(temp_dir: str) -> None:
    """Kill what a local cluster cut short in `ray.init` left running: `ray.shutdown` knows only
    a cluster whose start finished. Its processes are the ones using its private temp folder
    (Linux /proc); twice, for a child forked during the first pass."""
    for _ in range(2):
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if int(proc.name) != os.getpid() and uses_folder(proc, temp_dir):
                    os.kill(int(proc.name), signal.SIGKILL)  # Ray's agents ignore SIGTERM
            except (OSError, ValueError):  # gone already, or not ours
                continue


def uses_folder(proc: Path, folder: str) -> bool:
    """Whether the process `proc` (/proc/PID) names `folder` on its command line or has a file in
    it open (Ray's agents replace their command line with a title, but keep their logs open)."""
    name = os.fsencode(folder)
    if any(arg.endswith(name) or name + b"/" in arg
           for arg in (proc / "cmdline").read_bytes().split(b"\0")):
        return True
    return any(os.readlink(fd).startswith(folder + "/") for fd in (proc / "fd").iterdir())


_TOKEN: list[str] = []


def _process_token() -> str:
    """One random token per process: Ray's native side caches the first token it reads."""
    if not _TOKEN:
        _TOKEN.append(secrets.token_hex(32))
    return _TOKEN[0]


def set_auth_env(values: dict[str, str | None]) -> None:
    """Set (or unset, for None) Ray's auth variables, and make an imported Ray see the change.

    Ray reads $RAY_AUTH_MODE into its native config when it is imported; `ray.init` refreshes it
    only when it turns token auth on itself, so the refresh is repeated here.
    """
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if "ray" in sys.modules:
        with contextlib.suppress(Exception):  # a private API: without it, import Ray later
            from ray._raylet import Config

            Config.initialize("")


def _cluster_cpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("CPU", 0))


# Lines Ray's native code prints on the driver's stderr that are no news to a ct-edge user.
BENIGN_NATIVE_LINES = (
    # Ray Data passes its own operator state to pool actors by reference, and keeps actor
    # restarts on; the driver owns those objects for the whole job, so restarts do work.
    "has constructor arguments in the object store",
)


@contextlib.contextmanager
def quiet_ray(verbose: bool) -> Iterator[None]:
    """Keep stderr for ct-edge's own lines: Ray Data's INFO logs and known-benign native lines off.

    While the job runs, fd 2 is a pipe read by a thread that passes everything on to the real
    stderr at once, except whole lines holding one of BENIGN_NATIVE_LINES.
    """
    import logging
    import threading

    if verbose:
        yield
        return
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    # Ray Data re-reads its logging config when a dataset starts; this variable outranks it.
    env_level = os.environ.get("RAY_DATA_LOG_LEVEL")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    try:
        fd = sys.stderr.fileno()
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):  # stderr is not a real file (pytest capture)
        fd = None
    if fd is None:
        try:
            yield
        finally:
            restore_env("RAY_DATA_LOG_LEVEL", env_level)
            data_logger.setLevel(level)
        return
    saved = os.dup(fd)
    read_end, write_end = os.pipe()

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = [line + b"\n" for line in lines
                    if not any(p.encode() in line for p in BENIGN_NATIVE_LINES)]
            if pending and not pending.startswith(b"["):  # a progress bar, not a native log line
                kept.append(pending)
                pending = b""
            if kept:
                os.write(saved, b"".join(kept))
        if pending:
            os.write(saved, pending)
        os.close(read_end)

    thread = threading.Thread(target=pump, name="ct-edge-stderr", daemon=True)
    thread.start()
    os.dup2(write_end, fd)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)  # drops the pipe's last write end: the pump reads EOF and stops
        thread.join(timeout=5)
        # A Ray process that inherited the pipe can keep it open; the pump then lives on and
        # must keep a valid fd to write to, so `saved` (and the read end) are left to it.
        if not thread.is_alive():
            os.close(saved)
        restore_env("RAY_DATA_LOG_LEVEL", env_level)
        data_logger.setLevel(level)


def restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
