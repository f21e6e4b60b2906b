"""`ct-edge serve` inside the memory bound (limits.MEMORY_BOUND_MB): request bodies in memory,
decodes and the JSON it parses each held against a budget, over real HTTP on 127.0.0.1; and the
server's peak RSS under the worst uploads it accepts."""

from __future__ import annotations

import io
import json
import platform
import socket
import struct
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from server_helpers import PNG, infer_request, serving

from ct_edge import limits
from ct_edge.budget import ByteBudget, Hold, try_hold
from ct_edge.classifier import Classifier
from ct_edge.limits import MEMORY_BOUND_MB, return_large_frees_to_the_system
from ct_edge.preprocess import decode_cost
from ct_edge.server import Service
from ct_edge.server.body import BodyHandler
from ct_edge.server.oip import json_parse_cost
from ct_edge.store import Store

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def classifier(tiny_bundle: Path) -> Classifier:
    return Classifier.from_bundle(tiny_bundle)


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_budget_lets_in_what_fits_and_anything_alone() -> None:
    budget = ByteBudget(100)
    assert budget.try_take(60) and not budget.try_take(50) and budget.try_take(40)
    budget.give(100)
    assert budget.try_take(500)  # nothing held: a larger item goes alone rather than never
    taken = threading.Event()
    waiter = threading.Thread(target=lambda: (budget.take(1), taken.set()))
    waiter.start()
    assert not taken.wait(0.2)  # waits while the large one is held...
    budget.give(500)
    assert taken.wait(5)  # ...and goes once it is given back
    waiter.join()
    assert budget.held == 1


def test_waiters_go_in_first_come_first_served() -> None:
    budget = ByteBudget(100)
    budget.take(60)
    order: list[str] = []
    large = threading.Thread(target=lambda: (budget.take(100), order.append("large")))
    large.start()
    wait_until(lambda: budget.waiting == 1)  # the large one waits
    assert not budget.try_take(10)  # it would fit, but the large one came first
    small = threading.Thread(target=lambda: (budget.take(10), order.append("small")))
    small.start()
    time.sleep(0.2)
    assert order == []
    budget.give(60)
    wait_until(lambda: order == ["large"])
    time.sleep(0.1)
    assert order == ["large"]  # behind the large one, not beside it
    budget.give(100)
    small.join(5)
    large.join(5)
    assert order == ["large", "small"] and budget.held == 10


def test_a_shared_hold_is_given_back_by_its_last_owner() -> None:
    budget = ByteBudget(100)
    hold = try_hold(budget, 70)
    assert isinstance(hold, Hold) and try_hold(budget, 40) is None
    hold.share()
    hold.release()
    assert budget.held == 70  # the other owner (a queued worker) still has it
    hold.release()
    assert budget.held == 0
    with pytest.raises(RuntimeError):
        hold.share()


def test_an_upload_that_does_not_fit_beside_those_in_memory_is_503_unread(
        classifier: Classifier, tmp_path: Path) -> None:
    size = 700_000
    with serving(classifier, tmp_path / "data", upload_budget_bytes=MiB) as api:
        uploads = api.server.uploads
        with socket.create_connection((api.host, api.port), timeout=10) as first:
            first.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
                          "\r\n".encode() + b"x" * 100)
            wait_until(lambda: uploads.held == size)  # held while its body is still coming
            status, headers, body = api.request("POST", "/v1/classify", b"y" * size)
            assert status == 503 and headers["retry-after"] == "1"
            assert "1 MiB" in json.loads(body)["error"]
            first.sendall(b"x" * (size - 100))
            assert first.recv(100).startswith(b"HTTP/1.1 415 ")  # read, then refused: not a PNG
        wait_until(lambda: uploads.held == 0)
        assert api.request("POST", "/v1/classify", b"y" * size)[0] == 415  # room again
        assert api.request("POST", "/v1/classify", PNG)[0] == 200
        wait_until(lambda: uploads.held == 0)  # given back once the handler is done after sending


def test_decodes_run_together_only_as_far_as_the_decode_budget_allows(
        classifier: Classifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cost = decode_cost(PNG, classifier.spec)
    assert cost is not None and cost > 0
    for budget, most in [(cost, 1), (2 * cost, 2)]:
        service = Service(classifier, Store(tmp_path / f"data{budget}"), workers=2,
                          decode_budget=budget)
        active, peak, lock = [0], [0], threading.Lock()
        decode = service.classifier.predict

        def predict(data, active=active, peak=peak, decode=decode, lock=lock):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.1)
            with lock:
                active[0] -= 1
            return decode(data)

        monkeypatch.setattr(service.classifier, "predict", predict)
        threads = [threading.Thread(target=service.run, args=(service.classify_bytes, PNG, "x"))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        monkeypatch.undo()
        service.close()
        service.store.close()
        assert peak[0] == most, (budget, peak[0])


@pytest.mark.parametrize("text", [
    "[" + ", ".join(["0.123456"] * 20_000) + "]",
    "[" + ",".join(["0"] * 40_000) + "]",
    "[" + ",".join(["[0]"] * 20_000) + "]",
    "[" + ",".join(["[]"] * 30_000) + "]",
    "[" + ",".join(["{}"] * 30_000) + "]",
    "[" + ",".join(['"a"'] * 30_000) + "]",
    '{"inputs": [{"data": "' + "A" * 400_000 + '"}]}',
    '{"name": "\U0001F600", "data": "' + "A" * 400_000 + '"}',
    '{"data": "\\ud83d\\ude00' + "A" * 400_000 + '"}',
], ids=["floats", "zeros", "one-item-lists", "empty-lists", "empty-objects", "strings", "base64",
        "an-emoji", "an-escaped-emoji"])
def test_the_json_parse_estimate_bounds_what_parsing_allocates(text: str) -> None:
    head = text.encode()
    tracemalloc.start()
    try:
        parsed = json.loads(head)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert parsed is not None and peak <= json_parse_cost(head), (peak, json_parse_cost(head))


def test_a_json_request_too_large_to_parse_in_the_budget_is_413_and_binary_is_not(
        tiny_bundle: Path, tmp_path: Path) -> None:
    classifier = Classifier.from_bundle(tiny_bundle, artifact="onnx-fp32")
    spec = classifier.spec
    x = np.full((1, spec.size, spec.size, spec.channels), 0.5, np.float32)
    tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape)}
    as_json = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    assert json_parse_cost(as_json) > MiB
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}]})
    with serving(classifier, tmp_path / "data", decode_budget=MiB) as api:
        status, _, body = api.request("POST", "/v2/models/ct-edge/infer", as_json)
        assert status == 413 and "binary data" in json.loads(body)["error"]
        status, _, body = api.request(
            "POST", "/v2/models/ct-edge/infer", head.encode() + x.tobytes(),
            {"Inference-Header-Content-Length": str(len(head))})
        assert status == 200, body
        assert api.store.count() == 1 and api.server.service.decode_room.held == 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_frees_go_back_to_the_system_on_glibc() -> None:
    assert return_large_frees_to_the_system()


def test_peak_rss_of_serve_under_the_worst_concurrent_uploads_is_within_the_bound(
        tiny_bundle: Path, tmp_path: Path) -> None:
    from benchmarks.serve_memory import measure

    report = measure(str(tiny_bundle), tmp_path, clients=4)
    statuses = sorted(answer["status"] for answer in report["answers"])
    # every upload answered (503s retried); the JSON one number-heavier than the budget: 413
    assert statuses == [200] * 6 + [413], report["answers"]
    assert report["peak_rss_mb"] <= MEMORY_BOUND_MB, report


class RecordingBudget(ByteBudget):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.taken: list[int] = []

    def take(self, nbytes: int) -> None:
        self.taken.append(nbytes)
        super().take(nbytes)


def test_a_file_copied_out_of_an_oip_request_is_counted_in_its_decode_hold(
        classifier: Classifier, tmp_path: Path) -> None:
    cost = decode_cost(PNG, classifier.spec)
    element = struct.pack("<I", len(PNG)) + PNG
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(element)}}]}).encode()
    with serving(classifier, tmp_path / "data") as api:
        service = api.server.service
        service.decode_room = room = RecordingBudget(service.decode_room.limit)
        assert api.request("POST", "/v2/models/ct-edge/infer", header + element,
                           {"Inference-Header-Content-Length": str(len(header))})[0] == 200
        assert room.taken[-1] == cost + len(PNG)  # a view of the body, copied for decoding
        assert api.json("POST", "/v2/models/ct-edge/infer", infer_request(PNG, PNG))[0] == 200
        assert room.taken[-2:] == [cost + 2 * len(PNG)] * 2  # both decoded copies stay meanwhile
        assert api.request("POST", "/v1/classify", PNG)[0] == 200
        assert room.taken[-1] == cost  # the upload itself: counted with the upload
        assert room.held == 0


class FakeRequest(BodyHandler):
    """A BodyHandler over an in-memory request, without a socket."""

    body_limit = 1 << 30

    def __init__(self, body: bytes) -> None:  # no socket: BaseRequestHandler's init not run
        self.headers = {"Content-Length": str(len(body))}
        self.rfile = io.BufferedReader(io.BytesIO(body))
        self.reads: list[int] = []
        read = self.rfile.read
        self.rfile.read = lambda n=-1: (self.reads.append(n), read(n))[1]  # type: ignore[method-assign]


def test_a_body_sent_where_none_is_used_is_drained_in_pieces() -> None:
    request = FakeRequest(b"z" * (3 * 1024 * 1024))
    assert request.drain_body() == b"" and request.body_read
    assert max(request.reads) <= 64 * 1024 and request.rfile.read() == b""


def test_the_malloc_setting_is_linux_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    assert limits.return_large_frees_to_the_system() is False
