"""`ct-edge batch` (Ray) against single-process `ct-edge classify` on a few thousand small images.

    python -m benchmarks.ray_batch [--bundle artifacts/bundle] [--counts 500,3000]
                                   [--inputs artifacts/bench-inputs] [--out benchmarks/results]
                                   [--actors N] [--quick]

Both commands run as a user runs them, in fresh processes, timed from process start to exit:
`ct-edge classify --json -q FOLDER` (one process, decoding a file ahead in a thread) and
`ct-edge batch FOLDER --out DIR -q` (a private local Ray cluster, one actor per core). A run on
2 images gives each command's fixed cost, so Ray's start-up (import, `ray.init`, actors, shut
down) is stated apart from its rate; the break-even is where the two lines cross.

Writes ray_batch.json and ray_batch.md into --out; `measure()` and `markdown()` are the hooks
for `benchmarks.run`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ct_edge.cli.common import positive_int

REPO = Path(__file__).resolve().parents[1]
SIDE = 256  # small PNGs: decoding is cheap, so start-up and dispatch costs show fully
VERSION = 1
FIXED_COUNT = 2
SUMMARY = re.compile(r"batch: (?P<rows>\d+) rows, (?P<errors>\d+) errors, (?P<seconds>[\d.]+) s, "
                     r"(?P<rate>[\d.]+) images/s on (?P<actors>\d+) actors? "
                     r"\(\+(?P<startup>[\d.]+) s Ray start-up\)")


def make_images(root: Path, count: int, log=lambda _: None) -> Path:
    """A folder of `count` small chest-like 8-bit PNGs under root, made once and reused: the images
    live in one pool, and each count's folder holds hard links to the first `count` of them."""
    from PIL import Image

    base = root / f"ray-batch-v{VERSION}"
    pool, folder = base / f"png{SIDE}", base / f"png{SIDE}-{count}"
    missing = [i for i in range(count) if not (pool / f"{i:05d}.png").is_file()]
    if missing:
        log(f"making {len(missing)} PNGs of {SIDE} px in {pool}")
        pool.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[-1:1:complex(0, SIDE), -1:1:complex(0, SIDE)].astype(np.float32)
    for i in missing:
        rng = np.random.default_rng(i)
        body = np.clip(1 - (xx / 0.9) ** 2 - (yy / 1.05) ** 2, 0, 1) ** 0.3
        lungs = sum(np.clip(1 - ((xx - cx) / rng.uniform(0.25, 0.33)) ** 2
                            - ((yy + 0.05) / 0.62) ** 2, 0, 1) ** 0.5 for cx in (-0.4, 0.4))
        image = 0.08 + 0.6 * body - 0.45 * lungs + rng.normal(0, 0.03, body.shape)
        pixels = np.clip(image * 255, 0, 255).astype(np.uint8)
        tmp = pool / f".{i:05d}.png.tmp"
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, pool / f"{i:05d}.png")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        link = folder / f"{i:05d}.png"
        if not link.is_file():
            try:
                os.link(pool / link.name, link)
            except OSError:  # no hard links here: a copy
                shutil.copyfile(pool / link.name, link)
    return folder


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("ct-edge")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ct_edge.cli"]


def _timed(cmd: Sequence[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall, done


def run_classify(bundle: Path, folder: Path, count: int, artifact: str | None) -> dict:
    cmd = [*cli_command(), "classify", "--bundle", str(bundle), "--json", "-q",
           *(["--artifact", artifact] if artifact else []), str(folder)]
    wall, done = _timed(cmd)
    answers = sum(1 for line in done.stdout.splitlines() if line.startswith("{"))
    if answers != count:
        raise RuntimeError(f"classify answered {answers} of {count}")
    return {"images": count, "wall_s": wall, "images_per_s": count / wall}


def run_batch(bundle: Path, folder: Path, count: int, artifact: str | None,
              actors: int | None) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ct-edge-bench-batch-"))
    try:
        cmd = [*cli_command(), "batch", str(folder), "--out", str(out), "--bundle", str(bundle),
               "-q", *(["--artifact", artifact] if artifact else []),
               *(["--actors", str(actors)] if actors else [])]
        env = {**os.environ}
        env.pop("RAY_ADDRESS", None)  # always a private local cluster
        wall, done = _timed(cmd, env)
        match = SUMMARY.search(done.stdout)
        if match is None:
            raise RuntimeError(f"no summary line in: {done.stdout[-500:]}")
        rows = int(match["rows"])
        if rows != count:
            raise RuntimeError(f"batch wrote {rows} rows for {count} images")
        return {"images": count, "wall_s": wall, "images_per_s": count / wall,
                "ray_start_s": float(match["startup"]), "scoring_s": float(match["seconds"]),
                "scoring_images_per_s": float(match["rate"]), "actors": int(match["actors"])}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure(bundle: Path, counts: Sequence[int] = (500, 3000), root: Path | None = None,
            artifact: str | None = None, actors: int | None = None, log=lambda _: None) -> dict:
    """Images/s of both commands at each count, their fixed costs, and the break-even count."""
    root = root or REPO / "artifacts" / "bench-inputs"
    load_start = os.getloadavg()
    result: dict = {"bundle": str(bundle), "artifact": artifact, "side_px": SIDE,
                    "cores": len(os.sched_getaffinity(0)), "runs": []}
    for count in [FIXED_COUNT, *counts]:
        folder = make_images(root, count, log)
        log(f"ct-edge classify on {count} images")
        classify = run_classify(bundle, folder, count, artifact)
        log(f"ct-edge batch on {count} images")
        ray = run_batch(bundle, folder, count, artifact, actors)
        result["runs"].append({"images": count, "classify": classify, "batch": ray})
        log(f"  {count}: classify {classify['images_per_s']:.0f}/s in {classify['wall_s']:.1f} s, "
            f"batch {ray['images_per_s']:.0f}/s in {ray['wall_s']:.1f} s "
            f"(Ray start {ray['ray_start_s']:.1f} s)")
    fixed, *scaled = result["runs"]
    result["fixed_s"] = {"classify": fixed["classify"]["wall_s"], "batch": fixed["batch"]["wall_s"],
                         "ray_init": fixed["batch"]["ray_start_s"]}
    # Marginal rates from the largest run minus the fixed run; the lines cross at break-even.
    big = scaled[-1] if scaled else fixed
    extra = big["images"] - FIXED_COUNT
    rates = {}
    for name in ("classify", "batch"):
        span = big[name]["wall_s"] - fixed[name]["wall_s"]
        rates[name] = extra / span if span > 0 and extra > 0 else None
    result["marginal_images_per_s"] = rates
    gap = result["fixed_s"]["batch"] - result["fixed_s"]["classify"]
    if rates["classify"] and rates["batch"] and rates["batch"] > rates["classify"]:
        result["break_even_images"] = round(gap / (1 / rates["classify"] - 1 / rates["batch"]))
    else:
        result["break_even_images"] = None  # Ray never catches up on this machine
    result["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
    return result


def markdown(result: dict) -> str:
    fixed = result["fixed_s"]
    lines = [f"## `ct-edge batch` (Ray, {result['runs'][-1]['batch']['actors']} actors) vs "
             f"`ct-edge classify` (one process), {result['side_px']}-px PNGs, "
             f"{result['cores']} cores", "",
             "| Images | classify images/s (wall) | batch images/s (wall) | batch scoring only | "
             "batch / classify |", "|---|---|---|---|---|"]
    for run in result["runs"]:
        c, b = run["classify"], run["batch"]
        lines.append(f"| {run['images']:,} | {c['images_per_s']:.0f} ({c['wall_s']:.1f} s) | "
                     f"{b['images_per_s']:.0f} ({b['wall_s']:.1f} s) | "
                     f"{b['scoring_images_per_s']:.0f} | "
                     f"{b['images_per_s'] / c['images_per_s']:.2f}x |")
    rates = result["marginal_images_per_s"]
    even = result["break_even_images"]
    lines += ["", f"Fixed cost (a run on {FIXED_COUNT} images, process start to exit): classify "
              f"{fixed['classify']:.1f} s, batch {fixed['batch']:.1f} s, of which `ray.init` "
              f"{fixed['ray_init']:.1f} s; the rest is importing Ray, starting the actors (each "
              "loads the engine) and shutting the cluster down.",
              f"Marginal rate: classify {_rate(rates['classify'])}, batch "
              f"{_rate(rates['batch'])} images/s. " + (
                  f"Break-even: about {even:,} images; below it the plain loop finishes first."
                  if even is not None else
                  "Ray does not catch up with the plain loop on this machine at these sizes."),
              f"Load average at start {_load(result['load_average']['start'])}, at end "
              f"{_load(result['load_average']['end'])}.", ""]
    return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def counts_arg(text: str) -> list[int]:
    """argparse type: comma-separated image counts, each 1 or more."""
    counts = [positive_int(part) for part in text.split(",") if part.strip()]
    if not counts:
        raise argparse.ArgumentTypeError(f"expected counts such as 500,3000, got {text!r}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundle"),
                        help="bundle both commands run (default: %(default)s)")
    parser.add_argument("--artifact", help="artifact to run (default: the bundle's default)")
    parser.add_argument("--counts", type=counts_arg, default="500,3000",
                        help="image counts to time, comma-separated (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="counts 200,1000 (default: --counts)")
    parser.add_argument("--actors", type=positive_int,
                        help="batch actors (default: one per core)")
    parser.add_argument("--inputs", type=Path, default=REPO / "artifacts" / "bench-inputs",
                        help="folder the PNGs are made in once and reused from (default: "
                             "artifacts/bench-inputs in the repository)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="folder for ray_batch.json and ray_batch.md (default: benchmarks/results "
                             "in the repository)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    counts = [200, 1000] if args.quick else args.counts
    if not (args.bundle / "manifest.json").is_file():
        print(f"benchmarks.ray_batch: no bundle at {args.bundle}; run `make demo` first",
              file=sys.stderr)
        return 2
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[ray-batch {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr,
              flush=True)

    try:
        result = measure(args.bundle, counts, args.inputs, args.artifact, args.actors, log)
    except (RuntimeError, OSError) as exc:
        print(f"benchmarks.ray_batch: error: {exc}", file=sys.stderr)
        return 2
    result["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_batch.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "ray_batch.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
