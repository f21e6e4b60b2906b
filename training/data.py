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
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ct_edge import IMAGE_SUFFIXES, LABELS
from ct_edge.errors import CtEdgeError, InputError
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
    """Every file of one split folder, labelled and content-hashed (not yet decoded)."""
    samples = []
    for label, class_dir in _class_dirs(split_dir).items():
        for path in _files(class_dir):
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            samples.append(Sample(path, LABELS.index(label), sha))
    return samples


def stratified_hash_split(samples: Sequence[Sample], fraction: float,
                          seed: int) -> tuple[list[Sample], list[Sample]]:
    """(rest, held) with `fraction` of each class held out; duplicates stay on one side."""
    held_hashes: set[str] = set()
    for hashes in _groups_by_class(samples, seed):
        held_hashes.update(hashes[: round(len(hashes) * fraction)])
    rest = [s for s in samples if s.sha256 not in held_hashes]
    held = [s for s in samples if s.sha256 in held_hashes]
    return rest, held


def kfold_hash_splits(samples: Sequence[Sample], k: int,
                      seed: int) -> list[tuple[list[Sample], list[Sample]]]:
    """k (train, test) pairs, stratified by class, by content hash."""
    folds: list[set[str]] = [set() for _ in range(k)]
    for hashes in _groups_by_class(samples, seed):
        for i, sha in enumerate(hashes):
            folds[i % k].add(sha)
    return [([s for s in samples if s.sha256 not in fold], [s for s in samples if s.sha256 in fold])
            for fold in folds]


def _groups_by_class(samples: Sequence[Sample], seed: int) -> list[list[str]]:
    """Per class, its unique content hashes in a seeded order."""
    rng = np.random.default_rng(seed)
    groups = []
    for label in range(len(LABELS)):
        hashes = sorted({s.sha256 for s in samples if s.label == label})
        groups.append([hashes[i] for i in rng.permutation(len(hashes))])
    return groups


def load_splits(root: Path, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0) -> Splits:
    """Read `<root>/train` (and `<root>/test` when present) into content-hash splits."""
    root = Path(root)
    train_dir = root / "train" if (root / "train").is_dir() else root
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    samples = scan_split(train_dir)
    if (root / "test").is_dir():
        test = scan_split(root / "test")
        test_hashes = {s.sha256 for s in test}
        samples = [s for s in samples if s.sha256 not in test_hashes]
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
        return np.load(cached)
    x = preprocess(sample.path, spec)
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, x)
    os.replace(tmp, cached)
    return x


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


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
