"""`ct-edge batch`: score a whole image archive on Ray, into Parquet, resumably.

The same runtime code as `ct-edge classify`, spread over a pool of Ray actors:

    driver                                      every actor (one engine each)
    ------                                      -----------------------------
    expand folders / globs / list files         __init__(manifest bytes, model bytes):
    read the paths already in --out/*.parquet       check both against the sha256 the driver
    ray.data.from_items(the paths still to do)      read, load the engine once
      .map_batches(Scorer, ActorPoolStrategy)   __call__(a block of paths):
    write each result block as one Parquet part     decode + classify each file (exactly
      (temp name + rename: a part is all there      `classify`'s code), a bad file becomes an
       or not there at all)                         error row

Files are decoded inside the actors from their paths (never shipped through the object store), so
inputs must be readable at the same path on every node. Results come back to the driver, which
alone writes --out. A job killed part-way loses only the blocks in flight: run it again and it
scores only what no part holds yet. `ray.data.read_images` is not used on purpose: it drops
unreadable files without a row, and with an actor pool holding every CPU it can hang.

Ray is an optional extra (`pip install 'ct-edge[ray]'`): this module imports only the standard
library at module level (the CLI's `batch` parser reads its defaults) and Ray and pyarrow inside
the functions that need them, so `ct-edge classify` never loads either.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cluster import Cluster, available_cpus, quiet_ray, ray_cluster, require_ray
from .parts import PartWriter, count_rows, drop_error_rows, locked_out, read_done
from .payload import BatchError, ModelPayload, error_row, result_schema, rows_to_table
from .scorer import Scorer

if TYPE_CHECKING:
    import pyarrow as pa

LIST_SUFFIXES = (".txt", ".lst", ".list")
DEFAULT_PART_ROWS = 1000
# How long the actor pool may take to start (a runtime_env with pip packages can take minutes).
ACTOR_START_TIMEOUT_S = 600
# Small jobs still get a few blocks per actor, so every actor has work and a kill loses little.
BLOCKS_PER_ACTOR = 4
NOT_UTF8 = "the name is not valid UTF-8, so it cannot be stored in Parquet"

__all__ = ["DEFAULT_PART_ROWS", "BatchError", "BatchResult", "Cluster", "ModelPayload",
           "expand_batch_inputs", "parse_runtime_env", "run_batch"]


def expand_batch_inputs(args: Sequence[str]) -> list[tuple[str, str | None]]:
    """INPUT arguments -> (absolute path, error or None), without duplicates.

    Folders and globs expand as in `ct-edge classify`. A file ending in .txt, .lst or .list is a
    list: one image path per line (blank lines and lines starting with '#' skipped; relative
    paths are relative to the current folder). Listed paths are not checked here: on a cluster
    they are read by the actors, and a missing one becomes an error row. Paths on the command
    line are expanded here, so a missing one is an error row at once, without Ray. A name that
    is not valid UTF-8 is an error row keyed by its display form (`\\xff` for the byte), as
    `classify` prints it: Parquet strings are UTF-8.
    """
    from ..inputs import display_path, expand_inputs

    items: list[tuple[str, str | None]] = []
    seen: set[str] = set()

    def add(path: str, error: str | None) -> None:
        # The key for resuming, and what every node opens ('' stays '': abspath makes it the cwd).
        key = os.path.abspath(path) if path else ""
        if key in seen:
            return
        seen.add(key)
        if not is_utf8(key):
            key, error = display_path(key), error or NOT_UTF8
        items.append((key, error))

    plain: list[str] = []

    def flush() -> None:
        for path, error in expand_inputs(plain):
            # Named here, so checked here: a missing file must not cost a Ray start to report.
            if error is None and not os.path.lexists(path):
                error = "no such file"
            add(path, error)
        plain.clear()

    for arg in args:
        if arg.lower().endswith(LIST_SUFFIXES) and os.path.isfile(arg):
            flush()
            try:
                with open(arg, encoding="utf-8") as handle:
                    for line in handle:
                        line = line.strip()
                        if line and not line.startswith("#"):
                            add(line, None)
            except (OSError, UnicodeDecodeError) as exc:
                add(arg, f"cannot read the list file ({getattr(exc, 'strerror', None) or exc})")
        else:
            plain.append(arg)
    flush()
    return items


def is_utf8(text: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (lone surrogates in Python)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- the job -------------------------------------------------------------------------------


@dataclass
class BatchResult:
    out: Path
    inputs: int              # distinct inputs named this run
    skipped: int             # already scored by an earlier run (left alone)
    rows: int                # rows written by this run
    errors: int              # of which error rows
    parts: int               # part files written by this run
    seconds: float           # scoring, from submitting the dataset to the last part written
    startup_seconds: float   # starting or joining Ray (0 when it was already up)
    actors: int
    total_rows: int          # rows in --out after this run
    complete: bool           # every input now has a row in --out
    nodes: dict[str, int] = field(default_factory=dict)  # rows per Ray node id
    error_samples: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.rows == 0:
            return (f"batch: nothing to score: all {counted(self.inputs, 'input')} already "
                    f"scored; {counted(self.total_rows, 'row')} in {self.out}")
        if self.actors == 0:  # every new row is an error found before Ray was needed
            scored = "no actor started (no input could be read)"
        else:
            scored = (f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s on "
                      f"{counted(self.actors, 'actor')} (+{self.startup_seconds:.1f} s Ray "
                      "start-up)")
        return (f"batch: {counted(self.rows, 'row')}, {counted(self.errors, 'error')}, {scored}; "
                f"{self.skipped} already scored; {counted(self.total_rows, 'row')} in {self.out}")


def counted(number: int, noun: str) -> str:
    """'1 row', '2 rows', '0 rows'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def local_cpus(actors: int | None, threads: int) -> int:
    """CPUs for a local cluster: the machine's, or more when the pool asks for more. A local
    cluster has no autoscaler, so one sized below the pool would only wait, then fail."""
    return max(available_cpus(), (actors or 1) * threads)


def pool_warning(actors: int, threads: int, cpus: int) -> str | None:
    """The warning for a pool larger than the cluster it joins (None when it fits)."""
    need = actors * threads
    if not cpus or need <= cpus:
        return None
    return (f"{counted(actors, 'actor')} x {counted(threads, 'thread')} need {need} CPUs and "
            f"the cluster has {cpus}: "
            f"the job waits up to {ACTOR_START_TIMEOUT_S // 60} minutes for the cluster to grow "
            "(an autoscaler), then fails; use fewer --actors or --threads")


def plan_blocks(todo: int, actors: int, part_rows: int) -> int:
    """Rows per block (= per part file): at most part_rows, small enough for every actor to work."""
    return max(1, min(part_rows, math.ceil(todo / (actors * BLOCKS_PER_ACTOR))))


def run_batch(inputs: Sequence[str], out: str | Path, *, bundle: str | Path | None = None,
              artifact: str | None = None, actors: int | None = None, threads: int | None = 1,
              address: str | None = None, window: tuple[float, float] | None = None,
              part_rows: int = DEFAULT_PART_ROWS, runtime_env: dict | None = None,
              verbose: bool = False, stop_after_parts: int | None = None,
              domain_check: bool = True,
              on_start: Callable[[int, ModelPayload], None] | None = None,
              on_cluster: Callable[[Cluster], None] | None = None,
              on_part: Callable[[int], None] | None = None) -> BatchResult:
    """Score `inputs` into Parquet parts in `out`, skipping what `out` already holds.

    `stop_after_parts` ends the job after that many parts, as a kill would (tests of resuming).
    `on_start(rows to write, payload)` is called once the work is known, `on_cluster(cluster)`
    once Ray is up, `on_part(rows)` after each part is written (a progress bar).
    """
    if actors is not None and actors < 1:
        raise BatchError("--actors must be 1 or more")
    threads = threads or 1
    out = Path(out)
    require_ray()
    payload = ModelPayload.from_bundle(bundle, artifact)
    result_schema(payload.labels)  # label names that clash with fixed columns fail here
    items = expand_batch_inputs(inputs)
    with locked_out(out):
        done = read_done(out, payload)
        pending = [(path, error) for path, error in items if path not in done]
        drop_error_rows(out, {path for path, _ in pending})  # retried: their old rows go
        run_id = time.strftime("%Y%m%dT%H%M%S") + f"-{secrets.token_hex(3)}"
        writer = PartWriter(out, run_id)
        result = BatchResult(out=out, inputs=len(items), skipped=len(items) - len(pending), rows=0,
                             errors=0, parts=0, seconds=0.0, startup_seconds=0.0, actors=0,
                             total_rows=count_rows(out), complete=False)

        def record(table: pa.Table) -> None:
            writer.write(table)
            errors = [(p, e) for p, e in zip(table.column("path").to_pylist(),
                                             table.column("error").to_pylist(), strict=True)
                      if e is not None]
            result.parts += 1
            result.rows += table.num_rows
            result.total_rows += table.num_rows
            result.errors += len(errors)
            room = 20 - len(result.error_samples)
            result.error_samples.extend(errors[:max(0, room)])
            for node in table.column("node_id").to_pylist():
                if node is not None:
                    result.nodes[node] = result.nodes.get(node, 0) + 1
            if on_part is not None:
                on_part(table.num_rows)

        # Inputs that are wrong before any file is opened (a glob matching nothing, a folder
        # without images) are error rows written here, without Ray.
        early = [error_row(path, error, payload) for path, error in pending if error is not None]
        todo = [path for path, error in pending if error is None]
        if on_start is not None:
            on_start(len(pending), payload)
        start = time.perf_counter()
        if early:
            record(rows_to_table(early, payload.labels))
        if todo and not (stop_after_parts is not None and result.parts >= stop_after_parts):
            with ray_cluster(address, num_cpus=local_cpus(actors, threads),
                             runtime_env=runtime_env, verbose=verbose) as cluster:
                result.startup_seconds = cluster.seconds
                if on_cluster is not None:
                    on_cluster(cluster)
                start = time.perf_counter()
                n_actors = actors or max(1, cluster.cpus // threads)
                warning = pool_warning(n_actors, threads, cluster.cpus)
                if warning is not None:
                    print(f"warning: {warning}", file=sys.stderr)
                n_actors = min(n_actors, len(todo))
                result.actors = n_actors
                with quiet_ray(verbose):
                    options = {"threads": threads, "window": window,
                               "domain_check": domain_check}
                    for table in score_on_ray(todo, payload, n_actors, options, part_rows, verbose):
                        record(table)
                        if stop_after_parts is not None and result.parts >= stop_after_parts:
                            break
        result.seconds = time.perf_counter() - start
        result.complete = result.rows == len(pending)
    return result


def score_on_ray(paths: list[str], payload: ModelPayload, actors: int, options: dict[str, Any],
           part_rows: int, verbose: bool) -> Iterator[pa.Table]:
    """The Ray Data pipeline: paths -> blocks -> actor pool -> result tables, as they finish.

    `options` are the actors' keyword arguments besides the payload (threads, window,
    domain_check)."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    # Start every actor before the first block: work then spreads over all of them (and all
    # nodes), and a cluster that cannot host the pool fails with a message instead of waiting.
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    rows_per_block = plan_blocks(len(paths), actors, part_rows)
    dataset = ray.data.from_items([{"path": p} for p in paths],
                                  override_num_blocks=math.ceil(len(paths) / rows_per_block))
    scored = dataset.map_batches(
        Scorer,
        # The bundle as bytes: Ray Data puts the constructor arguments into the object store
        # once per job, and every actor (on every node) receives and verifies them.
        fn_constructor_kwargs={"payload": payload, **options},
        batch_size=rows_per_block,
        batch_format="numpy",
        # One block at a time per actor: blocks then go to whichever actor is free, rather than
        # queueing on the actors next to the (tiny) input data; files are read by path anyway.
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_cpus=options["threads"],
    )
    try:
        yield from scored.iter_batches(batch_size=None, batch_format="pyarrow")
    except (ray.exceptions.RayError, TimeoutError) as exc:
        raise BatchError(f"the Ray job failed ({type(exc).__name__}: {_last_line(exc)}); the "
                         "parts written so far are kept: run the same command again to resume "
                         "(--verbose shows Ray's logs)") from exc


def _last_line(exc: BaseException) -> str:
    """The gist of a Ray error: its text ends with the remote exception's own last line."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last if len(last) <= 300 else last[:297] + "..."


def parse_runtime_env(text: str | None) -> dict | None:
    """--runtime-env: JSON text, or the path of a JSON file."""
    if not text:
        return None
    try:
        if os.path.isfile(text):
            text = Path(text).read_text(encoding="utf-8")
        value = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise BatchError(f"--runtime-env: not JSON or a JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise BatchError("--runtime-env: expected a JSON object, e.g. '{\"pip\": [\"ct-edge[ray]\"]}'")
    return value
