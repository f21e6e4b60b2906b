"""make bench: every artifact of a bundle against the Keras model it came from, on this machine.

    python -m benchmarks.run --bundle artifacts/bundle [--model artifacts/model/model.keras]
                             [--out benchmarks/results] [--quick | --smoke] [--json]
                             [--inputs artifacts/bench-inputs] [--cli "ct-edge"]

Writes latest.json, latest.md and latency_size.png into --out; progress goes to stderr.
Every measurement runs in a fresh child process (pinned, for the one-core figures).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ct_edge.bundle import Bundle
from ct_edge.errors import CtEdgeError
from training import machine

from . import compare, endtoend, goals, inputs, memory, report
from .proc import REPO, all_cpus, one_cpu, run_worker

SCHEMA = "ct-edge-bench/1"
PI_NOTE = ("Pi-class profile: this machine pinned to one core with one thread. It is a proxy, "
           "not a Raspberry Pi: the core, caches, memory bandwidth and SIMD (x86 vs ARM NEON) differ.")
REAL_DATA = REPO.parent / "shared" / "data" / "covid19-xray"


@dataclass(frozen=True)
class Plan:
    """How many times each figure is measured."""

    mode: str
    runs: int  # timed batch-1 calls per latency figure
    warmup: int  # untimed calls before them
    batches: int  # timed batches per throughput figure
    repeats: int  # timed passes per input for the end-to-end split
    cold_runs: int  # cold starts of `ct-edge classify`
    folder_images: int  # images in the folder-throughput run


FULL = Plan("full", runs=200, warmup=20, batches=10, repeats=10, cold_runs=5, folder_images=300)
QUICK = Plan("quick", runs=30, warmup=5, batches=3, repeats=3, cold_runs=3, folder_images=40)
# Every figure present, none meaningful: for the smoke test of the harness itself.
SMOKE = Plan("smoke", runs=3, warmup=1, batches=1, repeats=1, cold_runs=1, folder_images=4)


class Progress:
    """Each step with the elapsed time on stderr; failures are kept for the report."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.errors: list[dict] = []

    def log(self, message: str) -> None:
        print(f"[bench {time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr,
              flush=True)

    def step(self, name: str, action: Callable[[], dict]) -> dict:
        self.log(f"{name} ...")
        try:
            return action()
        except Exception as exc:  # one failed measurement must not lose all the others
            message = f"{type(exc).__name__}: {exc}"
            self.log(f"{name} FAILED: {message}")
            self.errors.append({"step": name, "error": message})
            return {"error": message}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundle"),
                        help="the bundle whose artifacts are measured (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=None,
                        help="the Keras baseline (default: the bundle's source model.keras, found "
                             "beside the bundle or in artifacts/model/)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="where latest.json, latest.md and the chart go (default: %(default)s)")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true",
                       help=f"under a minute: {QUICK.runs} runs per latency, {QUICK.repeats} passes "
                            f"per input, {QUICK.folder_images} images in the folder (full: "
                            f"{FULL.runs}, {FULL.repeats}, {FULL.folder_images})")
    speed.add_argument("--smoke", action="store_true",
                       help="the fewest runs that still fill every field (tests; times mean nothing)")
    parser.add_argument("--json", action="store_true", help="also print latest.json to stdout")
    parser.add_argument("--inputs", type=Path, default=Path("artifacts/bench-inputs"),
                        help="where generated inputs are kept (reused between runs)")
    parser.add_argument("--cli", default=None,
                        help="command that runs ct-edge (default: the ct-edge console script)")
    return parser.parse_args(argv)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def keras_model(bundle: Bundle, explicit: Path | None) -> dict:
    """The Keras baseline: --model, else the bundle's source model (by its provenance sha256)
    among the model folders beside the bundle, else artifacts/model/model.keras."""
    provenance = bundle.manifest.get("provenance") or {}
    expected = provenance.get("model_sha256")
    name = Path(str(provenance.get("model_file") or "model.keras")).name
    usual = [bundle.root.parent / "model" / name, bundle.root.parent / name,
             Path("artifacts") / "model" / name]
    if explicit is not None:
        usual, siblings = [explicit], []
    else:
        siblings = sorted(bundle.root.parent.glob(f"*/{name}"))
    found = [path for path in dict.fromkeys([*usual, *siblings]) if path.is_file()]
    digests = {path: sha256(path) for path in found}
    match = next((path for path in found if expected and digests[path] == expected), None)
    path = match or next((p for p in usual if p in digests), None)
    if path is None:
        return {"path": None, "reason": "no Keras model at " + ", ".join(map(str, usual))}
    return {"path": str(path), "size_bytes": path.stat().st_size, "sha256": digests[path],
            "matches_bundle": None if expected is None else digests[path] == expected}


@dataclass
class Context:
    """What every section needs: the plan, the bundle, the inputs, the CLI and the cores."""

    plan: Plan
    progress: Progress
    bundle_dir: Path
    names: list[str]
    default: str
    cli_extra: list[str]  # `--artifact NAME` when the bundle has no default that passed
    inputs: inputs.Inputs
    cli: list[str] | None
    cores: list[int]
    pinned: list[int]

    @property
    def per_image(self) -> dict[str, str]:
        return {name: str(path.resolve()) for name, path in self.inputs.per_image.items()}

    def step(self, name: str, action: Callable[[], dict]) -> dict:
        return self.progress.step(name, action)

    def latency(self, threads: list[int], cpus: list[int] | None) -> dict:
        return run_worker("artifacts", {
            "bundle_dir": str(self.bundle_dir), "names": self.names, "threads": threads,
            "runs": self.plan.runs, "warmup": self.plan.warmup, "batches": self.plan.batches,
            "throughput_threads": max(threads)}, cpus=cpus)

    def split(self, threads: int, cpus: list[int] | None) -> dict:
        return run_worker("per_image", {
            "bundle_dir": str(self.bundle_dir), "inputs": self.per_image, "artifact": self.default,
            "threads": threads, "repeats": self.plan.repeats}, cpus=cpus)


def measure_artifacts(ctx: Context, bundle: Bundle) -> dict:
    """Per artifact: size, load, latency at 1 thread and all cores, throughput, peak RSS."""
    many = len(ctx.cores)
    latency = ctx.step(f"latency of {len(ctx.names)} artifacts at 1 and {many} threads",
                       lambda: ctx.latency(sorted({1, many}), None))
    engines = {entry.get("name"): entry.get("engine") for entry in bundle.manifest["artifacts"]}
    out = {}
    for artifact in bundle.artifacts.values():
        entry = {"file": artifact.file, "format": artifact.format, "precision": artifact.precision,
                 "engine": engines.get(artifact.name), "status": artifact.status,
                 "size_bytes": artifact.bytes,
                 **compare.latency_entry(latency.get(artifact.name, latency), 1, many)}
        entry["memory"] = ctx.step(f"peak RSS of {artifact.name}", lambda a=artifact.name:
                                   memory.artifact_memory(ctx.bundle_dir, a, ctx.inputs.scan))
        out[artifact.name] = entry
    return out


def measure_keras(ctx: Context, model: dict) -> tuple[dict, dict, dict]:
    """Keras at all cores and pinned to one core (both with the naive path), and at 1 thread.

    A process per thread setting: TensorFlow fixes its thread pools when it starts.
    Returns (all-cores worker result, pinned worker result, the keras section).
    """
    if not model["path"]:
        missing = {"error": model["reason"]}
        return missing, missing, {"path": None, **missing}
    many = len(ctx.cores)
    base = {"model_path": model["path"], "runs": ctx.plan.runs, "warmup": ctx.plan.warmup,
            "batches": ctx.plan.batches, "repeats": ctx.plan.repeats}
    full = ctx.step(f"Keras baseline at {many} threads (+ naive path)", lambda: run_worker(
        "keras", {**base, "threads": many, "naive_inputs": ctx.per_image,
                  "memory_image": str(ctx.inputs.scan)}))
    if ctx.plan is SMOKE:
        pinned = {**full, "stand_in": "smoke mode: the all-cores run stands in for the one-core one"}
    else:
        pinned = ctx.step("Keras baseline on one core, 1 thread (+ naive path)", lambda: run_worker(
            "keras", {**base, "threads": 1, "naive_inputs": ctx.per_image, "with_throughput": False},
            cpus=ctx.pinned))
    if ctx.plan is FULL:
        one = ctx.step("Keras baseline at 1 thread", lambda: run_worker(
            "keras", {**base, "threads": 1, "with_throughput": False}))
        source = "its own process"
    else:
        one, source = pinned, f"the one-core run ({ctx.plan.mode} mode saves a TensorFlow start)"
    section = {"path": model["path"], **compare.keras_entry(full, one, many),
               "one_thread_from": source}
    return full, pinned, section


def measure_cli(ctx: Context, cpus: list[int] | None, threads: list[str]) -> tuple[dict, dict]:
    """`ct-edge classify`: cold start, and the folder run when there is a folder."""
    if ctx.cli is None:
        return {"error": "ct-edge CLI unavailable"}, {"error": "ct-edge CLI unavailable"}
    where = "one core" if cpus else "all cores"
    extra = [*ctx.cli_extra, *threads]
    cold = ctx.step(f"cold start x{ctx.plan.cold_runs} on {where}: ct-edge classify scan.png",
                    lambda: endtoend.cold_start(ctx.cli, ctx.bundle_dir, ctx.inputs.scan,
                                                ctx.plan.cold_runs, cpus=cpus, extra=extra))
    if ctx.inputs.folder is None:
        return cold, {"error": "no folder"}
    folder = ctx.step(f"folder of {ctx.inputs.folder_count} images on {where}",
                      lambda: endtoend.folder_throughput(ctx.cli, ctx.bundle_dir, ctx.inputs.folder,
                                                         ctx.inputs.folder_count, cpus=cpus,
                                                         extra=extra))
    return cold, folder


def measure_end_to_end(ctx: Context, naive: dict, cpus: list[int] | None) -> tuple[dict, dict]:
    """Per-image split against the naive path, cold-start profile, `ct-edge classify` runs."""
    threads = 1 if cpus else len(ctx.cores)
    where = "one core" if cpus else "all cores"
    split = ctx.step(f"per-image split with {ctx.default} on {where}",
                     lambda: ctx.split(threads, cpus))
    profile = ctx.step(f"cold-start profile on {where}", lambda: endtoend.cold_profile(
        ctx.bundle_dir, ctx.default, ctx.inputs.scan, cpus))
    cold, folder = measure_cli(ctx, cpus, ["--threads", "1"] if cpus else [])
    e2e = {"artifact": ctx.default, "threads": threads,
           "per_image": compare.per_image_entry(split, naive), "cold_start": cold,
           "cold_start_profile": profile}
    return e2e, folder


def measure(args: argparse.Namespace, progress: Progress) -> dict:
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    bundle = Bundle.load(args.bundle)
    names = list(bundle.artifacts)
    try:
        default, cli_extra = bundle.select().name, []
    except CtEdgeError:
        # No artifact passed parity: `ct-edge classify` would refuse, so name one explicitly.
        default, cli_extra = names[0], ["--artifact", names[0]]
        progress.log(f"warning: no default artifact in {bundle.root}; using {default}")
    model = keras_model(bundle, args.model)
    if model["path"] and model["matches_bundle"] is False:
        progress.log(f"warning: {model['path']} is not the model this bundle was converted from")
    made = inputs.make_inputs(args.inputs.resolve(), plan.folder_images, REAL_DATA, log=progress.log)
    cli, cli_found = endtoend.cli_command(args.cli)
    if cli is None:
        progress.log(f"warning: {cli_found}; the `ct-edge classify` figures are skipped")
    ctx = Context(plan, progress, bundle.root.resolve(), names, default, cli_extra, made, cli,
                  all_cpus(), one_cpu())
    results: dict = {
        "schema": SCHEMA, "mode": plan.mode, "plan": asdict(plan),
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "units": compare.UNITS, "machine": machine.describe(),
        "bundle": {"path": str(bundle.root), "default": default, "artifacts": names,
                   "labels": list(bundle.labels), "input_shape": bundle.manifest["input"]["shape"]},
        "keras_model": model,
        "cli": {"command": cli, "found": cli_found},
        "inputs": {"scan": str(made.scan), "folder": str(made.folder) if made.folder else None,
                   "notes": made.notes,
                   "per_image": {n: compare.describe_image(p) for n, p in made.per_image.items()}},
    }
    results["artifacts"] = measure_artifacts(ctx, bundle)
    results["memory_limits"] = ctx.step(
        f"peak RSS of the largest accepted inputs with {default}", lambda: memory.limit_memory(
            ctx.bundle_dir, default, args.inputs.resolve() / "limits",
            ("png-16bit",) if plan is SMOKE else ()))
    full_keras, pinned_keras, results["keras"] = measure_keras(ctx, model)
    results["end_to_end"], all_folder = measure_end_to_end(ctx, full_keras, None)

    # The Pi-class proxy: the same figures on one pinned core with one thread.
    pi: dict = {"note": PI_NOTE, "cpus": ctx.pinned, "threads": 1}
    latency = ctx.step("Pi-class proxy: latency of every artifact on one core",
                       lambda: ctx.latency([1], ctx.pinned))
    pi["artifacts"] = {name: compare.latency_entry(latency.get(name, latency), 1, None)
                       for name in names}
    pi["keras"] = results["keras"]
    if model["path"]:
        pi["keras"] = {**compare.keras_entry(pinned_keras, pinned_keras, None),
                       "source": pinned_keras.get("stand_in", "its own process, pinned, 1 thread")}
    pi["end_to_end"], one_folder = measure_end_to_end(ctx, pinned_keras, ctx.pinned)
    results["pi_profile"] = pi
    results["folder"] = {"images": made.folder_count, "cores": len(ctx.cores),
                         "all_cores": all_folder, "one_core": one_folder,
                         "speedup_x": compare.ratio(one_folder.get("wall_s"), all_folder.get("wall_s"))}
    compare.add_ratios(results)
    results["goals"] = goals.goals(results)
    results["errors"] = progress.errors
    results["machine"]["load_average_end"] = machine.load_average()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is not None and not args.model.is_file():
        print(f"bench: --model {args.model}: no such file", file=sys.stderr)
        return 2
    progress = Progress()
    try:
        results = measure(args, progress)
    except CtEdgeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    results["wall_s"] = time.perf_counter() - progress.start
    written = report.write(results, args.out)
    progress.log("wrote " + ", ".join(str(path) for path in written))
    if args.json:
        print(json.dumps(results, indent=2))
    for goal in results["goals"]:
        progress.log(f"goal {goal['status']:>8}: {goal['goal']} (measured {goal['measured_text']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
