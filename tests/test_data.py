"""The data loader: layout, class-name mapping, content-hash and near-duplicate splits, bad
files, the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ct_edge import LABELS
from ct_edge.preprocess import PreprocessSpec
from training import data


def _write(path: Path, value: int, size: tuple[int, int] = (40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8)).save(path)


def _folder(root: Path, per_class: int = 10, names=("Covid", "Normal", "Viral Pneumonia")) -> Path:
    for c, name in enumerate(names):
        for i in range(per_class):
            _write(root / "train" / name / f"{i:03}.png", 1000 * c + i)
    return root


@pytest.mark.parametrize(("folder", "label"), [
    ("Covid", "COVID-19"), ("COVID19", "COVID-19"), ("covid-19", "COVID-19"),
    ("normal", "Normal"), ("NORMAL", "Normal"),
    ("Viral Pneumonia", "Viral Pneumonia"), ("viral_pneumonia", "Viral Pneumonia"),
    ("Viral-Pneumonia", "Viral Pneumonia"),
])
def test_class_folder_names_map_to_canonical_labels(folder: str, label: str) -> None:
    assert data.canonical_label(folder) == label


def test_unknown_class_folder_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    _write(root / "train" / "Bacterial" / "x.png", 1)
    with pytest.raises(data.DataError, match="unknown class folder 'Bacterial'"):
        data.load_splits(root)


def test_missing_data_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_splits(tmp_path / "nowhere")


def test_carved_splits_are_stratified_disjoint_and_deterministic(tmp_path: Path) -> None:
    root = _folder(tmp_path, per_class=20)
    splits = data.load_splits(root, val_fraction=0.15, test_fraction=0.2, seed=3)
    counts = splits.counts()
    assert all(counts["test"][label] == 4 for label in LABELS)
    assert all(counts["val"][label] == 3 for label in LABELS)
    assert sum(sum(c.values()) for c in counts.values()) == 60
    hashes = [{s.sha256 for s in getattr(splits, n)} for n in ("train", "val", "test")]
    assert not (hashes[0] & hashes[1] or hashes[0] & hashes[2] or hashes[1] & hashes[2])
    again = data.load_splits(root, val_fraction=0.15, test_fraction=0.2, seed=3)
    assert again.fingerprint() == splits.fingerprint()
    other = data.load_splits(root, val_fraction=0.15, test_fraction=0.2, seed=4)
    assert other.fingerprint() != splits.fingerprint()


def test_duplicate_files_never_straddle_a_split(tmp_path: Path) -> None:
    root = _folder(tmp_path, per_class=12)
    normal = root / "train" / "Normal"
    for i in range(6):  # six exact copies under other names
        shutil.copy(normal / f"{i:03}.png", normal / f"copy{i}.png")
    for seed in range(5):
        splits = data.load_splits(root, seed=seed)
        sides = {}
        for name in ("train", "val", "test"):
            for s in getattr(splits, name):
                sides.setdefault(s.sha256, set()).add(name)
        assert all(len(v) == 1 for v in sides.values())


def test_existing_test_folder_is_used_and_leaks_are_removed(tmp_path: Path) -> None:
    root = _folder(tmp_path, per_class=10)
    for c, name in enumerate(("Covid", "Normal", "Viral Pneumonia")):
        _write(root / "test" / name / "t.png", 5000 + c)
    shutil.copy(root / "train" / "Covid" / "000.png", root / "test" / "Covid" / "leak.png")
    splits = data.load_splits(root)
    assert splits.test_source == "test/ folder"
    assert len(splits.test) == 4
    test_hashes = {s.sha256 for s in splits.test}
    assert not any(s.sha256 in test_hashes for s in splits.train + splits.val)


def test_kfold_covers_every_image_once_by_content(tmp_path: Path) -> None:
    samples = data.scan_split(_folder(tmp_path, per_class=10) / "train")
    folds = data.kfold_hash_splits(samples, k=5, seed=0)
    tested = [s.path for _, test in folds for s in test]
    assert sorted(tested) == sorted(s.path for s in samples)
    for train, test in folds:
        assert {s.label for s in test} == {0, 1, 2}
        assert not {s.sha256 for s in train} & {s.sha256 for s in test}


def test_a_rescaled_recompressed_copy_lands_on_the_same_side_of_every_split(
        tmp_path: Path) -> None:
    root = _folder(tmp_path, per_class=10)
    smooth = Image.fromarray(np.random.default_rng(5).integers(0, 255, (8, 8), dtype=np.uint8))
    smooth.resize((200, 160), Image.Resampling.BICUBIC).save(root / "train" / "Covid" / "x.png")
    smooth.resize((150, 120), Image.Resampling.BICUBIC).convert("RGB").save(
        root / "train" / "Covid" / "x-copy.jpg", quality=85)
    samples = data.scan_split(root / "train")
    by_name = {s.path.name: s for s in samples}
    assert by_name["x.png"].sha256 != by_name["x-copy.jpg"].sha256
    assert by_name["x.png"].key == by_name["x-copy.jpg"].key
    assert len({s.key for s in samples}) == len(samples) - 1  # the noise images stay apart
    for seed in range(4):
        for _, test in data.kfold_hash_splits(samples, k=5, seed=seed):
            assert ({"x.png", "x-copy.jpg"} <= {s.path.name for s in test}
                    or not {"x.png", "x-copy.jpg"} & {s.path.name for s in test})
        rest, held = data.stratified_hash_split(samples, 0.3, seed)
        assert len({s.key for s in rest} & {s.key for s in held}) == 0


def test_a_copy_of_a_test_folder_image_in_train_is_dropped(tmp_path: Path) -> None:
    root = _folder(tmp_path, per_class=6)
    for name in ("Covid", "Normal", "Viral Pneumonia"):
        _write(root / "test" / name / "t.png", 7000 + len(name))
    smooth = Image.fromarray(np.random.default_rng(5).integers(0, 255, (8, 8), dtype=np.uint8))
    smooth.resize((200, 160), Image.Resampling.BICUBIC).save(root / "test" / "Covid" / "x.png")
    smooth.resize((150, 120), Image.Resampling.BICUBIC).convert("RGB").save(
        root / "train" / "Covid" / "x-copy.jpg", quality=85)
    splits = data.load_splits(root)
    assert "x-copy.jpg" not in {s.path.name for s in splits.train + splits.val}
    assert len(splits.train) + len(splits.val) == 18


def test_bad_files_are_skipped_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _folder(tmp_path, per_class=4)
    (root / "train" / "Normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "train" / "Covid" / "empty.jpg").write_bytes(b"")
    splits = data.load_splits(root, test_fraction=0.0, val_fraction=0.0)
    x, y, skipped = data.load_arrays(splits.train, PreprocessSpec(size=32), tmp_path / "cache")
    assert x.shape == (12, 32, 32, 3) and len(y) == 12
    assert sorted(Path(p).name for p, _ in skipped) == ["broken.png", "empty.jpg"]
    data.warn_skipped(skipped)
    err = capsys.readouterr().err
    assert "skipped 2 unreadable file(s)" in err and "empty file" in err


def test_empty_class_is_an_error(tmp_path: Path) -> None:
    root = _folder(tmp_path, per_class=3)
    for f in (root / "train" / "Normal").iterdir():
        f.write_bytes(b"garbage")
    splits = data.load_splits(root, test_fraction=0.0, val_fraction=0.0)
    _, y, _ = data.load_arrays(splits.train, PreprocessSpec(size=32), tmp_path / "cache")
    with pytest.raises(data.DataError, match="no readable images of Normal"):
        data.check_classes(y, "train")


def test_cache_returns_the_same_array_without_decoding_again(tmp_path: Path) -> None:
    root = _folder(tmp_path, per_class=2)
    samples = data.scan_split(root / "train")
    spec = PreprocessSpec(size=32)
    first, _, _ = data.load_arrays(samples, spec, tmp_path / "cache")
    for s in samples:  # the originals are gone: only the cache can answer now
        s.path.unlink()
    second, _, skipped = data.load_arrays(samples, spec, tmp_path / "cache")
    assert not skipped
    np.testing.assert_array_equal(first, second)
    assert len(list((tmp_path / "cache" / spec.fingerprint()).glob("*.npy"))) == 6


def test_cached_arrays_load_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_arrays reads the cache in threads; np.load must not run in two at once (CPython
    before 3.11.8: "AST constructor recursion depth mismatch", python/cpython#106905)."""
    from concurrent.futures import ThreadPoolExecutor

    from thread_helpers import watch_header_parses

    root = _folder(tmp_path, per_class=4)
    samples = data.scan_split(root / "train")
    spec = PreprocessSpec(size=32)
    first, _, _ = data.load_arrays(samples, spec, tmp_path / "cache")
    most_at_once = watch_header_parses(monkeypatch)
    monkeypatch.setattr(data.os, "cpu_count", lambda: 4)  # threads even on a one-core runner
    with ThreadPoolExecutor(max_workers=2) as pool:  # and two loads side by side
        runs = list(pool.map(lambda _: data.load_arrays(samples, spec, tmp_path / "cache"),
                             range(2)))
    for again, _, skipped in runs:
        assert not skipped
        np.testing.assert_array_equal(again, first)
    assert most_at_once() == 1, f"{most_at_once()} threads parsed .npy headers at once"


@pytest.mark.parametrize("damage", [
    lambda path: path.write_bytes(path.read_bytes()[:90]),  # truncated in the header
    lambda path: path.write_bytes(path.read_bytes()[:-100]),  # truncated in the data
    lambda path: path.write_bytes(b""),
    lambda path: np.save(path, np.zeros((4, 4, 3), np.float32)),  # a valid array, not this spec's
], ids=["header", "data", "empty", "other-shape"])
def test_an_unreadable_cache_entry_is_a_miss_decoded_again(tmp_path: Path, damage) -> None:
    root = _folder(tmp_path, per_class=1)
    samples = data.scan_split(root / "train")
    spec = PreprocessSpec(size=32)
    first, _, _ = data.load_arrays(samples, spec, tmp_path / "cache")
    cached = data.cache_path(tmp_path / "cache", spec, samples[0].sha256)
    damage(cached)
    second, _, skipped = data.load_arrays(samples, spec, tmp_path / "cache")
    assert not skipped
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(np.load(cached), first[0])  # rewritten whole


def test_a_data_file_is_not_a_folder(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(data.DataError, match=r"data folder .*afile is not a folder"):
        data.load_splits(afile)


@pytest.mark.parametrize(("val", "test"), [(0.15, 1.0), (1.0, 0.0), (0.5, 0.5), (-0.1, 0.15),
                                           (0.15, float("nan"))])
def test_split_fractions_out_of_range_are_refused(tmp_path: Path, val: float, test: float) -> None:
    root = _folder(tmp_path)
    with pytest.raises(data.DataError, match="each must be in"):
        data.load_splits(root, val_fraction=val, test_fraction=test)


@pytest.mark.parametrize("config", [{"seed": float("inf")}, {"seed": float("nan")}, {"seed": -1},
                                    {"seed": 1.5}, {"seed": "3"}, {"seed": True},
                                    {"test_fraction": 1}, {"val_fraction": 0.6, "test_fraction": 0.4}])
def test_split_settings_refuse_what_the_splits_cannot_use(config: dict) -> None:
    with pytest.raises(ValueError, match=r"seed|fraction"):
        data.split_settings(config)


def test_split_settings_keep_valid_values() -> None:
    assert data.split_settings({}) == (0, 0.15, 0.15)
    assert data.split_settings({"seed": 7.0, "val_fraction": 0, "test_fraction": 0.2}) == (7, 0.0, 0.2)


def test_write_json_leaves_no_temp_file_when_the_rename_fails(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises(OSError):
        data.write_json(target, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    data.write_json(tmp_path / "ok.json", {"a": 1})
    assert (tmp_path / "ok.json").read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json", "result.json"]


def test_check_writable_refuses_what_a_later_write_would(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    data.check_writable(tmp_path / "new" / "deeper" / "out.json")  # parents made when written
    data.check_writable(tmp_path / "new" / "folder", folder=True)
    data.check_writable(afile)  # replaced when written
    with pytest.raises(data.DataError, match="is a folder"):
        data.check_writable(tmp_path)
    with pytest.raises(data.DataError, match="afile is not a folder"):
        data.check_writable(afile / "out.json")
    with pytest.raises(data.DataError, match="is not a folder"):
        data.check_writable(afile, folder=True)
    with pytest.raises(data.DataError, match="afile is not a folder"):
        data.check_writable(afile / "sub", folder=True)
    assert not (tmp_path / "new").exists()  # only checked, nothing created


def test_a_corrupt_keras_file_is_named_as_such(tmp_path: Path) -> None:
    model = tmp_path / "model.keras"
    model.write_bytes(b"not a zip archive")
    with pytest.raises(data.DataError) as info:
        data.check_keras_archive(model)
    assert str(info.value) == f"{model}: not a Keras .keras archive (corrupt or another format)"
    import zipfile

    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("config.json", "{}")
    data.check_keras_archive(model)  # a zip: Keras itself judges the contents
