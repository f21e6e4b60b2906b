"""`ct-edge listen`: real associations on 127.0.0.1 with pynetdicom's and DCMTK's senders.

The node runs as its own process (`python -m ct_edge.cli listen`), as on a device; the tests read
its results store. Series classified per slice and per series, compressed transfer syntaxes, MR
refused or out of domain, a dataset that cannot be parsed, a sender that aborts, four senders at
once; and the node and the classifier agreeing on every modality and SOP class.
"""

from __future__ import annotations

import io
import itertools
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from listen_helpers import (
    DCMTK,
    FIXTURES,
    LABELS,
    TEST_FILES,
    Listener,
    association,
    dcmtk,
    needs_dcmtk,
    pynetdicom_tool,
    recorded_as,
    rewrite,
    running,
    series_of,
    wait_series,
)
from pydicom.uid import RLELossless, generate_uid

from ct_edge.dicom import DicomInfo
from ct_edge.dicom_node.contexts import storage_classes
from ct_edge.domain import MODALITIES, NEUTRAL_MODALITIES, SECONDARY_CAPTURE_CLASSES
from ct_edge.store import Store
from training.synthetic_series import write_series

# --- the node ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Input files: two synthetic series (52 and 12 slices), CT_small, a JPEG 2000 CT, an RLE
    CT, an MR, an MR as Secondary Capture, a deflated Secondary Capture."""
    root = tmp_path_factory.mktemp("listen-data")
    big = write_series(root / "big", "COVID-19", slices=52, seed=1, size=96).folder
    small = write_series(root / "small", "Normal", slices=12, seed=2, size=96).folder
    extra = root / "extra"
    extra.mkdir()
    rle = pydicom.dcmread(next(small.glob("*.dcm")))
    rle.SOPInstanceUID = rle.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    rle.SeriesInstanceUID = generate_uid()
    rle.compress(RLELossless)
    rle.save_as(extra / "rle_ct.dcm", enforce_file_format=True)
    mr_sc = rewrite(TEST_FILES / "MR_small.dcm", extra / "mr_as_sc.dcm",
                    SOPClassUID="1.2.840.10008.5.1.4.1.1.7", SeriesInstanceUID=generate_uid())
    return {"big": big, "small": small, "ct_small": FIXTURES / "ct_small.dcm",
            "j2k_ct": TEST_FILES / "693_J2KI.dcm", "rle_ct": extra / "rle_ct.dcm",
            "mr": TEST_FILES / "MR_small.dcm", "mr_sc": mr_sc,
            "deflated": TEST_FILES / "image_dfl.dcm"}


@pytest.fixture(scope="module")
def node(ct_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    with running(ct_bundle, tmp_path_factory.mktemp("node") / "data") as listener:
        yield listener


def test_echo_with_both_senders(node: Listener) -> None:
    assert pynetdicom_tool("echoscu", node.port).returncode == 0
    if DCMTK:
        assert dcmtk("echoscu", node.port).returncode == 0
    assert "association from PYSCU@127.0.0.1" in node.log()


@needs_dcmtk
def test_dcmtk_series_is_classified_per_slice_and_per_series(node: Listener,
                                                             data: dict[str, Path]) -> None:
    files = sorted(str(p) for p in data["big"].glob("*.dcm"))
    sent = dcmtk("storescu", node.port, *files)
    assert sent.returncode == 0, sent.stderr
    series = wait_series(node.data_dir, series_of(data["big"]), instances=52)
    assert series["status"] in ("ok", "uncertain") and series["label"] is not None
    assert series["counts"]["slices"] == series["counts"]["used"] == 52
    assert series["counts"]["k"] == 6 and series["aggregate"] == "topk-mean"
    assert series["modality"] == "CT" and series["calling_ae"] == "DCMTKSCU"
    with Store(node.data_dir) as store:
        slices = store.dicom_series_slices(series["id"])
        assert len(slices) == 52 and all(s["state"] == "classified" for s in slices)
        rows = [store.get(s["result_id"]) for s in slices]
    assert {row["origin"] for row in rows} == {"dicom"}
    assert all(set(row["probabilities"]) == set(LABELS) for row in rows)
    locations = [s["slice_location"] for s in slices]
    assert locations == sorted(locations, reverse=True)  # slice order, apex first
    report = pydicom.dcmread(node.data_dir / "reports" / series["report"])
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"
    assert report.VerificationFlag == "UNVERIFIED"
    assert "not for diagnostic use" in report.SeriesDescription
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
             for item in report.ContentSequence}
    assert texts["Series label"] == series["label"]
    assert series["bundle_sha256"] in texts["Bundle"]
    referenced = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(referenced.ReferencedSOPSequence) == 52
    assert re.search(rf"series {series['series_uid']} complete", node.log())


def test_pynetdicom_series_ct_small_and_compressed(node: Listener, data: dict[str, Path]) -> None:
    files = [str(p) for p in sorted(data["small"].glob("*.dcm"))]
    singles = [data["ct_small"], data["j2k_ct"], data["rle_ct"]]
    # -cx: propose each file's own transfer syntax (compressed ones included)
    sent = pynetdicom_tool("storescu", node.port, *files, *map(str, singles), "-cx")
    assert sent.returncode == 0, sent.stderr
    series = wait_series(node.data_dir, series_of(data["small"]), instances=12)
    assert series["counts"]["used"] == 12
    for path in singles:
        one = wait_series(node.data_dir, str(pydicom.dcmread(path).SeriesInstanceUID), instances=1)
        assert one["counts"]["used"] == 1, (path.name, one)
        assert one["label"] in LABELS


@needs_dcmtk
def test_dcmtk_sends_compressed_ct(node: Listener, data: dict[str, Path]) -> None:
    uid = generate_uid()
    copy = rewrite(data["j2k_ct"], data["rle_ct"].with_name("j2k_copy.dcm"), SeriesInstanceUID=uid)
    assert dcmtk("storescu", node.port, "-xw", str(copy)).returncode == 0  # JPEG 2000
    assert wait_series(node.data_dir, uid, instances=1)["counts"]["used"] == 1
    assert dcmtk("storescu", node.port, "-xr", str(data["rle_ct"])).returncode == 0  # RLE
    rle = wait_series(node.data_dir, str(pydicom.dcmread(data["rle_ct"]).SeriesInstanceUID))
    assert rle["counts"]["used"] == 1


def test_mr_is_refused_or_out_of_domain(node: Listener, data: dict[str, Path]) -> None:
    mr_series = str(pydicom.dcmread(data["mr"]).SeriesInstanceUID)
    pynetdicom_tool("storescu", node.port, str(data["mr"]))  # MR Image Storage: not negotiated
    if DCMTK:
        refused = dcmtk("storescu", node.port, str(data["mr"]))
        assert refused.returncode != 0 or "no presentation context" in refused.stderr.lower()
    # An MR wrapped as Secondary Capture gets through negotiation: recorded, never labelled.
    assert pynetdicom_tool("storescu", node.port, str(data["mr_sc"])).returncode == 0
    series = wait_series(node.data_dir, str(pydicom.dcmread(data["mr_sc"]).SeriesInstanceUID))
    assert series["status"] == "out_of_domain" and series["label"] is None
    with Store(node.data_dir) as store:
        (one,) = store.dicom_series_slices(series["id"])
        assert one["status"] == "out_of_domain" and one["label"] is None
        assert one["reason"].startswith("modality MR; this bundle accepts CT")
        assert store.get_dicom_series(series_uid=mr_series) is None  # never received
    # A deflated Secondary Capture travels in its own syntax and is read (modality OT says
    # nothing about the content: the classifier's gate judges the pixels).
    assert pynetdicom_tool("storescu", node.port, str(data["deflated"])).returncode == 0
    deflated = wait_series(node.data_dir, str(pydicom.dcmread(data["deflated"]).SeriesInstanceUID))
    assert deflated["counts"]["unreadable"] == 0 and deflated["counts"]["slices"] == 1


def test_unparsable_dataset_gets_a_failure_status_and_an_error_row(node: Listener,
                                                                  tmp_path: Path) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import _config

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    broken = io.BytesIO()
    broken.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(broken, meta)
    broken.write(b"\x08\x00\x16\x00SQ\x00\x00\xff\xff\xff\xff\x01\x02")  # a sequence cut short
    path = tmp_path / "broken.dcm"
    path.write_bytes(broken.getvalue())
    with Store(node.data_dir) as store:
        errors_before = store.count(status="")
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, undecoded
    try:
        assoc = association(node.port)
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert 0xC000 <= status.Status <= 0xCFFF
    with Store(node.data_dir) as store:
        assert store.count(status="") == errors_before + 1
        row = store.list(status="")[0]
    assert row["origin"] == "dicom" and "cannot parse the dataset" in row["error"]
    assert node.proc.poll() is None  # still serving


def test_sender_aborting_mid_series(node: Listener, tmp_path: Path) -> None:
    info = write_series(tmp_path / "aborted", "Normal", slices=20, seed=4, size=64)
    assoc = association(node.port)
    assert assoc.is_established
    for path in info.files[:8]:
        assert assoc.send_c_store(path).Status == 0x0000
    assoc.abort()
    series = wait_series(node.data_dir, info.series_uid, instances=8)
    assert series["counts"]["slices"] == 8
    assert "PYTEST@127.0.0.1" in node.log() and " aborted after " in node.log()


def test_four_senders_at_once(node: Listener, tmp_path: Path) -> None:
    series = [write_series(tmp_path / f"s{i}", "Normal", slices=15, seed=10 + i, size=64)
              for i in range(4)]
    tool = "storescu" if DCMTK else None

    def send(index: int) -> None:
        files = [str(p) for p in series[index].files]
        if tool and index % 2 == 0:
            results[index] = dcmtk(tool, node.port, *files, calling=f"SCU{index}").returncode
        else:
            results[index] = pynetdicom_tool("storescu", node.port, *files,
                                             calling=f"SCU{index}").returncode

    results: dict[int, int] = {}
    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: 0, 1: 0, 2: 0, 3: 0}
    for info in series:
        assert wait_series(node.data_dir, info.series_uid, instances=15)["counts"]["used"] == 15


# --- the node and the classifier: one statement of the domain ----------------------------------


MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
TABLE_CLASSES = (*dict.fromkeys(uid for rule in MODALITIES.values() for uid in rule["sop_classes"]),
                 *SECONDARY_CAPTURE_CLASSES, MR_IMAGE)
TABLE_MODALITIES = (*dict.fromkeys(value for rule in MODALITIES.values()
                                   for value in rule["modalities"]), *NEUTRAL_MODALITIES, "MR")


@pytest.mark.parametrize("modality", ["ct", "xray", None])
def test_node_and_classifier_agree_on_every_modality_and_sop_class(
        modality: str | None, tiny_bundle: Path, tmp_path: Path) -> None:
    """Every SOP class and Modality of ct_edge.domain's tables (and MR), one dataset each pair,
    sent by storescu: the node refuses at negotiation only classes that the classifier's header
    check refuses by class (a bundle that records no modality is held to every known modality's
    rule), and stores for every other dataset what `ct-edge classify` answers."""
    from ct_edge.classifier import Classifier
    from ct_edge.domain import metadata_reason

    bundle = recorded_as(tiny_bundle, tmp_path / "bundle", modality)
    offered = storage_classes(modality)
    for uid in TABLE_CLASSES:
        refused_by_class = metadata_reason(DicomInfo(sop_class_uid=uid), modality) is not None
        assert (uid not in offered) == refused_by_class, uid
    series_uid, files = generate_uid(), {}
    for n, (uid, value) in enumerate(itertools.product(TABLE_CLASSES, TABLE_MODALITIES)):
        path = rewrite(FIXTURES / "ct_small.dcm", tmp_path / f"{n}.dcm", SOPClassUID=uid,
                       Modality=value, SeriesInstanceUID=series_uid)
        files[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = (path, uid)
    with running(bundle, tmp_path / "data") as listener:
        assert pynetdicom_tool("storescu", listener.port,
                               *(str(p) for p, _ in files.values())).returncode == 0
        received = sum(uid in offered for _, uid in files.values())
        series = wait_series(listener.data_dir, series_uid, instances=received)
    with Store(tmp_path / "data") as store:
        answers = {s["sop_instance_uid"]: (s["status"], s["label"], s["reason"])
                   for s in store.dicom_series_slices(series["id"])}
    statuses = {status for status, _, _ in answers.values()}
    assert statuses & {"ok", "uncertain"} and "out_of_domain" in statuses
    classifier = Classifier.from_bundle(bundle)
    for sop_instance, (path, uid) in files.items():
        expected = classifier.predict(path)
        if uid in offered:
            assert answers[sop_instance] == (expected.status, expected.label, expected.reason), path
        else:
            assert sop_instance not in answers
            assert expected.status == "out_of_domain", path
