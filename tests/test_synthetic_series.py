"""The synthetic CT series writer (training/synthetic_series.py): valid DICOM, one patient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from ct_edge.preprocess import PreprocessSpec, decode
from training import synthetic_series
from training.phantom import render_slice
from training.synthetic_series import (
    CT_IMAGE_STORAGE,
    finding_slices,
    lung_extent,
    main,
    write_series,
)

SLICES = 12
SIZE = 64


@pytest.fixture(scope="module")
def covid(tmp_path_factory: pytest.TempPathFactory):
    return write_series(tmp_path_factory.mktemp("series") / "covid", "COVID-19", SLICES, seed=3,
                        size=SIZE)


def test_series_is_valid_ct_image_storage(covid) -> None:
    datasets = [pydicom.dcmread(path) for path in covid.files]
    assert len(datasets) == SLICES
    assert {ds.SOPClassUID for ds in datasets} == {CT_IMAGE_STORAGE}
    assert {ds.Modality for ds in datasets} == {"CT"}
    assert {ds.StudyInstanceUID for ds in datasets} == {covid.study_uid}
    assert {ds.SeriesInstanceUID for ds in datasets} == {covid.series_uid}
    uids = [ds.SOPInstanceUID for ds in datasets]
    assert len(set(uids)) == SLICES
    for uid in [*uids, covid.study_uid, covid.series_uid]:
        assert UID(uid).is_valid
    for ds in datasets:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.RescaleSlope == 1 and ds.RescaleIntercept == -1024
        assert float(ds.PixelSpacing[0]) > 0 and ds.Rows == ds.Columns == SIZE
    locations = [float(ds.SliceLocation) for ds in datasets]
    assert locations == sorted(locations, reverse=True)  # apex first, z falls towards the feet
    assert [float(ds.ImagePositionPatient[2]) for ds in datasets] == locations
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, SLICES + 1))


def test_hounsfield_units_decode_to_the_generator_image(covid) -> None:
    """ct-edge's DICOM path (HU -> lung window) gives back what the generator drew."""
    index = covid.finding_slices[0]
    expected = render_slice("COVID-19", np.random.default_rng([3, 0, index]), SIZE,
                            lung_extent=lung_extent(index / (SLICES - 1)),
                            anatomy_seed=int(np.random.SeedSequence([3, 7919]).generate_state(1)[0]))
    decoded = np.asarray(decode(covid.files[index], PreprocessSpec()), dtype=np.float32)
    assert np.abs(decoded - expected / 255.0).max() < 1e-3
    hu = pydicom.dcmread(covid.files[index]).pixel_array.astype(float) - 1024
    assert hu.min() >= -1350 and hu.max() <= 150


def test_findings_in_a_subset_of_slices() -> None:
    sick = finding_slices("COVID-19", 60)
    assert 0 < len(sick) < 60 and sick == list(range(sick[0], sick[-1] + 1))
    assert finding_slices("Normal", 60) == []
    extents = [lung_extent(z / 59) for z in range(60)]
    assert extents[0] < 0.5 and max(extents) == 1.0 and extents[-1] < 0.7  # grow, then shrink


def test_cli_writes_a_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "s"), "--slices", "3", "--size", "48",
                 "--label", "Normal"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "s")
    assert len(list((tmp_path / "s").glob("*.dcm"))) == 3


def _series(folder: Path) -> dict[str, tuple[str, bytes]]:
    """File name -> (SeriesInstanceUID, bytes) of every entry in the folder."""
    return {p.name: (str(pydicom.dcmread(p).SeriesInstanceUID), p.read_bytes())
            for p in sorted(folder.iterdir())}


def test_a_second_run_replaces_the_earlier_series_whole(tmp_path: Path) -> None:
    out = tmp_path / "ser"
    assert main(["--out", str(out), "--slices", "3", "--size", "32"]) == 0
    assert main(["--out", str(out), "--slices", "2", "--size", "32"]) == 0
    series = _series(out)
    assert list(series) == ["slice_0001.dcm", "slice_0002.dcm"]
    assert len({uid for uid, _ in series.values()}) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ser"]


def test_an_interrupted_run_leaves_the_earlier_series(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys) -> None:
    out = tmp_path / "ser"
    write_series(out, "Normal", slices=3, size=32)
    before = _series(out)
    drawn = []

    def ctrl_c_at_the_second_slice(*args, **kwargs) -> np.ndarray:
        drawn.append(1)
        if len(drawn) == 2:
            raise KeyboardInterrupt
        return render_slice(*args, **kwargs)

    monkeypatch.setattr(synthetic_series, "render_slice", ctrl_c_at_the_second_slice)
    try:
        status = main(["--out", str(out), "--slices", "3", "--size", "32", "--seed", "5"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main: a traceback")
    assert status == 130
    assert capsys.readouterr().err.strip() == f"interrupted; {out} was left as it was"
    assert _series(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ser"]


@pytest.mark.parametrize(("argv", "problem"), [
    (["--seed", "-1"], "argument --seed: must be 0 or more, got -1"),
    (["--slices", "0"], "argument --slices: must be 1 or more, got 0"),
    (["--size", "16"], "argument --size: must be 32 or more, got 16"),
    (["--render-size", "x"], "argument --render-size: expected a whole number, got 'x'"),
])
def test_bad_numbers_are_usage_errors_naming_the_flag(argv: list[str], problem: str,
                                                      tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "ser"), *argv])
    assert exit_.value.code == 2 and problem in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_series_and_a_path_through_a_file_are_refused(
        tmp_path: Path, capsys) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("keep me")
    assert main(["--out", str(notes), "--slices", "1", "--size", "32"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: refusing to replace {notes}") and "\n" not in err
    assert [p.name for p in notes.iterdir()] == ["keep.txt"]
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["--out", str(afile / "sub" / "x"), "--slices", "1", "--size", "32"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write {afile / 'sub' / 'x'}: {afile / 'sub'}: Not a directory"


def test_help_says_out_is_required_and_every_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(required)" in text and "(default: None)" not in text
    assert text.count("(default: ") == 7  # every option but --out and --help
