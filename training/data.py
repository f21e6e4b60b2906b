"""Data: the `<root>/<split>/<class>/<image>` loader, content-hash splits and the decode cache.

Every image goes through `ct_edge.preprocess` exactly once per (file content, spec): the result is
cached as .npy under the cache folder, keyed by the file's sha256 and the spec fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import numpy as np

from ct_edge import IMAGE_SUFFIXES, LABELS
from ct_edge.errors import CtEdgeError, InputError
from ct_edge.files import NUMPY_LOAD_LOCK, create_temp
from ct_edge.preprocess import PreprocessSpec, preprocess

DEFAULT_CACHE = Path("artifacts") / "cache"

_ALIASES = {
    "covid": "COVID-19", "covid19": "COVID-19", "covid2019": "COVID-19", "sarscov2": "COVID-19",
    "normal": "Normal", "healthy": "Normal",
    "viralpneumonia": "Viral Pneumonia", "pneumoniaviral": "Viral Pneumonia",
    "viral": "Viral Pneumonia",
}


class DataError(CtEdgeError):
    """The data folder cannot be used (missing, empty, unknown class folder...)."""


def canonical_label(folder: str) -> str:
    """Map a class folder name ('Covid', 'COVID19', 'viral_pneumonia'...) to its canonical label."""
    key = re.sub(r"[^a-z0-9]", "", folder.lower())
    if key not in _ALIASES:
        raise DataError(f"unknown class folder {folder!r}; expected one of {', '.join(LABELS)} "
                        "(case and spelling tolerant: covid, COVID19, viral_pneumonia...)")
    return _ALIASES[key]


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    sha256: str
    group: str = ""  # samples with one group always land on the same side of a split

    @property
    def key(self) -> str:
        return self.group or self.sha256


@dataclass
class Splits:
    """Train/validation/test samples and what was skipped while reading them."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    test_source: str = "carved"

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: {label: sum(s.label == i for s in split) for i, label in enumerate(LABELS)}
                for name, split in (("train", self.train), ("val", self.val), ("test", self.test))}

    def fingerprint(self) -> str:
        """Hash of which content went to which split with which label."""
        digest = hashlib.sha256()
        for name, split in (("train", self.train), ("val", self.val), ("test", self.test)):
            for sample in sorted(split, key=lambda s: s.sha256):
                digest.update(f"{name}:{sample.label}:{sample.sha256}\n".encode())
        return digest.hexdigest()[:16]


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    found: dict[str, Path] = {}
    for d in dirs:
        label = canonical_label(d.name)
        if label in found:
            raise DataError(f"{split_dir}: folders {found[label].name!r} and {d.name!r} both "
                            f"map to {label!r}")
        found[label] = d
    missing = [label for label in LABELS if label not in found]
    if missing:
        raise DataError(f"{split_dir}: no class folder for {', '.join(missing)}")
    return found


def _files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_split(split_dir: Path) -> list[Sample]:
    """Every file of one split folder, labelled, content-hashed and grouped with its near
    duplicates (decoded only as a small thumbnail)."""
    samples = []
    for label, class_dir in _class_dirs(split_dir).items():
        for path in _files(class_dir):
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            samples.append(Sample(path, LABELS.index(label), sha))
    groups = near_duplicate_groups(samples)
    return [replace(s, group=groups[s.sha256]) for s in samples]


NEAR_DUPLICATE = 0.98  # correlation of 32x32 thumbnails; re-encoded or rescaled copies score ~0.99+
_THUMBNAIL = PreprocessSpec(size=32, channels=1)


def near_duplicate_groups(samples: Sequence[Sample],
                          threshold: float = NEAR_DUPLICATE) -> dict[str, str]:
    """sha256 -> group key: the smallest sha256 among the files whose centre-cropped grey
    thumbnails correlate at `threshold` or more, directly or through others.

    Byte-identical files share a sha256; the same X-ray saved twice at another size or JPEG
    quality does not (in the real data: Covid 057/078, COVID-00033/00037), and would otherwise
    sit on both sides of a split.
    """
    unique = sorted({s.sha256: s for s in samples}.values(), key=lambda s: s.sha256)
    kept, rows = [], []
    for sample in unique:
        try:
            thumb = preprocess(sample.path, _THUMBNAIL).ravel()
        except InputError:
            continue  # unreadable: reported when the images are loaded; its own group
        thumb = thumb - thumb.mean()
        norm = float(np.linalg.norm(thumb))
        if norm > 0:
            kept.append(sample.sha256)
            rows.append(thumb / norm)
    parent = {s.sha256: s.sha256 for s in unique}

    def root(sha: str) -> str:
        while parent[sha] != sha:
            sha = parent[sha]
        return sha

    if rows:
        similar = np.stack(rows) @ np.stack(rows).T
        for i, j in zip(*np.nonzero(np.triu(similar >= threshold, k=1)), strict=True):
            a, b = root(kept[i]), root(kept[j])
            parent[max(a, b)] = min(a, b)
    return {sha: root(sha) for sha in parent}


def stratified_hash_split(samples: Sequence[Sample], fraction: float,
                          seed: int) -> tuple[list[Sample], list[Sample]]:
    """(rest, held) with `fraction` of each class held out; (near) duplicates stay on one side."""
    held_keys: set[str] = set()
    for keys in _groups_by_class(samples, seed):
        held_keys.update(keys[: round(len(keys) * fraction)])
    rest = [s for s in samples if s.key not in held_keys]
    held = [s for s in samples if s.key in held_keys]
    return rest, held


def kfold_hash_splits(samples: Sequence[Sample], k: int,
                      seed: int) -> list[tuple[list[Sample], list[Sample]]]:
    """k (train, test) pairs, stratified by class, by near-duplicate group."""
    folds: list[set[str]] = [set() for _ in range(k)]
    for keys in _groups_by_class(samples, seed):
        for i, key in enumerate(keys):
            folds[i % k].add(key)
    return [([s for s in samples if s.key not in fold], [s for s in samples if s.key in fold])
            for fold in folds]


def _groups_by_class(samples: Sequence[Sample], seed: int) -> list[list[str]]:
    """Per class, its group keys in a seeded order. A group counts for the class of its
    first member (by sha256), so a group spanning two classes is placed once."""
    rng = np.random.default_rng(seed)
    label_of: dict[str, int] = {}
    for s in sorted(samples, key=lambda s: s.sha256):
        label_of.setdefault(s.key, s.label)
    groups = []
    for label in range(len(LABELS)):
        keys = sorted(k for k, lab in label_of.items() if lab == label)
        groups.append([keys[i] for i in rng.permutation(len(keys))])
    return groups


def check_data_folder(root: Path) -> None:
    """DataError unless `root` is an existing folder."""
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a folder (it is a file)")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """ValueError unless each fraction is in [0, 1) and their sum is below 1."""
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0
            and val_fraction + test_fraction < 1.0):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction}: each "
                         "must be in [0, 1) and their sum below 1")


def split_settings(config: dict) -> tuple[int, float, float]:
    """A training record's (seed, val_fraction, test_fraction), defaults 0, 0.15, 0.15; ValueError
    unless the seed is a whole number >= 0 and the fractions pass `check_fractions`."""
    seed = config.get("seed", 0)
    whole = (isinstance(seed, int) and not isinstance(seed, bool)) or (
        isinstance(seed, float) and seed.is_integer())  # is_integer: False for inf and NaN
    if not whole or seed < 0:
        raise ValueError(f"seed {seed!r} is not a whole number >= 0")
    val_fraction = float(config.get("val_fraction", 0.15))
    test_fraction = float(config.get("test_fraction", 0.15))
    check_fractions(val_fraction, test_fraction)
    return int(seed), val_fraction, test_fraction


def load_splits(root: Path, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0) -> Splits:
    """Read `<root>/train` (and `<root>/test` when present) into content-hash splits."""
    root = Path(root)
    check_data_folder(root)
    try:
        check_fractions(val_fraction, test_fraction)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    train_dir = root / "train" if (root / "train").is_dir() else root
    samples = scan_split(train_dir)
    if (root / "test").is_dir():
        test = scan_split(root / "test")
        # Grouped together, so a re-encoded copy of a test image is dropped from training too.
        groups = near_duplicate_groups([*samples, *test])
        test_groups = {groups[s.sha256] for s in test}
        samples = [replace(s, group=groups[s.sha256]) for s in samples
                   if groups[s.sha256] not in test_groups]
        source = "test/ folder"
    else:
        samples, test = stratified_hash_split(samples, test_fraction, seed)
        source = f"carved from train/ ({test_fraction:.0%}, seed {seed})"
    train, val = stratified_hash_split(samples, val_fraction / (1.0 - test_fraction), seed + 1)
    return Splits(train, val, test, test_source=source)


def cache_path(cache_dir: Path, spec: PreprocessSpec, sha256: str) -> Path:
    return Path(cache_dir) / spec.fingerprint() / f"{sha256}.npy"


def _load_one(sample: Sample, spec: PreprocessSpec, cache_dir: Path) -> np.ndarray:
    cached = cache_path(cache_dir, spec, sample.sha256)
    if cached.is_file():
        x = _read_cached(cached, spec)
        if x is not None:
            return x
    x = preprocess(sample.path, spec)
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(cached, lambda handle: np.save(handle, x), binary=True, sync=False)
    return x


def _read_cached(cached: Path, spec: PreprocessSpec) -> np.ndarray | None:
    """The cached array, or None (the entry removed) when it is unreadable or not this spec's:
    a killed or full-disk write, or a damaged disk, must cost a decode, not the run."""
    try:
        with NUMPY_LOAD_LOCK:  # loads run in threads (`load_arrays`)
            x = np.load(cached)
    except (OSError, ValueError, EOFError):  # truncated, garbled or unreadable .npy
        x = None
    if (isinstance(x, np.ndarray) and x.dtype == np.float32
            and x.shape == (spec.size, spec.size, spec.channels)):
        return x
    cached.unlink(missing_ok=True)
    return None


def load_arrays(samples: Sequence[Sample], spec: PreprocessSpec, cache_dir: Path = DEFAULT_CACHE,
                progress: bool = True,
                desc: str = "decode") -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(x float32 (n,h,w,c), y int (n,), skipped [(path, reason)]) through the one preprocess."""
    from tqdm.auto import tqdm

    def work(sample: Sample) -> np.ndarray | InputError:
        try:
            return _load_one(sample, spec, cache_dir)
        except InputError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(tqdm(pool.map(work, samples), total=len(samples), desc=desc, unit="img",
                            disable=not progress or len(samples) < 50, file=sys.stderr))
    xs, ys, skipped = [], [], []
    for sample, result in zip(samples, results, strict=True):
        if isinstance(result, InputError):
            skipped.append((str(sample.path), result.problem))
        else:
            xs.append(result)
            ys.append(sample.label)
    shape = (0, spec.size, spec.size, spec.channels)
    x = np.stack(xs) if xs else np.zeros(shape, np.float32)
    return x, np.asarray(ys, dtype=np.int64), skipped


def warn_skipped(skipped: list[tuple[str, str]]) -> None:
    """One warning listing every file that could not be read."""
    if skipped:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in skipped)
        print(f"warning: skipped {len(skipped)} unreadable file(s):\n{lines}", file=sys.stderr)


def check_classes(y: np.ndarray, split: str) -> None:
    if len(y) == 0:
        raise DataError(f"the {split} split is empty: no readable images")
    empty = [label for i, label in enumerate(LABELS) if not (y == i).any()]
    if empty:
        raise DataError(f"the {split} split has no readable images of {', '.join(empty)}")


def write_atomically(path: Path, write: Callable[[IO], object], binary: bool = False,
                     sync: bool = True) -> None:
    """Create `path` through `write(handle)` on a temp file beside it, then a rename; on any
    failure the temp file is removed and `path` is left as it was."""
    fd, tmp = create_temp(path.parent)  # 0666 less the umask, not mkstemp's 0600
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())  # a power cut must not leave an empty file under the name
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def dump(handle: IO) -> None:
        json.dump(data, handle, indent=2)
        handle.write("\n")

    write_atomically(path, dump)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda handle: handle.write(text))


def check_writable(path: Path, folder: bool = False) -> None:
    """DataError unless `path` can be written later: a file (or with `folder`, a folder) or
    nothing yet, below a folder that exists and is writable or can be created. Checked before
    long work, so a bad --out fails at once instead of after the training."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise DataError(f"{path} is a folder; expected a file name")
    if path.exists() and folder and not path.is_dir():
        raise DataError(f"{path} is not a folder")
    start = path if folder else path.parent
    for parent in (start, *start.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise DataError(f"{path}: {parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise DataError(f"{path}: no permission to write in {parent}")
            return


def check_keras_archive(path: Path) -> None:
    """DataError when a .keras file is no zip archive (Keras would say "File not found")."""
    path = Path(path)
    if path.suffix != ".keras" or not path.is_file():
        return
    with path.open("rb") as handle:  # an unreadable file: the OSError says why
        if not zipfile.is_zipfile(handle):
            raise DataError(f"{path}: not a Keras .keras archive (corrupt or another format)")
