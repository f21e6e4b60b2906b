"""What the `ct-edge listen` tests share: the node as its own process, the DICOM senders
(pynetdicom's and DCMTK's), waiting for a series in the results store, and DICOM files made for a
test. DCMTK parts are skipped, with the reason, when `storescu` is not installed
(`tools/setup_system.sh` installs it)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from ct_edge.dicom_node import Node
from ct_edge.dicom_node.header import read_header
from ct_edge.store import Store

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
FIXTURES = Path(__file__).parent / "fixtures"
LABELS = ("COVID-19", "Normal", "Viral Pneumonia")


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


def recorded_as(tiny_bundle: Path, bundle: Path, modality: str | None) -> Path:
    """A copy of the tiny test bundle whose manifest records `modality` (None: no modality),
    without a feature gate: these tests are about the node (transport, spool, store, series,
    header rules); the domain gate has its own tests."""
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["domain"] = {} if modality is None else {"modality": modality}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return bundle


def association(port: int, calling: str = "PYTEST", called: str = AE,
                contexts: tuple[str, ...] = ("1.2.840.10008.5.1.4.1.1.2",)):
    from pynetdicom import AE as Entity

    entity = Entity(ae_title=calling)
    for context in contexts:
        entity.add_requested_context(context, "1.2.840.10008.1.2.1")
    return entity.associate("127.0.0.1", port, ae_title=called)


def receive(node: Node, source: Path = FIXTURES / "ct_small.dcm") -> dict:
    """What the C-STORE handler does with a dataset pynetdicom streamed to a file: its queue item."""
    node.incoming.mkdir(parents=True, exist_ok=True)
    streamed = node.incoming / generate_uid()
    shutil.copyfile(source, streamed)
    return node.keep(streamed, read_header(streamed), calling="PYTEST", peer="127.0.0.1:104")
