"""`ct-edge batch`: score an image archive on Ray into Parquet (the runner is ct_edge.batch)."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

from ..batch import DEFAULT_PART_ROWS  # the runner imports only the standard library up front
from .common import (
    BUNDLE_HELP,
    DOMAIN_CHECK_OFF,
    EXIT_INPUT,
    EXIT_OK,
    RAW,
    Progress,
    error,
    isatty,
    positive_int,
    warn,
    window_arg,
)

if TYPE_CHECKING:
    from ..batch import Cluster, ModelPayload

EXAMPLES = """\
examples:
  ct-edge batch scans/ --out results/                     (a local Ray cluster on this machine)
  ct-edge batch 'archive/**/*.dcm' --out results/ --actors 2 --threads 1
  ct-edge batch paths.txt --out results/ --address auto   (join the cluster of `ray start`)
  ct-edge batch paths.txt --out results/ --address ray://head:10001
  python -c "import pandas; print(pandas.read_parquet('results/'))"

INPUT: files, folders (searched recursively), globs, or list files (.txt, .lst, .list: one path
per line, '#' comments). Every node must be able to read each input at the same absolute path.

output: Parquet parts in --out, one row per input: path (absolute), label (null when out of
domain), confidence, status (ok, uncertain or out_of_domain), reason, one probability column per
class, error (null, or why the input could not be read), artifact, artifact_sha256,
bundle_sha256 (of manifest.json) and node_id (the Ray node that scored it). Run the same command
again after a kill: it scores only inputs no part holds yet. A summary line goes to stdout.
exit codes: 0 every input scored, 1 some inputs could not be read (each has an error row and,
for the first 20, an 'error:' line; the others are still scored), 2 usage, bundle or cluster
error, 130 interrupted (the parts written so far are kept).
"""


def add_parser(commands: Any) -> None:
    """The `batch` subcommand (parser only: nothing heavy is imported until it runs)."""
    batch = commands.add_parser(
        "batch", help="score an image archive on Ray into Parquet (needs ct-edge[ray])",
        formatter_class=RAW, epilog=EXAMPLES,
        description="Score many images with a pool of Ray actors, on this machine or a cluster; "
                    "results go to Parquet files, resumably.")
    batch.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="file, folder, glob pattern, or .txt/.lst list of paths")
    batch.add_argument("--out", required=True, metavar="DIR",
                       help="folder for the Parquet parts (created; a rerun resumes in it)")
    batch.add_argument("--address", metavar="auto|ray://HOST:PORT",
                       help="join this Ray cluster (default: start a local one on this machine)")
    batch.add_argument("--actors", type=positive_int, metavar="N",
                       help="actors, each with its own engine (default: the cluster's CPUs / "
                            "--threads)")
    batch.add_argument("--threads", type=positive_int, default=1, metavar="N",
                       help="engine threads (and CPUs reserved) per actor (default: 1)")
    batch.add_argument("--bundle", metavar="DIR", help=BUNDLE_HELP)
    batch.add_argument("--artifact", metavar="NAME",
                       help="artifact to run, as listed by 'ct-edge info' (default: the bundle's "
                            "default, else the smallest that passed its parity check)")
    batch.add_argument("--window", type=window_arg, metavar="lung|mediastinum|W,L",
                       help="CT window for DICOM (default: the bundle's)")
    batch.add_argument("--no-domain-check", action="store_true",
                       help="research use only: label every input, even one unlike the training "
                            "images (default: check)")
    batch.add_argument("--part-rows", type=positive_int, default=DEFAULT_PART_ROWS, metavar="N",
                       help=f"at most N rows per Parquet part; a kill loses at most the parts in "
                            f"flight (default: {DEFAULT_PART_ROWS}, fewer for small jobs)")
    batch.add_argument("--runtime-env", metavar="JSON|FILE",
                       help="Ray runtime_env for the job, e.g. '{\"pip\": [\"ct-edge[ray]\"]}' "
                            "(default: none: the package is installed on every node)")
    batch.add_argument("--verbose", "-v", action="store_true",
                       help="show Ray's own logs and progress bars (default: off)")
    batch.add_argument("--quiet", "-q", action="store_true",
                       help="no progress bar, parity or --no-domain-check warning, or "
                            "disclaimer; error lines and the summary line are still printed "
                            "(default: off)")
    batch.set_defaults(handler=run)


ERROR_LINES = 20


def run(args: Any) -> int:
    from .. import DISCLAIMER
    from ..batch import parse_runtime_env, run_batch

    progress: list[Progress] = []

    def on_start(rows: int, payload: ModelPayload) -> None:
        if not args.quiet:
            warn(payload.parity_warning)
        progress.append(Progress(rows, sys.stderr, enabled=not args.quiet and rows > 0
                                 and isatty(sys.stderr)))

    def on_part(rows: int) -> None:
        if progress:
            progress[0].update(rows)

    import signal

    previous: list[Any] = []

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # ends like Ctrl-C: Ray shut down, finished parts kept

    def on_cluster(cluster: Cluster) -> None:
        # After ray.init, which installs a native SIGTERM handler that only logs and dies.
        with contextlib.suppress(ValueError):  # not the main thread
            previous.append(signal.signal(signal.SIGTERM, stop))

    if args.no_domain_check and not args.quiet:
        print(DOMAIN_CHECK_OFF, file=sys.stderr)
    try:
        result = run_batch(args.inputs, args.out, bundle=args.bundle, artifact=args.artifact,
                           actors=args.actors, threads=args.threads, address=args.address,
                           window=args.window, part_rows=args.part_rows,
                           runtime_env=parse_runtime_env(args.runtime_env), verbose=args.verbose,
                           domain_check=not args.no_domain_check,
                           on_start=on_start, on_cluster=on_cluster, on_part=on_part)
    except KeyboardInterrupt:
        if progress:
            progress[0].close()
        print(f"\ninterrupted: the parts written so far stay in {args.out}; run the same "
              "command again to score the rest", file=sys.stderr)
        return 130
    finally:
        if previous:
            signal.signal(signal.SIGTERM, previous[0])
        if progress:
            progress[0].close()
    report_errors(result.error_samples, result.errors, result.out)
    print(result.summary(), flush=True)
    if not args.quiet:
        print(DISCLAIMER, file=sys.stderr)
    return EXIT_INPUT if result.errors else EXIT_OK


def report_errors(samples: list[tuple[str, str]], count: int, out: Any) -> None:
    """One `error: <path>: <problem>` line per error row (the first ERROR_LINES), as `classify`
    prints them, --quiet or not."""
    for path, problem in samples[:ERROR_LINES]:
        error(f"{path}: {problem}")
    if count > ERROR_LINES:
        error(f"... and {count - ERROR_LINES} more: see the 'error' column in {out}")
