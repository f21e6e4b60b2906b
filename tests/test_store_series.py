"""DICOM series in the results store: live progress counts, slice locations, a series an instance
moves out of, and `ct-edge results --series` with its filters."""

from __future__ import annotations

import json
from pathlib import Path

from ct_edge.store import Store


def test_series_progress_counts_each_instance_once_and_live(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        def receive(n: int) -> int:
            return store.add_dicom_instance(sop_instance_uid=f"1.9.{n}", study_uid="1.9",
                                            series_uid="1.9.1", spool_path=f"{n}.dcm", nbytes=10)

        ids = [receive(n) for n in range(4)]
        store.add_dicom_result(ids[0], source="a", status="ok", label="Normal",
                               probabilities={"Normal": 0.9, "COVID-19": 0.1})
        store.add_dicom_result(ids[1], source="b", status="out_of_domain", reason="modality MR")
        store.add_dicom_result(ids[2], source="c", status=None, error="cannot decode")
        series_id = store.get_dicom_series(series_uid="1.9.1")["id"]
        empty = dict.fromkeys(("slices", "waiting", "ok", "uncertain", "out_of_domain",
                               "unreadable"), 0)
        assert store.dicom_series_progress([series_id, series_id + 1]) == {
            series_id: {"slices": 4, "waiting": 1, "ok": 1, "uncertain": 0, "out_of_domain": 1,
                        "unreadable": 1},
            series_id + 1: empty}
        receive(0)  # sent again: replaces the classified copy, waits again, counts once
        assert store.dicom_series_progress([series_id])[series_id] == {
            "slices": 4, "waiting": 2, "ok": 0, "uncertain": 0, "out_of_domain": 1,
            "unreadable": 1}
        assert store.count_dicom_series() == 1
        assert store.dicom_series_progress([]) == {}


def test_a_slice_result_records_the_artifact_parity_status(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        ids = [store.add_dicom_instance(sop_instance_uid=f"1.8.{n}", study_uid="1.8",
                                        series_uid="1.8.1", spool_path=f"{n}.dcm", nbytes=1)
               for n in range(2)]
        failed = store.add_dicom_result(ids[0], source="a", status="ok", label="Normal",
                                        artifact="tflite-int8", artifact_parity="failed: accuracy")
        unknown = store.add_dicom_result(ids[1], source="b", status=None, error="cannot decode")
        assert store.get(failed)["artifact_parity"] == "failed: accuracy"
        assert store.get(unknown)["artifact_parity"] is None


def test_a_slice_location_stored_as_infinity_reads_as_absent(tmp_path: Path) -> None:
    """Stores written before the header check refused infinity must not fail every JSON answer
    about the series."""
    with Store(tmp_path) as store:
        store.add_dicom_instance(sop_instance_uid="1.2.3.1", study_uid="1.2", series_uid="1.2.3",
                                 spool_path="1.dcm", nbytes=1, slice_location=float("inf"))
        series_id = store.get_dicom_series(series_uid="1.2.3")["id"]
        (only,) = store.dicom_series_slices(series_id)
        assert only["slice_location"] is None
        json.dumps(only, allow_nan=False)


def test_a_completed_series_an_instance_moves_out_of_completes_again(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        for number in (1, 2):
            store.add_dicom_instance(sop_instance_uid=f"1.2.3.{number}", study_uid="1.2",
                                     series_uid="1.2.3", spool_path=f"{number}.dcm", nbytes=1)
        left = store.get_dicom_series(series_uid="1.2.3")["id"]
        store.complete_dicom_series(left, status="ok", label="Normal",
                                    probabilities={"Normal": 1.0}, reason=None, aggregate="mean",
                                    counts={"slices": 2})
        store.add_dicom_instance(sop_instance_uid="1.2.3.2", study_uid="1.2", series_uid="1.2.4",
                                 spool_path="2b.dcm", nbytes=1)
        series = store.get_dicom_series(left)
        assert (series["state"], series["instances"]) == ("receiving", 1)  # its result counted 2


# --- `ct-edge results` -------------------------------------------------------------------------


def test_results_command_series_view(tmp_path: Path, capsys) -> None:
    from ct_edge import cli

    Store(tmp_path).close()
    assert cli.main(["results", "--data-dir", str(tmp_path), "--series"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "no DICOM series stored"


def test_results_command_series_filters_by_status_and_label(tmp_path: Path, capsys) -> None:
    from ct_edge import cli

    with Store(tmp_path) as store:
        for n, (status, label) in enumerate([("ok", "Normal"), ("uncertain", "COVID-19")]):
            store.add_dicom_instance(sop_instance_uid=f"1.5.{n}.1", study_uid="1.5",
                                     series_uid=f"1.5.{n}", spool_path=f"{n}.dcm", nbytes=1)
            series_id = store.get_dicom_series(series_uid=f"1.5.{n}")["id"]
            store.complete_dicom_series(series_id, status=status, label=label,
                                        probabilities={label: 0.6}, reason=None,
                                        aggregate="mean", counts={"slices": 1})
        store.add_dicom_instance(sop_instance_uid="1.5.9.1", study_uid="1.5",
                                 series_uid="1.5.9", spool_path="9.dcm", nbytes=1)  # receiving

    def listed(*args: str) -> list[str]:
        assert cli.main(["results", "--data-dir", str(tmp_path), "--series", "--json",
                         *args]) == 0
        return [json.loads(line)["series_uid"] for line in capsys.readouterr().out.splitlines()]

    assert listed() == ["1.5.9", "1.5.1", "1.5.0"]
    assert listed("--status", "ok") == ["1.5.0"]
    assert listed("--status", "uncertain") == ["1.5.1"]
    assert listed("--label", "COVID-19") == ["1.5.1"]
    assert listed("--status", "ok", "--label", "COVID-19") == []
