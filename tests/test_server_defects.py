"""`ct-edge serve` defects found in review, over real HTTP on 127.0.0.1: a preflight with a bad
Content-Length, the metrics' method label, a keep-alive request's stale endpoint, FP32 inputs and
model outputs that are not finite, and refused uploads (lingering close, Expect: 100-continue).
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from server_helpers import PNG, TOKEN, Running, raw_exchange, serving

from ct_edge.classifier import Classifier, Prediction
from ct_edge.preprocess import preprocess
from ct_edge.store import Store, StoreError

AUTH = {"Authorization": f"Bearer {TOKEN}"}
# A metric line whose labels are well-formed Prometheus text (escaped \, " and newline only).
LABEL = r'[a-z_][a-z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
METRIC_LINE = re.compile(rf"[a-z_]+(\{{{LABEL}(,{LABEL})*\}})? [0-9.e+-]+")


@pytest.fixture(scope="module")
def classifier(tiny_bundle: Path) -> Classifier:
    return Classifier.from_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def fp32_classifier(tiny_bundle: Path) -> Classifier:
    return Classifier.from_bundle(tiny_bundle, artifact="onnx-fp32")


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def json_body(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


def metric_lines(api: Running, headers: dict[str, str] | None = None) -> list[str]:
    status, _, body = api.request("GET", "/metrics", headers=headers)
    assert status == 200
    return [line for line in body.decode().splitlines() if not line.startswith("#")]


# --- 1: a preflight with a bad Content-Length ---------------------------------------------------


@pytest.mark.parametrize("header, status", [
    (b"Content-Length: abc", 400), (b"Content-Length: 99999999999", 413),
    (b"Transfer-Encoding: chunked", 411)], ids=["not-a-number", "over-the-cap", "chunked"])
def test_options_with_a_bad_body_header_gets_a_json_4xx(classifier: Classifier, tmp_path: Path,
                                                        header: bytes, status: int) -> None:
    with serving(classifier, tmp_path / "data") as api:
        reply = raw_exchange(api, b"OPTIONS /v1/classify HTTP/1.1\r\nHost: x\r\n" + header +
                             b"\r\n\r\n")
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:80]
        assert b"Connection: close" in reply and "error" in json_body(reply)
        assert any(line.startswith(f'ct_edge_requests_total{{endpoint="preflight",'
                                   f'method="OPTIONS",status="{status}"}}')
                   for line in metric_lines(api))


# --- 2: the metrics' labels --------------------------------------------------------------------


def test_metrics_method_label_is_a_fixed_set_and_well_formed(classifier: Classifier,
                                                             tmp_path: Path) -> None:
    with serving(classifier, tmp_path / "data", token=TOKEN) as api:
        raw_exchange(api, b'X"}\\ / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        for index in range(5):
            raw_exchange(api, f"M{index} / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                         .encode())
        api.request("HEAD", "/v2/health/live")
        lines = metric_lines(api, AUTH)
    methods = set(re.findall(r'method="([^"]*)"', "\n".join(lines)))
    assert methods == {"HEAD", "other"}  # six unknown methods: one label value, not six
    assert any('endpoint="other",method="other",status="401"} 6' in line for line in lines)
    for line in lines:
        assert METRIC_LINE.fullmatch(line), line


def test_a_keep_alive_request_failing_early_is_not_labelled_with_the_last_endpoint(
        classifier: Classifier, tmp_path: Path) -> None:
    with serving(classifier, tmp_path / "data") as api:
        reply = raw_exchange(api, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
                                  b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 ") and b" 414 " in reply
        lines = metric_lines(api)
    assert any(line.startswith('ct_edge_requests_total{endpoint="other",method="other",'
                               'status="414"}') for line in lines), lines
    assert not any('endpoint="health_live"' in line and 'status="414"' in line for line in lines)


# --- 3: FP32 inputs and model outputs that are not finite ---------------------------------------


def fp32_request(classifier: Classifier, value: float | None = None) -> dict:
    """An FP32 infer request: `value` everywhere, or the preprocessed PNG."""
    spec = classifier.spec
    x = preprocess(PNG, spec) if value is None else \
        np.full((spec.size, spec.size, spec.channels), value, np.float32)
    return {"inputs": [{"name": "x", "shape": [1, *x.shape], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}


@pytest.mark.parametrize("value", [3.0e38, -1.0, 1.5], ids=["huge", "negative", "over-one"])
def test_fp32_values_outside_the_preprocessing_range_are_400(fp32_classifier: Classifier,
                                                             tmp_path: Path,
                                                             value: float) -> None:
    with serving(fp32_classifier, tmp_path / "data") as api:
        status, answer = api.json("POST", "/v2/models/ct-edge/infer",
                                  fp32_request(fp32_classifier, value))
        assert status == 400, answer
        assert "[0, 1]" in answer["error"] and "preprocess" in answer["error"]
        assert api.store.count() == 0
        assert api.json("GET", "/v1/results")[0] == 200


def test_a_non_finite_model_output_is_422_and_never_stored(classifier: Classifier,
                                                           tmp_path: Path) -> None:
    original = classifier.predict_scored

    def broken(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        probabilities, scores = original(batch)
        return np.full_like(probabilities, np.nan), scores

    classifier.predict_scored = broken  # type: ignore[method-assign]
    try:
        with serving(classifier, tmp_path / "data") as api:
            status, answer = api.json("POST", "/v1/classify?name=scan.png", body=PNG)
            assert status == 422 and answer["error"].startswith("scan.png: ")
            assert "not finite" in answer["error"]
            status, answer = api.json("POST", "/v2/models/ct-edge/infer",
                                      fp32_request(classifier))
            assert status == 422 and answer["error"].startswith("x[0]: "), answer
            assert api.store.count() == 0
            status, answer = api.json("GET", "/v1/results")
            assert status == 200 and answer["results"] == []
    finally:
        del classifier.predict_scored


def test_the_store_refuses_non_finite_numbers(tmp_path: Path) -> None:
    nan = Prediction(path="a.png", label="Normal", probabilities={"Normal": math.nan})
    inf = Prediction(path="b.png", label="Normal", probabilities={"Normal": 1.0},
                     timings_ms={"inference": math.inf})
    with Store(tmp_path / "data") as store:
        for prediction in (nan, inf):
            with pytest.raises(StoreError, match="not finite"):
                store.add_prediction(prediction, origin="test")
        ok = Prediction(path="c.png", label="Normal", probabilities={"Normal": 1.0})
        with pytest.raises(StoreError, match="not finite"):
            store.add_predictions([(ok, "0" * 64), (nan, "1" * 64)], origin="test")
        assert store.count() == 0  # all or none: the good row went too


def test_a_row_stored_before_the_fix_is_still_listed(classifier: Classifier,
                                                     tmp_path: Path) -> None:
    with Store(tmp_path / "data") as store:
        store.add_prediction(Prediction(path="a.png", label="Normal",
                                        probabilities={"Normal": 1.0}), origin="test")
    db = sqlite3.connect(tmp_path / "data" / "results.sqlite3")
    db.execute("""UPDATE results SET probabilities = '{"Normal": NaN}'""")
    db.commit()
    db.close()
    with serving(classifier, tmp_path / "data") as api:
        status, answer = api.json("GET", "/v1/results")
        assert status == 200 and answer["results"][0]["probabilities"] == {"Normal": None}
        assert api.json("GET", "/v1/results/1")[0] == 200


# --- 4: refused uploads --------------------------------------------------------------------------


def post(api: Running, body: bytes, headers: dict[str, str]) -> tuple[int | str, dict]:
    """POST with http.client, as an ordinary client sends (the whole body, then the answer)."""
    connection = http.client.HTTPConnection(api.host, api.port, timeout=30)
    try:
        connection.request("POST", "/v1/classify", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    except OSError as exc:
        return type(exc).__name__, {}
    finally:
        connection.close()


def test_a_refused_upload_gets_its_json_answer_not_a_broken_pipe(classifier: Classifier,
                                                                 tmp_path: Path) -> None:
    upload = b"x" * (4 << 20)
    with serving(classifier, tmp_path / "data", token=TOKEN, max_body_bytes=1 << 20) as api:
        for _ in range(3):
            status, answer = post(api, upload, {})
            assert status == 401 and "bearer token" in answer["error"]
            status, answer = post(api, upload, AUTH)
            assert status == 413 and answer["error"].startswith("body of")
        assert post(api, PNG, AUTH)[0] == 200


def test_a_full_server_refuses_an_upload_with_its_503(classifier: Classifier,
                                                      tmp_path: Path) -> None:
    with serving(classifier, tmp_path / "data", max_connections=1) as api, \
            socket.create_connection((api.host, api.port)):
        time.sleep(0.2)  # the held connection is accepted first
        for _ in range(3):
            status, answer = post(api, b"x" * (1 << 20), {})
            assert status == 503 and "too many connections" in answer["error"]


def test_lingering_is_bounded_in_time_for_a_client_that_keeps_sending(
        classifier: Classifier, tmp_path: Path) -> None:
    with serving(classifier, tmp_path / "data", token=TOKEN) as api, \
            socket.create_connection((api.host, api.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")
        start = time.monotonic()
        with pytest.raises(OSError):  # reset once the server stops reading
            while time.monotonic() - start < 20:
                sock.sendall(b"x" * 4096)
                time.sleep(0.005)
        assert time.monotonic() - start < 15  # LINGER_S is 2 s; 20 s would mean unbounded


def test_linger_stops_at_its_byte_cap_and_its_time_limit() -> None:
    from ct_edge.server.body import linger

    left, right = socket.socketpair()
    with left, right:
        right.sendall(b"x" * 5000)
        assert linger(left, limit_s=5.0, max_bytes=1000) == 1000
    left, right = socket.socketpair()
    with left, right:
        start = time.monotonic()
        assert linger(left, limit_s=0.3, max_bytes=1000) == 0  # the peer sends nothing
        assert 0.2 < time.monotonic() - start < 5  # stopped by its limit, not by the peer


def expect_exchange(api: Running, headers: str, body: bytes) -> bytes:
    """Send headers with Expect: 100-continue; the body only after a 100; everything answered."""
    with socket.create_connection((api.host, api.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     f"Content-Length: {len(body)}\r\n{headers}\r\n".encode())
        reply = sock.recv(65536)
        if reply.startswith(b"HTTP/1.1 100 "):
            sock.sendall(body)
            sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            reply += chunk
        return reply


def test_expect_100_continue_only_once_the_request_is_accepted(classifier: Classifier,
                                                               tmp_path: Path) -> None:
    with serving(classifier, tmp_path / "data", token=TOKEN, max_body_bytes=1 << 20) as api:
        reply = expect_exchange(api, "", b"x" * 50000)
        assert reply.startswith(b"HTTP/1.1 401 ") and b" 100 " not in reply
        assert "bearer token" in json_body(reply)["error"]
        reply = expect_exchange(api, f"Authorization: Bearer {TOKEN}\r\n", b"x" * (2 << 20))
        assert reply.startswith(b"HTTP/1.1 413 ") and b" 100 " not in reply
        reply = expect_exchange(api, f"Authorization: Bearer {TOKEN}\r\n", PNG)
        assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), reply[:80]
        assert json_body(reply.split(b"\r\n\r\n", 1)[1])["id"] == 1


def test_a_keep_alive_connection_is_not_lingered_on_after_a_body_was_read(
        classifier: Classifier, tmp_path: Path) -> None:
    with serving(classifier, tmp_path / "data", idle_timeout_s=0.5) as api:
        connection = http.client.HTTPConnection(api.host, api.port, timeout=10)
        connection.request("POST", "/v1/classify", body=b"not an image")
        response = connection.getresponse()
        assert response.status == 415 and response.read()
        start = time.monotonic()
        assert connection.sock.recv(1) == b""  # the server closes at its idle timeout
        assert time.monotonic() - start < 5  # not LINGER_S after each request on a busy CI
        connection.close()
