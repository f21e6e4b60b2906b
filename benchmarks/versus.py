"""The same artifact of several bundles, timed side by side in one process, calls interleaved.

    python -m benchmarks.versus artifacts/bundle-a artifacts/bundle-b [--artifact tflite-int8]

Each round calls every bundle once, in turn, on one thread, so a busy machine slows them alike
and the ratio stays meaningful where the absolute figures do not. Sizes and stored constants
come from the files (`benchmarks.tensors`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from convert.report import human_size
from ct_edge.cli.common import positive_int
from ct_edge.errors import CtEdgeError

from .latency import sample_input, summarize
from .tensors import constants


def side_by_side(bundles: list[Path], artifact: str, runs: int, warmup: int) -> list[dict]:
    """[{bundle, file, size_bytes, constants, latency}] for `artifact` of each bundle."""
    from convert.quiet import quiet
    from ct_edge.classifier import Classifier

    with quiet():  # LiteRT announces its XNNPACK delegate on stderr
        engines = [Classifier.from_bundle(b, artifact=artifact, threads=1) for b in bundles]
    spec = engines[0].spec
    if any((e.spec.size, e.spec.channels) != (spec.size, spec.channels) for e in engines):
        raise ValueError("the bundles take different input sizes")
    x = sample_input((1, spec.size, spec.size, spec.channels))
    samples: list[list[float]] = [[] for _ in engines]
    for round_ in range(warmup + runs):
        for engine, taken in zip(engines, samples, strict=True):
            start = time.perf_counter()
            engine.backend.predict(x)
            if round_ >= warmup:
                taken.append(time.perf_counter() - start)
    rows = []
    for bundle, engine, taken in zip(bundles, engines, samples, strict=True):
        path = engine.artifact.path
        data = path.read_bytes()
        try:
            stored = constants(data) if path.suffix == ".tflite" else None
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        rows.append({"bundle": str(bundle), "file": path.name, "size_bytes": len(data),
                     "constants": stored, "latency": summarize(taken)})
    return rows


def markdown(rows: list[dict], artifact: str) -> str:
    first = rows[0]["latency"]["p50_ms"]
    lines = [f"{artifact}, batch 1, one thread, calls interleaved:", "",
             "| bundle | file | size | stored constants | ops | p50 ms | p95 ms | p50 vs first |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        stored = row["constants"]
        lat = row["latency"]
        lines.append(f"| {row['bundle']} | {row['file']} | {human_size(row['size_bytes'])} | "
                     + (f"{human_size(stored['bytes'])} | {stored['ops']} | " if stored
                        else "— | — | "))
        lines[-1] += f"{lat['p50_ms']:.2f} | {lat['p95_ms']:.2f} | {lat['p50_ms'] / first:.2f}x |"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.versus",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", type=Path, nargs="+", help="bundle folders (the first is "
                        "the reference of the ratio)")
    parser.add_argument("--artifact", default="tflite-int8",
                        help="artifact name in every bundle (default: %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=200,
                        help="timed rounds (default: %(default)s)")
    parser.add_argument("--warmup", type=positive_int, default=10,
                        help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        rows = side_by_side(args.bundles, args.artifact, args.runs, args.warmup)
    except (CtEdgeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else markdown(rows, args.artifact))
    return 0


if __name__ == "__main__":
    sys.exit(main())
