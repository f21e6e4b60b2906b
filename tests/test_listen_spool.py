"""`ct-edge listen`'s copies, retention and restarts: the node's steps called in a chosen order (a
node in this process that does not listen), and a start that settles what a crash or an older
version left in the spool and the store."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from listen_helpers import FIXTURES, LABELS, receive, running, wait_series

from ct_edge.dicom_node import Node, NodeConfig
from ct_edge.dicom_node.node import ABANDONED_AFTER
from ct_edge.store import Store

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
