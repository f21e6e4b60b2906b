"""Regression tests for defects of `ct-edge listen` found in review (one test each): a slice that
came while its series completed, header numbers out of range and handler bugs on the wire, an
instance moved to another series, `--allow-ip` on a dual-stack socket, process-wide settings a
stopped node left behind.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from bundle_helpers import set_default_status
from listen_helpers import FIXTURES, receive, recorded_as, rewrite
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid

from ct_edge.classifier import Classifier
from ct_edge.dicom_node import Node, NodeConfig
from ct_edge.dicom_node.config import Forward
from ct_edge.dicom_node.header import read_header
from ct_edge.store import Store

CT_SMALL = FIXTURES / "ct_small.dcm"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ECHO = "1.2.840.10008.1.1"


@pytest.fixture(scope="module")
def ct_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recorded_as(tiny_bundle, tmp_path_factory.mktemp("ct-bundle") / "bundle", "ct")


@pytest.fixture
def local_node(ct_bundle: Path, tmp_path: Path) -> Iterator[Node]:
    """A node in this process that does not listen; the tests call its steps themselves."""
    data_dir = tmp_path / "data"
    with Store(data_dir) as store:
        yield Node(NodeConfig(data_dir=data_dir), Classifier.from_bundle(ct_bundle), store)


def later() -> datetime:
    """A time by which every series received so far is stable."""
    return datetime.now(timezone.utc) + timedelta(hours=1)


def reports(node: Node) -> list[str]:
    folder = node.config.data_dir / "reports"
    return sorted(p.name for p in folder.glob("*.dcm")) if folder.is_dir() else []


@contextlib.contextmanager
def listening(bundle: Path, data_dir: Path, host: str = "127.0.0.1", **config: object) -> Iterator[Node]:
    """A node in this process, listening on a free port of `host`."""
    with Store(data_dir) as store:
        node = Node(NodeConfig(data_dir=data_dir, host=host, port=0, **config),
                    Classifier.from_bundle(bundle), store)
        node.start()
        try:
            yield node
        finally:
            node.stop()


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def associate(port: int, *contexts: str):
    """An association from 127.0.0.1 (pynetdicom's sender)."""
    from pynetdicom import AE

    entity = AE(ae_title="PYTEST")
    for context in contexts:
        entity.add_requested_context(context, "1.2.840.10008.1.2.1")
    return entity.associate("127.0.0.1", port, ae_title="CTEDGE")


def with_element(target: Path, keyword: str, vr: str, raw: bytes, drop: tuple[str, ...] = ()) -> Path:
    """CT_small as a new instance with one element's raw value replaced (a sender's bytes)."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for name in drop:
        delattr(ds, name)
    ds[keyword] = DataElement(pydicom.datadict.tag_for_keyword(keyword), vr, raw)
    ds.save_as(target, enforce_file_format=True)
    return target


# --- 1: a slice that comes while its series completes ------------------------------------------


@pytest.mark.parametrize("late", ["new instance", "same instance again"])
def test_a_slice_received_while_its_series_completes_is_in_its_result(
        late: str, local_node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The completion that read the slices before the late one came is abandoned (no result, no
    report kept, nothing forwarded); the series completes later with every slice."""
    node = local_node
    node.config.forward = Forward("PACS", "127.0.0.1", 104)
    forwarded: list[Path] = []
    monkeypatch.setattr(node, "_forward", forwarded.append)
    node.classify(receive(node))
    (series_id,) = node.store.stable_dicom_series(later())
    source = rewrite(CT_SMALL, tmp_path / "late.dcm") if late == "new instance" else CT_SMALL
    write_report, item = node._report, {}

    def report_then_receive(series: dict, slices: list[dict]) -> Path | None:
        item.update(receive(node, source))  # acknowledged while the monitor completes the series
        return write_report(series, slices)

    monkeypatch.setattr(node, "_report", report_then_receive)
    assert node.complete_series(series_id) is None
    assert node.store.get_dicom_series(series_id)["state"] == "receiving"
    assert reports(node) == [] and forwarded == []
    monkeypatch.setattr(node, "_report", write_report)
    node.classify(item)
    assert node.store.stable_dicom_series(later()) == [series_id]
    series = node.complete_series(series_id)
    expected = 2 if late == "new instance" else 1
    assert series["state"] == "complete" and series["counts"]["slices"] == expected
    assert series["instances"] == expected
    assert reports(node) == [series["report"]]
    assert forwarded == [node.config.data_dir / "reports" / series["report"]]


# --- 2: header numbers out of range; a bug in the C-STORE handler ------------------------------


@pytest.mark.parametrize(("keyword", "vr", "raw"), [
    ("SliceLocation", "DS", b"1e400"), ("SliceLocation", "DS", b"nan"),
    ("ImagePositionPatient", "DS", b"0\\0\\-1e400"),
    ("InstanceNumber", "IS", b"99999999999999999999")])
def test_a_header_number_out_of_range_is_absent(keyword: str, vr: str, raw: bytes,
                                                tmp_path: Path) -> None:
    drop = ("SliceLocation", "ImagePositionPatient") if vr == "DS" else ()
    header = read_header(with_element(tmp_path / "odd.dcm", keyword, vr, raw, drop))
    kept = "SliceLocation" if vr == "DS" else keyword
    assert header[kept] is None
    assert header["SOPInstanceUID"]


def test_odd_numbers_are_stored_and_a_handler_bug_is_a_failure_status(
        ct_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """On the wire: an InstanceNumber past 64 bits and an infinite SliceLocation are acknowledged
    and stored without them (the series still reads as JSON); an unexpected exception while
    keeping an instance is a 0xC210 failure with an error row and a logged error, nothing of the
    instance is kept, and the node goes on serving."""
    big = with_element(tmp_path / "big.dcm", "InstanceNumber", "IS", b"99999999999999999999")
    inf = with_element(tmp_path / "inf.dcm", "SliceLocation", "DS", b"1e400",
                       drop=("ImagePositionPatient",))
    with listening(ct_bundle, tmp_path / "data") as node:
        assoc = associate(node.address[1], CT_IMAGE)
        assert assoc.is_established
        assert [assoc.send_c_store(path).Status for path in (big, inf)] == [0x0000, 0x0000]
        (series,) = node.store.list_dicom_series()
        slices = node.store.dicom_series_slices(series["id"])
        json.dumps([series, slices], allow_nan=False)
        numbers = {s["sop_instance_uid"]: (s["instance_number"], s["slice_location"]) for s in slices}
        assert numbers[uid(big)][0] is None and numbers[uid(big)][1] is not None
        assert numbers[uid(inf)] == (1, None)

        def broken(**fields: object) -> int:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")

        monkeypatch.setattr(node.store, "add_dicom_instance", broken)
        spooled = sorted(node.spool.glob("*/*.dcm"))
        failed = assoc.send_c_store(rewrite(CT_SMALL, tmp_path / "failed.dcm"))
        assert failed.Status == 0xC210
        assert sorted(node.spool.glob("*/*.dcm")) == spooled
        (row,) = node.store.list(status="")
        assert row["error"] == "internal error (Python int too large to convert to SQLite INTEGER)"
        assert "C-STORE from PYTEST failed (0xC210)" in caplog.text
        monkeypatch.undo()
        assert assoc.send_c_store(rewrite(CT_SMALL, tmp_path / "next.dcm")).Status == 0x0000
        assoc.release()
        assert list(node.incoming.iterdir()) == []


# --- 3: an instance sent again under another series --------------------------------------------


def test_an_instance_moved_to_another_series_is_counted_there_only(local_node: Node,
                                                                   tmp_path: Path) -> None:
    """Both series' counts follow the instance; the series it leaves empty is dropped (no
    result, no report over no slices)."""
    node = local_node
    first_uid = str(pydicom.dcmread(CT_SMALL, stop_before_pixels=True).SeriesInstanceUID)
    other_uid = generate_uid()
    second = rewrite(CT_SMALL, tmp_path / "second.dcm")
    receive(node)
    receive(node, second)
    receive(node, rewrite(second, tmp_path / "second-moved.dcm", SeriesInstanceUID=other_uid,
                          SOPInstanceUID=uid(second)))

    def counts() -> dict[str, int]:
        return {s["series_uid"]: s["instances"] for s in node.store.list_dicom_series()}

    assert counts() == {first_uid: 1, other_uid: 1}
    receive(node, rewrite(CT_SMALL, tmp_path / "first-moved.dcm", SeriesInstanceUID=other_uid,
                          SOPInstanceUID=uid(CT_SMALL)))
    assert counts() == {other_uid: 2}
    for item in node.store.pending_dicom_instances():
        node.classify(item)
    completed = [node.complete_series(i) for i in node.store.stable_dicom_series(later())]
    assert [(s["series_uid"], s["counts"]["slices"]) for s in completed] == [(other_uid, 2)]
    assert reports(node) == [completed[0]["report"]]


# --- 4: --allow-ip on a dual-stack socket -------------------------------------------------------


def dual_stack() -> bool:
    """Whether this host can listen on :: for IPv4 peers too."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not dual_stack(), reason="no dual-stack IPv6 socket on this host")
def test_allow_ip_matches_ipv4_peers_of_a_dual_stack_listener(ct_bundle: Path,
                                                              tmp_path: Path) -> None:
    with listening(ct_bundle, tmp_path / "data", host="::", allow_ip=("127.0.0.1",)) as node:
        assoc = associate(node.address[1], ECHO)
        assert assoc.is_established
        assoc.release()
    with listening(ct_bundle, tmp_path / "data", host="::", allow_ip=("10.0.0.0/8",)) as node:
        assert associate(node.address[1], ECHO).is_rejected


# --- 5: process-wide settings --------------------------------------------------------------------


def test_a_stopped_node_leaves_no_process_wide_setting(ct_bundle: Path,
                                                       tmp_path: Path) -> None:
    """pynetdicom's chunked receiving and the temporary folder are the node's only while it runs,
    and a start that fails (the port is taken) leaves them as they were too."""
    from pynetdicom import _config

    def settings() -> tuple[bool, str | None]:
        return _config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir

    before = settings()
    with listening(ct_bundle, tmp_path / "data") as node:
        assert settings() == (True, str(node.incoming))
    assert settings() == before
    with socket.socket() as taken, Store(tmp_path / "other") as store:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = Node(NodeConfig(data_dir=tmp_path / "other", host="127.0.0.1",
                               port=taken.getsockname()[1]), Classifier.from_bundle(ct_bundle), store)
        with pytest.raises(OSError):
            node.start()
    assert settings() == before


def test_a_report_that_cannot_be_written_leaves_no_temporary_file(tmp_path: Path) -> None:
    from ct_edge.dicom_node.report import save_report

    class HalfWritten:
        SOPInstanceUID = generate_uid()

        def save_as(self, path: Path, **kwargs) -> None:
            Path(path).write_bytes(b"half a report")  # what a full disk leaves
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_report(HalfWritten(), tmp_path / "reports")
    assert list((tmp_path / "reports").iterdir()) == []


def test_a_series_from_a_bundle_without_domain_gate_is_never_ok() -> None:
    from ct_edge.classifier import NO_GATE
    from ct_edge.dicom_node.series import aggregate

    sure = {"status": "uncertain", "reason": NO_GATE,
            "probabilities": {"COVID-19": 0.98, "Normal": 0.01, "Viral Pneumonia": 0.01}}
    labels = list(sure["probabilities"])
    assert aggregate([sure] * 4, labels).status == "ok"  # the slices' caveat alone is not seen
    result = aggregate([sure] * 4, labels, caveat=NO_GATE)
    assert (result.status, result.label, result.reason) == ("uncertain", "COVID-19", NO_GATE)


# --- 6: an artifact that missed parity -----------------------------------------------------------


@pytest.mark.parametrize("status, stored", [
    ("passed", "passed"),
    ("failed: agreement 0.91 < 0.97", "failed: agreement 0.91 < 0.97"),
    ("failed\ud800", "failed\ufffd"),  # a valid JSON escape in the manifest: no crash either
])
def test_slice_rows_and_the_report_state_the_parity_status_of_the_artifact(
        status: str, stored: str, ct_bundle: Path, tmp_path: Path) -> None:
    """`listen` warned on stderr at start only: an unattended node's slice rows and series
    reports did not say that its artifact missed parity. A report of one that passed is as
    before (no parity item)."""
    bundle = Path(shutil.copytree(ct_bundle, tmp_path / "bundle"))
    name = set_default_status(bundle, status)
    classifier = Classifier.from_bundle(bundle)
    with Store(tmp_path / "data") as store:
        node = Node(NodeConfig(data_dir=tmp_path / "data"), classifier, store)
        node.classify(receive(node))
        (series_id,) = store.stable_dicom_series(later())
        series = node.complete_series(series_id)
        (row,) = store.list()
    assert (row["origin"], row["artifact"], row["artifact_parity"]) == ("dicom", name, stored)
    report = pydicom.dcmread(tmp_path / "data" / "reports" / series["report"])
    meanings = [item.ConceptNameCodeSequence[0].CodeMeaning for item in report.ContentSequence]
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
             for item in report.ContentSequence}
    assert texts["Bundle"].endswith(f"artifact {name}")
    if status == "passed":
        assert "Parity warning" not in texts and meanings[:2] == ["Disclaimer", "Series label"]
    else:
        assert meanings[:3] == ["Disclaimer", "Parity warning", "Series label"]
        assert texts["Parity warning"] == classifier.artifact.parity_warning == (
            f"artifact {name!r} has parity status {status!r}; its answers may differ from the "
            "reference model")
