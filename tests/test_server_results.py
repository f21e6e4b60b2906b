"""`ct-edge serve`'s /v1 API over real HTTP: /v1/classify and the row it stores, /v1/results and
/v1/series (the series `ct-edge listen` writes, here added through the store API), their filters,
pages and 400/404 answers, and the disclaimer on every body with a result."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from bundle_helpers import set_default_status
from PIL import Image
from server_helpers import DICOM, JPEG, PNG, Running, infer_request, serving

from ct_edge import DISCLAIMER
from ct_edge.classifier import Classifier
from ct_edge.store import Store

PREDICTION_KEYS = {"path", "label", "confidence", "status", "reason", "probabilities",
                   "timings_ms", "error"}


@pytest.fixture(scope="module")
def scan(synthetic_root: Path) -> bytes:
    """An image like the tiny bundle's training images (in its domain, so it gets a label)."""
    return sorted((synthetic_root / "test" / "Normal").glob("*.png"))[0].read_bytes()


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
    assert (row["artifact"], row["artifact_parity"]) == (classifier.artifact.name,
                                                        classifier.artifact.status)


def test_stored_results_name_the_parity_status_of_the_artifact_that_answered(
        tiny_bundle: Path, tmp_path: Path) -> None:
    """serve named an artifact that missed parity in its metadata only: the results it stored
    (from /v1/classify and from an OIP infer batch) did not say so."""
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    name = set_default_status(bundle, "failed: agreement 0.91 < 0.97")
    with serving(Classifier.from_bundle(bundle), tmp_path / "data") as api:
        assert api.json("POST", "/v1/classify", body=PNG)[0] == 200
        assert api.json("POST", "/v2/models/ct-edge/infer", infer_request(PNG, JPEG))[0] == 200
        status, page = api.json("GET", "/v1/results")
    assert status == 200 and [row["origin"] for row in page["results"]] == ["oip", "oip", "http"]
    assert {(row["artifact"], row["artifact_parity"]) for row in page["results"]} == {
        (name, "failed: agreement 0.91 < 0.97")}


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
