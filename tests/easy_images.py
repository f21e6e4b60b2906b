"""Test data a small CNN separates within seconds of training (shared by several test files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ct_edge import LABELS


def write_easy_images(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """Class-dependent gray images a small CNN separates confidently within seconds of training:
    a bright disc (COVID-19), plain noise (Normal), horizontal stripes (Viral Pneumonia)."""
    rng = np.random.default_rng(seed)
    side = 48
    yy, xx = np.mgrid[0:side, 0:side] / side
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label_index, label in enumerate(LABELS):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                img = 0.3 + 0.1 * rng.standard_normal((side, side))
                if label_index == 0:
                    cx, cy = rng.uniform(0.3, 0.7, 2)
                    img += 0.5 * (((xx - cx) ** 2 + (yy - cy) ** 2) < 0.04)
                elif label_index == 2:
                    img += 0.4 * (np.sin(yy * rng.uniform(15, 25) + rng.uniform(0, 6)) > 0)
                pixels = np.clip(img * 255, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root
