"""Shared fixtures: tiny synthetic data, a tiny trained model and its converted bundle.

They are session-scoped: built once (about a minute in all) and shared by every test module. Below
them, the fixtures of the test files split by behaviour (CLI, serve, listen, convert, batch): the
CLI's small bundle and the convert tests' model and bundle are built once per session; a server,
a classifier or a batch archive once per module that asks for it, as each file had them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from server_helpers import Running

    from ct_edge.classifier import Classifier

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


# --- the CLI tests' bundle (test_cli_*.py and the other files that run `ct-edge` on it) ---------

SHARED_BUNDLE = os.environ.get("CT_EDGE_TEST_SHARED_BUNDLE") == "1"


@pytest.fixture(scope="session")
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle every test reads (never modified; copy it with `bundle_copy` to tamper)."""
    if SHARED_BUNDLE:
        return request.getfixturevalue("tiny_bundle")
    from bundle_helpers import make_test_bundle

    return make_test_bundle(tmp_path_factory.mktemp("cli") / "bundle")


@pytest.fixture
def bundle_copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


@pytest.fixture
def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


# --- `ct-edge serve` in this process (test_server_*.py) ------------------------------------------


@pytest.fixture(scope="module")
def classifier(tiny_bundle: Path) -> Classifier:
    from ct_edge.classifier import Classifier

    return Classifier.from_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def api(classifier: Classifier, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    from server_helpers import serving

    with serving(classifier, tmp_path_factory.mktemp("serve") / "data",
                 max_body_bytes=2 * 1024 * 1024, cors_origin="https://viewer.example") as running:
        yield running


# --- `ct-edge listen` (test_listen_*.py) -----------------------------------------------------------


@pytest.fixture(scope="module")
def ct_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from listen_helpers import recorded_as

    return recorded_as(tiny_bundle, tmp_path_factory.mktemp("ct-bundle") / "bundle", "ct")


# --- make convert (test_convert_*.py): one model and one bundle for the session -------------------


@pytest.fixture(scope="session")
def easy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.keras + config.json from a ~3 s training run (reference CNN, 32 px, no augmentation)."""
    from convert_helpers import SIZE
    from easy_images import write_easy_images

    from ct_edge.preprocess import PreprocessSpec
    from training.train import TrainConfig, train

    base = tmp_path_factory.mktemp("convert")
    data = write_easy_images(base / "data", train_per_class=30, test_per_class=20)
    out = base / "model"
    train(TrainConfig(data=str(data), out=str(out), arch="reference", epochs=10, patience=10,
                      augment=False, cache=str(base / "cache"),
                      spec=PreprocessSpec(size=SIZE).to_dict()))
    return out / "model.keras"


@pytest.fixture(scope="session")
def converted(easy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """All six formats converted once; (bundle folder, returned manifest)."""
    from convert.pipeline import convert_model

    out = tmp_path_factory.mktemp("bundles") / "bundle"
    manifest = convert_model(easy_model, out)
    return out, manifest


# --- `ct-edge batch` (test_batch_*.py) -----------------------------------------------------------

BAD_FILES = {"garbage.png": b"this is not an image", "empty.png": b"",
             "notimage.jpg": b"\xff\xd8\xff\xe0 truncated jpeg"}


@pytest.fixture(scope="module")
def ray_auth_disabled() -> Iterator[None]:
    """In this process Ray runs without token auth (and so writes no token to $HOME): Ray's native
    side caches the auth mode and token, so one pytest process must not mix modes. The default
    (a random token, in the environment only) is exercised by test_batch_ray.py's subprocess test.
    Every test_batch_*.py module uses it (pytestmark)."""
    from ct_edge.batch import cluster as batch_cluster

    saved = os.environ.get("RAY_AUTH_MODE")
    batch_cluster.set_auth_env({"RAY_AUTH_MODE": "disabled"})
    yield
    batch_cluster.set_auth_env({"RAY_AUTH_MODE": saved})


@pytest.fixture(scope="module")
def bundle_artifact(tiny_bundle: Path) -> tuple[Path, str]:
    """The real `tiny_bundle` and an artifact to run (named: the bundle's parity verdict varies)."""
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    names = [a["name"] for a in manifest["artifacts"]]
    name = manifest.get("default") or next(n for n in names if n.startswith("tflite"))
    return tiny_bundle, name


@pytest.fixture(scope="module")
def scans(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """~60 inputs: the synthetic images, three bad files, and a list file naming one more
    (missing) file and one already in the folder (a duplicate, scored once)."""
    root = tmp_path_factory.mktemp("scans")
    folder = root / "archive"
    good = []
    for i, src in enumerate(sorted(synthetic_root.rglob("*.png"))):
        dst = folder / src.parent.name / f"{i:03d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        good.append(str(dst))
    real = Path(good[0]).read_bytes()
    bad_files = {**BAD_FILES, "truncated.png": real[: len(real) // 3]}
    (folder / "bad").mkdir()
    bad = []
    for name, data in bad_files.items():
        (folder / "bad" / name).write_bytes(data)
        bad.append(str(folder / "bad" / name))
    missing = str(root / "elsewhere" / "missing.png")
    listing = root / "more.txt"
    listing.write_text(f"# extra inputs\n{missing}\n\n{good[0]}\n")
    return SimpleNamespace(folder=folder, listing=listing, good=good, bad=bad, missing=missing,
                           inputs=[str(folder), str(listing)], count=len(good) + len(bad) + 1)


@pytest.fixture
def ray_free(bundle_artifact, monkeypatch) -> SimpleNamespace:
    """run_batch without Ray: a fake cluster (recording the CPUs asked for) and the actors'
    scoring done in this process by the real Scorer."""
    import contextlib

    from ct_edge import batch
    from ct_edge.batch import cluster as batch_cluster
    from ct_edge.batch.payload import rows_to_table
    from ct_edge.batch.scorer import Scorer

    calls = SimpleNamespace(num_cpus=[])

    @contextlib.contextmanager
    def fake_cluster(address=None, num_cpus=None, **kwargs):
        calls.num_cpus.append(num_cpus)
        yield batch.Cluster(started=True, seconds=0.0, address=address,
                            cpus=num_cpus or batch_cluster.available_cpus())

    def fake_score(paths, payload, actors, options, part_rows, verbose):
        yield rows_to_table(Scorer(payload, **options).score(paths), payload.labels)

    monkeypatch.setattr(batch, "ray_cluster", fake_cluster)
    monkeypatch.setattr(batch, "score_on_ray", fake_score)
    return calls
