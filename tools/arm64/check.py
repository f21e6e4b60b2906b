"""`make arm64-check`: the runtime on aarch64 (QEMU user mode) gives the x86 answers.

Runs tools/arm64/classify.py twice on the same copy of a bundle and the same images: once with
the host's Python, once with an arm64 Debian python3.11 under `qemu-aarch64 -L ROOTFS` with the
aarch64 wheels of the runtime's pinned dependencies (tools/arm64/setup.sh prepares both). Checked:
the bundle's default TFLite artifact, the fp32 TFLite one and every ONNX one. Passes when every
input gets the same label on both machines and every probability agrees within --tolerance
(1e-5), for every artifact, the full-int8 one included. For int8-output models the report also
says how many output quantization steps apart the raw outputs are and whether TFLite's portable
reference kernels agree, which tells a kernel rounding difference from a runtime bug.

The bundle: --bundle, else artifacts/bundle when it loads, else a small one built once into
artifacts/arm64/bundle (synthetic data, a 3-epoch model, the converter). Emulated timings are
printed for the record only: they say nothing about a real Raspberry Pi.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "runtime")]  # this checkout's code, whatever is installed
CACHE = REPO / "artifacts" / "arm64"
FIXTURES = REPO / "tests" / "fixtures"
CLASSIFY = REPO / "tools" / "arm64" / "classify.py"
TOLERANCE = 1e-5


def log(line: str) -> None:
    print(f"arm64-check: {line}", file=sys.stderr, flush=True)


def find_bundle(explicit: Path | None) -> Path:
    from ct_edge.bundle import Bundle
    from ct_edge.errors import BundleError

    if explicit is not None:
        Bundle.load(explicit)
        return explicit
    for candidate in (REPO / "artifacts" / "bundle", CACHE / "bundle"):
        try:
            Bundle.load(candidate)
        except BundleError:
            continue
        return candidate
    return build_bundle(CACHE / "bundle")


def build_bundle(out: Path) -> Path:
    """A small real bundle: synthetic data, a 3-epoch model, every format (a few minutes)."""
    from convert.pipeline import BundleRejected, ParityError, convert_model
    from training.synthetic import generate_dataset
    from training.train import TrainConfig, train

    log(f"no bundle found; building a small one into {out} (synthetic data, 3 epochs)")
    data = generate_dataset(CACHE / "data", train_per_class=12, test_per_class=6, seed=0, size=96)
    model = CACHE / "model"
    with contextlib.redirect_stdout(sys.stderr):
        train(TrainConfig(data=str(data), out=str(model), epochs=3, patience=3,
                          cache=str(CACHE / "cache")))
    try:
        convert_model(model / "model.keras", out)
    except BundleRejected as exc:  # nothing in it can run: no bundle to check
        raise RuntimeError("the small bundle has no artifact that passed: "
                           + "; ".join(exc.reasons)) from None
    except ParityError:  # an untrained model may miss the gate for some artifacts: still a bundle
        pass
    return out


def choose_artifacts(bundle_dir: Path) -> list[str]:
    """The default TFLite artifact (the bundle's default, else what the runtime picks), the float
    TFLite one, and every ONNX one."""
    from ct_edge.bundle import Bundle
    from ct_edge.errors import BundleError

    bundle = Bundle.load(bundle_dir)
    names = []
    try:
        names.append(bundle.select(fmt="tflite").name)
    except BundleError:
        if "tflite-int8" in bundle.artifacts:
            names.append("tflite-int8")
    names += [a.name for a in bundle.artifacts.values()
              if (a.format == "tflite" and a.precision == "fp32") or a.format == "onnx"]
    names = list(dict.fromkeys(names))
    if not any(bundle.artifacts[n].format == "tflite" for n in names) or \
            not any(bundle.artifacts[n].format == "onnx" for n in names):
        raise SystemExit(f"arm64-check: {bundle_dir} lacks a TFLite or an ONNX artifact: {names}")
    return names


def inputs(limit_synthetic: int = 6, extra: list[Path] = (), limit_extra: int = 60) -> list[Path]:
    """Every fixture kind (PNG 8/16-bit, RGBA, palette, JPEG RGB/gray/CMYK, DICOM CT), a few
    synthetic scans, and up to `limit_extra` images spread evenly over the `extra` files/folders."""
    files = sorted(FIXTURES.glob("*.png")) + sorted(FIXTURES.glob("*.jpg")) + \
        sorted(FIXTURES.glob("*.dcm"))
    for root in (REPO / "artifacts" / "data" / "synthetic" / "test", CACHE / "data" / "test"):
        if root.is_dir():
            scans = sorted(root.glob("*/*.png"))
            step = max(1, len(scans) // limit_synthetic)
            files += scans[::step][:limit_synthetic]
            break
    from ct_edge import IMAGE_SUFFIXES

    more: list[Path] = []
    for entry in extra:
        found = sorted(f for f in ([entry] if entry.is_file() else entry.rglob("*"))
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise SystemExit(f"arm64-check: --images {entry}: no such file, or no images in it")
        more += found
    if len(more) > limit_extra:  # spread evenly, first and last included
        more = [more[i] for i in sorted({round(i) for i in np.linspace(0, len(more) - 1, limit_extra)})]
    return files + more


def run(command: list[str], env: dict[str, str], what: str, timeout: float) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"arm64-check: the {what} run failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds


def compare(host: dict, arm: dict, tolerance: float) -> tuple[list[str], dict]:
    """Same label, status and probabilities within `tolerance` for every artifact and input, int8 ones
    included. For an int8-output model the report adds, as a diagnosis when it fails, how many
    output quantization steps apart the raw outputs are and whether TFLite's portable reference
    kernels agree (then the difference is in the optimized kernels, not in the runtime)."""
    problems, summary = [], {}
    if arm["machine"] != "aarch64":
        problems.append(f"the emulated run reports machine {arm['machine']!r}, not aarch64")
    for name, ours in host["artifacts"].items():
        theirs = arm["artifacts"][name]
        if ours["sha256"] != theirs["sha256"]:
            problems.append(f"{name}: the two runs loaded different model files")
        step = ours.get("output_step")
        worst, worst_raw, same, exact = 0.0, 0.0, 0, 0
        for a, b in zip(ours["results"], theirs["results"], strict=True):
            if a["path"] != b["path"]:
                problems.append(f"{name}: inputs out of order ({a['path']} vs {b['path']})")
                continue
            answer_a, answer_b = (a["label"], a.get("status")), (b["label"], b.get("status"))
            same += answer_a == answer_b
            if answer_a != answer_b:
                problems.append(f"{name}: {a['path']}: x86 says {answer_a}, aarch64 {answer_b}")
            # np.max, not max(): a NaN must propagate, not lose every comparison
            diff = float(np.max(np.abs([a["probabilities"][k] - b["probabilities"][k]
                                        for k in a["probabilities"]])))
            raw = max(abs(p - q) for p, q in zip(a["raw"], b["raw"], strict=True))
            worst, worst_raw = max(worst, diff), max(worst_raw, raw)
            exact += diff <= tolerance
            if not diff <= tolerance:  # NaN included
                steps = f"; raw int8 outputs {raw / step:.0f} step(s) apart" if step else ""
                problems.append(f"{name}: {a['path']}: probabilities differ by {diff:.2e} "
                                f"(> {tolerance:g}){steps}")
        row = {"inputs": len(ours["results"]), "same_label": same, "within_tolerance": exact,
               "max_abs_diff": worst, "engine_x86": ours["engine"],
               "engine_aarch64": theirs["engine"], "output_step": step}
        if step is not None:
            row["max_raw_diff_steps"] = round(worst_raw / step, 3)
            reference = ours.get("reference_raw")
            reference_same = reference is not None and reference == theirs.get("reference_raw")
            row["reference_kernels_identical"] = reference_same
        summary[name] = row
    return problems, summary


def build_parser() -> argparse.ArgumentParser:
    from ct_edge.cli.common import positive_int  # after the sys.path line above

    parser = argparse.ArgumentParser(prog="python -m tools.arm64.check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle folder (default: artifacts/bundle when it loads, else a small one "
                             "built once into artifacts/arm64/bundle)")
    parser.add_argument("--rootfs", type=Path, default=CACHE / "rootfs",
                        help="the arm64 Debian userland for qemu-aarch64 -L, from tools/arm64/setup.sh "
                             "(default: artifacts/arm64/rootfs in the repository)")
    parser.add_argument("--site", type=Path, default=CACHE / "site",
                        help="the aarch64 wheels of the runtime's dependencies, from "
                             "tools/arm64/setup.sh (default: artifacts/arm64/site in the repository)")
    parser.add_argument("--images", type=Path, nargs="*", default=[],
                        help="more inputs: image files or folders (default: none)")
    parser.add_argument("--max-images", type=positive_int, default=60,
                        help="at most this many of --images, spread evenly (default: 60)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="largest difference allowed between the two machines' probabilities "
                             "(default: %(default)g)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="per run, seconds (default: %(default)g)")
    parser.add_argument("--report", type=Path, default=CACHE / "report.json",
                        help="JSON report written here (default: artifacts/arm64/report.json in the "
                             "repository)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    python_arm = args.rootfs / "usr" / "bin" / "python3.11"
    qemu = shutil.which("qemu-aarch64")
    if qemu is None or not python_arm.is_file() or not args.site.is_dir():
        raise SystemExit("arm64-check: run tools/arm64/setup.sh first (qemu-aarch64, rootfs, wheels)")
    source = find_bundle(args.bundle)
    names = choose_artifacts(source)
    images = inputs(extra=args.images, limit_extra=args.max_images)
    with tempfile.TemporaryDirectory(prefix="ct-edge-arm64-") as tmp:
        # Both runs read one private copy: a bundle replaced meanwhile cannot split the comparison.
        bundle = Path(tmp) / "bundle"
        shutil.copytree(source, bundle)
        rel = [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in images]
        tail = [str(CLASSIFY), str(bundle), "--reference", "--artifacts", ",".join(names), *rel]
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "LANG": "C.UTF-8",
                "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "TF_CPP_MIN_LOG_LEVEL": "2"}
        log(f"bundle {source} ({', '.join(names)}); {len(images)} inputs")
        host, host_s = run([sys.executable, *tail],
                           {**base, "PYTHONPATH": str(REPO / "runtime")}, "x86 (host)", args.timeout)
        log(f"x86 run: {host_s:.1f} s")
        arm_env = {**base, "PYTHONPATH": f"{args.site.resolve()}:{REPO / 'runtime'}"}
        arm, arm_s = run([qemu, "-L", str(args.rootfs.resolve()), str(python_arm.resolve()), *tail],
                         arm_env, "aarch64 (QEMU)", args.timeout)
        log(f"aarch64 run under QEMU: {arm_s:.1f} s (emulated: not a Raspberry Pi speed)")
    problems, summary = compare(host, arm, args.tolerance)
    qemu_version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    report = {"bundle": str(source), "inputs": rel, "tolerance": args.tolerance,
              "host_machine": host["machine"], "emulated_machine": arm["machine"],
              "qemu": qemu_version.splitlines()[0] if qemu_version else None,
              "host_seconds": round(host_s, 1), "emulated_seconds": round(arm_s, 1),
              "artifacts": summary, "problems": problems, "passed": not problems}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"arm64-check: {host['machine']} (host) vs {arm['machine']} ({report['qemu']})")
    for name, s in summary.items():
        line = (f"  {name:<15} {s['inputs']:>3} inputs  same label {s['same_label']}/{s['inputs']}  "
                f"within {args.tolerance:g}: {s['within_tolerance']}/{s['inputs']}  "
                f"max |dp| {s['max_abs_diff']:.1e}  ({s['engine_aarch64']})")
        if s["output_step"] is not None:
            line += (f"\n  {'':<15} int8 output: max {s['max_raw_diff_steps']:g} quantization step(s) "
                     f"apart; reference kernels identical: {s['reference_kernels_identical']}")
        print(line)
    print(f"  wall time: host {host_s:.1f} s, emulated {arm_s:.1f} s "
          "(QEMU emulation: says nothing about a real Pi)")
    for problem in problems:
        print(f"  FAIL {problem}")
    print(f"arm64-check: {'passed' if not problems else 'FAILED'} (tolerance {args.tolerance:g}); "
          f"report {args.report.relative_to(REPO) if args.report.is_relative_to(REPO) else args.report}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
