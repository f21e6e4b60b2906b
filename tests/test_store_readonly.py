"""The results store opened read-only (`ct-edge results`): it reads, never writes, works on a
read-only disk, and tells a store busy in another process from a damaged one."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ct_edge import store as store_module
from ct_edge.store import MIGRATIONS, Store, StoreError

WAL_FILES = ("results.sqlite3-wal", "results.sqlite3-shm")


def _store(data_dir: Path, rows: int = 1) -> Path:
    with Store(data_dir) as store:
        for i in range(rows):
            store.add(source=f"scan{i}.png", origin="test", status="ok", label="Normal",
                      probabilities={"Normal": 0.9})
    return data_dir


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_read_only_store_reads_and_changes_nothing(tmp_path: Path) -> None:
    data = _store(tmp_path / "data", rows=3)
    before = _files(data)
    with Store(data, read_only=True) as store:
        assert [row["source"] for row in store.list()] == ["scan2.png", "scan1.png", "scan0.png"]
        with pytest.raises(StoreError, match="readonly"):
            store.add(source="x.png", origin="test", status=None)
    after = _files(data)
    assert after["results.sqlite3"] == before["results.sqlite3"]
    # Only SQLite's own (empty) lock files for reading a WAL database may appear.
    assert set(after) - set(before) <= set(WAL_FILES) and after.get(WAL_FILES[0], b"") == b""


def test_read_only_store_refuses_a_newer_schema(tmp_path: Path) -> None:
    data = _store(tmp_path)
    db = sqlite3.connect(data / "results.sqlite3")
    db.execute("INSERT INTO schema_version VALUES (?, 'later')", (len(MIGRATIONS) + 1,))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        Store(data, read_only=True)


@pytest.mark.parametrize("read_only", [True, False])
def test_a_locked_store_is_busy_not_damaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            read_only: bool) -> None:
    data = _store(tmp_path)
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 100)
    locker = sqlite3.connect(data / "results.sqlite3", isolation_level=None)
    locker.execute("PRAGMA locking_mode = EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")  # as a process in the middle of a long write
    try:
        with pytest.raises(StoreError, match=r"is busy in another process .* try again"):
            Store(data, read_only=read_only)
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def _on_read_only_disk(data: Path) -> subprocess.CompletedProcess:
    """`Store(data, read_only=True).list()` with `data` bind-mounted read-only (a private mount
    namespace: `unshare`, which needs a kernel and sandbox that allow it)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here")
    code = ("from ct_edge.store import Store, StoreError\n"
            "try:\n"
            f"    print(len(Store({str(data)!r}, read_only=True).list()))\n"
            "except StoreError as exc:\n"
            "    print(exc)\n")
    script = (f"mount --bind {data} {data} && mount -o remount,bind,ro {data} {data} || exit 99\n"
              f"touch {data}/probe 2>/dev/null && exit 98\n"
              f'"$0" -c "$1" || exit 97')
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, sys.executable, code],
                            capture_output=True, text=True, timeout=60)
    if result.returncode in (1, 99):  # unshare (1) or mount (99) not permitted here
        pytest.skip(f"cannot mount read-only here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return result


def test_a_store_on_a_read_only_disk_is_listed(tmp_path: Path) -> None:
    data = _store(tmp_path / "data", rows=2)
    for name in WAL_FILES:
        assert not (data / name).exists()  # closed cleanly: the log was folded in
    assert _on_read_only_disk(data).stdout.splitlines() == ["2"]


def test_a_read_only_store_whose_log_cannot_be_read_says_why(tmp_path: Path) -> None:
    """A copy taken while a writer was open: rows in the -wal, no -shm, on a read-only disk."""
    data = tmp_path / "copy"
    data.mkdir()
    with Store(tmp_path / "live") as store:
        store.add(source="scan.png", origin="test", status=None)
        shutil.copy(store.path, data)
        shutil.copy(store.path.with_name(WAL_FILES[0]), data)
    (line,) = _on_read_only_disk(data).stdout.splitlines()
    assert "its write-ahead log holds results" in line and "results.sqlite3-shm" in line
