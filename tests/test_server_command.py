"""`ct-edge serve` as a command: refusal to bind a public address without a token, one-line usage
errors, help, a clean stop on SIGTERM with requests in flight; and the benchmark harness."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from server_helpers import PNG, TOKEN

from ct_edge.store import Store

# --- the command line --------------------------------------------------------------------------


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ct_edge.cli", "serve", *args]


def test_serve_refuses_a_public_address_without_a_token(tiny_bundle: Path, tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::"):
        done = subprocess.run(serve_command("--host", host, "--bundle", str(tiny_bundle),
                                            "--data-dir", str(tmp_path)),
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "CT_EDGE_TOKEN": ""})
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: refusing to listen on {host}")
        assert "--insecure-no-token" in lines[0]
    assert not (tmp_path / "results.sqlite3").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--token", "short"], "at least 8"),
    (["--token-file", "/nonexistent/token"], "cannot read --token-file"),
    (["--port", "70000"], "0-65535"),
    (["--max-body-mb", "0"], "more than 0"),
])
def test_serve_usage_errors_are_one_line(args: list[str], fragment: str) -> None:
    done = subprocess.run(serve_command(*args), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and fragment in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_help_has_examples() -> None:
    done = subprocess.run(serve_command("--help"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "examples:" in done.stdout and "--token-file" in done.stdout


def start_serve(bundle: Path, data_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(serve_command("--bundle", str(bundle), "--data-dir", str(data_dir),
                                             "--port", "0", *extra),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"listening on (http://\S+?)/?$", line.strip())
    if not match:
        process.kill()
        raise AssertionError(f"no address line: {line!r} {process.stderr.read()}")
    return process, match.group(1)


def test_serve_answers_then_stops_cleanly_on_sigterm(tiny_bundle: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    process, url = start_serve(tiny_bundle, tmp_path / "data", "--token-file", str(token_file))
    try:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        assert host == "127.0.0.1"
        answered: list[int] = []

        def client() -> None:
            for _ in range(10):
                connection = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    connection.request("POST", "/v1/classify", PNG,
                                       {"Authorization": f"Bearer {TOKEN}"})
                    response = connection.getresponse()
                    json.loads(response.read())
                    answered.append(response.status)
                except (ConnectionError, OSError):
                    return  # the server stopped accepting: fine, as long as no answer was cut
                finally:
                    connection.close()

        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        while not answered and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert process.wait(30) == 0
        assert answered and set(answered) == {200}
        assert "stopping" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    with Store(tmp_path / "data") as store:
        assert store.count() >= len(answered)


# --- the benchmark harness (make bench's server row) ---------------------------------------------


def test_server_benchmark_reports_every_figure(tiny_bundle: Path, tmp_path: Path) -> None:
    from benchmarks import server as bench

    assert bench.main(["--bundle", str(tiny_bundle), "--seconds", "1", "--concurrency", "2",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "server.json").read_text())
    for side in ("in_process", "server"):
        assert report[side]["requests"] > 0 and report[side]["per_s"] > 0
        assert report[side]["p99_ms"] >= report[side]["p50_ms"] > 0
    assert report["server"]["errors"] == 0
    assert 0 < report["server"]["rss_mb"] <= report["server"]["peak_rss_mb"]
    assert report["ratio"] == pytest.approx(report["server"]["per_s"] / report["in_process"]["per_s"])
    assert set(report["passed"]) == {"ratio", "p99_ms", "errors", "rss_mb"}
    assert set(report["in_process"]["engine_ms_per_image"]) == {"batch1", "batch4"}
