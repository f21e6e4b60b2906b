"""`ct-edge batch`: score a whole image archive on Ray, into Parquet, resumably.

The same runtime code as `ct-edge classify`, spread over a pool of Ray actors:

    driver                                      every actor (one engine each)
    ------                                      -----------------------------
    expand folders / globs / list files         __init__(manifest bytes, model bytes):
    read the paths already in --out/*.parquet       check both against the sha256 the driver
    ray.data.from_items(the paths still to do)      read, load the engine once
      .map_batches(_Scorer, ActorPoolStrategy)  __call__(a block of paths):
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

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BundleError, CtEdgeError

if TYPE_CHECKING:
    import pyarrow as pa

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TMP_PREFIX = ".tmp-"
LOCK_NAME = ".ct-edge-batch.lock"
LIST_SUFFIXES = (".txt", ".lst", ".list")
DEFAULT_PART_ROWS = 1000
# How long the actor pool may take to start (a runtime_env with pip packages can take minutes).
ACTOR_START_TIMEOUT_S = 600
# Small jobs still get a few blocks per actor, so every actor has work and a kill loses little.
BLOCKS_PER_ACTOR = 4
# Fixed columns; then one float column per label, in the bundle's label order, after `reason`.
FIXED_COLUMNS = ("path", "label", "confidence", "status", "reason", "error", "artifact",
                 "artifact_sha256", "bundle_sha256", "node_id")


class BatchError(CtEdgeError):
    """The batch job cannot start or go on (no Ray, a cluster problem, an --out folder in use)."""


@dataclass(frozen=True)
class ModelPayload:
    """What every actor receives in its constructor: the bundle as bytes, and what they must hash to."""

    manifest: bytes
    model: bytes
    artifact: str
    manifest_sha256: str
    labels: tuple[str, ...]
    artifact_sha256: str
    artifact_format: str
    artifact_status: str
    domain: bytes = b""  # the domain statistics file (ct_edge.domain), sha256-checked on load

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path | None, artifact: str | None,
                    backend: str | None = None) -> ModelPayload:
        """Load and verify the bundle on the driver (the actors verify the bytes again)."""
        from .bundle import MANIFEST, Bundle

        bundle = Bundle.load(bundle_dir)
        chosen = bundle.select(artifact, backend)
        model = chosen.read_verified()
        try:
            manifest = (bundle.root / MANIFEST).read_bytes()
            bundle.feature_gate()  # verified here first, as on a device
            domain = (bundle.root / bundle.domain["file"]).read_bytes() \
                if "file" in bundle.domain else b""
        except OSError as exc:
            raise BundleError(f"cannot read the bundle in {bundle.root}: {exc}") from None
        return cls(manifest=manifest, model=model, artifact=chosen.name, domain=domain,
                   manifest_sha256=hashlib.sha256(manifest).hexdigest(), labels=bundle.labels,
                   artifact_sha256=chosen.sha256, artifact_format=chosen.format,
                   artifact_status=chosen.status)


def result_schema(labels: Sequence[str]) -> pa.Schema:
    """The Parquet schema of every part: fixed columns plus one probability column per label."""
    import pyarrow as pa

    clash = sorted(set(labels) & set(FIXED_COLUMNS))
    if clash:
        raise BundleError(f"label(s) {clash} collide with result column names; rename the labels")
    fields = [pa.field("path", pa.string(), nullable=False),
              pa.field("label", pa.string()),
              pa.field("confidence", pa.float64()),
              pa.field("status", pa.string()),
              pa.field("reason", pa.string()),
              *(pa.field(label, pa.float64()) for label in labels),
              pa.field("error", pa.string()),
              pa.field("artifact", pa.string()),
              pa.field("artifact_sha256", pa.string()),
              pa.field("bundle_sha256", pa.string()),
              pa.field("node_id", pa.string())]
    return pa.schema(fields)


def rows_to_table(rows: list[dict[str, Any]], labels: Sequence[str]) -> pa.Table:
    import pyarrow as pa

    schema = result_schema(labels)
    return pa.Table.from_pylist(rows, schema=schema)


def error_row(path: str, error: str, payload: ModelPayload, node_id: str | None = None) -> dict:
    return {"path": path, "label": None, "confidence": None, "status": None, "reason": None,
            **dict.fromkeys(payload.labels), "error": error, "artifact": payload.artifact,
            "artifact_sha256": payload.artifact_sha256, "bundle_sha256": payload.manifest_sha256,
            "node_id": node_id}


# --- the actor -------------------------------------------------------------------------------


class _Scorer:
    """One Ray actor: the verified bundle in one engine, classifying blocks of paths.

    Ray Data builds it from `fn_constructor_kwargs`; it must be importable by name on every node
    (`ct_edge.batch._Scorer`), which is why the package has to be installed there.
    """

    def __init__(self, payload: ModelPayload, threads: int | None = 1,
                 window: tuple[float, float] | None = None, decode_workers: int = 1,
                 domain_check: bool = True) -> None:
        from .backends import open_backend
        from .bundle import MANIFEST, Bundle
        from .classifier import Classifier

        if hashlib.sha256(payload.manifest).hexdigest() != payload.manifest_sha256:
            raise BundleError("the manifest bytes the actor received do not match their sha256")
        # Bundle.load checks the manifest exactly as on a device; it reads a folder, so the
        # manifest (only: the model stays in memory) goes to a private temporary one.
        # The domain statistics file too: the Classifier reads (and sha256-checks) it on creation.
        with tempfile.TemporaryDirectory(prefix="ct-edge-actor-") as folder:
            Path(folder, MANIFEST).write_bytes(payload.manifest)
            bundle = Bundle.load(folder)
            if payload.domain:
                # Only a plain name inside the folder; ct_edge.domain refuses any other.
                Path(folder, Path(str(bundle.domain["file"])).name).write_bytes(payload.domain)
            artifact = bundle.select(payload.artifact)
            digest = hashlib.sha256(payload.model).hexdigest()
            if len(payload.model) != artifact.bytes or digest != artifact.sha256:
                raise BundleError(f"the model bytes of {artifact.name!r} the actor received do not "
                                  "match the manifest's sha256; it will not be run")
            engine = open_backend(artifact.format, payload.model, threads)
            spec = bundle.spec.with_window(window) if window is not None else None
            self.classifier = Classifier(bundle, artifact, engine, spec, domain_check)
        self.payload = payload
        self.decode_workers = decode_workers
        self.node_id = None
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():  # else a test calls the class directly
            self.node_id = ray.get_runtime_context().get_node_id()

    def score(self, paths: Sequence[str]) -> list[dict[str, Any]]:
        """One row per path, in order; a file that cannot be classified is an error row."""
        from .inputs import predictions  # the very code `ct-edge classify` runs per file

        payload = self.payload
        rows = []
        for prediction in predictions(self.classifier, [(str(p), None) for p in paths],
                                      workers=self.decode_workers):
            if prediction.error is not None:
                rows.append(error_row(prediction.path, prediction.error, payload, self.node_id))
                continue
            rows.append({"path": prediction.path, "label": prediction.label,
                         "confidence": prediction.confidence if prediction.label else None,
                         "status": prediction.status, "reason": prediction.reason,
                         **{label: prediction.probabilities.get(label) for label in payload.labels},
                         "error": None, "artifact": payload.artifact,
                         "artifact_sha256": payload.artifact_sha256,
                         "bundle_sha256": payload.manifest_sha256, "node_id": self.node_id})
        return rows

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        return rows_to_table(self.score(list(batch["path"])), self.payload.labels)


# --- inputs and the --out folder -----------------------------------------------------------


def expand_batch_inputs(args: Sequence[str]) -> list[tuple[str, str | None]]:
    """INPUT arguments -> (absolute path, error or None), without duplicates.

    Folders and globs expand as in `ct-edge classify`. A file ending in .txt, .lst or .list is a
    list: one image path per line (blank lines and lines starting with '#' skipped; relative
    paths are relative to the current folder). Listed paths are not checked here: on a cluster
    they are read by the actors, and a missing one becomes an error row. Paths on the command
    line are expanded here, so a missing one is an error row at once, without Ray.
    """
    from .inputs import expand_inputs

    items: list[tuple[str, str | None]] = []
    seen: set[str] = set()

    def add(path: str, error: str | None) -> None:
        # The key for resuming, and what every node opens ('' stays '': abspath makes it the cwd).
        key = os.path.abspath(path) if path else ""
        if key not in seen:
            seen.add(key)
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


def part_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob(f"{PART_PREFIX}*{PART_SUFFIX}") if p.is_file())


def read_done(out: Path, payload: ModelPayload) -> set[str]:
    """Paths that parts in `out` already hold a result for; refuses parts written with another
    model. An error row is not a result: the file may have been fixed, so a rerun retries it."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for part in part_files(out):
        try:
            table = pq.read_table(part, columns=["path", "error", "bundle_sha256",
                                                 "artifact_sha256"])
        except Exception as exc:  # a part is renamed into place whole, so this is outside damage
            raise BatchError(f"{part}: unreadable result part ({exc}); move it away and run "
                             "again to rescore its inputs") from None
        for column, mine in (("bundle_sha256", payload.manifest_sha256),
                             ("artifact_sha256", payload.artifact_sha256)):
            theirs = set(table.column(column).to_pylist()) - {mine}
            if theirs:
                raise BatchError(f"{out} holds results of another model ({column} "
                                 f"{sorted(theirs)[0][:12]}..., this run {mine[:12]}...); score "
                                 "into a new --out folder or use the same bundle and --artifact")
        done.update(path for path, error in zip(table.column("path").to_pylist(),
                                                table.column("error").to_pylist(), strict=True)
                    if error is None)
    return done


def count_rows(out: Path) -> int:
    """Rows in the parts of `out` (from the Parquet footers; no data is read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(part).metadata.num_rows for part in part_files(out))


def drop_error_rows(out: Path, paths: set[str]) -> int:
    """Remove the error rows of `paths` from the parts in `out` before they are scored again, so
    an input never has two rows. Each part is rewritten whole (temp file, then rename) or, left
    empty, deleted; a kill in between only means the input is retried once more. Returns the
    number of rows dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = pa.array(sorted(paths), pa.string())
    dropped = 0
    for part in part_files(out):
        table = pq.read_table(part)
        stale = pc.and_(pc.is_valid(table["error"]), pc.is_in(table["path"], value_set=wanted))
        count = pc.sum(pc.cast(stale, pa.int64())).as_py() or 0
        if not count:
            continue
        kept = table.filter(pc.invert(stale))
        if kept.num_rows == 0:
            part.unlink()
        else:
            tmp = out / f"{TMP_PREFIX}{part.name}"
            pq.write_table(kept, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, part)
        dropped += count
    return dropped


class PartWriter:
    """Writes result tables into `out` as part files, each atomically (temp name, then rename)."""

    def __init__(self, out: Path, run_id: str) -> None:
        self.out, self.run_id = out, run_id
        self.count = 0

    def write(self, table: pa.Table) -> Path:
        import pyarrow.parquet as pq

        self.count += 1
        name = f"{PART_PREFIX}{self.run_id}-{self.count:06d}{PART_SUFFIX}"
        tmp = self.out / f"{TMP_PREFIX}{name}"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:  # on disk before the name says it is complete
            os.fsync(handle.fileno())
        os.replace(tmp, self.out / name)
        with contextlib.suppress(OSError):  # make the rename itself durable where possible
            fd = os.open(self.out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self.out / name


@contextlib.contextmanager
def locked_out(out: Path) -> Iterator[None]:
    """Create `out`, take its lock (one job per folder) and drop temp files a killed run left."""
    import fcntl

    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_NAME, "a+")  # noqa: SIM115 - held for the whole job
    except OSError as exc:
        raise BatchError(f"cannot write to {out}: {exc.strerror or exc}") from None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BatchError(f"another ct-edge batch job is writing to {out}; wait for it or "
                             "choose another --out") from None
        for stale in out.glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                stale.unlink()
        yield


# --- the cluster ---------------------------------------------------------------------------


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
            _set_auth_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _process_token()})
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
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError... from Ray
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise BatchError(f"cannot start or reach {where}: "
                             f"{' '.join(str(exc).split())[:300]}") from None
        try:
            yield Cluster(started=address is None, seconds=time.perf_counter() - start,
                          address=address, cpus=_cluster_cpus(ray), temp_dir=temp_dir)
        finally:
            if address is None:  # wait for our raylet & co, so none writes into temp_dir after
                try:
                    ray.shutdown(wait_for_processes=True)
                except TypeError:  # an older Ray
                    ray.shutdown()
            else:
                ray.shutdown()
    finally:
        if saved != {key: os.environ.get(key) for key in saved}:
            _set_auth_env(saved)
        if temp_dir:
            for _ in range(10):  # a dying worker may still write a log line
                shutil.rmtree(temp_dir, ignore_errors=True)
                if not os.path.exists(temp_dir):
                    break
                time.sleep(0.2)


_TOKEN: list[str] = []


def _process_token() -> str:
    """One random token per process: Ray's native side caches the first token it reads."""
    if not _TOKEN:
        _TOKEN.append(secrets.token_hex(32))
    return _TOKEN[0]


def _set_auth_env(values: dict[str, str | None]) -> None:
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
            return (f"batch: nothing to score: all {self.inputs} inputs already scored; "
                    f"{self.total_rows} rows in {self.out}")
        return (f"batch: {self.rows} rows, {self.errors} errors, {self.seconds:.1f} s, "
                f"{self.images_per_second:.1f} images/s on {self.actors} "
                f"actor{'' if self.actors == 1 else 's'} "
                f"(+{self.startup_seconds:.1f} s Ray start-up); {self.skipped} already scored; "
                f"{self.total_rows} rows in {self.out}")


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
            want_cpus = (actors or 0) * threads
            with ray_cluster(address, num_cpus=max(available_cpus(), want_cpus) if want_cpus else None,
                             runtime_env=runtime_env, verbose=verbose) as cluster:
                result.startup_seconds = cluster.seconds
                if on_cluster is not None:
                    on_cluster(cluster)
                start = time.perf_counter()
                n_actors = actors or max(1, cluster.cpus // threads)
                if cluster.cpus and n_actors * threads > cluster.cpus:
                    print(f"warning: {n_actors} actors x {threads} threads need "
                          f"{n_actors * threads} CPUs, the cluster has {cluster.cpus}; some actors "
                          "wait for an autoscaler", file=sys.stderr)
                n_actors = min(n_actors, len(todo))
                result.actors = n_actors
                with quiet_ray(verbose):
                    options = {"threads": threads, "window": window,
                               "domain_check": domain_check}
                    for table in _score(todo, payload, n_actors, options, part_rows, verbose):
                        record(table)
                        if stop_after_parts is not None and result.parts >= stop_after_parts:
                            break
        result.seconds = time.perf_counter() - start
        result.complete = result.rows == len(pending)
    return result


def _score(paths: list[str], payload: ModelPayload, actors: int, options: dict[str, Any],
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
        _Scorer,
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
            _restore_env("RAY_DATA_LOG_LEVEL", env_level)
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
        _restore_env("RAY_DATA_LOG_LEVEL", env_level)
        data_logger.setLevel(level)


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def read_results(out: str | Path) -> pa.Table:
    """Every part in `out` as one table (for tests, notebooks and the benchmark)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = part_files(Path(out))
    if not parts:
        return pa.table({})
    return pa.concat_tables([pq.read_table(p) for p in parts])


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
