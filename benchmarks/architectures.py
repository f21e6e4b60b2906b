"""Issue #6: per architecture, train on the standard split, convert, and measure size, parity, latency.

    python -m benchmarks.architectures [--data DIR] [--archs a,b,...] [--out DIR]
        [--epochs N] [--lr R] [--size PX] [--reuse]

Each architecture is trained with the TrainConfig defaults (`make train`'s recipe, another
architecture) into <out>/<arch>/model, converted by convert_model into <out>/<arch>/bundle (a failed
parity gate is recorded, not fatal), and its tflite-int8 and onnx-fp32 artifacts are timed through
the runtime's backend: one thread, batch 1, the engine call only, on a preprocessed test image.
Writes <out>/architectures.json and <out>/architectures.md. Cross-validated accuracy is separate:
`python -m training.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ct_edge.cli.common import positive_int
from ct_edge.errors import CtEdgeError
from training import machine
from training.synthetic import DEFAULT_ROOT as BUILTIN_DATA

from .latency import time_calls

SCHEMA = "ct-edge-architectures/1"
DEFAULT_ARCHS = ("reference", "edge-gap", "edge-sep", "edge-gap-se")
DEFAULT_OUT = Path("artifacts") / "architectures"
TIMED = ("tflite-int8", "onnx-fp32")
INT8 = "tflite-int8"
RUNS = 1000
WARMUP = 50

Log = Callable[[str], None]


def train_arch(arch: str, data: Path | None, model_dir: Path, settings: dict | None = None,
               reuse: bool = False) -> dict:
    """Train one architecture with the default recipe (TrainConfig fields in `settings` changed,
    e.g. epochs, learning_rate, spec); returns training's metrics.json. `reuse`: a model folder
    that already holds model.keras and metrics.json is measured as it is."""
    from training.train import TrainConfig, train

    metrics_file = model_dir / "metrics.json"
    if reuse and metrics_file.is_file() and (model_dir / "model.keras").is_file():
        return json.loads(metrics_file.read_text(encoding="utf-8"))
    return train(TrainConfig(data=str(data) if data else None, out=str(model_dir), arch=arch,
                             **(settings or {})))


def convert_arch(model_dir: Path, bundle_dir: Path, log: Log) -> tuple[dict, list[str], Path]:
    """The project's converter; returns (manifest, gate failure reasons, the folder the bundle is
    in: `<bundle_dir>.rejected` when no artifact passed). A failed gate is a result."""
    from convert.pipeline import BundleRejected, ParityError, convert_model

    try:
        return convert_model(model_dir / "model.keras", bundle_dir, log=log), [], bundle_dir
    except BundleRejected as exc:  # bundle_dir still holds an earlier bundle: not this one
        return exc.manifest, exc.reasons, exc.folder
    except ParityError as exc:
        return exc.manifest, exc.reasons, bundle_dir


def artifact_figures(manifest: dict) -> dict[str, dict]:
    """Size, status and parity figures of every artifact, as the manifest records them."""
    keep = ("accuracy", "agreement", "disagreements", "max_abs_diff", "mean_abs_diff", "loss",
            "test_images", "per_class_recall", "convert_seconds")
    out = {}
    for entry in manifest.get("artifacts", []):
        parity = entry.get("parity") or {}
        out[entry["name"]] = {"file": entry["file"], "precision": entry["precision"],
                              "bytes": entry["bytes"], "status": entry["status"],
                              "failures": entry["failures"],
                              **{key: parity.get(key) for key in keep}}
    for entry in manifest.get("failed_conversions", []):
        out[entry["name"]] = {"file": entry["file"], "precision": entry["precision"], "bytes": None,
                              "status": "failed", "failures": entry["failures"]}
    return out


def timing_input(model_dir: Path) -> np.ndarray:
    """The first image of the model's test split, preprocessed exactly as convert sees it (h, w, c)."""
    from convert import dataset

    record, root = dataset.resolve_record(model_dir / "model.keras", None)
    x, _ = dataset.held_out_arrays(record, dataset.load_splits(record, root))
    return x[0]


def time_artifact(bundle_dir: Path, name: str, x: np.ndarray, runs: int, warmup: int) -> dict:
    """Batch-1 latency of one artifact's engine call (1 thread), after `warmup` untimed calls."""
    from convert.quiet import quiet
    from ct_edge.classifier import Classifier

    with quiet():  # LiteRT announces its XNNPACK delegate on stderr
        classifier = Classifier.from_bundle(bundle_dir, artifact=name, threads=1)
    batch = np.ascontiguousarray(x[None], dtype=np.float32)
    return {"threads": 1, "batch": 1, "warmup": warmup,
            **time_calls(lambda: classifier.backend.predict(batch), runs, warmup)}


def measure_arch(arch: str, data: Path | None, out: Path, runs: int, warmup: int, log: Log,
                 image: dict[str, np.ndarray], settings: dict | None = None,
                 reuse: bool = False) -> dict:
    """Train, convert and time one architecture; `image` caches the timing input across archs."""
    model_dir, bundle_dir = out / arch / "model", out / arch / "bundle"
    start = time.perf_counter()
    reused = reuse and (model_dir / "metrics.json").is_file() and (model_dir / "model.keras").is_file()
    log(f"{arch}: {'measuring the model already in' if reused else 'training into'} {model_dir}")
    metrics = train_arch(arch, data, model_dir, settings, reuse)
    log(f"{arch}: test accuracy {metrics['test_accuracy']:.1%}, {metrics['params']:,} parameters; "
        f"converting into {bundle_dir}")
    manifest, reasons, bundle_dir = convert_arch(model_dir, bundle_dir, log)
    artifacts = artifact_figures(manifest)
    if reasons:
        log(f"{arch}: parity gate FAILED: " + "; ".join(reasons))
    x = timing_input(model_dir)
    if "x" not in image or image["x"].shape != x.shape:  # one image per input size
        image["x"] = x
    latency: dict[str, dict] = {}
    for name in TIMED:
        if artifacts.get(name, {}).get("bytes") is None:
            latency[name] = {"error": f"no {name} artifact (conversion failed)"}
            continue
        log(f"{arch}: timing {name}, {runs} runs after {warmup} warm-up, 1 thread")
        try:
            latency[name] = time_artifact(bundle_dir, name, image["x"], runs, warmup)
        except Exception as exc:  # one engine failing must not lose the other figures
            latency[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {
        "arch": arch, "params": metrics["params"], "keras_test_accuracy": metrics["test_accuracy"],
        "test_images": metrics["test"]["n"], "test_source": metrics["test_source"],
        "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"],
        "train_seconds": metrics["seconds"], "keras_bytes": (model_dir / "model.keras").stat().st_size,
        "model_dir": str(model_dir), "bundle_dir": str(bundle_dir),
        "gate": {"passed": not reasons, "reasons": reasons}, "default": manifest.get("default"),
        "artifacts": artifacts, "latency": latency,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(entry: dict) -> str:
    return f"{entry['p50_ms']:.2f}" if "p50_ms" in entry else "-"


def render_table(results: dict) -> str:
    """The markdown comparison table of architectures.json's `architectures` list."""
    header = ["architecture", "parameters", "Keras test acc.", "tflite-int8 bytes", "int8 acc.",
              "int8 agreement", "int8 gate", "int8 p50 ms", "onnx-fp32 p50 ms"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in results["architectures"]:
        int8 = row["artifacts"].get(INT8, {})
        latency = row.get("latency", {})
        size = int8.get("bytes")
        cells = [row["arch"], f"{row['params']:,}", _pct(row["keras_test_accuracy"]),
                 "-" if size is None else f"{size:,}", _pct(int8.get("accuracy")),
                 _pct(int8.get("agreement")), int8.get("status", "missing"),
                 _ms(latency.get(INT8, {})), _ms(latency.get("onnx-fp32", {}))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    """architectures.md: the table, what it was measured on, and any gate failures."""
    rows = results["architectures"]
    n = rows[0]["test_images"] if rows else 0
    source = rows[0]["test_source"] if rows else ""
    parts = [
        "# Architectures (issue #6)", "",
        render_table(results), "",
        f"Data: {results['data']}; one training run per architecture (TrainConfig defaults, seed "
        f"{results['train_config']['seed']}); accuracies on the test split ({n} images, {source}). "
        "Cross-validated accuracy: `python -m training.evaluate`.",
        f"Latency: batch 1, 1 thread, engine call only on a preprocessed test image, "
        f"{results['runs']} runs after {results['warmup']} warm-up; p90 and more in "
        f"architectures.json. Load average at start {results['machine'].get('load_average_start')}, "
        f"at end {results.get('load_average_end')}.",
    ]
    failed = [(row["arch"], reason) for row in rows for reason in row["gate"]["reasons"]]
    if failed:
        parts += ["", "Parity gate failures:", *(f"- {arch}: {reason}" for arch, reason in failed)]
    return "\n".join(parts) + "\n"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "architectures.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "architectures.md").write_text(render_markdown(results), encoding="utf-8")


def run(data: Path | None, archs: Sequence[str], out: Path, runs: int, warmup: int,
        log: Log, settings: dict | None = None, reuse: bool = False) -> dict:
    """Every architecture in turn; the JSON and markdown are rewritten after each one."""
    from training.train import TrainConfig, builtin_data

    root = data if data is not None else builtin_data()
    results: dict = {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "data": str(root), "archs": list(archs), "runs": runs, "warmup": warmup,
        "train_config": {k: v for k, v in asdict(TrainConfig(**(settings or {}))).items()
                         if k not in ("data", "out")},
        "machine": machine.describe(), "architectures": [],
    }
    image: dict[str, np.ndarray] = {}
    for index, arch in enumerate(archs, 1):
        log(f"[{index}/{len(archs)}] {arch}")
        results["architectures"].append(measure_arch(arch, root, out, runs, warmup, log, image,
                                                     settings, reuse))
        results["load_average_end"] = machine.load_average()
        write(results, out)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.architectures", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m benchmarks.architectures --data ../shared/data/covid19-xray "
               f"--archs {','.join(DEFAULT_ARCHS)}")
    add = parser.add_argument
    add("--data", type=Path, default=None, help="data folder <root>/<split>/<class>/<image> "
        f"(default: the built-in synthetic set, generated into {BUILTIN_DATA}, as training.train)")
    add("--archs", default=",".join(DEFAULT_ARCHS),
        help="comma-separated architectures from training.models (default: %(default)s)")
    add("--out", type=Path, default=DEFAULT_OUT,
        help="output folder: <arch>/model, <arch>/bundle, architectures.json/.md "
             "(default: %(default)s)")
    add("--runs", type=positive_int, default=RUNS,
        help="timed calls per latency figure (default: %(default)s)")
    add("--warmup", type=positive_int, default=WARMUP,
        help="untimed calls before them (default: %(default)s)")
    add("--epochs", type=positive_int, default=None, help="maximum epochs (default: training's)")
    add("--lr", type=float, default=None, help="learning rate (default: training's)")
    add("--size", type=positive_int, default=None, help="input size in pixels (default: 128)")
    add("--reuse", action="store_true",
        help="measure a model already trained into <out>/<arch>/model instead of training again")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    archs = [name for name in args.archs.split(",") if name]
    if args.data is not None and not args.data.is_dir():
        print(f"error: data folder {args.data} does not exist", file=sys.stderr)
        return 2
    from training.models import ARCHITECTURES

    unknown = [name for name in archs if name not in ARCHITECTURES]
    if unknown or not archs:
        print(f"error: unknown architecture(s) {', '.join(unknown) or '(none given)'}; choose from "
              + ", ".join(ARCHITECTURES), file=sys.stderr)
        return 2
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[architectures {time.perf_counter() - started:7.1f}s] {line}", flush=True)

    from ct_edge.preprocess import PreprocessSpec

    settings: dict = {}
    if args.epochs:
        settings["epochs"] = args.epochs
    if args.lr:
        settings["learning_rate"] = args.lr
    if args.size:
        settings["spec"] = PreprocessSpec(size=args.size).to_dict()
    try:
        results = run(args.data, archs, args.out, args.runs, args.warmup, log, settings, args.reuse)
    except (CtEdgeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results["wall_s"] = round(time.perf_counter() - started, 1)
    write(results, args.out)
    print()
    print(render_table(results))
    print(f"\nwrote {args.out / 'architectures.json'}, {args.out / 'architectures.md'} "
          f"({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
