"""What `ct-edge batch` sends its actors: the very bundle bytes that were verified, checked again by
each actor, with the parity warning every other command gives and --no-domain-check honoured."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from ct_edge import batch, cli
from ct_edge.batch.scorer import Scorer
from ct_edge.errors import BundleError

pytest.importorskip("pyarrow", reason="ct-edge batch needs the [ray] extra")
# In this process Ray runs without token auth (conftest's `ray_auth_disabled`).
pytestmark = pytest.mark.usefixtures("ray_auth_disabled")


# --- without a cluster -------------------------------------------------------------------


def test_actor_verifies_the_bytes_it_receives(bundle_artifact, scans) -> None:
    bundle, artifact = bundle_artifact
    payload = batch.ModelPayload.from_bundle(bundle, artifact)
    scorer = Scorer(payload)
    rows = scorer.score([scans.good[0], scans.bad[0]])
    assert rows[0]["label"] in payload.labels and rows[0]["error"] is None
    assert rows[1]["label"] is None and rows[1]["error"]

    flipped = bytes([payload.model[0] ^ 1]) + payload.model[1:]
    with pytest.raises(BundleError, match="do not match the manifest's sha256"):
        Scorer(replace(payload, model=flipped))
    with pytest.raises(BundleError, match="manifest bytes"):
        Scorer(replace(payload, manifest=payload.manifest + b" "))


def test_the_payload_is_the_very_bytes_that_were_verified(bundle_artifact, tmp_path,
                                                          monkeypatch) -> None:
    """The driver read manifest.json again after verifying the bundle: a bundle installed in
    between was sent to every actor, and named on every row, for answers it had not checked."""
    from ct_edge.bundle import Bundle

    bundle, artifact = bundle_artifact
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    manifest_bytes = (copy / "manifest.json").read_bytes()
    domain_bytes = (copy / "domain.npz").read_bytes()
    load = Bundle.load.__func__

    def load_then_install(cls, root=None):
        loaded = load(cls, root)
        newer = json.loads(manifest_bytes)
        newer["calibration"]["temperature"] = 5.0  # `make convert` installs a new bundle now
        (copy / "manifest.json").write_text(json.dumps(newer))
        return loaded

    monkeypatch.setattr(Bundle, "load", classmethod(load_then_install))
    payload = batch.ModelPayload.from_bundle(copy, artifact)
    assert payload.manifest == manifest_bytes and payload.domain == domain_bytes
    assert payload.manifest_sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    monkeypatch.undo()
    assert Scorer(payload).classifier.bundle.temperature == json.loads(manifest_bytes)[
        "calibration"]["temperature"]


def test_batch_warns_when_its_artifact_missed_parity(bundle_artifact, tmp_path, capsys,
                                                     monkeypatch) -> None:
    """The payload carries the same warning the bundle gives every other command."""
    bundle, artifact = bundle_artifact
    payload = batch.ModelPayload.from_bundle(bundle, artifact)
    assert replace(payload, artifact_status="passed").parity_warning is None
    failed = replace(payload, artifact_status="failed")
    assert failed.parity_warning == (f"artifact {artifact!r} has parity status 'failed'; its "
                                     "answers may differ from the reference model")

    def run_batch(*args, on_start, **kwargs):
        on_start(0, failed)
        return SimpleNamespace(error_samples=[], errors=0, out=tmp_path, summary=lambda: "done")

    monkeypatch.setattr(batch, "run_batch", run_batch)
    for quiet in ([], ["--quiet"]):
        assert cli.main(["batch", str(tmp_path), "--out", str(tmp_path / "out"), *quiet]) == 0
        err = capsys.readouterr().err
        assert (f"warning: {failed.parity_warning}" in err.splitlines()) == (not quiet)


def test_actors_honour_no_domain_check(bundle_artifact, tmp_path) -> None:
    """`batch --no-domain-check` reaches the actors: every readable input gets a label."""
    import numpy as np
    from PIL import Image

    bundle, artifact = bundle_artifact
    payload = batch.ModelPayload.from_bundle(bundle, artifact)
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96), np.uint8)).save(noise)
    checked, forced = Scorer(payload), Scorer(payload, domain_check=False)
    assert checked.classifier.gate is not None and forced.classifier.gate is None
    (row,) = checked.score([str(noise)])
    assert row["status"] == "out_of_domain" and row["label"] is None
    (row,) = forced.score([str(noise)])
    assert row["label"] in payload.labels and "domain check off" in row["reason"]


def test_the_summary_counts_in_words() -> None:
    def result(**fields: object) -> batch.BatchResult:
        base = dict(out=Path("res"), inputs=1, skipped=0, rows=1, errors=0, parts=1, seconds=2.0,
                    startup_seconds=0.5, actors=1, total_rows=1, complete=True)
        return batch.BatchResult(**{**base, **fields})

    assert result().summary() == ("batch: 1 row, 0 errors, 2.0 s, 0.5 images/s on 1 actor "
                                  "(+0.5 s Ray start-up); 0 already scored; 1 row in res")
    assert result(rows=0, skipped=1).summary() == (
        "batch: nothing to score: all 1 input already scored; 1 row in res")
    assert result(rows=2, errors=2, actors=0, total_rows=2).summary() == (
        "batch: 2 rows, 2 errors, no actor started (no input could be read); 0 already scored; "
        "2 rows in res")
