"""`ct-edge listen`: real associations on 127.0.0.1 with pynetdicom's and DCMTK's senders.

The node runs as its own process (`python -m ct_edge.cli listen`), as on a device; the tests read
its results store. DCMTK parts are skipped, with the reason, when `storescu` is not installed
(`tools/setup_system.sh` installs it).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from ct_edge.dicom import DicomInfo
from ct_edge.dicom_node import Node, NodeConfig
from ct_edge.dicom_node.contexts import storage_classes
from ct_edge.dicom_node.header import read_header
from ct_edge.dicom_node.node import ABANDONED_AFTER
from ct_edge.dicom_node.series import aggregate, top_k
from ct_edge.domain import MODALITIES, NEUTRAL_MODALITIES, SECONDARY_CAPTURE_CLASSES
from ct_edge.store import Store
from training.synthetic_series import write_series

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
FIXTURES = Path(__file__).parent / "fixtures"


def dcmtk_tool(name: str) -> str | None:
    """DCMTK's `name` on PATH, not pynetdicom's command of the same name in this environment."""
    scripts = Path(sysconfig.get_path("scripts")).resolve()
    folders = [p for p in os.environ.get("PATH", "").split(os.pathsep)
               if p and Path(p).resolve() != scripts]
    return shutil.which(name, path=os.pathsep.join(folders))


DCMTK_TOOLS = {name: dcmtk_tool(name) for name in ("storescu", "echoscu", "storescp")}
DCMTK = all(DCMTK_TOOLS.values())
needs_dcmtk = pytest.mark.skipif(not DCMTK, reason="DCMTK storescu/echoscu/storescp not installed "
                                                   "(apt-get install dcmtk; tools/setup_system.sh)")
STABLE = "1"
AE = "CTEDGE"


class Listener:
    """`ct-edge listen` in a child process on a free port of 127.0.0.1."""

    def __init__(self, bundle: Path, data_dir: Path, *extra: str) -> None:
        self.bundle, self.data_dir, self.extra = bundle, data_dir, extra
        self.log_path = data_dir.with_name(f"{data_dir.name}-{time.monotonic_ns()}.log")
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> Listener:
        command = [sys.executable, "-m", "ct_edge.cli", "listen", "--bundle", str(self.bundle),
                   "--host", "127.0.0.1", "--port", "0", "--data-dir", str(self.data_dir),
                   "--stable-seconds", STABLE, *self.extra]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            match = re.search(r"on 127\.0\.0\.1:(\d+)", self.log())
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"ct-edge listen did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def running(bundle: Path, data_dir: Path, *extra: str) -> Iterator[Listener]:
    node = Listener(bundle, data_dir, *extra).start()
    try:
        yield node
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()


def wait_series(data_dir: Path, series_uid: str, instances: int | None = None,
                timeout: float = 120) -> dict:
    """The series once complete (with `instances` received, when given)."""
    deadline = time.monotonic() + timeout
    with Store(data_dir) as store:
        while time.monotonic() < deadline:
            series = store.get_dicom_series(series_uid=series_uid)
            if series and series["state"] == "complete" and \
                    (instances is None or series["instances"] == instances):
                return series
            time.sleep(0.2)
        raise AssertionError(f"series {series_uid} not complete: {series}")


def pynetdicom_tool(tool: str, port: int, *args: str, calling: str = "PYSCU") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pynetdicom", tool, "127.0.0.1", str(port), *args,
                           "-aec", AE, "-aet", calling], capture_output=True, text=True,
                          timeout=300)


def dcmtk(tool: str, port: int, *args: str, calling: str = "DCMTKSCU") -> subprocess.CompletedProcess:
    return subprocess.run([DCMTK_TOOLS[tool], "-aec", AE, "-aet", calling, "127.0.0.1", str(port),
                           *args],
                          capture_output=True, text=True, timeout=300)


def series_of(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


def rewrite(source: Path, target: Path, **changes: object) -> Path:
    """A copy of a DICOM file with some attributes changed (and a new SOP instance UID)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for key, value in changes.items():
        setattr(ds, key, value)
    if "SOPClassUID" in changes:
        ds.file_meta.MediaStorageSOPClassUID = changes["SOPClassUID"]
    ds.save_as(target, enforce_file_format=True)
    return target


# --- series aggregation (no network) -----------------------------------------------------------

LABELS = ("COVID-19", "Normal", "Viral Pneumonia")


def _slice(covid: float, normal: float, status: str = "ok") -> dict:
    return {"status": status, "probabilities": {"COVID-19": covid, "Normal": normal,
                                                "Viral Pneumonia": 1 - covid - normal}}


def test_topk_mean_finds_findings_in_a_tenth_of_the_slices() -> None:
    slices = [_slice(0.9, 0.05)] * 3 + [_slice(0.02, 0.95)] * 27
    result = aggregate(slices, LABELS, "topk-mean")
    assert result.counts["k"] == top_k(30, "topk-mean") == 3
    assert result.label == "COVID-19" and result.status == "ok"
    assert abs(sum(result.probabilities.values()) - 1) < 1e-9
    mean = aggregate(slices, LABELS, "mean")  # diluted by the 27 clear slices
    assert mean.label == "Normal" and mean.counts["k"] == 30
    assert aggregate([_slice(0.02, 0.95)] * 30, LABELS, "max").label == "Normal"


def test_out_of_domain_and_unreadable_slices_are_excluded_and_counted() -> None:
    ood = {"status": "out_of_domain", "reason": "modality MR; this bundle accepts CT",
           "probabilities": {}}
    unreadable = {"status": None, "error": "truncated", "probabilities": {}}
    result = aggregate([_slice(0.1, 0.8)] * 4 + [ood] * 2 + [unreadable], LABELS)
    assert result.label == "Normal" and result.counts == {
        "slices": 7, "used": 4, "ok": 4, "uncertain": 0, "out_of_domain": 2, "unreadable": 1,
        "k": 1}
    mostly = aggregate([_slice(0.1, 0.8)] * 2 + [ood] * 3, LABELS)
    assert mostly.status == "out_of_domain" and mostly.label is None
    assert "3 of 5 slices out of domain (modality MR" in mostly.reason
    assert aggregate([unreadable], LABELS).status is None
    low = aggregate([_slice(0.4, 0.35)], LABELS, "mean", uncertain_below=0.5)
    assert low.status == "uncertain" and "below 50%" in low.reason
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate([], LABELS, "median")


def test_store_counts_a_resent_instance_once_and_finds_stable_series(tmp_path: Path) -> None:
    from datetime import datetime, timedelta, timezone

    with Store(tmp_path) as store:
        def receive(sop: str, series: str) -> int:
            return store.add_dicom_instance(sop_instance_uid=sop, study_uid="1.2", series_uid=series,
                                            spool_path=f"spool/{sop}.dcm", nbytes=100,
                                            modality="CT")

        first = receive("1.2.3.1", "1.2.3")
        assert receive("1.2.3.1", "1.2.3") == first  # sent again: the same row, received again
        receive("1.2.3.2", "1.2.3")
        receive("1.2.4.1", "1.2.4")
        assert [s["id"] for s in store.list_dicom_series()] == [2, 1]  # no gaps in the ids
        assert store.get_dicom_series(series_uid="1.2.3")["instances"] == 2
        later = datetime.now(timezone.utc) + timedelta(seconds=1)
        assert store.stable_dicom_series(later) == []  # instances not classified yet
        for item in store.pending_dicom_instances():
            store.add_dicom_result(item["id"], source="x", status="ok", label="Normal",
                                   probabilities={"Normal": 0.9})
        assert store.stable_dicom_series(later) == [1, 2]
        assert store.stable_dicom_series(later - timedelta(seconds=60)) == []
        assert {s["result_id"] is not None for s in store.dicom_series_slices(1)} == {True}
        # Oldest first, the newest kept; a claimed file is no instance's any more.
        assert store.claim_dicom_spool_over(150) == ["spool/1.2.3.1.dcm", "spool/1.2.3.2.dcm"]
        assert store.claim_dicom_spool_over(150) == []
        assert store.dicom_spool_paths() == {"spool/1.2.4.1.dcm"}
        assert store.dicom_spool_path("1.2.3.1") is None
        # A result computed from a copy the instance no longer holds is not stored.
        receive("1.2.4.1", "1.2.4")
        before = store.count()
        assert store.add_dicom_result(3, spool_path="spool/old.dcm", source="x", status="ok") is None
        assert store.count() == before and store.pending_dicom_instances()[0]["id"] == 3
        assert store.add_dicom_result(3, spool_path="spool/1.2.4.1.dcm", source="x", status="ok")


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


def recorded_as(tiny_bundle: Path, bundle: Path, modality: str | None) -> Path:
    """A copy of the tiny test bundle whose manifest records `modality` (None: no modality),
    without a feature gate: these tests are about the node (transport, spool, store, series,
    header rules); the domain gate has its own tests."""
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["domain"] = {} if modality is None else {"modality": modality}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return bundle


@pytest.fixture(scope="module")
def ct_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recorded_as(tiny_bundle, tmp_path_factory.mktemp("ct-bundle") / "bundle", "ct")


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


def _association(port: int, calling: str = "PYTEST", called: str = AE,
                 contexts: tuple[str, ...] = ("1.2.840.10008.5.1.4.1.1.2",)):
    from pynetdicom import AE as Entity

    entity = Entity(ae_title=calling)
    for context in contexts:
        entity.add_requested_context(context, "1.2.840.10008.1.2.1")
    return entity.associate("127.0.0.1", port, ae_title=called)


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
        assoc = _association(node.port)
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
    assoc = _association(node.port)
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


def test_called_ae_calling_ae_and_address_checks(ct_bundle: Path, tmp_path: Path) -> None:
    with running(ct_bundle, tmp_path / "data", "--allow-ae", "SCANNER,PACS",
                 "--allow-ip", "127.0.0.0/8") as listener:
        allowed = _association(listener.port, calling="SCANNER")
        assert allowed.is_established
        allowed.release()
        stranger = _association(listener.port, calling="STRANGER")
        assert stranger.is_rejected
        assert _association(listener.port, calling="SCANNER", called="OTHERNODE").is_rejected
        if DCMTK:
            assert dcmtk("echoscu", listener.port, calling="STRANGER").returncode != 0
            assert dcmtk("echoscu", listener.port, calling="PACS").returncode == 0
        assert pynetdicom_tool("echoscu", listener.port, calling="STRANGER").returncode != 0
        held = _association(listener.port, calling="PACS")  # left open: SIGTERM still ends it
        assert held.is_established
        assert listener.stop() == 0
        log = listener.log()
    assert "rejected: calling AE title 'STRANGER' is not allowed" in log
    assert "rejected: called AE title 'OTHERNODE' is not 'CTEDGE'" in log
    with running(ct_bundle, tmp_path / "data", "--allow-ip", "10.0.0.0/8") as listener:
        assert _association(listener.port).is_rejected
        assert "rejected: address 127.0.0.1 is not allowed" in listener.log()
    # No disk is this large: every association is refused (transient, local limit exceeded).
    with running(ct_bundle, tmp_path / "data", "--min-free-mb", str(2**40)) as listener:
        assert _association(listener.port).is_rejected
        assert "rejected: low disk space" in listener.log()


def test_help_and_bad_arguments() -> None:
    run = [sys.executable, "-m", "ct_edge.cli", "listen"]
    shown = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "storescu -aec CTEDGE" in shown.stdout
    for bad in (["--ae-title", "A" * 17], ["--allow-ip", "10.0.0.300/8"], ["--port", "70000"],
                ["--forward", "nohost"], ["--tls-cert", "x.pem"]):
        result = subprocess.run([*run, *bad], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, bad
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_unusable_spool_and_a_port_in_use_are_named(ct_bundle: Path, tmp_path: Path) -> None:
    """Each start-up failure says what failed, in one line, exit 2."""
    run = [sys.executable, "-m", "ct_edge.cli", "listen", "--bundle", str(ct_bundle),
           "--host", "127.0.0.1"]
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "spool").write_text("a file where the spool folder goes")
    result = subprocess.run([*run, "--port", "0", "--data-dir", str(blocked)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == \
        [f"error: cannot use {blocked / 'spool' / '.incoming'}: Not a directory"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*run, "--port", str(port), "--data-dir", str(tmp_path / "free")],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == \
        [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]


@pytest.mark.slow
def test_kill_9_during_a_transfer_loses_no_acknowledged_instance(ct_bundle: Path,
                                                                 tmp_path: Path) -> None:
    """kill -9 of the node while a sender is mid-series; every instance it acknowledged is on disk
    and in the store, and a restart classifies them and completes the series."""
    info = write_series(tmp_path / "series", "COVID-19", slices=120, seed=5, size=128)
    data_dir = tmp_path / "data"
    acknowledged: list[str] = []
    listener = Listener(ct_bundle, data_dir).start()

    def send() -> None:
        with contextlib.suppress(Exception):  # the association dies with the node
            assoc = _association(listener.port)
            for path in info.files:
                status = assoc.send_c_store(path)
                if getattr(status, "Status", None) != 0x0000:
                    return
                acknowledged.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 120
    while len(acknowledged) < 40 and time.monotonic() < deadline and sender.is_alive():
        time.sleep(0.01)
    os.kill(listener.proc.pid, signal.SIGKILL)
    listener.proc.wait(timeout=30)
    sender.join(timeout=120)
    assert 40 <= len(acknowledged) < 120
    with Store(data_dir) as store:
        series = store.get_dicom_series(series_uid=info.series_uid)
        stored = {s["sop_instance_uid"] for s in store.dicom_series_slices(series["id"])}
    assert set(acknowledged) <= stored  # nothing acknowledged is missing
    restarted = Listener(ct_bundle, data_dir).start()
    try:
        done = wait_series(data_dir, info.series_uid)
        assert done["instances"] == len(stored)
        with Store(data_dir) as store:
            slices = store.dicom_series_slices(done["id"])
        assert all(s["state"] == "classified" and s["status"] for s in slices)
        with Store(data_dir) as store:
            spooled = {uid: data_dir / store.dicom_spool_path(uid) for uid in acknowledged}
        for uid, path in spooled.items():
            assert pydicom.dcmread(path).SOPInstanceUID == uid
        # The sender resends the whole series; the node counts every instance once.
        assoc = _association(restarted.port)
        for path in info.files:
            assert assoc.send_c_store(path).Status == 0x0000
        assoc.release()
        assert wait_series(data_dir, info.series_uid, instances=120)["counts"]["slices"] == 120
    finally:
        restarted.stop()


def _certificates(folder: Path) -> dict[str, Path]:
    """A test CA, a node certificate for 127.0.0.1 and a sender certificate (openssl CLI)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=ct-edge test CA")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, subject in (("node", "/CN=127.0.0.1"), ("sender", "/CN=scanner")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", subject)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf")
    return {name: folder / name for name in ("ca.pem", "node.pem", "node.key", "sender.pem",
                                             "sender.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_mutual_tls_and_spool_retention(ct_bundle: Path, tmp_path: Path) -> None:
    import ssl

    from pynetdicom import AE as Entity

    certs = _certificates(tmp_path)
    info = write_series(tmp_path / "series", "Normal", slices=10, seed=6, size=64)
    one_file = info.files[0].stat().st_size
    with running(ct_bundle, tmp_path / "data", "--tls-cert", str(certs["node.pem"]),
                 "--tls-key", str(certs["node.key"]), "--tls-ca", str(certs["ca.pem"]),
                 "--spool-max-mb", str(3.5 * one_file / 2**20)) as listener:
        client = ssl.create_default_context(cafile=str(certs["ca.pem"]))
        client.load_cert_chain(str(certs["sender.pem"]), str(certs["sender.key"]))
        entity = Entity(ae_title="SCANNER")
        entity.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = entity.associate("127.0.0.1", listener.port, ae_title=AE,
                                 tls_args=(client, "127.0.0.1"))
        assert assoc.is_established
        for path in info.files:
            assert assoc.send_c_store(path).Status == 0x0000
        assoc.release()
        # Without a certificate signed by the CA the handshake fails: no association.
        anonymous = ssl.create_default_context(cafile=str(certs["ca.pem"]))
        refused = entity.associate("127.0.0.1", listener.port, ae_title=AE,
                                   tls_args=(anonymous, "127.0.0.1"))
        assert not refused.is_established
        assert not _association(listener.port).is_established  # plain TCP: no association
        series = wait_series(listener.data_dir, info.series_uid, instances=10)
        deadline = time.monotonic() + 30
        while len(list((listener.data_dir / "spool").rglob("*.dcm"))) > 3 and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(list((listener.data_dir / "spool").rglob("*.dcm"))) <= 3
        with Store(listener.data_dir) as store:
            slices = store.dicom_series_slices(series["id"])
        assert len(slices) == 10 and all(s["status"] for s in slices)  # results stay
        assert "over TLS" in listener.log() and "retention: removed" in listener.log()


@needs_dcmtk
def test_series_report_is_forwarded(ct_bundle: Path, tmp_path: Path) -> None:
    """--forward sends each series' Basic Text SR by C-STORE (here to DCMTK's storescp)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    received = tmp_path / "received"
    received.mkdir()
    receiver = subprocess.Popen([DCMTK_TOOLS["storescp"], "-aet", "RESEARCHPACS", "-od", str(received),
                                 str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        info = write_series(tmp_path / "series", "Normal", slices=5, seed=7, size=64)
        with running(ct_bundle, tmp_path / "data", "--forward",
                     f"RESEARCHPACS@127.0.0.1:{port}") as listener:
            assert dcmtk("storescu", listener.port, *map(str, info.files)).returncode == 0
            series = wait_series(listener.data_dir, info.series_uid, instances=5)
            deadline = time.monotonic() + 60
            # The receiver writes the file before the node logs the C-STORE's answer: wait for both.
            while time.monotonic() < deadline and not (
                    list(received.iterdir()) and "forwarded to RESEARCHPACS" in listener.log()):
                time.sleep(0.2)
            log = listener.log()
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)
    (forwarded,) = list(received.iterdir())
    report = pydicom.dcmread(forwarded)
    assert report.SOPInstanceUID == series["report"].removesuffix(".dcm")
    assert report.VerificationFlag == "UNVERIFIED" and report.StudyInstanceUID == info.study_uid
    assert "forwarded to RESEARCHPACS@127.0.0.1" in log and "status 0x0000" in log


# --- copies, retention and restarts: the node's steps called in a chosen order -----------------


@pytest.fixture
def local_node(ct_bundle: Path, tmp_path: Path) -> Iterator[Node]:
    """A node in this process that does not listen (spool limit 1 byte: retention takes every
    classified copy); the tests call its steps themselves."""
    from ct_edge.classifier import Classifier

    data_dir = tmp_path / "data"
    with Store(data_dir) as store:
        yield Node(NodeConfig(data_dir=data_dir, spool_max_bytes=1),
                   Classifier.from_bundle(ct_bundle), store)


def test_the_node_stamps_the_manifest_it_loaded_not_one_installed_since(ct_bundle: Path,
                                                                          tmp_path: Path) -> None:
    """The node hashed manifest.json again after Classifier.from_bundle had parsed it: a bundle
    installed in between was named on every series and report of the one that answered."""
    import hashlib

    from ct_edge.classifier import Classifier

    bundle = Path(shutil.copytree(ct_bundle, tmp_path / "bundle"))
    loaded = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    classifier = Classifier.from_bundle(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["calibration"]["temperature"] = 5.0  # `make convert` installs a new bundle now
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with Store(tmp_path / "data") as store:
        node = Node(NodeConfig(data_dir=tmp_path / "data"), classifier, store)
        assert node.bundle_sha256 == loaded == classifier.bundle.manifest_sha256


def test_listen_warns_when_its_artifact_missed_parity(ct_bundle: Path, tmp_path: Path) -> None:
    """`classify` warned about such an artifact; `listen` ran it silently (also with --quiet,
    which keeps warnings)."""
    bundle = Path(shutil.copytree(ct_bundle, tmp_path / "bundle"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["name"] == manifest["default"])
    entry["status"] = "failed"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with running(bundle, tmp_path / "data", "--quiet") as listener:
        log = listener.log()
    assert (f"warning: artifact {entry['name']!r} has parity status 'failed'; its answers may "
            "differ from the reference model") in log.splitlines()


def receive(node: Node, source: Path = FIXTURES / "ct_small.dcm") -> dict:
    """What the C-STORE handler does with a dataset pynetdicom streamed to a file: its queue item."""
    node.incoming.mkdir(parents=True, exist_ok=True)
    streamed = node.incoming / generate_uid()
    shutil.copyfile(source, streamed)
    return node.keep(streamed, read_header(streamed), calling="PYTEST", peer="127.0.0.1:104")


def spooled(node: Node) -> list[str]:
    return sorted(p.relative_to(node.config.data_dir).as_posix() for p in node.spool.glob("*/*.dcm"))


def test_retention_never_deletes_a_copy_received_while_it_runs(local_node: Node,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention has claimed a classified instance's file; the instance arrives again and is
    acknowledged before the file is deleted: the new copy stays and is classified."""
    node = local_node
    node.classify(receive(node))
    claim, again = node.store.claim_dicom_spool_over, {}

    def claim_then_receive(max_bytes: int) -> list[str]:
        claimed = claim(max_bytes)
        again.update(receive(node))
        return claimed

    monkeypatch.setattr(node.store, "claim_dicom_spool_over", claim_then_receive)
    node.retain_spool()
    assert spooled(node) == [again["spool_path"]]
    (pending,) = node.store.pending_dicom_instances()
    assert pending["spool_path"] == again["spool_path"]
    node.classify(pending)
    (one,) = node.store.dicom_series_slices(pending["series_id"])
    assert one["state"] == "classified" and one["error"] is None and one["label"] in LABELS


def test_a_superseded_copy_never_answers_for_the_newer_one(local_node: Node) -> None:
    """An instance received twice before the worker reached it: the first copy's item neither
    stores a result nor marks the instance classified, so retention cannot take the newer copy
    before it is classified; the earlier file goes as soon as the newer one is recorded."""
    node = local_node
    first, second = receive(node), receive(node)
    assert spooled(node) == [second["spool_path"]]
    node.classify(first)
    assert node.store.count() == 0 and len(node.store.pending_dicom_instances()) == 1
    node.retain_spool()  # nothing classified: nothing to take
    assert spooled(node) == [second["spool_path"]]
    node.classify(second)
    (series,) = node.store.list_dicom_series()
    (one,) = node.store.dicom_series_slices(series["id"])
    assert series["instances"] == 1 and node.store.count() == 1
    assert one["state"] == "classified" and one["error"] is None and one["label"] in LABELS
    node.retain_spool()
    assert spooled(node) == [] and node.store.dicom_series_slices(series["id"])[0]["label"]


def test_a_start_settles_what_a_crash_or_an_older_version_left(ct_bundle: Path,
                                                                tmp_path: Path) -> None:
    """An instance left 'received' without a spool file (an older version's retention) is
    recorded unreadable and its series completes, unless its copy is on disk under the older
    version's name (then it is classified); spool files no instance refers to (a crash
    between spooling and recording, or between a claim and its deletion) are removed once older
    than ABANDONED_AFTER; the files instances refer to stay."""
    data_dir = tmp_path / "data"
    folder = data_dir / "spool" / "1.2.3"
    folder.mkdir(parents=True)
    for name in ("kept.dcm", "orphan.dcm", "young.dcm"):
        shutil.copyfile(FIXTURES / "ct_small.dcm", folder / name)
    past = time.time() - ABANDONED_AFTER - 60
    for name in ("kept.dcm", "orphan.dcm"):
        os.utime(folder / name, (past, past))
    # An older version's copy under its old name, whose instance lost its record of it.
    (data_dir / "spool" / "1.2.5").mkdir()
    old_name = data_dir / "spool" / "1.2.5" / "1.2.5.1.dcm"
    shutil.copyfile(FIXTURES / "ct_small.dcm", old_name)
    os.utime(old_name, (past, past))
    with Store(data_dir) as store:
        for sop, series in (("1.2.3.1", "1.2.3"), ("1.2.4.1", "1.2.4"), ("1.2.5.1", "1.2.5")):
            store.add_dicom_instance(sop_instance_uid=sop, study_uid="1.2", series_uid=series,
                                     spool_path="spool/1.2.3/kept.dcm", nbytes=100, modality="CT")
    with contextlib.closing(sqlite3.connect(data_dir / "results.sqlite3")) as db, db:
        db.execute("UPDATE dicom_instances SET spool_path = NULL "
                   "WHERE sop_instance_uid IN ('1.2.4.1', '1.2.5.1')")
    with running(ct_bundle, data_dir) as listener:
        lost = wait_series(data_dir, "1.2.4")
        kept = wait_series(data_dir, "1.2.3")
        found = wait_series(data_dir, "1.2.5")
        log = listener.log()
    assert lost["status"] is None and lost["counts"]["unreadable"] == 1
    assert kept["counts"]["used"] == 1
    assert found["counts"]["used"] == 1 and old_name.is_file()
    assert "instance 1.2.5.1: its copy 1.2.5.1.dcm is kept" in log
    with Store(data_dir) as store:
        (one,) = store.dicom_series_slices(lost["id"])
    assert one["error"] == "spool file unreadable (no spool file recorded)"
    assert sorted(p.name for p in folder.iterdir()) == ["kept.dcm", "young.dcm"]
    assert "removed 1 spool files no instance refers to" in log


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
