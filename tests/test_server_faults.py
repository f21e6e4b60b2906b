"""`kill -9` of `ct-edge serve` under load loses no answered result, and it starts again on the
same store: every 200 a client received is a committed row."""

from __future__ import annotations

import http.client
import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ct_edge.store import Store

pytestmark = pytest.mark.slow


def start(bundle: Path, data_dir: Path) -> tuple[subprocess.Popen, str, int]:
    process = subprocess.Popen([sys.executable, "-m", "ct_edge.cli", "serve", "--bundle",
                                str(bundle), "--data-dir", str(data_dir), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    match = re.search(r"http://(127\.0\.0\.1):(\d+)", line)
    if not match:
        process.kill()
        raise AssertionError(f"no address line from ct-edge serve: {line!r}")
    return process, match.group(1), int(match.group(2))


def test_kill_9_under_load_loses_no_answered_result(tiny_bundle: Path, synthetic_root: Path,
                                                    tmp_path: Path) -> None:
    images = [p.read_bytes() for p in sorted((synthetic_root / "test").glob("*/*.png"))[:8]]
    data_dir = tmp_path / "data"
    process, host, port = start(tiny_bundle, data_dir)
    answered: list[int] = []  # ids of results received with a 200
    lock = threading.Lock()
    stop = threading.Event()

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        index = offset
        while not stop.is_set():
            try:
                connection.request("POST", f"/v1/classify?name=load{index}.png",
                                   images[index % len(images)])
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):
                return  # the server died: the reply never arrived, nothing was promised
            if response.status == 200:
                with lock:
                    answered.append(json.loads(body)["id"])
            index += 4

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(answered) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
        process.wait(10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
        if process.poll() is None:
            process.kill()
    assert len(answered) >= 150, "the load never got going"

    db = sqlite3.connect(data_dir / "results.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = {row[0] for row in db.execute("SELECT id FROM results")}
    db.close()
    assert len(stored) >= len(answered)
    assert set(answered) <= stored  # every id a client was given is there

    restarted, host, port = start(tiny_bundle, data_dir)
    try:
        connection = http.client.HTTPConnection(host, port, timeout=30)
        connection.request("POST", "/v1/classify?name=after-restart.png", images[0])
        response = connection.getresponse()
        assert response.status == 200
        new_id = json.loads(response.read())["id"]
        assert new_id > max(stored)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(30) == 0
    with Store(data_dir) as store:
        assert store.count() == len(stored) + 1
        assert store.get(new_id)["source"] == "after-restart.png"
