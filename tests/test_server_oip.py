"""`ct-edge serve`'s Open Inference Protocol v2 over real HTTP: health, server and model metadata,
and /v2/models/ct-edge/infer with base64 and binary-extension bytes, FP32 tensors, the
classification extension, malformed requests, and what an infer batch stores."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from bundle_helpers import set_default_status
from server_helpers import JPEG, PNG, Running, infer_request, serving

from ct_edge import DISCLAIMER
from ct_edge.classifier import Classifier
from ct_edge.preprocess import preprocess

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
    assert (meta["parameters"]["artifact_parity"], meta["parameters"]["parity_warning"]) == (
        "passed", None)
    assert api.json("GET", "/v2/models/ct-edge/versions/1")[1] == meta


def test_metadata_and_metrics_name_an_artifact_that_missed_parity(tiny_bundle: Path,
                                                                  tmp_path: Path) -> None:
    """serve warned on stderr only: a client (or the page) could not tell."""
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    name = set_default_status(bundle)
    with serving(Classifier.from_bundle(bundle), tmp_path / "data") as api:
        parameters = api.json("GET", "/v2/models/ct-edge")[1]["parameters"]
        metrics = api.request("GET", "/metrics")[2].decode()
    assert parameters["artifact_parity"] == "failed"
    assert parameters["parity_warning"] == (
        f"artifact {name!r} has parity status 'failed'; its answers may differ from the "
        "reference model")
    info = next(line for line in metrics.splitlines() if line.startswith("ct_edge_bundle_info{"))
    assert 'artifact_parity="failed"' in info


def test_metrics_answer_when_the_manifest_holds_a_lone_surrogate(tiny_bundle: Path,
                                                                 tmp_path: Path) -> None:
    """A valid JSON escape (\\ud800) in a status loads; /metrics must not turn it into a 500."""
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    set_default_status(bundle, "failed\ud800")
    with serving(Classifier.from_bundle(bundle), tmp_path / "data") as api:
        status, _, body = api.request("GET", "/metrics")
    assert status == 200 and 'artifact_parity="failed\\\\ud800"' in body.decode()  # \\ escaped


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


def test_infer_with_a_non_image_file_is_415(api: Running) -> None:
    status, body = api.json("POST", "/v2/models/ct-edge/infer", infer_request(b"plain text"))
    assert status == 415 and body["error"].startswith("image[0]")
