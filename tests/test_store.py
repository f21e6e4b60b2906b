"""The results store: schema and migrations, rows, heatmap files, filters, threads, data folder."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from ct_edge import store as store_module
from ct_edge.classifier import Prediction
from ct_edge.store import MIGRATIONS, Store, StoreError, default_data_dir, schema_version
from ct_edge.store import schema as store_schema

PNG = b"\x89PNG\r\n\x1a\nfake heatmap bytes"


def _add(store: Store, **overrides) -> int:
    fields = {"source": "scan.png", "origin": "test", "status": "ok", "label": "Normal",
              "probabilities": {"COVID-19": 0.1, "Normal": 0.8, "Viral Pneumonia": 0.1},
              "timings_ms": {"inference": 1.5}, "sha256": "ab" * 32}
    return store.add(**{**fields, **overrides})


def damage_store(data_dir: Path, rows: int = 300) -> None:
    """A store of `rows` results, checkpointed, whose later pages (the rows, not the schema) are
    overwritten with random bytes: it opens, and reading the rows fails."""
    with Store(data_dir) as store:
        store.add_predictions([(Prediction(path=f"scan{i:04d}.png" * 4, label="Normal", status="ok",
                                           probabilities={"Normal": 0.9}, reason="r" * 40),
                                "ab" * 32) for i in range(rows)], origin="test")
    db = sqlite3.connect(data_dir / "results.sqlite3")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    path = data_dir / "results.sqlite3"
    data = bytearray(path.read_bytes())
    noise = random.Random(7)
    for start in range(len(data) // 2 // page * page, len(data), page):
        data[start + 100:start + page - 100] = noise.randbytes(page - 200)
    path.write_bytes(bytes(data))


def test_new_store_is_migrated_and_wal(tmp_path: Path) -> None:
    with Store(tmp_path / "data") as store:
        assert store.version == len(MIGRATIONS)
    db = sqlite3.connect(tmp_path / "data" / "results.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert schema_version(db) == len(MIGRATIONS)
    versions = [row[0] for row in db.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))


def test_reopening_applies_only_missing_migrations(tmp_path: Path, monkeypatch) -> None:
    Store(tmp_path).close()
    calls: list[int] = []

    def v_next(db: sqlite3.Connection) -> None:
        calls.append(1)
        db.execute("CREATE TABLE extra (x INTEGER)")

    monkeypatch.setattr(store_schema, "MIGRATIONS", [*MIGRATIONS, v_next])
    with Store(tmp_path) as store:
        assert store.version == len(MIGRATIONS) + 1
    with Store(tmp_path):
        pass
    assert calls == [1]


def test_failed_migration_leaves_the_previous_version(tmp_path: Path, monkeypatch) -> None:
    Store(tmp_path).close()

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half (x INTEGER)")
        raise RuntimeError("boom")

    monkeypatch.setattr(store_schema, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(RuntimeError):
        Store(tmp_path)
    db = sqlite3.connect(tmp_path / "results.sqlite3")
    assert schema_version(db) == len(MIGRATIONS)
    assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchall()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "results.sqlite3")
    db.execute("INSERT INTO schema_version VALUES (?, 'later')", (len(MIGRATIONS) + 1,))
    db.commit()
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path)


def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "results.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable results store"):
        Store(tmp_path)


def test_row_round_trip_and_commit_visible_to_another_connection(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        row_id = _add(store, reason=None, bundle_sha256="cd" * 32, artifact="tflite-int8",
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


def test_heatmap_files_get_store_names_inside_the_folder(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        row_id = _add(store, source="../../etc/passwd", heatmap_png=PNG)
        path = store.heatmap_path(row_id)
        assert path is not None and path.read_bytes() == PNG
        assert path.parent == tmp_path / "heatmaps"
        assert store_module.HEATMAP_NAME.match(path.name)
        assert store.get(row_id)["heatmap"] is True
        assert store.heatmap_path(_add(store)) is None
        assert store.heatmap_path(10_000) is None
    assert not list((tmp_path / "heatmaps").glob(".*.tmp"))


def test_a_tampered_heatmap_reference_is_not_followed(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        row_id = _add(store, heatmap_png=PNG)
        db = sqlite3.connect(tmp_path / "results.sqlite3")
        db.execute("UPDATE results SET heatmap = '../results.sqlite3' WHERE id = ?", (row_id,))
        db.commit()
        assert store.heatmap_path(row_id) is None


def test_list_is_newest_first_paged_and_filtered(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        ids = [_add(store, label=label, status=status) for label, status in
               [("Normal", "ok"), ("COVID-19", "uncertain"), ("Normal", "ok"),
                (None, "out_of_domain")]]
        _add(store, label=None, status=None, error="empty file")
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
                    _add(store)
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


def test_two_stores_on_one_folder(tmp_path: Path) -> None:
    with Store(tmp_path) as first, Store(tmp_path) as second:
        a = _add(first)
        b = _add(second)
        assert {r["id"] for r in first.list()} == {a, b}


def test_default_data_dir_order(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CT_EDGE_DATA", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "explicit"
    monkeypatch.delenv("CT_EDGE_DATA")
    assert default_data_dir() == tmp_path / "xdg" / "ct-edge"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "ct-edge"


def test_unwritable_folder_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open the results store"):
        Store(blocker / "data")


# --- `ct-edge results` -------------------------------------------------------------------------


def test_results_command_lists_the_store(tmp_path: Path, capsys) -> None:
    from ct_edge import cli

    with Store(tmp_path) as store:
        _add(store, source="first.png")
        _add(store, source="second.dcm", label=None, status="out_of_domain",
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


def test_results_command_without_a_store_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    from ct_edge import cli

    assert cli.main(["results", "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no results store in")
    assert not (tmp_path / "none").exists()  # listing never creates a store


def test_results_command_series_view(tmp_path: Path, capsys) -> None:
    from ct_edge import cli

    Store(tmp_path).close()
    assert cli.main(["results", "--data-dir", str(tmp_path), "--series"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "no DICOM series stored"


def test_series_progress_counts_each_instance_once_and_live(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        def receive(n: int) -> int:
            return store.add_dicom_instance(sop_instance_uid=f"1.9.{n}", study_uid="1.9",
                                            series_uid="1.9.1", spool_path=f"{n}.dcm", nbytes=10)

        ids = [receive(n) for n in range(4)]
        store.add_dicom_result(ids[0], source="a", status="ok", label="Normal",
                               probabilities={"Normal": 0.9, "COVID-19": 0.1})
        store.add_dicom_result(ids[1], source="b", status="out_of_domain", reason="modality MR")
        store.add_dicom_result(ids[2], source="c", status=None, error="cannot decode")
        series_id = store.get_dicom_series(series_uid="1.9.1")["id"]
        empty = dict.fromkeys(("slices", "waiting", "ok", "uncertain", "out_of_domain",
                               "unreadable"), 0)
        assert store.dicom_series_progress([series_id, series_id + 1]) == {
            series_id: {"slices": 4, "waiting": 1, "ok": 1, "uncertain": 0, "out_of_domain": 1,
                        "unreadable": 1},
            series_id + 1: empty}
        receive(0)  # sent again: replaces the classified copy, waits again, counts once
        assert store.dicom_series_progress([series_id])[series_id] == {
            "slices": 4, "waiting": 2, "ok": 0, "uncertain": 0, "out_of_domain": 1,
            "unreadable": 1}
        assert store.count_dicom_series() == 1
        assert store.dicom_series_progress([]) == {}


# --- text the database cannot hold, a damaged file, heatmap durability, a read-only store ------


def test_text_that_is_not_unicode_is_stored_with_a_replacement_character(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        row_id = _add(store, source="x\ud800[0]", reason="why \udcff", label="Nor\udcffmal",
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


def test_a_damaged_store_is_a_store_error_on_every_read(tmp_path: Path, capsys) -> None:
    from ct_edge import cli

    damage_store(tmp_path)
    with Store(tmp_path) as store:
        for read in (lambda: store.list(limit=1000), lambda: store.list(status="ok", limit=1000)):
            with pytest.raises(StoreError, match="cannot read the results store"):
                read()
        failed = 0
        for result_id in range(1, 301):  # each read answers (a damaged row may be missing)...
            for read in (store.get, store.heatmap_path):
                try:
                    read(result_id)
                except StoreError:  # ...or says the store is damaged: nothing else
                    failed += 1
        assert failed
        assert store.list_dicom_series() == [] and store.count_dicom_series() == 0  # intact
    assert cli.main(["results", "--data-dir", str(tmp_path), "--limit", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot read the results store")
    assert "malformed" in err


def test_the_heatmap_folder_is_fsynced_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    synced: list[tuple[str, list[str]]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((target, sorted(os.listdir(target)) if os.path.isdir(target) else []))
        real_fsync(fd)

    with Store(tmp_path) as store:
        monkeypatch.setattr(os, "fsync", fsync)
        row_id = _add(store, heatmap_png=PNG)
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
                _add(store, heatmap_png=PNG)
        else:
            store._db.execute("CREATE TEMP TRIGGER poison BEFORE INSERT ON results "
                              "BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
            with pytest.raises(StoreError):
                _add(store, heatmap_png=PNG)
        monkeypatch.undo()
        assert store.count() == 0
    assert os.listdir(tmp_path / "heatmaps") == []


def test_a_read_only_store_says_it_must_be_writable(tmp_path: Path, monkeypatch) -> None:
    Store(tmp_path).close()

    def read_only(db: sqlite3.Connection) -> int:
        # what SQLite says, as a user who may not write the folder (the tests may run as root)
        exc = sqlite3.OperationalError("attempt to write a readonly database")
        exc.sqlite_errorcode = 8 | 6 << 8  # SQLITE_READONLY_DIRECTORY
        raise exc

    monkeypatch.setattr(store_module, "migrate", read_only)
    with pytest.raises(StoreError, match="must be writable") as caught:
        Store(tmp_path)
    assert "not a usable" not in str(caught.value)


def test_results_command_series_filters_by_status_and_label(tmp_path: Path, capsys) -> None:
    from ct_edge import cli

    with Store(tmp_path) as store:
        for n, (status, label) in enumerate([("ok", "Normal"), ("uncertain", "COVID-19")]):
            store.add_dicom_instance(sop_instance_uid=f"1.5.{n}.1", study_uid="1.5",
                                     series_uid=f"1.5.{n}", spool_path=f"{n}.dcm", nbytes=1)
            series_id = store.get_dicom_series(series_uid=f"1.5.{n}")["id"]
            store.complete_dicom_series(series_id, status=status, label=label,
                                        probabilities={label: 0.6}, reason=None,
                                        aggregate="mean", counts={"slices": 1})
        store.add_dicom_instance(sop_instance_uid="1.5.9.1", study_uid="1.5",
                                 series_uid="1.5.9", spool_path="9.dcm", nbytes=1)  # receiving

    def listed(*args: str) -> list[str]:
        assert cli.main(["results", "--data-dir", str(tmp_path), "--series", "--json",
                         *args]) == 0
        return [json.loads(line)["series_uid"] for line in capsys.readouterr().out.splitlines()]

    assert listed() == ["1.5.9", "1.5.1", "1.5.0"]
    assert listed("--status", "ok") == ["1.5.0"]
    assert listed("--status", "uncertain") == ["1.5.1"]
    assert listed("--label", "COVID-19") == ["1.5.1"]
    assert listed("--status", "ok", "--label", "COVID-19") == []


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
            assert store.heatmap_path(_add(store, heatmap_png=PNG)) is not None
        else:
            with pytest.raises(StoreError):
                _add(store, heatmap_png=PNG)
            assert store.count() == 0 and not list((tmp_path / "heatmaps").glob("*"))


def test_heatmaps_no_row_names_are_removed_once_old(tmp_path: Path) -> None:
    """A kill between a heatmap file and its row's commit leaves an orphan; `serve` sweeps them
    at start, sparing young files another process may be about to commit."""
    with Store(tmp_path) as store:
        kept = store.heatmap_path(_add(store, heatmap_png=PNG))
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


def test_a_slice_location_stored_as_infinity_reads_as_absent(tmp_path: Path) -> None:
    """Stores written before the header check refused infinity must not fail every JSON answer
    about the series."""
    with Store(tmp_path) as store:
        store.add_dicom_instance(sop_instance_uid="1.2.3.1", study_uid="1.2", series_uid="1.2.3",
                                 spool_path="1.dcm", nbytes=1, slice_location=float("inf"))
        series_id = store.get_dicom_series(series_uid="1.2.3")["id"]
        (only,) = store.dicom_series_slices(series_id)
        assert only["slice_location"] is None
        json.dumps(only, allow_nan=False)


def test_a_completed_series_an_instance_moves_out_of_completes_again(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        for number in (1, 2):
            store.add_dicom_instance(sop_instance_uid=f"1.2.3.{number}", study_uid="1.2",
                                     series_uid="1.2.3", spool_path=f"{number}.dcm", nbytes=1)
        left = store.get_dicom_series(series_uid="1.2.3")["id"]
        store.complete_dicom_series(left, status="ok", label="Normal",
                                    probabilities={"Normal": 1.0}, reason=None, aggregate="mean",
                                    counts={"slices": 2})
        store.add_dicom_instance(sop_instance_uid="1.2.3.2", study_uid="1.2", series_uid="1.2.4",
                                 spool_path="2b.dcm", nbytes=1)
        series = store.get_dicom_series(left)
        assert (series["state"], series["instances"]) == ("receiving", 1)  # its result counted 2
