"""Runs cases in a replaceable worker process and gathers the results into a report."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ct_edge.limits import MEMORY_BOUND_MB

from .cases import REPO, Case, save_case

TIME_LIMIT = 10.0  # seconds per case; the slowest legitimate case (a bomb at MAX_PIXELS) takes ~2 s
# MEMORY_BOUND_MB (imported): the peak RSS of the worker (its baseline plus one case) allowed,
# the runtime's own bound, which MAX_PIXELS, MAX_FILE_BYTES and strip-wise decoding are chosen to meet.

FAILURES = ("crash", "died", "hang", "memory", "invalid")


@dataclass
class Result:
    case: Case
    outcome: str  # valid, error, crash, died, hang, memory, invalid
    detail: str = ""
    seconds: float = 0.0
    rss_growth_mb: float = 0.0


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    baseline_mb: float = 0.0

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.outcome in FAILURES]

    def counts(self) -> Counter:
        return Counter(r.outcome for r in self.results)

    def summary(self) -> dict:
        counts = self.counts()
        slowest = max(self.results, key=lambda r: r.seconds, default=None)
        hungriest = max(self.results, key=lambda r: r.rss_growth_mb, default=None)
        by_target: dict[str, dict] = {}
        for r in self.results:
            row = by_target.setdefault(r.case.target, Counter())
            row[r.outcome] += 1
        return {
            "cases": len(self.results), "valid": counts["valid"], "clean_errors": counts["error"],
            "crashes": counts["crash"] + counts["died"], "hangs": counts["hang"],
            "memory": counts["memory"], "invalid_output": counts["invalid"],
            "seconds": round(self.seconds, 1),
            "slowest_case": {"seconds": round(slowest.seconds, 3), "case": slowest.case.label()}
            if slowest else None,
            "peak_rss_growth_mb": round(hungriest.rss_growth_mb, 1) if hungriest else 0.0,
            "peak_rss_case": hungriest.case.label() if hungriest else None,
            "worker_baseline_rss_mb": round(self.baseline_mb, 1),
            "memory_bound_mb": MEMORY_BOUND_MB, "time_limit_s": TIME_LIMIT,
            "by_target": {k: dict(v) for k, v in by_target.items()},
            "by_generator": _by_generator(self.results),
        }


def _by_generator(results: list[Result]) -> dict:
    table: dict[str, Counter] = {}
    for r in results:
        table.setdefault(r.case.generator.split(":")[0], Counter())[r.outcome] += 1
    return {k: dict(v) for k, v in sorted(table.items())}


class Runner:
    """Runs cases in a worker process; replaces it after a hang or a death.

    The worker is a fresh interpreter (`python -c`), not a fork: a campaign may run inside a
    process that has started threads (pytest with TensorFlow loaded), where fork is unsafe.
    """

    def __init__(self, time_limit: float = TIME_LIMIT, memory_bound_mb: float = MEMORY_BOUND_MB):
        self.time_limit, self.memory_bound_mb = time_limit, memory_bound_mb
        self.process: subprocess.Popen | None = None
        self.baseline_mb = 0.0
        self.stderr = None

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        to_child, from_parent = os.pipe()[::-1]
        from_child, to_parent = os.pipe()
        code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'runtime')!r}]; "
                f"from tools.fuzz.worker import worker_main; worker_main({from_parent}, {to_parent})")
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed in _close)
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                                        pass_fds=(from_parent, to_parent), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=self.stderr)
        os.close(from_parent)
        os.close(to_parent)
        self.send = Connection(to_child, readable=False)
        self.recv = Connection(from_child, writable=False)
        if not self.recv.poll(180):
            raise RuntimeError(f"the fuzz worker did not start within 180 s: {self._stderr_tail()}")
        self.baseline_mb = max(self.baseline_mb, self.recv.recv()["rss_mb"])

    def _stderr_tail(self) -> str:
        if self.stderr is None:
            return ""
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-2000:]

    def _close(self) -> None:
        for conn in (self.send, self.recv):
            conn.close()
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            self.send.send(None)
            self.process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self._close()

    def run(self, case: Case) -> Result:
        if self.process is None:
            self._start()
        start = time.perf_counter()
        try:
            self.send.send((case.target, case.data, case.suffix, case.spec, case.fs))
            ready = self.recv.poll(self.time_limit)
        except OSError:
            ready = True
        if not ready:
            self.process.kill()
            self.process.wait()
            self._close()
            return Result(case, "hang", f"no answer within {self.time_limit:g} s",
                          time.perf_counter() - start)
        try:
            answer = self.recv.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            detail = f"worker died (exit code {code}): {self._stderr_tail()}"
            self._close()
            return Result(case, "died", detail, time.perf_counter() - start)
        result = Result(case, answer["outcome"], answer["detail"], answer["seconds"],
                        answer["growth_mb"])
        peak = self.baseline_mb + result.rss_growth_mb
        if result.outcome in ("valid", "error") and peak > self.memory_bound_mb:
            result.outcome = "memory"
            result.detail = (f"peak RSS {peak:.0f} MiB (> {self.memory_bound_mb} MiB; the worker "
                             f"started at {self.baseline_mb:.0f} MiB)")
        return result


def run_campaign(cases: Iterator[Case], *, time_limit: float = TIME_LIMIT,
                 memory_bound_mb: float = MEMORY_BOUND_MB, progress: Callable[[int], None] | None = None,
                 save: Path | None = None) -> Report:
    report = Report()
    runner = Runner(time_limit, memory_bound_mb)
    start = time.perf_counter()
    try:
        for n, case in enumerate(cases, 1):
            result = runner.run(case)
            report.results.append(result)
            if result.outcome in FAILURES and save is not None:
                save_case(case, save)
            if progress is not None:
                progress(n)
    finally:
        runner.stop()
    report.seconds = time.perf_counter() - start
    report.baseline_mb = runner.baseline_mb
    return report
