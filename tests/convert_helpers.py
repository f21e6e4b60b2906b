"""What the `make convert` tests share: the model's input side, calibration data too narrow for
real inputs, a conversion table whose every artifact fails, and looks at the output folder."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

SIZE = 32  # model input side: small enough to train and convert in seconds


def dim_noise(n: int = 64) -> np.ndarray:
    """Noise far darker than any scan: calibration ranges too narrow for real inputs."""
    return np.random.default_rng(0).uniform(0.0, 0.1, (n, SIZE, SIZE, 3)).astype(np.float32)


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def junk_table() -> tuple:
    """Two rows whose files convert but fail parity (as a broken converter release would)."""
    from convert.formats import FORMATS

    return tuple(replace(row, writer=lambda ctx: b"junk") for row in FORMATS[:2])
