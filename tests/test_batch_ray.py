"""`ct-edge batch` on Ray: a local cluster scores an archive into Parquet as `classify` would and a
rerun after a kill scores only the rest; a multi-node cluster; the real process stopped by SIGTERM
and SIGKILL; the cluster sized for the threads asked for; a Ray start cut short leaves no process.

The tests that start Ray are marked `ray` (skip them with -m 'not ray'); the multi-node and the
kill-a-real-process ones are also `slow`.
"""

from __future__ import annotations

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

import pytest
from batch_helpers import rows_by_path

from ct_edge import batch, cli
from ct_edge.batch import cluster as batch_cluster
from ct_edge.batch import parts
from ct_edge.inputs import predictions

pytest.importorskip("pyarrow", reason="ct-edge batch needs the [ray] extra")
# In this process Ray runs without token auth (conftest's `ray_auth_disabled`).
pytestmark = pytest.mark.usefixtures("ray_auth_disabled")


def classify_reference(bundle: Path, artifact: str, paths: list[str]) -> dict:
    """What `ct-edge classify` answers for each path (the same per-file code, one process)."""
    from ct_edge.classifier import Classifier

    classifier = Classifier.from_bundle(bundle, artifact=artifact)
    return {p.path: p for p in predictions(classifier, [(path, None) for path in paths])}


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


# --- the cluster's size and start --------------------------------------------------------


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
