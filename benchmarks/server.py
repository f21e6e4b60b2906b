"""make bench, server row: `ct-edge serve` under N concurrent loopback clients against in-process
`Classifier.predict` on the same 128-px PNGs.

    python -m benchmarks.server --bundle artifacts/bundle [--concurrency 4] [--seconds 10]
                                [--workers 2] [--quick] [--out benchmarks/results]
    python -m benchmarks.server --stacks    (http.server vs Starlette + uvicorn; needs both)

Prints requests/s, p50/p99, errors and the server's RSS beside the in-process throughput at the
same concurrency, the ratio, the goals of issue 15, and whether micro-batching would pay (engine
time per image at batch 1 vs batch 4). Writes server.json into --out.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from ct_edge.cli.common import positive_float, positive_int

from .inputs import chest
from .latency import summarize
from .proc import REPO, child_env

GOALS = {"ratio": 0.70, "p99_ms": 50.0, "errors": 0, "rss_mb": 150.0}
IMAGES = 32
SIDE = 128


def png_images(count: int = IMAGES, side: int = SIDE) -> list[bytes]:
    """`count` chest-like 8-bit PNGs of side x side pixels (deterministic)."""
    images = []
    for seed in range(count):
        buffer = io.BytesIO()
        pixels = np.rint(chest(side, side, seed) * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def run_clients(call: Callable[[int], bool], concurrency: int, seconds: float) -> dict:
    """`concurrency` threads calling `call(i)` (True = success) for `seconds`; the rate and the
    latencies of successful calls only (a fast refusal, 503 say, must not look like throughput),
    and the number of failed calls."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    stop = time.perf_counter() + seconds

    def worker(n: int) -> None:
        i = n
        while time.perf_counter() < stop:
            start = time.perf_counter()
            if call(i):
                latencies[n].append(time.perf_counter() - start)
            else:
                errors[n] += 1
            i += concurrency

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - begin
    samples = [s for per in latencies for s in per]
    if not samples:
        raise RuntimeError(f"every one of {sum(errors)} calls failed")
    return {"requests": len(samples), "per_s": len(samples) / elapsed, "errors": sum(errors),
            **summarize(samples)}


def poster(host: str, port: int, path: str, images: list[bytes]) -> Callable[[int], bool]:
    """`call(i)` for run_clients: POST image i on the calling thread's keep-alive connection."""
    local = threading.local()

    def call(i: int) -> bool:
        try:
            if not hasattr(local, "connection"):
                local.connection = http.client.HTTPConnection(host, port, timeout=30)
                local.connection.connect()
                # http.client sends headers and body in two writes; like curl, no Nagle delay.
                local.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            local.connection.request("POST", path, images[i % len(images)])
            response = local.connection.getresponse()
            response.read()
            return response.status == 200
        except (OSError, http.client.HTTPException):
            if hasattr(local, "connection"):
                local.connection.close()
                del local.connection
            return False

    return call


def in_process(bundle: str, images: list[bytes], concurrency: int, seconds: float) -> dict:
    from ct_edge.classifier import Classifier

    classifier = Classifier.from_bundle(bundle)
    for image in images[:8]:
        classifier.predict(image)
    result = run_clients(lambda i: classifier.predict(images[i % len(images)]) is not None,
                         concurrency, seconds)
    # Would micro-batching pay? Engine time per image at batch 1 against batch 4.
    x = np.stack([_fit(classifier, image) for image in images[:4]])
    per_image = {}
    for batch in (1, 4):
        classifier.predict_array(x[:batch])
        start, runs = time.perf_counter(), 50
        for _ in range(runs):
            classifier.predict_array(x[:batch])
        per_image[batch] = (time.perf_counter() - start) / (runs * batch) * 1e3
    stages = [classifier.predict(image).timings_ms for image in images]
    result["engine_ms_per_image"] = {f"batch{b}": round(v, 3) for b, v in per_image.items()}
    result["stage_ms"] = {stage: round(float(np.mean([s[stage] for s in stages])), 3)
                          for stage in stages[0]}
    return result


def _fit(classifier, image: bytes) -> np.ndarray:
    from ct_edge.preprocess import decode, fit

    return fit(decode(image, classifier.spec), classifier.spec)


@contextmanager
def serve_process(bundle: str, *options: str) -> Iterator[tuple[subprocess.Popen, str, int]]:
    """`ct-edge serve` on a free loopback port with a throw-away store: (process, host, port);
    stopped on exit. RuntimeError when it does not start."""
    with tempfile.TemporaryDirectory(prefix="ct-edge-bench-") as data_dir:
        command = [sys.executable, "-m", "ct_edge.cli", "serve", "--bundle", bundle, "--port", "0",
                   "--data-dir", data_dir, *options]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True, env=child_env(), cwd=REPO)
        try:
            line = process.stdout.readline()
            match = re.search(r"http://([0-9.]+):(\d+)", line)
            if not match:
                raise RuntimeError(f"ct-edge serve did not start: {line!r}")
            yield process, match.group(1), int(match.group(2))
        finally:
            process.terminate()
            process.wait(30)


def over_http(bundle: str, images: list[bytes], concurrency: int, seconds: float,
              workers: int) -> dict:
    with serve_process(bundle, "--workers", str(workers), "--queue", "64") as (process, host, port):
        idle_rss = rss_mb(process.pid)[0]
        call = poster(host, port, "/v1/classify", images)
        run_clients(call, concurrency, min(2.0, seconds / 4))  # warm-up
        result = run_clients(call, concurrency, seconds)
        result["rss_mb"], result["peak_rss_mb"] = rss_mb(process.pid)
        result["idle_rss_mb"] = idle_rss
    return result


# --- the stack choice (docs/serve.md) -----------------------------------------------------------

_STDLIB_APP = """
import json, sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *a): pass
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        out = json.dumps({"n": len(body)}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True); s.serve_forever()
"""
_STARLETTE_APP = """
import socket, sys
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
import uvicorn
async def echo(request):
    return JSONResponse({"n": len(await request.body())})
app = Starlette(routes=[Route("/", echo, methods=["POST"])])
probe = socket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]; probe.close()
print(port, flush=True)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


def compare_stacks(images: list[bytes], concurrency: int, seconds: float) -> dict:
    """Import time, RSS and requests/s of an echo endpoint on each stack (no model)."""
    def import_s(statement: str) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True, env=child_env())
            best = min(best, time.perf_counter() - start)
        return best

    bare = import_s("pass")
    results = {}
    for name, imports, app in [
            ("http.server", "import http.server, json", _STDLIB_APP),
            ("starlette+uvicorn", "import starlette.applications, starlette.responses, "
                                  "starlette.routing, uvicorn", _STARLETTE_APP)]:
        try:
            imported = import_s(imports) - bare
        except subprocess.CalledProcessError:
            results[name] = {"skipped": "not installed"}
            continue
        process = subprocess.Popen([sys.executable, "-c", app], stdout=subprocess.PIPE, text=True,
                                   env=child_env())
        try:
            port = int(process.stdout.readline())
            deadline = time.monotonic() + 20
            while True:  # uvicorn binds after it printed the port
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            call = poster("127.0.0.1", port, "/", images)
            run = run_clients(call, concurrency, seconds)
            results[name] = {"import_s": round(imported, 3), "rss_mb": round(rss_mb(process.pid)[0], 1),
                             "per_s": round(run["per_s"]), "p99_ms": round(run["p99_ms"], 2)}
        finally:
            process.terminate()
            process.wait(10)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="artifacts/bundle",
                        help="bundle served and loaded in process (default: %(default)s)")
    parser.add_argument("--concurrency", type=positive_int, default=4,
                        help="concurrent clients: keep-alive loopback connections, or threads in "
                             "process (default: %(default)s)")
    parser.add_argument("--seconds", type=positive_float, default=10.0,
                        help="seconds each figure is timed for (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=2,
                        help="ct-edge serve --workers: its worker threads (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="3 s per figure (default: --seconds per figure)")
    parser.add_argument("--stacks", action="store_true",
                        help="compare http.server with Starlette + uvicorn instead (default: off)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                        help="folder for server.json (default: benchmarks/results in the repository)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seconds = 3.0 if args.quick else args.seconds
    images = png_images()
    if args.stacks:
        print(json.dumps(compare_stacks(images, args.concurrency, seconds), indent=2))
        return 0
    if not (Path(args.bundle) / "manifest.json").is_file():
        print(f"benchmarks.server: no bundle at {args.bundle}; run `make demo` first",
              file=sys.stderr)
        return 2
    try:
        local = in_process(args.bundle, images, args.concurrency, seconds)
        served = over_http(args.bundle, images, args.concurrency, seconds, args.workers)
    except RuntimeError as exc:  # every call failed, or the server did not start
        print(f"benchmarks.server: error: {exc}", file=sys.stderr)
        return 2
    ratio = served["per_s"] / local["per_s"]
    checks = {"ratio": ratio >= GOALS["ratio"], "p99_ms": served["p99_ms"] < GOALS["p99_ms"],
              "errors": served["errors"] == GOALS["errors"],
              "rss_mb": served["peak_rss_mb"] < GOALS["rss_mb"]}
    report = {"images": f"{len(images)} PNG, {SIDE}x{SIDE} 8-bit", "concurrency": args.concurrency,
              "seconds": seconds, "workers": args.workers, "cpus": os.cpu_count(),
              "in_process": local, "server": served, "ratio": ratio, "goals": GOALS,
              "passed": checks}
    print(f"server row: {args.concurrency} clients on loopback, {len(images)} {SIDE}-px PNGs, "
          f"{seconds:g} s, {args.workers} workers, {os.cpu_count()} CPUs")
    print(f"  in-process Classifier.predict ({args.concurrency} threads): "
          f"{local['per_s']:.0f}/s, p50 {local['p50_ms']:.2f} ms, p99 {local['p99_ms']:.2f} ms")
    print(f"  ct-edge serve POST /v1/classify: {served['per_s']:.0f}/s, p50 "
          f"{served['p50_ms']:.2f} ms, p99 {served['p99_ms']:.2f} ms, errors {served['errors']}, "
          f"RSS {served['rss_mb']:.0f} MiB (peak {served['peak_rss_mb']:.0f}, idle "
          f"{served['idle_rss_mb']:.0f})")
    print(f"  server / in-process throughput: {ratio:.0%}")
    print(f"  engine per image: batch 1 {local['engine_ms_per_image']['batch1']:.3f} ms, batch 4 "
          f"{local['engine_ms_per_image']['batch4']:.3f} ms; stages {local['stage_ms']}")
    print("  goals: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in checks.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
