"""Built-in data set: deterministic synthetic axial chest CT slices.

Images are 8-bit grayscale PNGs laid out as ``<root>/<split>/<class_folder>/<name>.png`` with
splits ``train`` and ``test`` and class folders named exactly as in `CLASSES`.

Each slice is `training.phantom.render_slice` (anatomy, class findings, acquisition noise) from
a generator seeded per split, class and index, so the set is byte-identical for a seed.

    python -m training.synthetic --out data/synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from ct_edge.cli.common import int_at_least

from .phantom import CLASSES, GENERATOR_VERSION, MIN_SIZE, render_slice
from .run_files import describe_os_error

# 300 + 60 per class: with 120 + 40 the demo model landed anywhere from 82% to 94% between runs;
# 300 + 60 keeps it in the mid 90s within the same 50 epochs (about two minutes here).
TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 60
DEFAULT_ROOT = Path("artifacts") / "data" / "synthetic"
SPLITS: tuple[str, ...] = ("train", "test")
STAMP_NAME = "synthetic.json"

_SPLIT_IDS = {"train": 0, "test": 1}


def _params(train_per_class: int, test_per_class: int, seed: int, size: int) -> dict:
    return {
        "generator": "training.synthetic",
        "version": GENERATOR_VERSION,
        "classes": list(CLASSES),
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "seed": seed,
        "size": size,
    }


def _stamp_matches(root: Path, params: dict) -> bool:
    try:
        return json.loads((root / STAMP_NAME).read_text(encoding="utf-8")) == params
    except (OSError, ValueError):
        return False


def _replaceable(root: Path) -> bool:
    """Only an empty folder or an earlier synthetic data set may be replaced."""
    if not root.exists():
        return True
    if not root.is_dir():
        return False
    return (root / STAMP_NAME).is_file() or not any(root.iterdir())


def _save_png(img: np.ndarray, path: Path) -> None:
    # Fixed options and no metadata chunks keep the bytes reproducible.
    Image.fromarray(img).save(path, format="PNG", optimize=False, compress_level=6)


def _install(tmp: Path, root: Path, params: dict) -> None:
    """Move the finished temp folder to `root`, replacing an outdated synthetic set."""
    try:
        os.rename(tmp, root)  # succeeds when root is missing or an empty folder
        return
    except OSError:
        pass
    if _stamp_matches(root, params):  # a concurrent run finished the same set first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if not _replaceable(root):
        raise FileExistsError(f"{root} exists and is not a synthetic data set; not replacing it")
    old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        os.rename(old, root)
        raise
    shutil.rmtree(old, ignore_errors=True)


def generate_dataset(
    root: Path,
    train_per_class: int = TRAIN_PER_CLASS,
    test_per_class: int = TEST_PER_CLASS,
    seed: int = 0,
    size: int = 192,
) -> Path:
    """Write train/ and test/ splits; returns root.

    Deterministic for a seed (byte-identical PNGs); image ``i`` of a split and class is drawn
    from ``numpy.random.default_rng([seed, split_id, class_id, i])``. Writes atomically into a
    temp folder beside root, then renames. If root already holds a complete set made with the
    same parameters (its ``synthetic.json`` stamp, written last), returns at once. An existing
    root is replaced only if it is empty or an earlier synthetic set; otherwise
    FileExistsError.
    """
    root = Path(root)
    if train_per_class < 0 or test_per_class < 0:
        raise ValueError("per-class counts must be >= 0")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    params = _params(train_per_class, test_per_class, seed, size)
    if _stamp_matches(root, params):
        return root
    if not _replaceable(root):
        raise FileExistsError(f"{root} exists and is not a synthetic data set; not replacing it")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data set is not
        counts = {"train": train_per_class, "test": test_per_class}
        for split in SPLITS:
            for class_id, label in enumerate(CLASSES):
                folder = tmp / split / label
                folder.mkdir(parents=True)
                for i in range(counts[split]):
                    rng = np.random.default_rng([seed, _SPLIT_IDS[split], class_id, i])
                    _save_png(render_slice(label, rng, size), folder / f"{i:05d}.png")
        (tmp / STAMP_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _install(tmp, root, params)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def main(argv: list[str] | None = None) -> int:
    """CLI: write the synthetic data set and print its root."""
    parser = argparse.ArgumentParser(
        prog="python -m training.synthetic",
        description="Write the built-in synthetic chest CT data set (<out>/<split>/<class>/<name>.png).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT, help="output folder")
    parser.add_argument("--train-per-class", type=int_at_least(0), default=TRAIN_PER_CLASS,
                        help="training images per class")
    parser.add_argument("--test-per-class", type=int_at_least(0), default=TEST_PER_CLASS,
                        help="test images per class")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (>= 0)")
    parser.add_argument("--size", type=int_at_least(MIN_SIZE), default=192, help="image side in pixels")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        root = generate_dataset(args.out, args.train_per_class, args.test_per_class, args.seed, args.size)
    except OSError as exc:  # FileExistsError: not a synthetic data set; else e.g. a path through a file
        print(f"error: {describe_os_error(exc, writing=args.out)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; {args.out} was left as it was", file=sys.stderr)
        return 130
    n = (args.train_per_class + args.test_per_class) * len(CLASSES)
    print(f"{n} images ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
