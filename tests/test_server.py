"""`ct-edge serve` over real HTTP on 127.0.0.1 with a real client (http.client): every endpoint,
every error code, auth on and off, the body cap, the Open Inference Protocol v2 shapes, a fuzz
campaign (never a 500), and the command line (refusal to bind a public address, SIGTERM).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from test_store import damage_store

from ct_edge import DISCLAIMER
from ct_edge.classifier import Classifier
from ct_edge.limits import DECODE_BUDGET_BYTES
from ct_edge.preprocess import preprocess
from ct_edge.server import Server, ServerConfig, Service, create_server
from ct_edge.store import Store

FIXTURES = Path(__file__).parent / "fixtures"
PNG = (FIXTURES / "gray8.png").read_bytes()
JPEG = (FIXTURES / "gray.jpg").read_bytes()
DICOM = (FIXTURES / "ct_small.dcm").read_bytes()
PREDICTION_KEYS = {"path", "label", "confidence", "status", "reason", "probabilities",
                   "timings_ms", "error"}
TOKEN = "s3cret-token-for-tests"


# --- a server in this process, a client over real sockets --------------------------------------


@pytest.fixture(scope="module")
def classifier(tiny_bundle: Path) -> Classifier:
    return Classifier.from_bundle(tiny_bundle)


class Running:
    def __init__(self, server: Server, store: Store) -> None:
        self.server, self.store = server, store
        self.host, self.port = server.server_address[:2]

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def json(self, method: str, path: str, payload: object = None, **kwargs) -> tuple[int, dict]:
        body = json.dumps(payload).encode() if payload is not None else kwargs.pop("body", None)
        status, _, data = self.request(method, path, body, kwargs.pop("headers", None))
        return status, json.loads(data) if data else {}


@contextlib.contextmanager
def serving(classifier: Classifier, data_dir: Path, **config) -> Iterator[Running]:
    store = Store(data_dir)
    service = Service(classifier, store, workers=config.pop("workers", 2),
                      queue_size=config.pop("queue_size", 16),
                      timeout_s=config.pop("timeout_s", 30.0),
                      decode_budget=config.pop("decode_budget", DECODE_BUDGET_BYTES))
    server = create_server(ServerConfig(port=0, **config), service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Running(server, store)
    finally:
        server.stop()
        thread.join(10)
        store.close()


@pytest.fixture(scope="module")
def api(classifier: Classifier, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with serving(classifier, tmp_path_factory.mktemp("serve") / "data",
                 max_body_bytes=2 * 1024 * 1024, cors_origin="https://viewer.example") as running:
        yield running


@pytest.fixture(scope="module")
def scan(synthetic_root: Path) -> bytes:
    """An image like the tiny bundle's training images (in its domain, so it gets a label)."""
    return sorted((synthetic_root / "test" / "Normal").glob("*.png"))[0].read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def infer_request(*files: bytes, **extra) -> dict:
    return {"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES",
                        "data": [b64(f) for f in files], "parameters": {"content_type": "base64"}}],
            **extra}


# --- Open Inference Protocol v2: health and metadata -------------------------------------------


def test_health_endpoints_answer_200_with_an_empty_body(api: Running) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/ct-edge/ready",
                 "/v2/models/ct-edge/versions/1/ready"):
        status, _, body = api.request("GET", path)
        assert (status, body) == (200, b""), path


def test_server_metadata(api: Running) -> None:
    status, meta = api.json("GET", "/v2")
    assert status == 200
    assert meta["name"] == "ct-edge" and isinstance(meta["version"], str)
    assert set(meta["extensions"]) >= {"classification", "binary_tensor_data"}


def test_model_metadata_names_inputs_outputs_labels_and_identity(api: Running,
                                                                 tiny_bundle: Path,
                                                                 classifier: Classifier) -> None:
    status, meta = api.json("GET", "/v2/models/ct-edge")
    assert status == 200
    assert meta["name"] == "ct-edge" and meta["versions"] == ["1"]
    size = classifier.spec.size
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"]} == {
        ("image", "BYTES", (-1,)), ("input", "FP32", (-1, size, size, classifier.spec.channels))}
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "probabilities": "FP32", "label": "BYTES", "status": "BYTES", "reason": "BYTES"}
    assert meta["parameters"]["labels"] == list(classifier.labels)
    assert meta["parameters"]["bundle_sha256"] == Classifier.from_bundle(tiny_bundle).bundle.manifest_sha256
    assert meta["parameters"]["artifact_sha256"] == classifier.artifact.sha256
    assert api.json("GET", "/v2/models/ct-edge/versions/1")[1] == meta


# --- /v1/classify and the store -----------------------------------------------------------------


def test_classify_returns_the_cli_json_object_plus_the_row_id(api: Running,
                                                              classifier: Classifier) -> None:
    status, result = api.json("POST", "/v1/classify?name=scan%20one.png", body=PNG,
                              headers={"Content-Type": "image/png"})
    assert status == 200
    assert set(result) == PREDICTION_KEYS | {"id", "disclaimer"}
    assert result["disclaimer"] == DISCLAIMER
    expected = classifier.predict(PNG).to_dict()
    assert result["label"] == expected["label"] and result["status"] == expected["status"]
    assert result["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
    assert result["path"] == "scan one.png"
    row = api.store.get(result["id"])
    assert row["label"] == result["label"] and row["origin"] == "http"
    assert row["source"] == "scan one.png" and row["heatmap"] is False
    assert row["bundle_sha256"] == classifier.bundle.manifest_sha256


@pytest.mark.parametrize("name, data", [("jpeg", JPEG), ("dicom", DICOM)])
def test_classify_sniffs_jpeg_and_dicom_whatever_the_content_type(api: Running, name: str,
                                                                  data: bytes) -> None:
    pytest.importorskip("pydicom")
    status, result = api.json("POST", "/v1/classify", body=data,
                              headers={"Content-Type": "text/plain"})
    assert status == 200, result
    assert result["status"] in ("ok", "uncertain", "out_of_domain")
    assert result["path"] == "upload"


def test_explain_stores_a_heatmap_png_under_a_store_name(api: Running, scan: bytes) -> None:
    status, result = api.json("POST", "/v1/classify?explain=1&name=../../etc/passwd", body=scan)
    assert status == 200 and result["label"] is not None, result
    assert result["heatmap"] == f"/v1/results/{result['id']}/heatmap.png"
    status, headers, body = api.request("GET", result["heatmap"])
    assert status == 200 and headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG" and image.size == (256, 256)
    stored = api.store.heatmap_path(result["id"])
    assert stored.parent == api.store.heatmaps and "passwd" not in stored.name
    assert api.store.get(result["id"])["source"] == "../../etc/passwd"


def test_results_list_get_and_filters(api: Running, scan: bytes) -> None:
    ids = [api.json("POST", f"/v1/classify?name=list{i}.png", body=scan)[1]["id"]
           for i in range(3)]
    status, page = api.json("GET", "/v1/results?limit=2")
    assert status == 200 and page["limit"] == 2 and page["offset"] == 0
    assert [r["id"] for r in page["results"]] == [ids[2], ids[1]]
    assert page["total"] >= 3
    status, page = api.json("GET", "/v1/results?limit=1&offset=1")
    assert [r["id"] for r in page["results"]] == [ids[1]]
    label = page["results"][0]["label"]
    rows = api.json("GET", f"/v1/results?label={label}&limit=1000")[1]["results"]
    assert rows and all(r["label"] == label for r in rows)
    status_value = page["results"][0]["status"]
    rows = api.json("GET", f"/v1/results?status={status_value}&limit=1000")[1]["results"]
    assert rows and all(r["status"] == status_value for r in rows)
    status, row = api.json("GET", f"/v1/results/{ids[0]}")
    assert status == 200 and row["source"] == "list0.png" and row["heatmap"] is None
    assert api.request("GET", f"/v1/results/{ids[0]}/heatmap.png")[0] == 404


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=5000", "offset=-1",
                                   "status=maybe", "limit=%C2%B2"])
def test_bad_result_queries_are_400(api: Running, query: str) -> None:
    status, body = api.json("GET", f"/v1/results?{query}")
    assert status == 400 and "error" in body


def test_missing_results_are_404(api: Running) -> None:
    for path in ("/v1/results/999999", "/v1/results/9999999999999999999",
                 "/v1/results/999999/heatmap.png"):
        status, body = api.json("GET", path)
        assert status == 404 and "error" in body, path


# --- DICOM series (written by `ct-edge listen`; here through the store API) ---------------------


def add_series(store: Store, series_uid: str, slices: list[dict | None]) -> int:
    """Record one received instance per item (slice locations descending from 0), classify those
    with a result dict (None: still waiting); the series id."""
    for n, result in enumerate(slices):
        instance_id = store.add_dicom_instance(
            sop_instance_uid=f"{series_uid}.{n + 1}", study_uid="1.2.826.0.1.99", modality="CT",
            series_uid=series_uid, spool_path=f"spool/{n}.dcm", nbytes=1000,
            patient_id="PATIENT-42", description="CHEST 1mm", instance_number=n + 1,
            slice_location=-5.0 * n, calling_ae="SCANNER")
        if result is not None:
            store.add_dicom_result(instance_id, source=f"dicom {series_uid}.{n + 1}", **result)
    return store.get_dicom_series(series_uid=series_uid)["id"]


OK = {"status": "ok", "label": "Normal", "probabilities": {"Normal": 0.9, "COVID": 0.1}}
UNSURE = {"status": "uncertain", "label": "COVID", "probabilities": {"Normal": 0.45, "COVID": 0.55},
          "reason": "confidence 0.55 below the operating point 0.70"}
OUTSIDE = {"status": "out_of_domain", "reason": "modality MR; this bundle accepts CT"}
UNREADABLE = {"status": None, "error": "pixel data cannot be decoded"}


def test_series_list_newest_first_paged_with_live_counts(classifier: Classifier,
                                                         tmp_path: Path) -> None:
    with serving(classifier, tmp_path / "data") as api:
        status, page = api.json("GET", "/v1/series")
        assert (status, page["series"], page["total"]) == (200, [], 0)
        first = add_series(api.store, "1.2.826.0.1.1", [OK, UNSURE, OUTSIDE, UNREADABLE])
        api.store.complete_dicom_series(first, status="uncertain", label="Normal",
                                        probabilities={"Normal": 0.6, "COVID": 0.4},
                                        reason="below the operating point", aggregate="topk-mean",
                                        counts={"slices": 4, "used": 2})
        second = add_series(api.store, "1.2.826.0.1.2", [OK, None])
        status, page = api.json("GET", "/v1/series")
        assert status == 200 and (page["total"], page["limit"], page["offset"]) == (2, 50, 0)
        assert [s["id"] for s in page["series"]] == [second, first]
        newest, oldest = page["series"]
        assert newest["state"] == "receiving" and newest["status"] is None
        assert newest["progress"] == {"slices": 2, "waiting": 1, "ok": 1, "uncertain": 0,
                                      "out_of_domain": 0, "unreadable": 0}
        assert oldest["state"] == "complete" and oldest["label"] == "Normal"
        assert oldest["status"] == "uncertain" and oldest["instances"] == 4
        assert oldest["progress"] == {"slices": 4, "waiting": 0, "ok": 1, "uncertain": 1,
                                      "out_of_domain": 1, "unreadable": 1}
        assert oldest["description"] == "CHEST 1mm" and oldest["modality"] == "CT"
        # The API and the page show no patient identifier.
        assert all("patient_id" not in s for s in page["series"])
        assert b"PATIENT-42" not in api.request("GET", f"/v1/series/{first}")[2]
        status, page = api.json("GET", "/v1/series?limit=1&offset=1")
        assert [s["id"] for s in page["series"]] == [first] and page["total"] == 2


def test_series_detail_has_its_slice_results_in_slice_order(classifier: Classifier,
                                                            tmp_path: Path) -> None:
    with serving(classifier, tmp_path / "data") as api:
        series_id = add_series(api.store, "1.2.826.0.1.3", [OK, UNSURE, OUTSIDE, UNREADABLE, None])
        status, series = api.json("GET", f"/v1/series/{series_id}")
        assert status == 200 and series["id"] == series_id
        assert series["series_uid"] == "1.2.826.0.1.3" and series["progress"]["slices"] == 5
        slices = series["slices"]
        # Slice order is head to feet: slice location descending (0, -5, -10, ...).
        assert [s["slice_location"] for s in slices] == [0.0, -5.0, -10.0, -15.0, -20.0]
        assert [s["status"] for s in slices] == ["ok", "uncertain", "out_of_domain", None, None]
        assert [s["state"] for s in slices] == ["classified"] * 4 + ["received"]
        assert slices[0]["label"] == "Normal" and slices[0]["probabilities"]["Normal"] == 0.9
        assert slices[2]["label"] is None and "modality MR" in slices[2]["reason"]
        assert slices[3]["error"] == "pixel data cannot be decoded"
        assert slices[4]["result_id"] is None
        # Each classified slice is also a result row the results endpoint serves.
        status, row = api.json("GET", f"/v1/results/{slices[1]['result_id']}")
        assert status == 200 and row["origin"] == "dicom" and row["status"] == "uncertain"


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=5000", "offset=-1"])
def test_bad_series_queries_are_400(api: Running, query: str) -> None:
    status, body = api.json("GET", f"/v1/series?{query}")
    assert status == 400 and "error" in body


def test_missing_series_are_404_and_writes_405(api: Running) -> None:
    for path in ("/v1/series/999999", "/v1/series/9999999999999999999", "/v1/series/x"):
        status, body = api.json("GET", path)
        assert status == 404 and "error" in body, path
    status, headers, _ = api.request("POST", "/v1/series", b"{}")
    assert status == 405 and headers["allow"] == "GET"


def test_every_v1_body_with_a_result_carries_the_disclaimer(classifier: Classifier,
                                                              tmp_path: Path) -> None:
    with serving(classifier, tmp_path / "data") as api:
        result_id = api.json("POST", "/v1/classify", body=PNG)[1]["id"]
        series_id = add_series(api.store, "1.2.826.0.1.9", [OK])
        for path in ("/v1/results", f"/v1/results/{result_id}", "/v1/series",
                     f"/v1/series/{series_id}"):
            status, body = api.json("GET", path)
            assert status == 200 and body["disclaimer"] == DISCLAIMER, path
        # On the body, not repeated in each row: the rows keep their shape.
        assert "disclaimer" not in api.json("GET", "/v1/results")[1]["results"][0]
        assert "disclaimer" not in api.json("GET", "/v1/series")[1]["series"][0]


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


def raw_exchange(api: Running, data: bytes) -> bytes:
    with socket.create_connection((api.host, api.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


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


# --- OIP v2 infer ---------------------------------------------------------------------------------


def test_infer_base64_bytes_as_mlserver_sends_it(api: Running, classifier: Classifier) -> None:
    status, response = api.json("POST", "/v2/models/ct-edge/infer",
                                infer_request(PNG, JPEG, id="req-7"))
    assert status == 200, response
    assert response["model_name"] == "ct-edge" and response["id"] == "req-7"
    outputs = {o["name"]: o for o in response["outputs"]}
    assert set(outputs) == {"probabilities", "label", "status", "reason"}
    probabilities = outputs["probabilities"]
    assert probabilities["datatype"] == "FP32" and probabilities["shape"] == [2, 3]
    expected = classifier.predict(PNG)
    assert probabilities["data"][:3] == pytest.approx(
        [expected.probabilities[label] for label in classifier.labels], abs=1e-5)
    assert outputs["label"]["shape"] == [2]
    assert outputs["label"]["data"][0] == (expected.label or "")
    assert outputs["status"]["data"][0] == expected.status
    ids = response["parameters"]["result_ids"]
    assert len(ids) == 2 and api.store.get(ids[0])["origin"] == "oip"
    assert response["parameters"]["disclaimer"] == DISCLAIMER


def test_infer_binary_extension_matches_base64(api: Running) -> None:
    element = struct.pack("<I", len(PNG)) + PNG
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(element)}}],
                         "outputs": [{"name": "probabilities"}]}).encode()
    status, _, body = api.request("POST", "/v2/models/ct-edge/infer", header + element,
                                  {"Inference-Header-Content-Length": str(len(header)),
                                   "Content-Type": "application/octet-stream"})
    assert status == 200, body
    binary = json.loads(body)["outputs"]
    reference = api.json("POST", "/v2/models/ct-edge/infer",
                         infer_request(PNG, outputs=[{"name": "probabilities"}]))[1]["outputs"]
    assert [o["name"] for o in binary] == ["probabilities"]
    assert binary[0]["data"] == pytest.approx(reference[0]["data"], abs=1e-6)


def test_infer_fp32_tensor_json_and_binary(api: Running, classifier: Classifier) -> None:
    x = preprocess(PNG, classifier.spec)
    expected = classifier.predict(x)
    request = {"inputs": [{"name": "input", "shape": [1, *x.shape], "datatype": "FP32",
                           "data": x.ravel().tolist()}]}
    status, response = api.json("POST", "/v2/models/ct-edge/infer", request)
    assert status == 200, response
    outputs = {o["name"]: o for o in response["outputs"]}
    assert outputs["probabilities"]["data"] == pytest.approx(
        [expected.probabilities[label] for label in classifier.labels], abs=1e-5)
    assert outputs["label"]["data"] == [expected.label or ""]
    raw = x.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    status, _, body = api.request("POST", "/v2/models/ct-edge/infer", header + raw,
                                  {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200
    assert {o["name"]: o for o in json.loads(body)["outputs"]}["probabilities"]["data"] == \
        pytest.approx(outputs["probabilities"]["data"], abs=1e-6)


def test_classification_extension_score_index_label(api: Running, classifier: Classifier) -> None:
    request = infer_request(PNG, outputs=[{"name": "probabilities",
                                           "parameters": {"classification": 2}}])
    status, response = api.json("POST", "/v2/models/ct-edge/infer", request)
    assert status == 200
    (output,) = response["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 2]
    expected = classifier.predict(PNG).probabilities
    parsed = [entry.split(":", 2) for entry in output["data"]]
    scores = [float(score) for score, _, _ in parsed]
    assert scores == sorted(scores, reverse=True)
    for score, index, label in parsed:
        assert classifier.labels[int(index)] == label
        assert float(score) == pytest.approx(expected[label], abs=1e-5)
    # Request-level parameters.classification, as MLServer clients send it; N past the classes.
    request = infer_request(PNG, parameters={"classification": 10})
    response = api.json("POST", "/v2/models/ct-edge/infer", request)[1]
    top = {o["name"]: o for o in response["outputs"]}["probabilities"]
    assert top["shape"] == [1, len(classifier.labels)]
    assert all(re.fullmatch(r"[0-9.]+:[0-9]+:.+", entry) for entry in top["data"])


@pytest.mark.parametrize("request_body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"inputs": []}).encode(), "exactly one tensor"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}]}).encode(),
     "not supported"),
    (json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES",
                             "data": ["aGk="], "parameters": {"content_type": "base64"}}]}).encode(),
     "needs 2 strings"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                             "data": ["%%%"], "parameters": {"content_type": "base64"}}]}).encode(),
     "not valid base64"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 4, 4, 3], "datatype": "FP32",
                             "data": [0.0] * 48}]}).encode(), "FP32 input shape"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',
     "FP32 input shape"),
    (json.dumps({**infer_request(PNG), "outputs": [{"name": "logits"}]}).encode(),
     "unknown output"),
    (json.dumps({**infer_request(PNG), "outputs": [{"name": "label", "parameters":
                                                    {"classification": 1}}]}).encode(),
     "probabilities"),
    (json.dumps({"inputs": [{"name": "x", "shape": [-1], "datatype": "BYTES", "data": []}]}).encode(),
     "shape"),
    (json.dumps({"inputs": [{"name": "x", "shape": [100], "datatype": "BYTES",
                             "data": ["a"] * 100}]}).encode(), "between 1 and"),
])
def test_malformed_infer_requests_are_400(api: Running, request_body: bytes, fragment: str) -> None:
    status, body = api.json("POST", "/v2/models/ct-edge/infer", body=request_body)
    assert status == 400, body
    assert fragment in body["error"]


def test_fp32_nan_and_header_length_errors_are_400(api: Running, classifier: Classifier) -> None:
    size, channels = classifier.spec.size, classifier.spec.channels
    data = [0.5] * (size * size * channels)
    data[7] = float("nan")
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, size, size, channels],
                                   "datatype": "FP32", "data": data}]}).encode()
    status, answer = api.json("POST", "/v2/models/ct-edge/infer", body=body)
    assert status == 400 and "NaN" in answer["error"]
    for length in ("abc", "0", "999999"):
        status, answer = api.json("POST", "/v2/models/ct-edge/infer", body=b"{}",
                                  headers={"Inference-Header-Content-Length": length})
        assert status == 400 and "Inference-Header-Content-Length" in answer["error"]


@pytest.mark.parametrize("bad_item, status, fragment", [
    (b"garbage, not an image", 415, "image[1]: not a PNG, JPEG or DICOM"),
    (PNG[:60], 400, "image[1]:"),
    (b"", 400, "image[1]: empty file"),
], ids=["not-an-image", "damaged-png", "empty"])
def test_a_refused_infer_batch_stores_nothing(api: Running, bad_item: bytes, status: int,
                                              fragment: str) -> None:
    before = api.store.count()
    answer_status, body = api.json("POST", "/v2/models/ct-edge/infer",
                                   infer_request(PNG, bad_item, PNG))
    assert answer_status == status and fragment in body["error"], body
    assert api.store.count() == before  # image[0] was readable, yet it is not stored either


def test_an_answered_infer_batch_stores_every_item_in_order(api: Running) -> None:
    before = api.store.count()
    status, response = api.json("POST", "/v2/models/ct-edge/infer", infer_request(PNG, JPEG, PNG))
    assert status == 200, response
    ids = response["parameters"]["result_ids"]
    assert api.store.count() == before + 3 and ids == sorted(ids)
    assert [api.store.get(i)["source"] for i in ids] == ["image[0]", "image[1]", "image[2]"]


def test_infer_tensor_name_is_cleaned_like_a_classify_name(api: Running) -> None:
    # A lone surrogate is valid JSON ("\ud800") but no text the store can hold: once a 500.
    request = infer_request(PNG)
    request["inputs"][0]["name"] = "x\ud800\n"
    status, response = api.json("POST", "/v2/models/ct-edge/infer", request)
    assert status == 200, response
    (result_id,) = response["parameters"]["result_ids"]
    assert api.store.get(result_id)["source"] == "x[0]"
    request["inputs"][0]["name"] = "\udcff"
    status, response = api.json("POST", "/v2/models/ct-edge/infer", request)
    assert status == 200 and api.store.get(response["parameters"]["result_ids"][0])["source"] \
        == "input[0]"


def test_a_damaged_store_is_503_not_a_bug(classifier: Classifier, tmp_path: Path) -> None:
    damage_store(tmp_path / "data")
    with serving(classifier, tmp_path / "data") as api:
        status, headers, body = api.request("GET", "/v1/results?limit=1000")
        assert status == 503 and headers["retry-after"] == "5"
        assert json.loads(body)["error"].startswith("results store unavailable: cannot read")


def test_infer_with_a_non_image_file_is_415(api: Running) -> None:
    status, body = api.json("POST", "/v2/models/ct-edge/infer", infer_request(b"plain text"))
    assert status == 415 and body["error"].startswith("image[0]")


# --- auth, CORS, metrics, the page ---------------------------------------------------------------


def test_token_guards_everything_but_health_and_the_page(classifier: Classifier,
                                                          tmp_path: Path) -> None:
    with serving(classifier, tmp_path / "data", token=TOKEN) as api:
        for method, path, body in [("GET", "/v1/results", None), ("POST", "/v1/classify", PNG),
                                   ("GET", "/v2", None), ("GET", "/v2/models/ct-edge", None),
                                   ("POST", "/v2/models/ct-edge/infer", b"{}"),
                                   ("GET", "/metrics", None), ("GET", "/v1/results/1", None),
                                   ("GET", "/v1/series", None), ("GET", "/v1/series/1", None),
                                   ("GET", "/nowhere", None)]:
            for headers in ({}, {"Authorization": "Bearer wrong-token-xx"},
                            {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
                status, answer_headers, answer = api.request(method, path, body, headers)
                assert status == 401, (method, path, headers)
                assert answer_headers["www-authenticate"].startswith("Bearer")
                assert "bearer token" in json.loads(answer)["error"]
        # An unauthenticated upload is refused from its headers alone, never read.
        reply = raw_exchange(api, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 30000000\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in reply
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert api.request("POST", "/v1/classify", PNG, good)[0] == 200
        assert api.request("GET", "/v1/results", None, good)[0] == 200
        assert api.request("GET", "/v1/series", None, good)[0] == 200
        assert api.store.count() == 1  # refused requests stored nothing
        for path in ("/v2/health/live", "/v2/health/ready", "/", "/static/app.js"):
            assert api.request("GET", path)[0] == 200, path


def test_cors_preflight_and_origin_header(api: Running) -> None:
    status, headers, _ = api.request("OPTIONS", "/v1/classify",
                                     headers={"Origin": "https://viewer.example",
                                              "Access-Control-Request-Method": "POST"})
    assert status == 204
    assert "Authorization" in headers["access-control-allow-headers"]
    assert headers["access-control-allow-origin"] == "https://viewer.example"
    _, headers, _ = api.request("GET", "/v2", headers={"Origin": "https://viewer.example"})
    assert headers["access-control-allow-origin"] == "https://viewer.example"
    _, headers, _ = api.request("GET", "/v2", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in headers


def test_metrics_in_prometheus_text_format(api: Running, classifier: Classifier) -> None:
    api.request("POST", "/v1/classify", PNG)
    api.request("POST", "/v1/classify", b"text")
    status, headers, body = api.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert re.search(r'^ct_edge_requests_total\{endpoint="classify",method="POST",status="200"\} '
                     r"[1-9]", text, re.M)
    assert 'status="415"' in text
    buckets = [int(v) for v in re.findall(
        r'^ct_edge_request_seconds_bucket\{endpoint="classify",le="[^"]+"\} (\d+)', text, re.M)]
    assert buckets == sorted(buckets) and buckets[-1] >= 2
    assert re.search(r"^ct_edge_queue_depth 0$", text, re.M)
    assert f'artifact_sha256="{classifier.artifact.sha256}"' in text
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{[^}]*\})? [0-9.e+-]+', line), line


def test_the_page_and_its_assets(api: Running) -> None:
    status, headers, body = api.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert DISCLAIMER in page and "{{" not in page
    assert "default-src 'self'" in headers["content-security-policy"]
    # No CDN: every script and stylesheet is served by the package itself.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        assert api.request("GET", asset)[0] == 200, asset
    assert api.request("GET", "/static/nothing.js")[0] == 404
    assert api.request("GET", "/static/..%2Fapp.py")[0] == 404


def test_the_page_says_each_status_in_the_words_of_the_cli(api: Running) -> None:
    from ct_edge import STATUS_WORDS

    status, _, body = api.request("GET", "/static/app.js")
    assert status == 200
    tags = re.search(r"const names = (\{[^}]*\})", body.decode()).group(1)
    assert json.loads(re.sub(r"(\w+):", r'"\1":', tags)) == STATUS_WORDS


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
