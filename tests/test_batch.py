"""`ct-edge batch`: Ray actors score an archive into Parquet; bad files are rows; reruns resume.

The tests that start Ray are marked `ray` (skip them with -m 'not ray'); the multi-node and the
kill-a-real-process ones are also `slow`. The rest check the pieces without a cluster.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from ct_edge import batch, cli
from ct_edge.batch import cluster as batch_cluster
from ct_edge.batch import parts
from ct_edge.batch.payload import error_row, rows_to_table
from ct_edge.batch.scorer import Scorer
from ct_edge.errors import BundleError
from ct_edge.inputs import predictions

pytest.importorskip("pyarrow", reason="ct-edge batch needs the [ray] extra")

REPO = Path(__file__).resolve().parents[1]
BAD_FILES = {"garbage.png": b"this is not an image", "empty.png": b"",
             "notimage.jpg": b"\xff\xd8\xff\xe0 truncated jpeg"}


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def ray_auth_disabled():
    """In this process Ray runs without token auth (and so writes no token to $HOME): Ray's native
    side caches the auth mode and token, so one pytest process must not mix modes. The default
    (a random token, in the environment only) is exercised by the subprocess test below."""
    saved = os.environ.get("RAY_AUTH_MODE")
    batch_cluster.set_auth_env({"RAY_AUTH_MODE": "disabled"})
    yield
    batch_cluster.set_auth_env({"RAY_AUTH_MODE": saved})


@pytest.fixture(scope="module")
def bundle_artifact(tiny_bundle: Path) -> tuple[Path, str]:
    """conftest's real bundle and an artifact to run (named: the bundle's parity verdict varies)."""
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    names = [a["name"] for a in manifest["artifacts"]]
    name = manifest.get("default") or next(n for n in names if n.startswith("tflite"))
    return tiny_bundle, name


@pytest.fixture(scope="module")
def scans(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """~60 inputs: the synthetic images, three bad files, and a list file naming one more
    (missing) file and one already in the folder (a duplicate, scored once)."""
    root = tmp_path_factory.mktemp("scans")
    folder = root / "archive"
    good = []
    for i, src in enumerate(sorted(synthetic_root.rglob("*.png"))):
        dst = folder / src.parent.name / f"{i:03d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        good.append(str(dst))
    real = Path(good[0]).read_bytes()
    bad_files = {**BAD_FILES, "truncated.png": real[: len(real) // 3]}
    (folder / "bad").mkdir()
    bad = []
    for name, data in bad_files.items():
        (folder / "bad" / name).write_bytes(data)
        bad.append(str(folder / "bad" / name))
    missing = str(root / "elsewhere" / "missing.png")
    listing = root / "more.txt"
    listing.write_text(f"# extra inputs\n{missing}\n\n{good[0]}\n")
    return SimpleNamespace(folder=folder, listing=listing, good=good, bad=bad, missing=missing,
                           inputs=[str(folder), str(listing)], count=len(good) + len(bad) + 1)


def classify_reference(bundle: Path, artifact: str, paths: list[str]) -> dict:
    """What `ct-edge classify` answers for each path (the same per-file code, one process)."""
    from ct_edge.classifier import Classifier

    classifier = Classifier.from_bundle(bundle, artifact=artifact)
    return {p.path: p for p in predictions(classifier, [(path, None) for path in paths])}


def rows_by_path(out: Path) -> dict[str, dict]:
    rows = parts.read_results(out).to_pylist()
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "an input was scored twice"
    return {row["path"]: row for row in rows}


# --- with a local Ray cluster ------------------------------------------------------------


@pytest.mark.ray
class TestLocalCluster:
    @pytest.fixture(scope="class")
    def local_ray(self):
        """One private local cluster (2 CPUs, its own temp dir, nothing in $HOME) for the class."""
        pytest.importorskip("ray")
        with batch_cluster.ray_cluster(num_cpus=2) as cluster:
            assert cluster.started and cluster.cpus == 2
            yield cluster
        assert not Path(cluster.temp_dir).exists(), "the cluster's temp dir was left behind"

    def test_scores_like_classify_and_a_rerun_after_a_kill_scores_only_the_rest(
            self, local_ray, scans, bundle_artifact, tmp_path, capsys) -> None:
        import pyarrow.parquet as pq
        import ray

        bundle, artifact = bundle_artifact
        out = tmp_path / "results"
        # A job "killed" after two parts (the test hook stops it as a kill would).
        first = batch.run_batch(scans.inputs, out, bundle=bundle, artifact=artifact, actors=2,
                                part_rows=6, stop_after_parts=2)
        assert first.parts == 2 and 0 < first.rows < scans.count and not first.complete
        assert len(parts.part_files(out)) == 2
        # Parts without error rows stay as they are; error rows are retried (the file may be fixed).
        kept = {p.name: p.stat().st_mtime_ns for p in parts.part_files(out)
                if pq.read_table(p, columns=["error"])["error"].null_count == pq.read_metadata(p).num_rows}
        ok_first = first.rows - first.errors

        # The rerun, as a user types it: scores only what no part holds yet.
        code = cli.main(["batch", *scans.inputs, "--out", str(out), "--bundle", str(bundle),
                         "--artifact", artifact, "--actors", "2", "--part-rows", "6"])
        captured = capsys.readouterr()
        assert code == 1, captured.err  # some inputs could not be read, as in classify
        summary = captured.out.strip().splitlines()[-1]
        assert summary.startswith(f"batch: {scans.count - ok_first} rows, ")
        assert f"{ok_first} already scored; {scans.count} rows in {out}" in summary
        assert "images/s on 2 actors" in summary
        for path in {*scans.bad, scans.missing}:  # one line per error row, retried ones too
            assert f"error: {path}: " in captured.err
        assert all(p.stat().st_mtime_ns == kept[p.name] for p in parts.part_files(out)
                   if p.name in kept), "a part of the first run was rewritten"

        rows = rows_by_path(out)
        assert set(rows) == {*scans.good, *scans.bad, scans.missing}
        expected = classify_reference(bundle, artifact, [*scans.good, *scans.bad, scans.missing])
        manifest_bytes = (bundle / "manifest.json").read_bytes()
        manifest = json.loads(manifest_bytes)
        entry = next(a for a in manifest["artifacts"] if a["name"] == artifact)
        node = ray.get_runtime_context().get_node_id()
        for path, row in rows.items():
            want = expected[path]
            assert row["bundle_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
            assert row["artifact_sha256"] == entry["sha256"] and row["artifact"] == artifact
            assert row["node_id"] == node
            if want.error is not None:
                assert row["error"] == want.error and row["label"] is None
                assert all(row[label] is None for label in manifest["labels"])
                continue
            assert row["error"] is None
            assert row["label"] == want.label
            assert row["status"] == want.status and row["reason"] == want.reason
            for label in manifest["labels"]:
                assert row[label] == pytest.approx(want.probabilities[label], abs=1e-5)
        assert {rows[p]["error"] for p in scans.bad} >= {"empty file"}
        assert rows[scans.missing]["error"] == "no such file"

        # A rerun retries only the error rows, each replacing its old row.
        failed = len(scans.bad) + 1
        again = batch.run_batch(scans.inputs, out, bundle=bundle, artifact=artifact, actors=2)
        assert (again.rows, again.errors, again.skipped) == (failed, failed, scans.count - failed)
        assert set(rows_by_path(out)) == set(rows) and again.total_rows == scans.count

    @pytest.mark.slow
    def test_an_actor_refuses_bytes_that_do_not_match_and_the_job_says_so(
            self, local_ray, scans, bundle_artifact, tmp_path) -> None:
        bundle, artifact = bundle_artifact
        payload = batch.ModelPayload.from_bundle(bundle, artifact)
        tampered = replace(payload, model=bytes([payload.model[0] ^ 1]) + payload.model[1:])
        with pytest.raises(batch.BatchError, match=r"the Ray job failed \(.*BundleError: the "
                                                   r"model bytes .* do not match"):
            list(batch.score_on_ray(scans.good[:4], tampered, 1, {"threads": 1, "window": None}, 10, False))


@pytest.mark.ray
@pytest.mark.slow
def test_multi_node_cluster_scores_on_every_node(scans, bundle_artifact, tmp_path, capsys) -> None:
    """Three Ray nodes on this machine (ray.cluster_utils.Cluster); the job joins with --address."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    bundle, artifact = bundle_artifact
    temp = tempfile.mkdtemp(prefix="ct-edge-ray-", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    cluster = None
    try:
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        node_ids = {node.node_id for node in cluster.list_all_nodes()}
        assert len(node_ids) == 3
        out = tmp_path / "results"
        code = cli.main(["batch", str(scans.folder), "--out", str(out), "--bundle", str(bundle),
                         "--artifact", artifact, "--address", cluster.address, "--actors", "3",
                         "--part-rows", "4", "-q"])
        assert code == 1, capsys.readouterr().err  # the bad files
        rows = rows_by_path(out)
        assert len(rows) == len(scans.good) + len(scans.bad)
        scored_on = {row["node_id"] for row in rows.values()}
        assert scored_on == node_ids, "every node should have scored some inputs"
        assert all(rows[p]["error"] is None for p in scans.good)
    finally:
        if cluster is not None:
            cluster.shutdown()
        batch_cluster.restore_env("RAY_TMPDIR", saved)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_process_then_rerun_completes_without_duplicates(bundle_artifact, tmp_path) -> None:
    """The real thing: `ct-edge batch` in its own process, stopped by SIGTERM (a scheduler) and by
    SIGKILL (the OOM killer) once parts exist, then run to the end."""
    pytest.importorskip("ray")
    from PIL import Image

    bundle, artifact = bundle_artifact
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(150):
        Image.new("L", (40, 40), color=i).save(folder / f"{i:03d}.png")
    out, home = tmp_path / "results", tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    for key in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # ct-edge's own defaults
        env.pop(key, None)
    temp = tempfile.mkdtemp(prefix="ct-edge-ray-", dir="/tmp")
    cmd = [str(Path(sys.executable).with_name("ct-edge")), "batch", str(folder), "--out", str(out),
           "--bundle", str(bundle), "--artifact", artifact, "--actors", "1", "--part-rows", "1"]

    def start_and_stop_after(count: int, sig: int, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                **kwargs)
        deadline = time.monotonic() + 120
        while (len(parts.part_files(out)) < count and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.02)
        children = _children(proc.pid)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        _wait_gone(children)
        return proc

    try:
        before = set(Path("/tmp").glob("ct-edge-ray-*"))
        stopped = start_and_stop_after(3, signal.SIGTERM, env=env)
        assert stopped.returncode == 130
        assert "interrupted: the parts written so far stay in" in stopped.stderr.read()
        assert set(Path("/tmp").glob("ct-edge-ray-*")) <= before, "temp dir left behind"
        after_term = len(rows_by_path(out))

        killed = start_and_stop_after(after_term + 3, signal.SIGKILL,
                                      env={**env, "RAY_TMPDIR": temp})
        assert killed.returncode == -signal.SIGKILL
        written = len(rows_by_path(out))
        assert 3 <= after_term < written < 150, "each stop should land part-way"

        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"{written} already scored" in done.stdout
        rows = rows_by_path(out)
        assert len(rows) == 150 and all(row["error"] is None for row in rows.values())
        assert set(Path("/tmp").glob("ct-edge-ray-*")) <= before, "temp dir left behind"
        in_home = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
        assert not in_home, f"written to $HOME: {in_home}"
        assert not list(out.glob(".tmp-*"))
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_gone(pids: list[int], timeout: float = 20.0) -> None:
    """Ray's local processes share the driver's fate; kill (by pid) any that outlive it."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
        time.sleep(0.2)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"Ray processes outlived the killed driver: {alive}"


# --- without a cluster -------------------------------------------------------------------


def test_actor_verifies_the_bytes_it_receives(bundle_artifact, scans) -> None:
    bundle, artifact = bundle_artifact
    payload = batch.ModelPayload.from_bundle(bundle, artifact)
    scorer = Scorer(payload)
    rows = scorer.score([scans.good[0], scans.bad[0]])
    assert rows[0]["label"] in payload.labels and rows[0]["error"] is None
    assert rows[1]["label"] is None and rows[1]["error"]

    flipped = bytes([payload.model[0] ^ 1]) + payload.model[1:]
    with pytest.raises(BundleError, match="do not match the manifest's sha256"):
        Scorer(replace(payload, model=flipped))
    with pytest.raises(BundleError, match="manifest bytes"):
        Scorer(replace(payload, manifest=payload.manifest + b" "))


def test_the_payload_is_the_very_bytes_that_were_verified(bundle_artifact, tmp_path,
                                                          monkeypatch) -> None:
    """The driver read manifest.json again after verifying the bundle: a bundle installed in
    between was sent to every actor, and named on every row, for answers it had not checked."""
    from ct_edge.bundle import Bundle

    bundle, artifact = bundle_artifact
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    manifest_bytes = (copy / "manifest.json").read_bytes()
    domain_bytes = (copy / "domain.npz").read_bytes()
    load = Bundle.load.__func__

    def load_then_install(cls, root=None):
        loaded = load(cls, root)
        newer = json.loads(manifest_bytes)
        newer["calibration"]["temperature"] = 5.0  # `make convert` installs a new bundle now
        (copy / "manifest.json").write_text(json.dumps(newer))
        return loaded

    monkeypatch.setattr(Bundle, "load", classmethod(load_then_install))
    payload = batch.ModelPayload.from_bundle(copy, artifact)
    assert payload.manifest == manifest_bytes and payload.domain == domain_bytes
    assert payload.manifest_sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    monkeypatch.undo()
    assert Scorer(payload).classifier.bundle.temperature == json.loads(manifest_bytes)[
        "calibration"]["temperature"]


def test_batch_warns_when_its_artifact_missed_parity(bundle_artifact, tmp_path, capsys,
                                                     monkeypatch) -> None:
    """The payload carries the same warning the bundle gives every other command."""
    bundle, artifact = bundle_artifact
    payload = batch.ModelPayload.from_bundle(bundle, artifact)
    assert replace(payload, artifact_status="passed").parity_warning is None
    failed = replace(payload, artifact_status="failed")
    assert failed.parity_warning == (f"artifact {artifact!r} has parity status 'failed'; its "
                                     "answers may differ from the reference model")

    def run_batch(*args, on_start, **kwargs):
        on_start(0, failed)
        return SimpleNamespace(error_samples=[], errors=0, out=tmp_path, summary=lambda: "done")

    monkeypatch.setattr(batch, "run_batch", run_batch)
    for quiet in ([], ["--quiet"]):
        assert cli.main(["batch", str(tmp_path), "--out", str(tmp_path / "out"), *quiet]) == 0
        err = capsys.readouterr().err
        assert (f"warning: {failed.parity_warning}" in err.splitlines()) == (not quiet)


def test_actors_honour_no_domain_check(bundle_artifact, tmp_path) -> None:
    """`batch --no-domain-check` reaches the actors: every readable input gets a label."""
    import numpy as np
    from PIL import Image

    bundle, artifact = bundle_artifact
    payload = batch.ModelPayload.from_bundle(bundle, artifact)
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96), np.uint8)).save(noise)
    checked, forced = Scorer(payload), Scorer(payload, domain_check=False)
    assert checked.classifier.gate is not None and forced.classifier.gate is None
    (row,) = checked.score([str(noise)])
    assert row["status"] == "out_of_domain" and row["label"] is None
    (row,) = forced.score([str(noise)])
    assert row["label"] in payload.labels and "domain check off" in row["reason"]


def test_out_folder_of_another_model_is_refused(bundle_artifact, tmp_path) -> None:
    bundle, artifact = bundle_artifact
    out = tmp_path / "results"
    # A glob that matches nothing is an error row written without Ray.
    first = batch.run_batch([str(tmp_path / "none-*.png")], out, bundle=bundle, artifact=artifact)
    assert (first.rows, first.errors, first.actors) == (1, 1, 0)
    other = next(a["name"] for a in json.loads((bundle / "manifest.json").read_text())
                 ["artifacts"] if a["name"] != artifact)
    with pytest.raises(batch.BatchError, match="holds results of another model"):
        batch.run_batch([str(tmp_path / "none-*.png")], out, bundle=bundle, artifact=other)


def test_a_part_that_cannot_be_written_is_one_line_and_leaves_no_temp_file(
        bundle_artifact, tmp_path, monkeypatch, capsys) -> None:
    """A full disk while a part is written was a traceback; now one line naming the folder."""
    import pyarrow.parquet as pq

    bundle, artifact = bundle_artifact
    out = tmp_path / "results"

    def disk_full(table, where, **kwargs) -> None:
        Path(where).write_bytes(b"half a part")  # what a real write leaves when the disk fills
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", disk_full)
    code = cli.main(["batch", str(tmp_path / "none-*.png"), "--out", str(out),
                     "--bundle", str(bundle), "--artifact", artifact])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: cannot write results to {out}: No space left on device\n"
    assert not out.exists(), "a job that wrote nothing should leave nothing"


def test_inputs_folders_globs_and_list_files(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    for name in ("x.png", "y.png"):
        (tmp_path / "a" / name).write_bytes(b"")
    Path("list.lst").write_text("# comment\na/x.png\n\n/abs/z.dcm\n  a/y.png  \n")
    items = batch.expand_batch_inputs(["a", "list.lst", "a/*.png", "none-*.png"])
    assert [path for path, _ in items] == [str(tmp_path / "a" / "x.png"), str(tmp_path / "a" / "y.png"),
                                           "/abs/z.dcm", str(tmp_path / "none-*.png")]
    assert [error for _, error in items] == [None, None, None, "no files match this pattern"]


def test_parts_are_written_whole_and_the_folder_is_locked(bundle_artifact, tmp_path) -> None:
    bundle, artifact = bundle_artifact
    payload = batch.ModelPayload.from_bundle(bundle, artifact)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp-part-old.parquet").write_bytes(b"half a part from a killed run")
    with parts.locked_out(out):
        assert not (out / ".tmp-part-old.parquet").exists()
        with pytest.raises(batch.BatchError, match="another ct-edge batch job"), \
                parts.locked_out(out):
            pass
        part = parts.PartWriter(out, "run").write(
            rows_to_table([error_row("/x.png", "no such file", payload)],
                                payload.labels))
    assert part.name == "part-run-000001.parquet"
    assert parts.read_done(out, payload) == set()  # an error row is retried by the next run
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp")] == []


def test_classify_and_help_never_import_ray(bundle_artifact) -> None:
    bundle, artifact = bundle_artifact
    image = REPO / "tests" / "fixtures" / "gray8.png"
    code = (
        "import sys\nfrom ct_edge import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"assert cli.main(['classify', '-q', '--bundle', {str(bundle)!r}, '--artifact', "
        f"{artifact!r}, {str(image)!r}]) == 0\n"
        "print(sorted(m for m in ('ray', 'pyarrow', 'pandas') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_batch_without_ray_says_how_to_install_it(bundle_artifact, tmp_path) -> None:
    bundle, artifact = bundle_artifact
    code = (
        "import sys\nsys.modules['ray'] = None\nfrom ct_edge import cli\n"
        f"sys.exit(cli.main(['batch', {str(REPO / 'tests' / 'fixtures')!r}, '--out', "
        f"{str(tmp_path / 'out')!r}, '--bundle', {str(bundle)!r}, '--artifact', {artifact!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: ct-edge batch needs Ray: pip install 'ct-edge[ray]' "
                                     "(ray[data] and pyarrow)")


# --- review fixes: names, temp files, CPUs, exit codes, Ctrl-C, leftovers -----------------


@pytest.fixture
def ray_free(bundle_artifact, monkeypatch) -> SimpleNamespace:
    """run_batch without Ray: a fake cluster (recording the CPUs asked for) and the actors'
    scoring done in this process by the real Scorer."""
    import contextlib

    calls = SimpleNamespace(num_cpus=[])

    @contextlib.contextmanager
    def fake_cluster(address=None, num_cpus=None, **kwargs):
        calls.num_cpus.append(num_cpus)
        yield batch.Cluster(started=True, seconds=0.0, address=address,
                            cpus=num_cpus or batch_cluster.available_cpus())

    def fake_score(paths, payload, actors, options, part_rows, verbose):
        yield rows_to_table(Scorer(payload, **options).score(paths), payload.labels)

    monkeypatch.setattr(batch, "ray_cluster", fake_cluster)
    monkeypatch.setattr(batch, "score_on_ray", fake_score)
    return calls


def test_a_name_that_is_not_utf8_is_an_error_row_and_the_rest_is_scored(
        bundle_artifact, scans, ray_free, tmp_path, capsys) -> None:
    """One such name aborted the whole batch with a UnicodeEncodeError traceback."""
    bundle, artifact = bundle_artifact
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(scans.good[0], folder / "good.png")
    bad = os.path.join(os.fsencode(folder), b"bad\xff.png")
    shutil.copyfile(scans.good[0], bad)
    out = tmp_path / "results"
    shown = f"{folder}/bad\\xff.png"  # as classify prints it
    for _ in range(2):  # a rerun retries the error row without tripping over it
        code = cli.main(["batch", str(folder), "--out", str(out), "--bundle", str(bundle),
                         "--artifact", artifact])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        assert f"error: {shown}: {batch.NOT_UTF8}" in err.splitlines()
    rows = rows_by_path(out)
    assert set(rows) == {str(folder / "good.png"), shown}
    assert rows[shown]["error"] == batch.NOT_UTF8
    assert rows[str(folder / "good.png")]["error"] is None


def test_arrow_errors_writing_a_part_are_one_line(bundle_artifact, tmp_path, monkeypatch,
                                                 capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    bundle, artifact = bundle_artifact
    payload = batch.ModelPayload.from_bundle(bundle, artifact)
    with pytest.raises(batch.BatchError, match="cannot store a result row in Parquet"):
        rows_to_table([error_row("/x\udcff.png", "no such file", payload)], payload.labels)

    def invalid(table, where, **kwargs) -> None:
        raise pa.ArrowInvalid("cannot write\nthis value")

    monkeypatch.setattr(pq, "write_table", invalid)
    out = tmp_path / "results"
    code = cli.main(["batch", str(tmp_path / "none-*.png"), "--out", str(out),
                     "--bundle", str(bundle), "--artifact", artifact])
    assert code == 2
    assert capsys.readouterr().err == f"error: cannot write results to {out}: cannot write this value\n"


def test_only_its_own_temp_parts_are_removed_from_out(tmp_path) -> None:
    """--out may be any folder: the user's own `.tmp-*` files in it were deleted."""
    out = tmp_path / "out"
    out.mkdir()
    theirs = [".tmp-notes.txt", ".tmp-draft.parquet", ".tmp-part-notes.txt"]
    for name in [*theirs, ".tmp-part-20261207T175728-b3fde7-000001.parquet"]:
        (out / name).write_bytes(b"x")
    with parts.locked_out(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == sorted([*theirs, parts.LOCK_NAME])


def test_a_local_cluster_is_sized_for_threads_above_the_cpus(bundle_artifact, scans, ray_free,
                                                            tmp_path, capsys) -> None:
    """`--threads N` above the CPUs, no --actors: the cluster got the machine's CPUs only, and
    the one actor waited 10 minutes for an autoscaler a local cluster does not have."""
    bundle, artifact = bundle_artifact
    threads = batch_cluster.available_cpus() + 1
    result = batch.run_batch([scans.good[0]], tmp_path / "out", bundle=bundle, artifact=artifact,
                             threads=threads)
    assert ray_free.num_cpus == [threads] and result.actors == 1 and result.errors == 0
    assert "warning" not in capsys.readouterr().err


def test_the_pool_warning_says_what_happens() -> None:
    assert batch.pool_warning(2, 1, 2) is None and batch.pool_warning(1, 4, 0) is None
    assert batch.pool_warning(1, 4, 2) == (
        "1 actor x 4 threads need 4 CPUs and the cluster has 2: the job waits up to 10 minutes "
        "for the cluster to grow (an autoscaler), then fails; use fewer --actors or --threads")
    assert batch.pool_warning(3, 1, 2).startswith("3 actors x 1 thread need 3 CPUs")


@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_inputs_that_could_not_be_read_exit_1_with_their_lines(bundle_artifact, tmp_path, capsys,
                                                               quiet) -> None:
    """The package's contract, as classify: exit 1 and one `error:` line each, -q or not."""
    bundle, artifact = bundle_artifact
    pattern = str(tmp_path / "none-*.png")
    code = cli.main(["batch", pattern, "--out", str(tmp_path / "out"), "--bundle", str(bundle),
                     "--artifact", artifact, *quiet])
    captured = capsys.readouterr()
    assert code == 1
    assert f"error: {pattern}: no files match this pattern" in captured.err.splitlines()
    assert captured.out.startswith("batch: 1 rows, 1 errors")


class FakeRay:
    """A Ray whose init starts two processes of the cluster and then raises: one naming the
    temp folder on its command line (the raylet), one only writing a log in it (an agent, whose
    command line is a title)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc, self.shutdowns, self.started = exc, [], []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs) -> None:
        session = Path(kwargs["_temp_dir"], "session_1")
        session.mkdir()
        sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
        self.started.append(subprocess.Popen([*sleep, str(session)]))
        with open(session / "agent.log", "w") as log:
            self.started.append(subprocess.Popen(sleep, stdout=log))
        time.sleep(0.5)  # both are in /proc by now
        raise self.exc

    def shutdown(self, **kwargs) -> None:
        self.shutdowns.append(kwargs)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("no")])
def test_ray_start_cut_short_leaves_no_ray_process(monkeypatch, exc) -> None:
    """Ctrl-C inside ray.init skipped ray.shutdown: Ray's agents ran on ~60 s after exit."""
    fake = FakeRay(exc)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(batch_cluster, "import_ray", lambda: fake)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    try:
        with pytest.raises(type(exc) if isinstance(exc, KeyboardInterrupt) else batch.BatchError), \
                batch_cluster.ray_cluster():
            pass
        raylet, agent = fake.started
        assert raylet.wait(timeout=10) == agent.wait(timeout=10) == -signal.SIGKILL
        assert fake.shutdowns == [{"wait_for_processes": True}]
        assert not Path(raylet.args[-1]).parent.exists(), "the temp dir was left behind"
    finally:
        for proc in fake.started:
            proc.kill()


def test_a_job_that_fails_before_writing_leaves_nothing(bundle_artifact, scans, tmp_path,
                                                       monkeypatch, capsys) -> None:
    """`--address auto` without a cluster left --out and its lock file behind."""
    bundle, artifact = bundle_artifact

    def no_cluster(*args, **kwargs):
        raise batch.BatchError("cannot start or reach the Ray cluster at auto: none")

    monkeypatch.setattr(batch, "ray_cluster", no_cluster)
    made, mine = tmp_path / "new" / "out", tmp_path / "mine"
    mine.mkdir()
    for out in (made, mine):
        code = cli.main(["batch", scans.good[0], "--out", str(out), "--address", "auto",
                         "--bundle", str(bundle), "--artifact", artifact])
        assert code == 2 and "at auto: none" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert list(mine.iterdir()) == [], "the user's own folder stays, empty"
