"""`ct-edge listen` against DCMTK's plain `storescp`: one 300-slice CT series sent by DCMTK's
`storescu` to each, side by side in the same run.

    python -m benchmarks.listen [--bundle artifacts/bundle] [--slices 300] [--size 512]
                                [--runs 3] [--stable-seconds 5] [--out benchmarks/results]

Figures, per run (the median over runs is the result):
- receive throughput: slices / wall time of `storescu` (first byte to the last response), for
  the node and for `storescp -od DIR` (which writes each file and does no fsync and no
  classification); the ratio node / plain is the goal (>= 0.8).
- time to the series result: from `storescu`'s exit (the last slice acknowledged) until the store
  shows the series complete; goal <= stable-seconds + 2 s.
- acknowledged instances lost: instances `storescu` sent with success status (all 300 when it
  exits 0) minus instances recorded in the store; goal 0.
The node classifies while it receives (a worker thread), so the CPU it spends on classification
during the transfer counts against its receive rate, as it would on a device.

Writes listen.json and listen.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ct_edge.cli.common import positive_float, positive_int

REPO = Path(__file__).resolve().parents[1]
AE = "CTEDGE"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_series(root: Path, slices: int, size: int, log=print) -> tuple[Path, str]:
    """A synthetic CT series, written once and reused (it is keyed by slices and size)."""
    import pydicom

    from training.synthetic_series import write_series

    folder = root / f"series-{slices}x{size}"
    files = sorted(folder.glob("*.dcm"))
    if len(files) != slices:
        shutil.rmtree(folder, ignore_errors=True)
        log(f"writing a {slices}-slice {size}-px series to {folder}")
        write_series(folder, "COVID-19", slices=slices, seed=0, size=size,
                     render_size=min(size, 256))
        files = sorted(folder.glob("*.dcm"))
    return folder, str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def send(port: int, files: list[str]) -> tuple[float, int, str]:
    """storescu of every file; (seconds, exit code, stderr)."""
    start = time.perf_counter()
    done = subprocess.run(["storescu", "-aec", AE, "-aet", "BENCH", "127.0.0.1", str(port), *files],
                          capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode, done.stderr[-500:]


def run_plain(files: list[str], work: Path) -> float:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", AE, "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        seconds, code, err = send(port, files)
        if code != 0:
            raise RuntimeError(f"storescu to storescp failed: {err}")
        received = len(list(out.iterdir()))
        if received != len(files):
            raise RuntimeError(f"storescp wrote {received} of {len(files)} files")
        return seconds
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_node(files: list[str], series_uid: str, bundle: Path, work: Path,
             stable: float) -> dict:
    from ct_edge.store import Store

    data = work / "node"
    log_path = work / "listen.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ct_edge.cli", "listen", "--bundle",
                                 str(bundle), "--host", "127.0.0.1", "--port", "0", "--data-dir",
                                 str(data), "--stable-seconds", str(stable)],
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline, port = time.monotonic() + 120, None
        while port is None and time.monotonic() < deadline:
            match = re.search(r"on 127\.0\.0\.1:(\d+)", log_path.read_text())
            port = int(match.group(1)) if match else None
            if proc.poll() is not None:
                raise RuntimeError(f"ct-edge listen exited:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        if port is None:
            raise RuntimeError("ct-edge listen did not start")
        seconds, code, err = send(port, files)
        acknowledged_at = time.monotonic()
        if code != 0:
            raise RuntimeError(f"storescu to ct-edge listen failed: {err}")
        with Store(data) as store:
            while True:
                series = store.get_dicom_series(series_uid=series_uid)
                if series and series["state"] == "complete":
                    break
                if time.monotonic() - acknowledged_at > stable + 600:
                    raise RuntimeError("the series did not complete")
                time.sleep(0.02)
            to_result = time.monotonic() - acknowledged_at
            recorded = len(store.dicom_series_slices(series["id"]))
        return {"seconds": seconds, "to_result_s": to_result, "recorded": recorded,
                "lost": len(files) - recorded, "label": series["label"],
                "status": series["status"], "counts": series["counts"]}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def measure(bundle: Path, slices: int, size: int, runs: int, stable: float, cache: Path,
            log=print) -> dict:
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        raise SystemExit("DCMTK is not installed (bash tools/setup_system.sh, or apt-get install "
                         "dcmtk)")
    folder, series_uid = make_series(cache, slices, size, log)
    files = [str(p) for p in sorted(folder.glob("*.dcm"))]
    megabytes = sum(Path(f).stat().st_size for f in files) / 1e6
    rows = []
    for index in range(runs):
        with tempfile.TemporaryDirectory(prefix="listen-bench-") as tmp:
            # Alternate which receiver goes first: a shared machine's load drifts.
            if index % 2 == 0:
                plain = run_plain(files, Path(tmp))
                node = run_node(files, series_uid, bundle, Path(tmp), stable)
            else:
                node = run_node(files, series_uid, bundle, Path(tmp), stable)
                plain = run_plain(files, Path(tmp))
        row = {"plain_s": plain, "node_s": node["seconds"], "ratio": plain / node["seconds"],
               "to_result_s": node["to_result_s"], "lost": node["lost"], "label": node["label"],
               "status": node["status"], "counts": node["counts"]}
        log(f"run {index + 1}: storescp {slices / plain:.0f} slices/s, ct-edge listen "
            f"{slices / node['seconds']:.0f} slices/s (ratio {row['ratio']:.2f}), series result "
            f"{node['to_result_s']:.2f} s after the last slice, {node['lost']} lost, "
            f"{node['label']} ({node['status']})")
        rows.append(row)
    median = {key: statistics.median(r[key] for r in rows)
              for key in ("plain_s", "node_s", "ratio", "to_result_s")}
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "slices": slices, "size": size, "megabytes": round(megabytes, 1),
            "stable_seconds": stable, "bundle": str(bundle), "runs": rows, "median": median,
            "lost_total": sum(r["lost"] for r in rows),
            "goals": {"ratio>=0.8": median["ratio"] >= 0.8,
                      "to_result<=stable+2": median["to_result_s"] <= stable + 2,
                      "lost==0": all(r["lost"] == 0 for r in rows)}}


def markdown(result: dict) -> str:
    m, n = result["median"], result["slices"]
    lines = [f"# ct-edge listen vs DCMTK storescp ({result['created']})", "",
             f"{n} CT slices of {result['size']} px ({result['megabytes']} MB) sent by DCMTK "
             f"storescu over loopback; median of {len(result['runs'])} runs; "
             f"--stable-seconds {result['stable_seconds']:g}; {result['cpus']} CPUs, load "
             f"average {result['load_average'][0]} at the end.", "",
             "| figure | value | goal |", "|---|---|---|",
             f"| storescp (plain receiver) | {n / m['plain_s']:.0f} slices/s | |",
             f"| ct-edge listen | {n / m['node_s']:.0f} slices/s | |",
             f"| throughput ratio | {m['ratio']:.2f} | >= 0.8 |",
             f"| last slice to series result | {m['to_result_s']:.2f} s | <= "
             f"{result['stable_seconds'] + 2:g} s |",
             f"| acknowledged instances lost | {result['lost_total']} | 0 |"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.listen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "artifacts" / "bundle",
                        help="bundle ct-edge listen classifies with (default: artifacts/bundle in "
                             "the repository)")
    parser.add_argument("--slices", type=positive_int, default=300,
                        help="slices in the synthetic CT series sent (default: %(default)s)")
    parser.add_argument("--size", type=positive_int, default=512,
                        help="rows and columns of each slice, pixels (default: %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=3,
                        help="runs of both receivers, which goes first alternating; the result is "
                             "the median (default: %(default)s)")
    parser.add_argument("--stable-seconds", type=positive_float, default=5.0,
                        help="ct-edge listen --stable-seconds: a series is complete after this many "
                             "seconds without a new slice (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=REPO / "artifacts" / "listen-bench",
                        help="folder the synthetic series is written to once and reused from "
                             "(default: artifacts/listen-bench in the repository)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="folder for listen.json and listen.md (default: benchmarks/results in "
                             "the repository)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        print(f"benchmarks.listen: no bundle at {args.bundle}; run `make demo` first",
              file=sys.stderr)
        return 2
    try:
        result = measure(args.bundle, args.slices, args.size, args.runs, args.stable_seconds,
                         args.cache, log=lambda line: print(line, file=sys.stderr, flush=True))
    except (RuntimeError, OSError) as exc:
        print(f"benchmarks.listen: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "listen.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "listen.md").write_text(text)
    print(text)
    return 0 if all(result["goals"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
