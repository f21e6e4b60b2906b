"""Opening the results store: schema and migrations, a newer schema, a file that is not a store, a
damaged or read-only one, and where the data folder is."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from store_helpers import damage_store

from ct_edge import store as store_module
from ct_edge.store import MIGRATIONS, Store, StoreError, default_data_dir, schema_version
from ct_edge.store import schema as store_schema


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


def test_a_store_from_before_artifact_parity_is_migrated_keeping_its_rows(
        tmp_path: Path, monkeypatch, capsys) -> None:
    """A version-2 store file (what ct-edge wrote before results recorded the artifact's parity
    status): `results` asks for an upgrade, a writer applies the missing migrations, and the old
    row reads back as before with its parity status unknown (NULL)."""
    from ct_edge import cli

    before = MIGRATIONS.index(store_schema.v3_artifact_parity)
    monkeypatch.setattr(store_schema, "MIGRATIONS", MIGRATIONS[:before])
    db = sqlite3.connect(tmp_path / "results.sqlite3", isolation_level=None)
    assert store_schema.migrate(db) == before
    db.execute("INSERT INTO results (created_at, source, sha256, bundle_sha256, artifact, "
               "artifact_sha256, status, label, confidence, probabilities, origin) VALUES "
               "('2024-05-01T10:00:00.000Z', 'old.png', ?, ?, 'tflite-int8', ?, 'ok', 'Normal', "
               "0.8, '{\"Normal\": 0.8}', 'http')", ("ab" * 32, "cd" * 32, "ef" * 32))
    db.close()
    monkeypatch.undo()
    assert cli.main(["results", "--data-dir", str(tmp_path)]) == 2
    assert "older than this ct-edge's" in capsys.readouterr().err
    with Store(tmp_path) as store:
        assert store.version == len(MIGRATIONS)
        (old,) = store.list()
        new = store.get(store.add(source="new.png", origin="http", status="ok",
                                  artifact="tflite-int8", artifact_parity="passed"))
    assert old["artifact_parity"] is None and new["artifact_parity"] == "passed"
    assert (old["source"], old["artifact"], old["artifact_sha256"], old["label"]) == (
        "old.png", "tflite-int8", "ef" * 32, "Normal")
    assert old["probabilities"] == {"Normal": 0.8} and old["created_at"].startswith("2024-05-01")
    assert cli.main(["results", "--data-dir", str(tmp_path), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["source"], row["artifact_parity"]) for row in listed] == [
        ("new.png", "passed"), ("old.png", None)]


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
