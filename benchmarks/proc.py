"""Child processes: pinned to chosen cores, timed, with their own peak RSS (wait4's rusage).

Every measurement runs in a fresh child so thread settings, CPU affinity and first-import costs
are controlled, and the parent never imports TensorFlow or an inference engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class ChildError(RuntimeError):
    """A child process failed; the message ends with the tail of its stderr."""


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float  # process start to exit
    first_output_s: float | None  # process start to its first line on stdout
    max_rss_mb: float  # peak resident set size of the child itself (ru_maxrss)


def all_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def one_cpu() -> list[int]:
    """The core the one-core runs are pinned to: the last one, away from core 0's interrupts."""
    return all_cpus()[-1:]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # TensorFlow's C++ start-up chatter is noise in the captured stderr.
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    env.update(extra or {})
    return env


# Children are started by this small launcher, not forked from the harness: a child's ru_maxrss
# never drops below the RSS of the process it was forked from (Linux keeps the pre-exec high-water
# mark), so forking from the harness would report the harness's memory as the child's.
# The launcher pins itself (the affinity is inherited), forks, execs, and reports wait4's rusage.
_LAUNCHER = """
import json, os, sys, time
cpus, report, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
if cpus:
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
start = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
end = time.monotonic()
with open(report, "w") as f:
    json.dump({"start": start, "end": end, "returncode": os.waitstatus_to_exitcode(status),
               "maxrss_kb": usage.ru_maxrss}, f)
"""


def run_child(cmd: Sequence[str], cpus: Sequence[int] | None = None,
              env: dict[str, str] | None = None, timeout_s: float = 900.0) -> ChildResult:
    """Run cmd (optionally pinned to `cpus`) through the launcher; time it and read its peak RSS."""
    with tempfile.TemporaryDirectory(prefix="ct-edge-bench-") as tmp, \
            tempfile.TemporaryFile() as err:
        report = Path(tmp) / "launch.json"
        pinned = ",".join(str(c) for c in cpus) if cpus is not None else ""
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, pinned, str(report),
                                 *cmd], stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, env=env or child_env(),
                                start_new_session=True)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _kill_group(proc.pid)

        timer = threading.Timer(timeout_s, expire)
        timer.start()
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            first_at = time.monotonic()  # the same clock as the launcher's, across processes
            rest = proc.stdout.read()
            proc.wait()
        except BaseException:
            # The child has its own session, so Ctrl-C does not reach it: stop it here.
            _kill_group(proc.pid)
            raise
        finally:
            timer.cancel()
            proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        if expired.is_set():
            raise ChildError(f"{shlex.join(cmd)} timed out after {timeout_s:.0f} s")
        if not report.is_file():
            raise ChildError(f"could not launch {cmd[0]} (launcher exited {proc.returncode}):\n"
                             f"{tail(stderr)}")
        launch = json.loads(report.read_text())
    wall = launch["end"] - launch["start"]
    return ChildResult(launch["returncode"], (first + rest).decode(errors="replace"), stderr, wall,
                       first_at - launch["start"] if first else None, launch["maxrss_kb"] / 1024.0)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_worker(task: str, spec: dict, cpus: Sequence[int] | None = None,
               timeout_s: float = 900.0) -> dict:
    """Run `benchmarks.worker` task in a fresh interpreter; its JSON result, plus the child's RSS."""
    with tempfile.TemporaryDirectory(prefix="ct-edge-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.worker", task, json.dumps(spec), str(result_path)]
        child = run_child(cmd, cpus=cpus, timeout_s=timeout_s)
        if child.returncode != 0 or not result_path.is_file():
            raise ChildError(f"worker {task} exited {child.returncode}:\n{tail(child.stderr)}")
        result = json.loads(result_path.read_text())
    result["process"] = {"wall_s": child.wall_s, "max_rss_mb": child.max_rss_mb,
                         "cpus": list(cpus) if cpus is not None else all_cpus()}
    return result
