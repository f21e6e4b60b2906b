"""`ct-edge listen`'s series results without a network: slice results aggregated into one per
series (top-k mean, out-of-domain and unreadable slices), and the store counting a resent instance
once and finding the series that are stable."""

from __future__ import annotations

from pathlib import Path

import pytest
from listen_helpers import LABELS

from ct_edge.dicom_node.series import aggregate, top_k
from ct_edge.store import Store

# --- series aggregation (no network) -----------------------------------------------------------


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
