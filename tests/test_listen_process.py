"""`ct-edge listen` as a process: who may connect (called and calling AE titles, addresses, free
disk), the command line and start-up failures, kill -9 mid-transfer, mutual TLS and spool
retention, forwarding each series' report, and the parity warning."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from bundle_helpers import set_default_status
from listen_helpers import (
    AE,
    DCMTK,
    DCMTK_TOOLS,
    Listener,
    association,
    dcmtk,
    needs_dcmtk,
    pynetdicom_tool,
    running,
    wait_series,
)

from ct_edge.store import Store
from training.synthetic_series import write_series


def test_called_ae_calling_ae_and_address_checks(ct_bundle: Path, tmp_path: Path) -> None:
    with running(ct_bundle, tmp_path / "data", "--allow-ae", "SCANNER,PACS",
                 "--allow-ip", "127.0.0.0/8") as listener:
        allowed = association(listener.port, calling="SCANNER")
        assert allowed.is_established
        allowed.release()
        stranger = association(listener.port, calling="STRANGER")
        assert stranger.is_rejected
        assert association(listener.port, calling="SCANNER", called="OTHERNODE").is_rejected
        if DCMTK:
            assert dcmtk("echoscu", listener.port, calling="STRANGER").returncode != 0
            assert dcmtk("echoscu", listener.port, calling="PACS").returncode == 0
        assert pynetdicom_tool("echoscu", listener.port, calling="STRANGER").returncode != 0
        held = association(listener.port, calling="PACS")  # left open: SIGTERM still ends it
        assert held.is_established
        assert listener.stop() == 0
        log = listener.log()
    assert "rejected: calling AE title 'STRANGER' is not allowed" in log
    assert "rejected: called AE title 'OTHERNODE' is not 'CTEDGE'" in log
    with running(ct_bundle, tmp_path / "data", "--allow-ip", "10.0.0.0/8") as listener:
        assert association(listener.port).is_rejected
        assert "rejected: address 127.0.0.1 is not allowed" in listener.log()
    # No disk is this large: every association is refused (transient, local limit exceeded).
    with running(ct_bundle, tmp_path / "data", "--min-free-mb", str(2**40)) as listener:
        assert association(listener.port).is_rejected
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
            assoc = association(listener.port)
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
        assoc = association(restarted.port)
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
        assert not association(listener.port).is_established  # plain TCP: no association
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


def test_listen_warns_when_its_artifact_missed_parity(ct_bundle: Path, tmp_path: Path) -> None:
    """`classify` warned about such an artifact; `listen` ran it silently (also with --quiet,
    which keeps warnings)."""
    bundle = Path(shutil.copytree(ct_bundle, tmp_path / "bundle"))
    name = set_default_status(bundle)
    with running(bundle, tmp_path / "data", "--quiet") as listener:
        log = listener.log()
    assert (f"warning: artifact {name!r} has parity status 'failed'; its answers may "
            "differ from the reference model") in log.splitlines()
