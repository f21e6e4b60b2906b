"""Prometheus text exposition: requests by endpoint and status, latency, queue depth, bundle."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable

# Seconds; a 128-px PNG takes a few milliseconds, a heatmap by occlusion about a second.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Any method reaches the router (405), and labels are kept forever: an unknown one is "other".
METHODS = ("GET", "HEAD", "POST", "OPTIONS")


def _escape(value: object) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped; a lone surrogate
    (a manifest's \\ud800, which UTF-8 cannot carry) as its escaped name."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Counters kept in memory since the server started. Thread-safe."""

    def __init__(self, info: dict[str, str], queue_depth: Callable[[], int],
                 capacity: int) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, int]] = Counter()
        self._buckets: dict[str, list[int]] = {}
        self._sums: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._info = info
        self._queue_depth = queue_depth
        self._capacity = capacity

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request; `endpoint` is the route, never the raw path, and `method`
        is counted as itself only when it is one of METHODS."""
        method = method if method in METHODS else "other"
        with self._lock:
            self._requests[(endpoint, method, status)] += 1
            buckets = self._buckets.setdefault(endpoint, [0] * len(BUCKETS))
            index = bisect.bisect_left(BUCKETS, seconds)
            if index < len(BUCKETS):
                buckets[index] += 1
            self._sums[endpoint] += seconds
            self._counts[endpoint] += 1

    def render(self) -> str:
        lines = ["# HELP ct_edge_requests_total HTTP requests answered, by endpoint and status.",
                 "# TYPE ct_edge_requests_total counter"]
        with self._lock:
            for (endpoint, method, status), count in sorted(self._requests.items()):
                lines.append(f'ct_edge_requests_total{{endpoint="{_escape(endpoint)}",'
                             f'method="{_escape(method)}",status="{_escape(status)}"}} '
                             f"{count}")
            lines += ["# HELP ct_edge_request_seconds Time from request read to response sent.",
                      "# TYPE ct_edge_request_seconds histogram"]
            for endpoint in sorted(self._buckets):
                label = _escape(endpoint)
                cumulative = 0
                for bound, count in zip(BUCKETS, self._buckets[endpoint], strict=True):
                    cumulative += count
                    lines.append(f'ct_edge_request_seconds_bucket{{endpoint="{label}",'
                                 f'le="{bound:g}"}} {cumulative}')
                lines.append(f'ct_edge_request_seconds_bucket{{endpoint="{label}",le="+Inf"}} '
                             f"{self._counts[endpoint]}")
                lines.append(f'ct_edge_request_seconds_sum{{endpoint="{label}"}} '
                             f"{self._sums[endpoint]:.6f}")
                lines.append(f'ct_edge_request_seconds_count{{endpoint="{label}"}} '
                             f"{self._counts[endpoint]}")
        lines += ["# HELP ct_edge_queue_depth Inference requests admitted and not finished.",
                  "# TYPE ct_edge_queue_depth gauge", f"ct_edge_queue_depth {self._queue_depth()}",
                  "# HELP ct_edge_queue_capacity Workers plus queue slots; past it, 503.",
                  "# TYPE ct_edge_queue_capacity gauge", f"ct_edge_queue_capacity {self._capacity}",
                  "# HELP ct_edge_bundle_info The bundle and artifact answering.",
                  "# TYPE ct_edge_bundle_info gauge",
                  "ct_edge_bundle_info{" + ",".join(f'{k}="{_escape(v)}"' for k, v in
                                                     sorted(self._info.items())) + "} 1"]
        return "\n".join(lines) + "\n"
