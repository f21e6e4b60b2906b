"""make convert installs its bundle atomically: an interrupted, failed or SIGKILLed run leaves the
previous bundle, an orphaned backup is restored, and only a folder convert wrote is replaced."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from convert_helpers import leftovers, snapshot

from ct_edge.bundle import Bundle

REPO = Path(__file__).resolve().parents[1]


# --- atomicity ----------------------------------------------------------------------------------


def test_interrupted_convert_leaves_the_previous_bundle(converted, easy_model: Path,
                                                       tmp_path: Path) -> None:
    from convert.formats import FORMATS
    from convert.pipeline import convert_model

    out = tmp_path / "bundle"
    shutil.copytree(converted[0], out)
    before = snapshot(out)

    def interrupted(ctx) -> bytes:
        raise KeyboardInterrupt

    table = (FORMATS[4], replace(FORMATS[5], writer=interrupted))  # after onnx-fp32 is staged
    with pytest.raises(KeyboardInterrupt):
        convert_model(easy_model, out, table=table, log=None)
    assert snapshot(out) == before
    assert leftovers(out) == []
    Bundle.load(out).artifacts["tflite-int8"].read_verified()


def test_failed_swap_puts_the_previous_bundle_back(tmp_path: Path, monkeypatch) -> None:
    from convert import staging
    from training import folders

    out = tmp_path / "bundle"
    out.mkdir()
    old = json.dumps(dict.fromkeys(staging.MANIFEST_KEYS))
    (out / "manifest.json").write_text(old)
    staged = staging.prepare(out)
    (staged / "manifest.json").write_text('{"new": true}')
    real_rename = os.rename

    def rename(src, dst) -> None:
        if Path(src) == staged:
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(folders.os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        folders.install(staged, out)
    assert (out / "manifest.json").read_text() == old


def test_a_backup_orphaned_by_a_killed_swap_is_restored(tmp_path: Path) -> None:
    from convert import staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    out = tmp_path / "bundle"
    backup = tmp_path / f".bundle.old-{pid}-abcd"
    backup.mkdir()
    (backup / "manifest.json").write_text("{}")
    stale = tmp_path / f".bundle.convert-{pid}-xyz"
    stale.mkdir()
    staged = staging.prepare(out)
    assert (out / "manifest.json").read_text() == "{}"
    assert not backup.exists() and not stale.exists()
    shutil.rmtree(staged)


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(easy_model: Path, tmp_path: Path) -> None:
    from convert.pipeline import ConvertError, convert_model

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not a ct-edge bundle"):
        convert_model(easy_model, tmp_path, formats=["onnx-fp32"], log=None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _web_app(folder: Path, bundle: Path) -> None:
    """A web app: its manifest.json is no bundle's."""
    (folder / "manifest.json").write_text(json.dumps({"name": "My PWA", "start_url": "/"}))
    (folder / "index.html").write_text("<h1>precious</h1>")
    (folder / "assets").mkdir()
    (folder / "assets" / "app.js").write_text("")


def _bundle_and_a_note(folder: Path, bundle: Path) -> None:
    shutil.copytree(bundle, folder, dirs_exist_ok=True)
    (folder / "notes.txt").write_text("mine")


def _bundle_and_a_folder(folder: Path, bundle: Path) -> None:
    shutil.copytree(bundle, folder, dirs_exist_ok=True)
    (folder / "model_weights").mkdir()
    (folder / "model_weights" / "mine.bin").write_text("mine")


@pytest.mark.parametrize(("make", "holds"), [
    (_web_app, "it holds assets/, index.html, manifest.json;"),
    (lambda folder, bundle: (folder / "manifest.json").write_text("[1, 2]"), "manifest.json"),
    (lambda folder, bundle: (folder / "manifest.json").write_text("{not json"), "manifest.json"),
    (lambda folder, bundle: (folder / "parity.md").write_text("# mine"), "parity.md"),
    (_bundle_and_a_note, "it holds notes.txt, domain.npz, manifest.json, model_dynamic.tflite, "
                         "model_fp16.tflite and 6 more;"),
    (_bundle_and_a_folder, "it holds model_weights/, domain.npz,"),
], ids=["web-app", "manifest-not-an-object", "manifest-not-json", "no-manifest",
        "bundle-and-a-note", "bundle-and-a-folder"])
def test_only_a_folder_convert_wrote_is_replaced(converted, tmp_path: Path, make,
                                                 holds: str) -> None:
    from convert import staging
    from convert.pipeline import ConvertError

    site = tmp_path / "site"
    site.mkdir()
    make(site, converted[0])
    before = _tree(site)
    with pytest.raises(ConvertError) as caught:
        staging.prepare(site)
    message = str(caught.value)
    assert message.startswith(f"refusing to replace {site}: it is not empty and not a ct-edge "
                              "bundle"), message
    assert holds in message and "\n" not in message, message
    assert _tree(site) == before
    assert [p.name for p in tmp_path.iterdir()] == ["site"], "no staging folder was made"


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_a_format_file_not_named_as_a_bundle_file_is_refused(tmp_path: Path) -> None:
    from convert.formats import FORMATS
    from convert.pipeline import ConvertError, convert_model

    table = (replace(FORMATS[0], file="weights.tflite"),)
    with pytest.raises(ConvertError, match=r"'weights\.tflite' must be model_"):
        convert_model(tmp_path / "model.keras", tmp_path / "b", table=table, log=None)
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_bundle_and_a_bare_bundle_manifest_may_be_replaced(converted,
                                                                      tmp_path: Path) -> None:
    from convert import staging

    bundle = tmp_path / "bundle"
    shutil.copytree(converted[0], bundle)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps(dict.fromkeys(staging.MANIFEST_KEYS)))
    for out in (bundle, bare):
        shutil.rmtree(staging.prepare(out))  # no ConvertError


@pytest.mark.slow
def test_sigkilled_convert_leaves_the_previous_bundle(converted, easy_model: Path,
                                                     tmp_path: Path) -> None:
    from convert.pipeline import convert_model

    out = tmp_path / "bundle"
    shutil.copytree(converted[0], out)
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "convert", "--model", str(easy_model),
                                "--out", str(out)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            staged = list(tmp_path.glob(".bundle.convert-*/model_*"))
            if staged:
                break
            time.sleep(0.05)
        assert process.poll() is None, "convert finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert snapshot(out) == before
    assert leftovers(out), "the killed run's staging folder is still there"
    convert_model(easy_model, out, formats=["onnx-fp32"], log=None)
    assert leftovers(out) == [], "the next run cleans up after the killed one"
    assert [a["name"] for a in Bundle.load(out).manifest["artifacts"]] == ["onnx-fp32"]
