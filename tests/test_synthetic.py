"""Tests for the built-in synthetic chest CT data set (training/synthetic.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import synthetic
from training.phantom import CLASSES, render_slice
from training.synthetic import generate_dataset, main

SIZE = 96
REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return generate_dataset(root, train_per_class=3, test_per_class=2, seed=7, size=SIZE)


def test_classes_are_the_project_labels() -> None:
    assert CLASSES == ("COVID-19", "Normal", "Viral Pneumonia")


@pytest.mark.parametrize("label", CLASSES)
@pytest.mark.parametrize("size", [64, SIZE])
def test_render_slice_is_a_plausible_uint8_slice(label: str, size: int) -> None:
    img = render_slice(label, _rng(1, 2), size)
    assert img.dtype == np.uint8
    assert img.shape == (size, size)
    # Dark air in the corners, a much brighter body in the middle, and bright bone somewhere.
    corners = np.concatenate([img[:4, :4].ravel(), img[:4, -4:].ravel()])
    centre = img[size // 3 : 2 * size // 3, size // 3 : 2 * size // 3]
    assert corners.mean() < 40
    assert centre.mean() > corners.mean() + 40
    assert img.max() > 180


def test_render_slice_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        render_slice("Bacterial Pneumonia", _rng(0), SIZE)
    with pytest.raises(ValueError):
        render_slice("Normal", _rng(0), 8)


def test_render_slice_is_deterministic_per_rng_seed() -> None:
    a = render_slice("COVID-19", _rng(3, 4), SIZE)
    b = render_slice("COVID-19", _rng(3, 4), SIZE)
    c = render_slice("COVID-19", _rng(3, 5), SIZE)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


def test_same_seed_differs_between_classes_only_in_the_lungs() -> None:
    # Anatomy, pose and noise come from label-independent streams: the same seed gives the same
    # patient, and only the findings (inside the body, away from the image border) differ.
    normal = render_slice("Normal", _rng(11), SIZE).astype(int)
    border = np.ones((SIZE, SIZE), bool)
    border[8:-8, 8:-8] = False
    for label in ("COVID-19", "Viral Pneumonia"):
        seen = []
        for seed in range(11, 15):
            base = render_slice("Normal", _rng(seed), SIZE).astype(int)
            sick = render_slice(label, _rng(seed), SIZE).astype(int)
            changed = np.abs(sick - base) > 2
            np.testing.assert_array_equal(sick[border], base[border])
            assert changed.mean() < 0.35
            seen.append(changed.mean())
        assert max(seen) > 0.005, f"{label} findings are invisible in every sample"
    np.testing.assert_array_equal(normal, render_slice("Normal", _rng(11), SIZE))


def test_findings_are_mostly_salient_with_a_subtle_tail() -> None:
    # The demo set must be learnable (most sick slices show clear findings) but not trivial (a
    # tail of faint early cases). Measured as the share of pixels that change visibly against
    # the same patient rendered Normal.
    n = 40
    for label in ("COVID-19", "Viral Pneumonia"):
        changed = []
        for i in range(n):
            base = render_slice("Normal", _rng(21, i), SIZE).astype(int)
            sick = render_slice(label, _rng(21, i), SIZE).astype(int)
            changed.append((np.abs(sick - base) > 8).mean())
        visible = np.array(changed) > 0.025
        assert visible.mean() >= 0.75, (label, sorted(changed))
        assert not visible.all(), f"{label} has no subtle cases"


def test_global_brightness_does_not_reveal_the_class() -> None:
    n = 24
    means = {
        label: np.array([render_slice(label, _rng(99, k, i), 64).mean() for i in range(n)])
        for k, label in enumerate(CLASSES)
    }
    for i, first in enumerate(CLASSES):
        for second in CLASSES[i + 1 :]:
            a, b = means[first], means[second]
            assert max(a.min(), b.min()) < min(a.max(), b.max()), (first, second)
            # Best single threshold on mean intensity, either direction.
            values = np.concatenate([a, b])
            labels = np.concatenate([np.zeros(n), np.ones(n)])
            best = max(max(np.mean((values > t) == labels), np.mean((values <= t) == labels)) for t in values)
            assert best < 0.8, (first, second, best)


def test_dataset_layout_counts_and_images(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == ["synthetic.json", "test", "train"]
    for split, count in (("train", 3), ("test", 2)):
        assert sorted(p.name for p in (dataset / split).iterdir()) == sorted(CLASSES)
        for label in CLASSES:
            pngs = sorted((dataset / split / label).iterdir())
            assert len(pngs) == count
            assert all(p.suffix == ".png" for p in pngs)
            for png in pngs:
                with Image.open(png) as im:
                    assert im.format == "PNG"
                    assert im.mode == "L"
                    assert im.size == (SIZE, SIZE)
    # Nothing left beside the root (temp folders are renamed or removed).
    assert [p.name for p in dataset.parent.iterdir()] == [dataset.name]


def test_stamp_records_the_parameters(dataset: Path) -> None:
    stamp = json.loads((dataset / "synthetic.json").read_text())
    assert stamp["seed"] == 7
    assert stamp["size"] == SIZE
    assert stamp["train_per_class"] == 3
    assert stamp["test_per_class"] == 2
    assert stamp["classes"] == list(CLASSES)


def test_each_image_is_reproducible_on_its_own(dataset: Path) -> None:
    for split_id, split in enumerate(("train", "test")):
        for class_id, label in enumerate(CLASSES):
            png = sorted((dataset / split / label).iterdir())[1]
            with Image.open(png) as im:
                on_disk = np.asarray(im)
            expected = render_slice(label, _rng(7, split_id, class_id, 1), SIZE)
            np.testing.assert_array_equal(on_disk, expected)


def test_generation_is_byte_identical_and_seed_dependent(tmp_path: Path, dataset: Path) -> None:
    again = generate_dataset(tmp_path / "again", 3, 2, seed=7, size=SIZE)
    other = generate_dataset(tmp_path / "other", 3, 2, seed=8, size=SIZE)
    reference = _files(dataset)
    assert _files(again) == reference
    other_files = _files(other)
    assert other_files.keys() == reference.keys()
    pngs = [name for name in reference if name.endswith(".png")]
    assert all(other_files[name] != reference[name] for name in pngs)


def test_complete_dataset_short_circuits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = generate_dataset(tmp_path / "data", 2, 1, seed=1, size=SIZE)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def fail(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("regenerated a complete data set")

    monkeypatch.setattr(synthetic, "render_slice", fail)
    assert generate_dataset(tmp_path / "data", 2, 1, seed=1, size=SIZE) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_changed_parameters_replace_the_dataset(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "data", 2, 1, seed=1, size=SIZE)
    generate_dataset(root, 1, 1, seed=2, size=64)
    assert json.loads((root / "synthetic.json").read_text())["seed"] == 2
    assert len(list((root / "train" / "Normal").iterdir())) == 1
    with Image.open(root / "test" / "COVID-19" / "00000.png") as im:
        assert im.size == (64, 64)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_failed_run_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic.render_slice
    calls = []

    def flaky(label: str, rng: np.random.Generator, size: int = 192) -> np.ndarray:
        calls.append(label)
        if len(calls) > 3:
            raise RuntimeError("interrupted")
        return real(label, rng, size)

    monkeypatch.setattr(synthetic, "render_slice", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_dataset(tmp_path / "data", 2, 1, seed=1, size=SIZE)
    assert list(tmp_path.iterdir()) == []


def test_unrelated_folder_is_not_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_dataset(root, 1, 1, seed=0, size=SIZE)
    assert (root / "notes.txt").read_text() == "keep me"
    assert [p.name for p in root.iterdir()] == ["notes.txt"]


def test_cli_writes_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--train-per-class", "1", "--test-per-class", "1"]
    assert main([*argv, "--seed", "3", "--size", "64"]) == 0
    assert str(out) in capsys.readouterr().out
    stamp = json.loads((out / "synthetic.json").read_text())
    assert (stamp["seed"], stamp["size"], stamp["train_per_class"]) == (3, 64, 1)
    assert sum(1 for _ in out.rglob("*.png")) == 6


def test_cli_rejects_bad_values() -> None:
    with pytest.raises(SystemExit):
        main(["--size", "4"])
    with pytest.raises(SystemExit):
        main(["--train-per-class", "-1"])


def test_cli_module_help_shows_defaults() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training.synthetic", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = " ".join(result.stdout.split())
    for flag, default in (
        ("--out", "artifacts/data/synthetic"),
        ("--train-per-class", "300"),
        ("--test-per-class", "60"),
        ("--seed", "0"),
        ("--size", "192"),
    ):
        assert flag in text
        assert f"(default: {default})" in text


@pytest.mark.parametrize(("out", "problem"), [
    ("afile/sub/x", "cannot write {out}: {tmp}/afile/sub: Not a directory"),
    ("afile/x", "cannot write {out}: {tmp}/afile: File exists"),
    ("afile", "{tmp}/afile exists and is not a synthetic data set; not replacing it"),
])
def test_cli_an_unusable_out_is_one_line_naming_the_path(out: str, problem: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("a regular file")
    argv = ["--out", str(tmp_path / out), "--train-per-class", "1", "--test-per-class", "1",
            "--size", "64"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: " + problem.format(out=tmp_path / out, tmp=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_cli_ctrl_c_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: object, **kwargs: object) -> np.ndarray:
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "render_slice", interrupted)
    try:
        status = main(["--out", str(tmp_path / "data"), "--size", "64"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main: a traceback")
    assert status == 130
    assert capsys.readouterr().err.strip() == f"interrupted; {tmp_path / 'data'} was left as it was"
    assert list(tmp_path.iterdir()) == []


def test_cli_a_number_that_is_not_one_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--seed", "x"])
    assert exit_.value.code == 2
    assert "argument --seed: expected a whole number, got 'x'" in capsys.readouterr().err
