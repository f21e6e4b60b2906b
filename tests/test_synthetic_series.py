"""The synthetic CT series writer (training/synthetic_series.py): valid DICOM, one patient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from ct_edge.preprocess import PreprocessSpec, decode
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
    assert main(["--out", str(tmp_path / "t"), "--slices", "0"]) == 1
