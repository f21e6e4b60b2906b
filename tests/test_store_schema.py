"""Opening the results store: schema and migrations, a newer schema, a file that is not a store, a
damaged or read-only one, and where the data folder is."""

from __future__ import annotations

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
