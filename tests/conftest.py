"""Shared fixtures: tiny synthetic data, a tiny trained model and its converted bundle.

They are session-scoped: built once (about a minute in all) and shared by every test module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid19-xray"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small built-in data set: train/ and test/, 12 + 6 images per class at 96 px."""
    from training.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "synthetic", train_per_class=12,
                            test_per_class=6, seed=0, size=96)


@pytest.fixture(scope="session")
def tiny_model(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder (model.keras, config.json, metrics.json, ...) from a 3-epoch run."""
    from training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("model")
    train(TrainConfig(data=str(synthetic_root), out=str(out), epochs=3, patience=3,
                      cache=str(out / "cache")))
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle converted from `tiny_model` (all formats), whatever its parity verdict."""
    from convert.pipeline import BundleRejected, ParityError, convert_model

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    # An untrained tiny model may miss the parity gate for some artifacts; the bundle is written
    # all the same. With none passing there is nothing to run: say so here, not in every test.
    try:
        convert_model(tiny_model / "model.keras", out)
    except BundleRejected as exc:
        raise RuntimeError("the tiny test bundle has no artifact that passed: "
                           + "; ".join(exc.reasons)) from None
    except ParityError:
        pass
    return out


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "train").is_dir():
        pytest.skip("real images not present at ../shared/data/covid19-xray")
    return REAL_DATA
