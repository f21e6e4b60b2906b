"""Peak memory of `ct-edge serve` under concurrent worst-case uploads, against the bound.

    python -m benchmarks.serve_memory --bundle artifacts/bundle [--clients 4] [--out DIR]

Starts `ct-edge serve` and sends, all at once from loopback clients: the largest 16-bit PNG the
runtime accepts (with ?explain=1), an OIP v2 FP32 batch as JSON just inside what the server
parses, and an OIP FP32 batch of 64 as binary data. A client answered 503 waits Retry-After and
sends again, as a well-behaved client does. Prints each request's status, the server's peak
RSS (VmHWM) and whether it stayed inside limits.MEMORY_BOUND_MB; an OIP JSON body too large to
parse within the decode budget is answered 413. Writes serve_memory.json into --out.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from ct_edge.cli.common import positive_int
from ct_edge.limits import DECODE_BUDGET_BYTES, MEMORY_BOUND_MB
from ct_edge.server.oip import json_parse_cost

from .memory import limit_input
from .proc import REPO
from .server import rss_mb, serve_process

INFER = "/v2/models/ct-edge/infer"
ROUNDS = 30  # 503-and-retry rounds a client makes before it gives up


def fp32_json(size: int, images: int) -> bytes:
    """An OIP FP32 request of `images` preprocessed inputs as JSON numbers."""
    count = images * size * size * 3
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                   "shape": [images, size, size, 3],
                                   "data": [0.123456] * count}]}).encode()


def fp32_binary(size: int, images: int) -> tuple[bytes, dict[str, str]]:
    """An OIP FP32 request of `images` inputs in Triton's binary-data extension."""
    raw = b"\x00\x00\x00\x3f" * (images * size * size * 3)  # 0.5f, little-endian
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [images, size, size, 3],
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def post_until_answered(port: int, path: str, body: bytes, headers: dict[str, str]) -> dict:
    """POST, again after Retry-After while the server answers 503; the last status and time."""
    started = time.perf_counter()
    for attempt in range(1, ROUNDS + 1):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
            text = response.read()
            retry = response.getheader("Retry-After")
        finally:
            connection.close()
        if response.status != 503 or attempt == ROUNDS:
            break
        time.sleep(float(retry or 1))
    return {"path": path.split("?")[0], "status": response.status, "attempts": attempt,
            "seconds": round(time.perf_counter() - started, 2),
            "error": json.loads(text).get("error") if response.status != 200 else None}


def measure(bundle: str, folder: Path, clients: int = 4) -> dict:
    """Start `ct-edge serve` on `bundle`, send the worst-case uploads at once, stop it."""
    from ct_edge.bundle import Bundle

    size = Bundle.load(Path(bundle)).spec.size
    png = limit_input(folder, "png-16bit").read_bytes()
    # The most images the server parses as JSON numbers; one more is refused with 413.
    one, two = json_parse_cost(fp32_json(size, 1)), json_parse_cost(fp32_json(size, 2))
    near_limit = max(1, (DECODE_BUDGET_BYTES - (2 * one - two)) // (two - one))  # cost is linear
    binary, binary_headers = fp32_binary(size, 64)
    jobs = [("/v1/classify?explain=1", png, {})] * clients + [
        (INFER, fp32_json(size, near_limit), {}),
        (INFER, fp32_json(size, near_limit + 1), {}),
        (INFER, binary, binary_headers)]
    with serve_process(bundle) as (process, _, port):
        idle = rss_mb(process.pid)[1]
        answers: list[dict] = []
        threads = [threading.Thread(target=lambda j=job: answers.append(
            post_until_answered(port, *j))) for job in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        peak = rss_mb(process.pid)[1]
    return {"bound_mb": MEMORY_BOUND_MB, "idle_peak_rss_mb": idle, "peak_rss_mb": peak,
            "within_bound": peak <= MEMORY_BOUND_MB, "png_bytes": len(png),
            "json_images": [near_limit, near_limit + 1], "answers": answers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="artifacts/bundle",
                        help="bundle to serve (default: %(default)s)")
    parser.add_argument("--clients", type=positive_int, default=4,
                        help="concurrent uploads of the largest PNG (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                        help="folder for serve_memory.json (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if not (Path(args.bundle) / "manifest.json").is_file():
        print(f"benchmarks.serve_memory: no bundle at {args.bundle}; run `make demo` first",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ct-edge-inputs-") as folder:
        try:
            report = measure(args.bundle, Path(folder), args.clients)
        except (RuntimeError, OSError) as exc:
            print(f"benchmarks.serve_memory: error: {exc}", file=sys.stderr)
            return 2
    for answer in sorted(report["answers"], key=lambda a: a["path"]):
        print(f"  {answer['path']}: {answer['status']} after {answer['attempts']} attempt(s), "
              f"{answer['seconds']} s" + (f" ({answer['error']})" if answer["error"] else ""))
    print(f"serve peak RSS {report['peak_rss_mb']:.0f} MiB (idle {report['idle_peak_rss_mb']:.0f}); "
          f"bound {MEMORY_BOUND_MB} MiB: {'within' if report['within_bound'] else 'OVER'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
