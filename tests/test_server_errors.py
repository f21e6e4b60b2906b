"""`ct-edge serve`'s error answers over real HTTP: 400 / 404 / 405 / 411 / 413 / 415 from headers
and bodies, 503 for a damaged store or a full queue, 504 past the time limit, and a fuzz campaign
in which no client input gets a 500."""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from server_helpers import DICOM, JPEG, PNG, Running, infer_request, raw_exchange, serving
from store_helpers import damage_store

from ct_edge.classifier import Classifier

# --- errors: 400 / 404 / 405 / 411 / 413 / 415 -------------------------------------------------


def test_not_an_image_is_415_and_not_stored(api: Running) -> None:
    before = api.store.count()
    status, body = api.json("POST", "/v1/classify", body=b"hello, I am text")
    assert status == 415 and "not a PNG, JPEG or DICOM" in body["error"]
    assert api.store.count() == before


def test_damaged_image_and_empty_body_are_400(api: Running) -> None:
    status, body = api.json("POST", "/v1/classify?name=broken.png", body=PNG[:60])
    assert status == 400 and body["error"].startswith("broken.png:")
    status, body = api.json("POST", "/v1/classify", body=b"")
    assert status == 400 and "empty body" in body["error"]


def test_unknown_path_404_and_wrong_method_405(api: Running) -> None:
    status, body = api.json("GET", "/v3/nothing")
    assert status == 404 and "error" in body
    status, headers, _ = api.request("GET", "/v1/classify")
    assert status == 405 and headers["allow"] == "POST"
    status, headers, _ = api.request("DELETE", "/v1/results")
    assert status == 405 and headers["allow"] == "GET"


def test_body_over_the_cap_is_413_without_reading_it(api: Running) -> None:
    cap = api.server.config.max_body_bytes
    # Only the headers are sent: the server must answer from Content-Length alone, and close.
    reply = raw_exchange(api, f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: "
                              f"{cap + 1}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"].startswith("body of")
    reply = raw_exchange(api, f"POST /v2/models/ct-edge/infer HTTP/1.1\r\nHost: x\r\n"
                              f"Content-Length: {10 * cap}\r\n\r\n{{}}".encode())
    assert reply.startswith(b"HTTP/1.1 413 ")


def test_chunked_or_unsized_posts_are_411(api: Running) -> None:
    chunked = raw_exchange(api, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411 ")
    unsized = raw_exchange(api, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert unsized.startswith(b"HTTP/1.1 411 ")


def test_garbage_request_lines_get_a_json_4xx(api: Running) -> None:
    for data in (b"\x00\x01\x02 garbage\r\n\r\n", b"GET\r\n\r\n", b"BREW /pot HTTP/1.1\r\n\r\n",
                 b"GET / HTTP/9.9\r\n\r\n", b"GET " + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
        reply = raw_exchange(api, data)
        status = int(reply.split(b" ", 2)[1])
        # 505 (HTTP Version Not Supported) is the protocol's own answer to HTTP/9.9.
        assert 400 <= status < 500 or (status == 505 and b"9.9" in data), (data[:30], reply[:80])
        assert "error" in json.loads(reply.split(b"\r\n\r\n", 1)[1])


def test_keep_alive_serves_several_requests_on_one_connection(api: Running) -> None:
    connection = http.client.HTTPConnection(api.host, api.port, timeout=10)
    for _ in range(3):
        connection.request("POST", "/v1/classify", body=PNG)
        response = connection.getresponse()
        assert response.status == 200
        response.read()
    connection.close()


def test_a_damaged_store_is_503_not_a_bug(classifier: Classifier, tmp_path: Path) -> None:
    damage_store(tmp_path / "data")
    with serving(classifier, tmp_path / "data") as api:
        status, headers, body = api.request("GET", "/v1/results?limit=1000")
        assert status == 503 and headers["retry-after"] == "5"
        assert json.loads(body)["error"].startswith("results store unavailable: cannot read")


# --- queue full (503) and time limit (504) -------------------------------------------------------


@contextlib.contextmanager
def slow_engine(classifier: Classifier, release: threading.Event) -> Iterator[None]:
    original = classifier.predict

    def slow(source):  # the engine is held until the test says so
        release.wait(20)
        return original(source)

    classifier.predict = slow  # type: ignore[method-assign]
    try:
        yield
    finally:
        del classifier.predict


def test_queue_full_is_503_with_retry_after(classifier: Classifier, tmp_path: Path) -> None:
    release = threading.Event()
    with serving(classifier, tmp_path / "data", workers=1, queue_size=0) as api, \
            slow_engine(classifier, release):
        first: list[int] = []
        holder = threading.Thread(target=lambda: first.append(
            api.request("POST", "/v1/classify", PNG)[0]))
        holder.start()
        deadline = time.monotonic() + 10
        while api.server.service.queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, body = api.request("POST", "/v1/classify", PNG)
        assert status == 503 and headers["retry-after"] == "1"
        assert "busy" in json.loads(body)["error"]
        release.set()
        holder.join(20)
        assert first == [200]


def test_inference_over_the_time_limit_is_504(classifier: Classifier, tmp_path: Path) -> None:
    release = threading.Event()
    with serving(classifier, tmp_path / "data", timeout_s=0.2) as api, \
            slow_engine(classifier, release):
        status, body = api.json("POST", "/v1/classify", body=PNG)
        assert status == 504 and "0.2 s" in body["error"]
        release.set()


# --- fuzz: no client input gets a 500 ------------------------------------------------------------


def _mutate(rng: random.Random, value: object, depth: int = 0) -> object:
    """Replace a random part of a JSON value with something of another type."""
    odd = [None, True, -1, 0, 2**64, 1e308, "", "x" * 300, [], {}, [[[]]], {"a": 1}, "AAAA",
           [1, "a"], -0.5]
    if depth > 4 or rng.random() < 0.25:
        return rng.choice(odd)
    if isinstance(value, dict) and value:
        key = rng.choice(list(value))
        return {**value, key: _mutate(rng, value[key], depth + 1)}
    if isinstance(value, list) and value:
        index = rng.randrange(len(value))
        return [*value[:index], _mutate(rng, value[index], depth + 1), *value[index + 1:]]
    return rng.choice(odd)


def test_fuzz_never_gets_a_500(api: Running) -> None:
    rng = random.Random(15)
    base_requests = [infer_request(PNG, outputs=[{"name": "probabilities",
                                                  "parameters": {"classification": 2}}]),
                     {"inputs": [{"name": "input", "shape": [1, 2, 2, 3], "datatype": "FP32",
                                  "data": [0.5] * 12}]}]
    paths = ["/v1/classify", "/v1/classify?explain=1", "/v2/models/ct-edge/infer",
             "/v1/results", "/v1/results/1", "/v1/series", "/v1/series/1", "/metrics", "/",
             "/v2/models/ct-edge"]
    statuses: dict[int, int] = {}
    for case in range(400):
        kind = case % 5
        headers: dict[str, str] = {}
        if kind == 0:  # mutated OIP JSON
            body = json.dumps(_mutate(rng, rng.choice(base_requests))).encode()
            path = "/v2/models/ct-edge/infer"
        elif kind == 1:  # damaged files
            data = bytearray(rng.choice([PNG, JPEG, DICOM]))
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            body = bytes(data[:rng.randint(1, len(data))])
            path = rng.choice(["/v1/classify", "/v1/classify?explain=1"])
        elif kind == 2:  # random bytes, random headers
            body = rng.randbytes(rng.randint(0, 2000))
            path = rng.choice(paths)
            headers = {"Inference-Header-Content-Length": str(rng.randint(-5, 3000)),
                       "Content-Type": rng.choice(["image/png", "application/json", "\u00ff"])}
        elif kind == 3:  # odd paths and queries
            junk = "".join(rng.choice("/%?&=.;#~ab01+") for _ in range(rng.randint(0, 40)))
            path = rng.choice(paths) + "?" + junk
            body = PNG if path.startswith("/v1/classify") else None
        else:  # binary-extension frames with lying sizes
            size = rng.randint(-3, 5000)
            header = json.dumps({"inputs": [{"name": "image", "shape": [rng.randint(0, 3)],
                                             "datatype": rng.choice(["BYTES", "FP32"]),
                                             "parameters": {"binary_data_size": size}}]}).encode()
            body = header + rng.randbytes(rng.randint(0, 200))
            path = "/v2/models/ct-edge/infer"
            headers = {"Inference-Header-Content-Length": str(len(header) + rng.randint(-3, 3))}
        method = "POST" if body is not None and path.split("?")[0] in (
            "/v1/classify", "/v2/models/ct-edge/infer") else "GET"
        status, _answer_headers, answer = api.request(method, path, body if method == "POST"
                                                     else None, headers)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (case, path, answer[:200])
        if status >= 400:
            assert "error" in json.loads(answer)
    assert statuses.get(400, 0) > 50 and statuses.get(200, 0) > 10  # both paths were exercised
