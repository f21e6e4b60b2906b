"""End to end: `ct-edge classify` cold start and folder throughput, and the per-image time split.

`per_image` runs inside a worker; the rest runs `ct-edge` itself as a child process.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .proc import ChildError, run_child, tail

STAGES = ("decode", "preprocess", "inference")

# Where a cold start goes, stage by stage, in a fresh interpreter: what bounds it when it is slow.
_PROFILE = """
import json, sys, time
t = [time.perf_counter()]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
stages = {}
def mark(name):
    t.append(time.perf_counter()); stages[name] = {"ms": (t[-1] - t[-2]) * 1e3, "rss_mb": rss()}
import numpy; mark("import numpy")
import PIL.Image; mark("import Pillow")
import ct_edge.classifier; mark("import ct_edge")
from ct_edge.bundle import Bundle
from ct_edge.backends import open_backend
bundle = Bundle.load(sys.argv[1]); mark("read manifest")
artifact = bundle.select(sys.argv[2]); data = artifact.read_verified(); mark("read + sha256 model")
backend = open_backend(artifact.format, data, None); mark("open engine (imports it)")
classifier = ct_edge.classifier.Classifier(bundle, artifact, backend)
prediction = classifier.predict(sys.argv[3]); mark("classify first image")
print(json.dumps({"artifact": artifact.name, "stages": stages,
                  "first_image_timings_ms": prediction.timings_ms}))
"""


def cli_command(explicit: str | None = None) -> tuple[list[str] | None, str]:
    """The command that runs `ct-edge` (or None) and how it was found."""
    if explicit:
        return shlex.split(explicit), "--cli"
    if importlib.util.find_spec("ct_edge.cli") is None:
        return None, "ct_edge.cli is not installed yet"
    script = Path(sys.executable).with_name("ct-edge")
    if script.is_file():
        return [str(script)], "console script"
    found = shutil.which("ct-edge")
    if found:
        return [found], "console script on PATH"
    return [sys.executable, "-m", "ct_edge.cli"], "python -m ct_edge.cli"


def per_image(bundle_dir: str, inputs: dict[str, str], threads: int | None, repeats: int,
              artifact: str | None = None) -> dict:
    """Median decode / preprocess / inference / total ms per input, via Classifier.predict, and
    the header estimate `serve` and a `ct-edge classify` of several files make before it
    (`decode_cost`)."""
    from ct_edge.classifier import Classifier
    from ct_edge.preprocess import decode_cost

    classifier = Classifier.from_bundle(bundle_dir, artifact=artifact, threads=threads)
    out: dict = {"artifact": classifier.artifact.name, "threads": threads, "inputs": {}}
    for name, path in inputs.items():
        try:
            classifier.predict(path)  # untimed: first touch of the file and of the engine
            samples: dict[str, list[float]] = {key: [] for key in (*STAGES, "total", "estimate")}
            for _ in range(repeats):
                start = time.perf_counter()
                decode_cost(path, classifier.spec)
                samples["estimate"].append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                prediction = classifier.predict(path)
                samples["total"].append((time.perf_counter() - start) * 1e3)
                for stage in STAGES:
                    samples[stage].append(prediction.timings_ms.get(stage, 0.0))
            out["inputs"][name] = {f"{key}_ms": statistics.median(values)
                                   for key, values in samples.items()}
            out["inputs"][name].update(repeats=repeats, label=prediction.label)
        except Exception as exc:  # an input the runtime rejects is a finding, not a crash
            out["inputs"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def cold_start(cli: Sequence[str], bundle_dir: Path, image: Path, runs: int,
               cpus: Sequence[int] | None = None, extra: Sequence[str] = ()) -> dict:
    """`ct-edge classify --bundle B image`: wall time from process start, median of runs."""
    cmd = [*cli, "classify", "--bundle", str(bundle_dir), *extra, str(image)]
    exits, firsts, rss = [], [], []
    answer = ""
    for _ in range(runs):
        child = run_child(cmd, cpus=cpus)
        if child.returncode != 0:
            raise ChildError(f"{shlex.join(cmd)} exited {child.returncode}:\n{tail(child.stderr)}")
        exits.append(child.wall_s)
        firsts.append(child.first_output_s or child.wall_s)
        rss.append(child.max_rss_mb)
        answer = child.stdout.strip()
    return {"command": shlex.join(cmd), "runs": runs, "median_s": statistics.median(exits),
            "min_s": min(exits), "max_s": max(exits),
            "median_to_first_output_s": statistics.median(firsts),
            "peak_rss_mb": max(rss), "output": answer[-500:]}


def cold_profile(bundle_dir: Path, artifact: str, image: Path,
                 cpus: Sequence[int] | None = None) -> dict:
    """Bare interpreter start, then each stage of a cold classification in a fresh process."""
    bare = run_child([sys.executable, "-c", "pass"], cpus=cpus)
    child = run_child([sys.executable, "-c", _PROFILE, str(bundle_dir), artifact, str(image)],
                      cpus=cpus)
    if child.returncode != 0:
        raise ChildError(f"cold-start profile exited {child.returncode}:\n{tail(child.stderr)}")
    profile = json.loads(child.stdout.strip().splitlines()[-1])
    profile.update(python_start_ms=bare.wall_s * 1e3, python_start_rss_mb=bare.max_rss_mb,
                   total_s=child.wall_s, peak_rss_mb=child.max_rss_mb)
    return profile


def folder_throughput(cli: Sequence[str], bundle_dir: Path, folder: Path, count: int,
                      cpus: Sequence[int] | None = None, extra: Sequence[str] = ()) -> dict:
    """`ct-edge classify --json` over a folder: images/s including start-up."""
    cmd = [*cli, "classify", "--bundle", str(bundle_dir), "--json", *extra, str(folder)]
    child = run_child(cmd, cpus=cpus)
    if child.returncode != 0:
        raise ChildError(f"{shlex.join(cmd)} exited {child.returncode}:\n{tail(child.stderr)}")
    answers = count_answers(child.stdout)
    return {"command": shlex.join(cmd), "images": count, "answers": answers, "wall_s": child.wall_s,
            "images_per_s": count / child.wall_s, "peak_rss_mb": child.max_rss_mb}


def count_answers(stdout: str) -> int:
    """Results in `--json` output: one object per line, or one JSON array."""
    try:
        whole = json.loads(stdout)
        return len(whole) if isinstance(whole, list) else 1
    except json.JSONDecodeError:
        return sum(1 for line in stdout.splitlines() if line.strip().startswith("{"))
