"""Rows of the results store and their heatmap files: what is stored and read back,
transactions, newest-first pages and filters, threads and two stores on one folder, text the
database cannot hold, `ct-edge results` listing rows; heatmap names the store chooses inside its
folder, durability (the folder synced after the rename), no file left by a failed insert, and
orphans swept once old."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from store_helpers import add_row

from ct_edge import store as store_module
from ct_edge.classifier import Prediction
from ct_edge.store import Store, StoreError

PNG = b"\x89PNG\r\n\x1a\nfake heatmap bytes"


def test_row_round_trip_and_commit_visible_to_another_connection(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        row_id = add_row(store, reason=None, bundle_sha256="cd" * 32, artifact="tflite-int8",
                         artifact_sha256="ef" * 32)
        # Committed: a second process (here a second connection) sees it at once.
        other = sqlite3.connect(tmp_path / "results.sqlite3")
        assert other.execute("SELECT label FROM results WHERE id = ?", (row_id,)).fetchone() \
            == ("Normal",)
        row = store.get(row_id)
    assert row["source"] == "scan.png" and row["origin"] == "test"
    assert row["confidence"] == pytest.approx(0.8)
    assert row["probabilities"]["Normal"] == pytest.approx(0.8)
    assert row["timings_ms"] == {"inference": 1.5}
    assert row["artifact"] == "tflite-int8" and row["bundle_sha256"] == "cd" * 32
    assert row["heatmap"] is False
    assert row["created_at"].endswith("Z")


def test_add_prediction_uses_the_prediction_fields(tmp_path: Path) -> None:
    prediction = Prediction(path="x.dcm", label=None, probabilities={}, status="out_of_domain",
                            reason="modality MR; this bundle accepts CT")
    with Store(tmp_path) as store:
        row = store.get(store.add_prediction(prediction, origin="cli"))
        failed = store.get(store.add_prediction(
            Prediction(path="bad.png", label=None, probabilities={}, status=None,
                       error="not a PNG, JPEG or DICOM image"), origin="cli", source="upload"))
    assert row["status"] == "out_of_domain" and row["label"] is None
    assert row["reason"].startswith("modality MR") and row["confidence"] is None
    assert failed["status"] is None and failed["error"].startswith("not a PNG")
    assert failed["source"] == "upload"


def test_add_predictions_stores_all_in_one_transaction_or_none(tmp_path: Path) -> None:
    answered = [(Prediction(path=f"image[{i}]", label="Normal", status="ok",
                            probabilities={"COVID-19": 0.1, "Normal": 0.8, "Viral Pneumonia": 0.1}),
                 f"{i:064x}") for i in range(3)]
    with Store(tmp_path) as store:
        ids = store.add_predictions(answered, origin="oip", artifact="tflite-int8")
        rows = [store.get(i) for i in ids]
        assert ids == sorted(ids) and [r["source"] for r in rows] == ["image[0]", "image[1]",
                                                                      "image[2]"]
        assert {r["sha256"] for r in rows} == {sha for _, sha in answered}
        assert all(r["confidence"] == 0.8 and r["artifact"] == "tflite-int8" for r in rows)
        # the third row cannot be written: the first two are rolled back with it
        with sqlite3.connect(store.path) as db:  # the database refuses the third row
            db.execute("CREATE TRIGGER poison BEFORE INSERT ON results WHEN NEW.source = 'poison' "
                       "BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
        poison = Prediction(path="poison", label="Normal", status="ok", probabilities={"Normal": 1})
        bad = [*answered[:2], (poison, "0" * 64)]
        with pytest.raises(StoreError):
            store.add_predictions(bad, origin="oip")
        assert store.count() == 3


def test_list_is_newest_first_paged_and_filtered(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        ids = [add_row(store, label=label, status=status) for label, status in
               [("Normal", "ok"), ("COVID-19", "uncertain"), ("Normal", "ok"),
                (None, "out_of_domain")]]
        add_row(store, label=None, status=None, error="empty file")
        rows = store.list(limit=3)
        assert [r["id"] for r in rows] == [ids[-1] + 1, ids[3], ids[2]]
        assert [r["id"] for r in store.list(limit=2, offset=3)] == [ids[1], ids[0]]
        assert [r["id"] for r in store.list(label="Normal")] == [ids[2], ids[0]]
        assert [r["id"] for r in store.list(status="uncertain")] == [ids[1]]
        assert [r["error"] for r in store.list(status="")] == ["empty file"]
        assert store.count() == 5 and store.count(status="ok", label="Normal") == 2
        assert len(store.list(limit=10**9)) == 5  # the page size is capped, not an error


def test_threads_share_one_store(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                for _ in range(25):
                    add_row(store)
                    store.list(limit=5)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert store.count() == 100
        assert len({r["id"] for r in store.list(limit=100)}) == 100


def test_every_results_writer_records_the_artifact_parity_status(tmp_path: Path) -> None:
    """A result of an artifact that missed parity looked like any other once stored."""
    failed = "failed: agreement 0.91 < 0.97"
    prediction = Prediction(path="x.png", label="Normal", status="ok", probabilities={"Normal": 1})
    with Store(tmp_path) as store:
        ids = [add_row(store, artifact="tflite-int8", artifact_parity=failed),
               store.add_prediction(prediction, origin="http", artifact_parity=failed),
               *store.add_predictions([(prediction, "ab" * 32)], origin="oip",
                                      artifact_parity=failed)]
        assert [store.get(i)["artifact_parity"] for i in ids] == [failed] * 3
        assert store.get(add_row(store))["artifact_parity"] is None  # not given: unknown
        assert store.get(add_row(store, artifact_parity="failed\ud800"))["artifact_parity"] \
            == "failed\ufffd"


def test_two_stores_on_one_folder(tmp_path: Path) -> None:
    with Store(tmp_path) as first, Store(tmp_path) as second:
        a = add_row(first)
        b = add_row(second)
        assert {r["id"] for r in first.list()} == {a, b}


def test_text_that_is_not_unicode_is_stored_with_a_replacement_character(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        row_id = add_row(store, source="x\ud800[0]", reason="why \udcff", label="Nor\udcffmal",
                         probabilities={"Nor\udcffmal": 0.8})
        row = store.get(row_id)
        assert row["source"] == "x\ufffd[0]" and row["reason"] == "why \ufffd"
        assert row["label"] == "Nor\ufffdmal" and row["confidence"] == pytest.approx(0.8)
        assert [r["id"] for r in store.list(label="Nor\udcffmal")] == [row_id]  # a filter too
        (other,) = store.add_predictions([(Prediction(path="y\ud800", label=None, status=None,
                                                      probabilities={}, error="e\ud800"),
                                           "cd" * 32)], origin="oip")
        assert store.get(other)["source"] == "y\ufffd" and store.get(other)["error"] == "e\ufffd"
        series = store.add_dicom_instance(sop_instance_uid="1.2.3.1", study_uid="1.2",
                                          series_uid="1.2.3", spool_path="1.dcm", nbytes=1,
                                          description="CHEST \udce9")
        assert series and store.get_dicom_series(series_uid="1.2.3")["description"] == "CHEST \ufffd"
        # every write goes through the one cleaning path, not only the writers that remember it
        series_id = store.get_dicom_series(series_uid="1.2.3")["id"]
        store.complete_dicom_series(series_id, status="ok", label="Normal",
                                    probabilities={"Normal": 1.0}, reason=None,
                                    aggregate="mean \udce9", counts={}, report="r\ud800.json")
        done = store.get_dicom_series(series_id)
        assert (done["aggregate"], done["report"]) == ("mean \ufffd", "r\ufffd.json")
        # a UID is an identity, not display text: refused, never a raw UnicodeEncodeError
        with pytest.raises(StoreError, match="SOPInstanceUID is not valid Unicode"):
            store.add_dicom_instance(sop_instance_uid="1.2.3.\udce9", study_uid="1.2",
                                     series_uid="1.2.3", spool_path="2.dcm", nbytes=1)


# --- `ct-edge results` -------------------------------------------------------------------------


def test_results_command_lists_the_store(tmp_path: Path, capsys) -> None:
    from ct_edge import cli

    with Store(tmp_path) as store:
        add_row(store, source="first.png")
        add_row(store, source="second.dcm", label=None, status="out_of_domain",
                reason="modality MR; this bundle accepts CT")
    assert cli.main(["results", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["id", "time", "(UTC)"]
    assert "second.dcm" in lines[1] and "out of domain" in lines[1] and "modality MR" in lines[1]
    assert "first.png" in lines[2] and "Normal 80.0%" in lines[2] and " ok " in lines[2]
    assert lines[-2] == "2 of 2 shown, newest first" and "not a diagnostic" in lines[-1]
    assert cli.main(["results", "--data-dir", str(tmp_path), "--json", "--limit", "1",
                     "--status", "ok"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["source"] == "first.png" and row["probabilities"]["Normal"] == 0.8


def test_results_command_marks_results_of_an_artifact_that_missed_parity(tmp_path: Path,
                                                                         capsys) -> None:
    """The table showed such a result like any other; rows that passed, or stored before the
    status was recorded, are shown as before."""
    from ct_edge import cli
    from ct_edge.errors import parity_warning

    failed = "failed: agreement 0.91 < 0.97"
    with Store(tmp_path) as store:
        add_row(store, source="unknown.png")
        add_row(store, source="passed.png", artifact="tflite-int8", artifact_parity="passed")
        for source in ("failed1.png", "failed2.png"):
            add_row(store, source=source, artifact="onnx-fp32", artifact_parity=failed)
    assert cli.main(["results", "--data-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[3]: line for line in lines[1:5]}
    assert " ok * " in rows["failed2.png"] and " ok * " in rows["failed1.png"]
    assert " ok " in rows["passed.png"] and "*" not in rows["passed.png"] + rows["unknown.png"]
    assert lines[5:7] == [f"* {parity_warning('onnx-fp32', failed)}",  # once per artifact
                          "4 of 4 shown, newest first"]
    assert cli.main(["results", "--data-dir", str(tmp_path), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["artifact_parity"] for row in listed] == [failed, failed, "passed", None]


def test_results_command_without_a_store_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    from ct_edge import cli

    assert cli.main(["results", "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no results store in")
    assert not (tmp_path / "none").exists()  # listing never creates a store


# --- heatmap files ------------------------------------------------------------------------------


def test_heatmap_files_get_store_names_inside_the_folder(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        row_id = add_row(store, source="../../etc/passwd", heatmap_png=PNG)
        path = store.heatmap_path(row_id)
        assert path is not None and path.read_bytes() == PNG
        assert path.parent == tmp_path / "heatmaps"
        assert store_module.HEATMAP_NAME.match(path.name)
        assert store.get(row_id)["heatmap"] is True
        assert store.heatmap_path(add_row(store)) is None
        assert store.heatmap_path(10_000) is None
    assert not list((tmp_path / "heatmaps").glob(".*.tmp"))


def test_a_tampered_heatmap_reference_is_not_followed(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        row_id = add_row(store, heatmap_png=PNG)
        db = sqlite3.connect(tmp_path / "results.sqlite3")
        db.execute("UPDATE results SET heatmap = '../results.sqlite3' WHERE id = ?", (row_id,))
        db.commit()
        assert store.heatmap_path(row_id) is None


def test_the_heatmap_folder_is_fsynced_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    synced: list[tuple[str, list[str]]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((target, sorted(os.listdir(target)) if os.path.isdir(target) else []))
        real_fsync(fd)

    with Store(tmp_path) as store:
        monkeypatch.setattr(os, "fsync", fsync)
        row_id = add_row(store, heatmap_png=PNG)
        name = store.heatmap_path(row_id).name
    folder = str(tmp_path / "heatmaps")
    # the file's name is durable (its folder synced once the rename is done) before the commit
    assert (folder, [name]) in synced


class Crashing:
    """A connection whose every statement raises a non-sqlite exception (a bug, an interrupt)."""

    def execute(self, *args: object) -> None:
        raise KeyboardInterrupt


@pytest.mark.parametrize("failure", ["crash", "sqlite"])
def test_a_failed_insert_leaves_no_heatmap_file(tmp_path: Path, monkeypatch, failure: str) -> None:
    real = store_module.transaction

    @contextlib.contextmanager
    def crashing(db, lock, path):
        with real(db, lock, path):
            yield Crashing()

    with Store(tmp_path) as store:
        if failure == "crash":
            monkeypatch.setattr(store_module, "transaction", crashing)
            with pytest.raises(KeyboardInterrupt):
                add_row(store, heatmap_png=PNG)
        else:
            store._db.execute("CREATE TEMP TRIGGER poison BEFORE INSERT ON results "
                              "BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
            with pytest.raises(StoreError):
                add_row(store, heatmap_png=PNG)
        monkeypatch.undo()
        assert store.count() == 0
    assert os.listdir(tmp_path / "heatmaps") == []


@pytest.mark.parametrize(("code", "stored"), [(errno.EINVAL, True), (errno.EIO, False)])
def test_a_folder_that_cannot_be_synced_is_no_error_but_an_io_error_is(
        tmp_path: Path, monkeypatch, code: int, stored: bool) -> None:
    """Some mounts refuse fsync on a folder (EINVAL): explained uploads must still be stored.
    A disk error is a StoreError, and no heatmap file or row is left."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    with Store(tmp_path) as store:
        monkeypatch.setattr(os, "fsync", fsync)
        if stored:
            assert store.heatmap_path(add_row(store, heatmap_png=PNG)) is not None
        else:
            with pytest.raises(StoreError):
                add_row(store, heatmap_png=PNG)
            assert store.count() == 0 and not list((tmp_path / "heatmaps").glob("*"))


def test_heatmaps_no_row_names_are_removed_once_old(tmp_path: Path) -> None:
    """A kill between a heatmap file and its row's commit leaves an orphan; `serve` sweeps them
    at start, sparing young files another process may be about to commit."""
    with Store(tmp_path) as store:
        kept = store.heatmap_path(add_row(store, heatmap_png=PNG))
        old_orphan = store.heatmaps / ("ab" * 16 + ".png")
        old_temp = store.heatmaps / f".{'cd' * 16}.png.tmp"
        young_orphan = store.heatmaps / ("ef" * 16 + ".png")
        for path in (old_orphan, old_temp, young_orphan):
            path.write_bytes(PNG)
        hours_ago = time.time() - 7200
        for path in (kept, old_orphan, old_temp):
            os.utime(path, (hours_ago, hours_ago))
        assert store.remove_orphan_heatmaps() == 2
        assert sorted(p.name for p in store.heatmaps.iterdir()) == sorted(
            [kept.name, young_orphan.name])
