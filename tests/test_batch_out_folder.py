"""`ct-edge batch`'s --out folder: parts written whole under a lock, results of another model
refused, a part that cannot be written (a full disk, Arrow) one line, only its own temp parts
removed, and nothing left by a job that fails before writing."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from ct_edge import batch, cli
from ct_edge.batch import parts
from ct_edge.batch.payload import error_row, rows_to_table

pytest.importorskip("pyarrow", reason="ct-edge batch needs the [ray] extra")
# In this process Ray runs without token auth (conftest's `ray_auth_disabled`).
pytestmark = pytest.mark.usefixtures("ray_auth_disabled")


# --- without a cluster -------------------------------------------------------------------


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
