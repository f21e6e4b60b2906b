"""The HTTP front end on the standard library's `http.server` (docs/serve.md has the measurement
behind that choice): routing, bearer-token auth, body cap, CORS, the page and its assets.

Every answer is JSON (`{"error": "..."}` with a 4xx status for a refused request) except the page,
its assets, heatmap PNGs and /metrics; every JSON body that carries a result also carries
`disclaimer` (ct_edge.DISCLAIMER). A handler thread reads the request and waits; the work
itself runs in the Service's bounded worker pool.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import DISCLAIMER, __version__
from ..budget import ByteBudget
from ..classifier import STATUSES
from ..limits import UPLOAD_BUDGET_BYTES
from ..store import StoreError
from .body import DIGITS, BodyHandler, LingeringCloser
from .metrics import Metrics
from .oip import infer, model_metadata, server_metadata
from .service import Busy, ClientError, Service, display_name

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY"}
MAX_NAME = 200
MAX_RESULT_ID = 2**63 - 1


@dataclass
class ServerConfig:
    """Everything `ct-edge serve` can set; the defaults are the documented ones."""

    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    upload_budget_bytes: int = UPLOAD_BUDGET_BYTES
    cors_origin: str | None = None
    workers: int = 2
    queue_size: int = 16
    timeout_s: float = 30.0
    max_connections: int = 64
    idle_timeout_s: float = 5.0
    access_log: bool = False


def is_loopback(host: str) -> bool:
    """True when `host` (a name or an address) resolves only to loopback addresses."""
    if host in ("localhost", "::1") or host.startswith("127."):
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(a.startswith("127.") or a == "::1" for a in addresses)


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes", "on")


Route = tuple[str, re.Pattern[str], str]
_MODEL = r"/v2/models/ct-edge(?:/versions/1)?"
ROUTES: list[Route] = [(method, re.compile(f"^{pattern}$"), name) for method, pattern, name in [
    ("GET", "/", "page"),
    ("GET", r"/static/(?P<file>[a-z0-9_-]+\.[a-z]+)", "static"),
    ("GET", "/v2/health/live", "health_live"),
    ("GET", "/v2/health/ready", "health_ready"),
    ("GET", "/v2", "server_metadata"),
    ("GET", _MODEL, "model_metadata"),
    ("GET", f"{_MODEL}/ready", "model_ready"),
    ("POST", f"{_MODEL}/infer", "infer"),
    ("POST", "/v1/classify", "classify"),
    ("GET", "/v1/results", "results"),
    ("GET", r"/v1/results/(?P<id>[0-9]{1,19})", "result"),
    ("GET", r"/v1/results/(?P<id>[0-9]{1,19})/heatmap\.png", "heatmap"),
    ("GET", "/v1/series", "series_list"),
    ("GET", r"/v1/series/(?P<id>[0-9]{1,19})", "series"),
    ("GET", "/metrics", "metrics"),
]]
OPEN_ROUTES = {"page", "static", "health_live", "health_ready"}


class Server(ThreadingHTTPServer):
    """A threading HTTP server that lets requests in flight finish when it is closed."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, config: ServerConfig, service: Service) -> None:
        self.config = config
        self.service = service
        self.metrics = Metrics(service.identity.to_dict(), lambda: service.queue_depth,
                               service.capacity)
        self.stopping = False
        self.uploads = ByteBudget(config.upload_budget_bytes)
        self.assets = _load_assets()
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._refused = LingeringCloser(self.shutdown_request)
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            full = self._connections >= self.config.max_connections
            if not full:
                self._connections += 1
        if full:
            body = json.dumps({"error": "too many connections; retry shortly"}).encode()
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                                b"Content-Type: application/json\r\nConnection: close\r\n"
                                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            self._refused.close(request)  # a body may be on its way: the 503 must reach it
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections -= 1

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish, then stop the workers.

        Call from a thread other than the one in `serve_forever`. The store is its owner's to close.
        """
        self.stopping = True
        self.shutdown()
        self.server_close()
        self.service.close()


def _load_assets() -> dict[str, tuple[bytes, str]]:
    assets = {}
    for path in STATIC.iterdir():
        if path.suffix in STATIC_TYPES and path.is_file():
            data = path.read_bytes()
            if path.name == "index.html":
                data = data.replace(b"{{DISCLAIMER}}", DISCLAIMER.encode()) \
                           .replace(b"{{VERSION}}", __version__.encode())
            assets[path.name] = (data, STATIC_TYPES[path.suffix])
    return assets


class Handler(BodyHandler):
    """One connection: requests are read here, the work runs in the Service's workers."""

    server: Server
    _route = "other"  # the endpoint and start time of the request being answered, for metrics
    _started: float | None = None
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server_version = f"ct-edge/{__version__}"
    sys_version = ""

    def setup(self) -> None:
        # An idle keep-alive connection is closed after this, so a stopping server never waits
        # on it for long.
        self.timeout = self.server.config.idle_timeout_s
        super().setup()

    @property
    def body_limit(self) -> int:
        return self.server.config.max_body_bytes

    @property
    def upload_room(self) -> ByteBudget:
        return self.server.uploads

    def handle_one_request(self) -> None:
        # A keep-alive request refused before it is routed (414, bad headers) is not the last one.
        self._route, self._started = "other", None
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.config.access_log:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    # --- responses ------------------------------------------------------------------------------

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors http.server raises itself (bad request line, unsupported method) as JSON."""
        text = message or HTTPStatus(code).phrase
        if getattr(self, "request_version", "") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # so the status line and headers are sent
        self.close_connection = True
        self._json(code, {"error": text}, {"Connection": "close"})

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # no status line, no headers: not for an API
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        return True

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        headers_in = getattr(self, "headers", None)  # unset when the request line was bad
        origin = headers_in.get("Origin") if headers_in else None
        cors = self.server.config.cors_origin
        if cors and origin and (cors == "*" or origin == cors):
            self.send_header("Access-Control-Allow-Origin", cors)
            self.send_header("Vary", "Origin")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.server.stopping and not self.close_connection:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        now = time.perf_counter()
        self.server.metrics.observe(self._route, self.command or "", status,
                                    now - (self._started or now))

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        self._send(status, body, "application/json", headers)

    # --- dispatch -------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # http.server looks up do_<METHOD>; every method goes through the router (405 / 404),
        # so an unknown one is a 4xx rather than http.server's 501.
        if name.startswith("do_") and name != "do_OPTIONS":
            return self._dispatch
        raise AttributeError(name)

    def do_OPTIONS(self) -> None:
        self._started, self._route = time.perf_counter(), "preflight"
        try:
            self.drain_body()
        except ClientError as exc:
            self._refuse(exc)
            return
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
            return
        self._send(204, b"", "text/plain", {
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, "
                                            "Inference-Header-Content-Length",
            "Access-Control-Max-Age": "600"})

    def _refuse(self, exc: ClientError) -> None:
        headers = dict(exc.headers)
        if not self.body_read or self.close_connection:
            # A body left unread (refused before it was read: 401, 404, 413, 503...) would be
            # taken for the next request; an unauthenticated upload is never kept, only drained.
            self.close_unread()
            headers["Connection"] = "close"
        self._json(exc.status, {"error": exc.message}, headers)

    def _match(self, path: str) -> tuple[str, dict[str, str]]:
        allowed = []
        method = "GET" if self.command == "HEAD" else self.command
        for route_method, pattern, name in ROUTES:
            found = pattern.match(path)
            if found:
                if route_method == method:
                    return name, found.groupdict()
                allowed.append(route_method)
        if allowed:
            raise ClientError(405, f"{self.command} is not allowed on {path[:100]}",
                              {"Allow": ", ".join(sorted(set(allowed)))})
        raise ClientError(404, f"no such endpoint: {path[:100]}")

    def _authorized(self) -> bool:
        token = self.server.config.token
        if not token:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), token.encode())

    def _dispatch(self) -> None:
        self._started, self._route = time.perf_counter(), "other"
        try:
            try:
                url = urlsplit(self.path)
                query = parse_qs(url.query, keep_blank_values=True, max_num_fields=50)
            except ValueError:
                raise ClientError(400, "malformed request target") from None
            try:
                name, params = self._match(url.path)
            except ClientError:
                name, params = "other", {}
                if self._authorized():  # a caller without the token learns nothing of routes
                    raise
            self._route = name
            if name not in OPEN_ROUTES and not self._authorized():
                raise ClientError(401, "missing or wrong bearer token (Authorization: Bearer ...)",
                                  {"WWW-Authenticate": 'Bearer realm="ct-edge"'})
            if name in ("classify", "infer") and self.server.service.full:
                # Refused before the body is read: a full server does not buffer more uploads.
                self.close_connection = True
                raise Busy()
            body = self.read_body() if self.command == "POST" else self.drain_body()
            getattr(self, f"_{name}")(params, {k: v[-1] for k, v in query.items()}, body)
        except ClientError as exc:
            self._refuse(exc)
        except StoreError as exc:
            self._json(503, {"error": f"results store unavailable: {exc}"}, {"Retry-After": "5"})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception:  # a bug: logged, answered, never a dropped connection
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            self._json(500, {"error": "internal error (a bug; see the server log)"})

    # --- the page -------------------------------------------------------------------------------

    def _page(self, params: dict, query: dict, body: bytes) -> None:
        self._static({"file": "index.html"}, query, body)

    def _static(self, params: dict, query: dict, body: bytes) -> None:
        asset = self.server.assets.get(params["file"])
        if asset is None:
            raise ClientError(404, f"no such file: {params['file']}")
        self._send(200, asset[0], asset[1], PAGE_HEADERS)

    # --- Open Inference Protocol v2 -----------------------------------------------------------

    def _health_live(self, params: dict, query: dict, body: bytes) -> None:
        self._send(200, b"", "text/plain")

    def _health_ready(self, params: dict, query: dict, body: bytes) -> None:
        self._send(503 if self.server.stopping else 200, b"", "text/plain")

    _model_ready = _health_ready

    def _server_metadata(self, params: dict, query: dict, body: bytes) -> None:
        self._json(200, server_metadata())

    def _model_metadata(self, params: dict, query: dict, body: bytes) -> None:
        self._json(200, model_metadata(self.server.service))

    def _infer(self, params: dict, query: dict, body: bytes) -> None:
        header = self.headers.get("Inference-Header-Content-Length")
        service = self.server.service
        self._json(200, service.run(infer, service, body, header, hold=self.upload))

    # --- plain endpoints ------------------------------------------------------------------------

    def _classify(self, params: dict, query: dict, body: bytes) -> None:
        if not body:
            raise ClientError(400, "empty body; send the file's bytes as the request body")
        service = self.server.service
        source = display_name(query.get("name", "upload"), "upload", MAX_NAME)
        result = service.run(service.classify_bytes, body, source, _truthy(query.get("explain")),
                             hold=self.upload)
        self._json(200, {**result, "disclaimer": DISCLAIMER})

    def _results(self, params: dict, query: dict, body: bytes) -> None:
        limit = _int_query(query, "limit", 50, 1, 1000)
        offset = _int_query(query, "offset", 0, 0, MAX_RESULT_ID)
        status = query.get("status") or None
        if status is not None and status not in STATUSES:
            raise ClientError(400, f"status must be one of {', '.join(STATUSES)}")
        label = (query.get("label") or None)
        store = self.server.service.store
        rows = [_public(row) for row in store.list(limit, offset, status, label)]
        self._json(200, {"results": rows, "total": store.count(status, label), "limit": limit,
                         "offset": offset, "disclaimer": DISCLAIMER})

    def _result(self, params: dict, query: dict, body: bytes) -> None:
        row = self.server.service.store.get(_result_id(params))
        if row is None:
            raise ClientError(404, f"no result {params['id']}")
        self._json(200, {**_public(row), "disclaimer": DISCLAIMER})

    def _heatmap(self, params: dict, query: dict, body: bytes) -> None:
        path = self.server.service.store.heatmap_path(_result_id(params))
        try:
            data = path.read_bytes() if path is not None else None
        except OSError:  # removed by hand since the row was read
            data = None
        if data is None:
            raise ClientError(404, f"no heatmap for result {params['id']}")
        self._send(200, data, "image/png")

    def _series_list(self, params: dict, query: dict, body: bytes) -> None:
        limit = _int_query(query, "limit", 50, 1, 1000)
        offset = _int_query(query, "offset", 0, 0, MAX_RESULT_ID)
        store = self.server.service.store
        rows = store.list_dicom_series(limit, offset)
        progress = store.dicom_series_progress([row["id"] for row in rows])
        self._json(200, {"series": [_public_series(row, progress[row["id"]]) for row in rows],
                         "total": store.count_dicom_series(), "limit": limit, "offset": offset,
                         "disclaimer": DISCLAIMER})

    def _series(self, params: dict, query: dict, body: bytes) -> None:
        store = self.server.service.store
        series_id = _result_id(params, "series")
        row = store.get_dicom_series(series_id)
        if row is None:
            raise ClientError(404, f"no series {params['id']}")
        slices = store.dicom_series_slices(series_id)
        progress = store.dicom_series_progress([series_id])[series_id]
        self._json(200, {**_public_series(row, progress), "slices": slices,
                         "disclaimer": DISCLAIMER})

    def _metrics(self, params: dict, query: dict, body: bytes) -> None:
        self._send(200, self.server.metrics.render().encode(),
                   "text/plain; version=0.0.4; charset=utf-8")


def _int_query(query: dict, key: str, default: int, low: int, high: int) -> int:
    raw = query.get(key)
    if raw is None or raw == "":
        return default
    if not DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise ClientError(400, f"{key} must be an integer from {low} to {high}")
    return int(raw)


def _result_id(params: dict, kind: str = "result") -> int:
    value = int(params["id"])
    if value > MAX_RESULT_ID:
        raise ClientError(404, f"no {kind} {params['id']}")
    return value


def _public(row: dict) -> dict:
    """A store row as the API shows it: the heatmap as a URL."""
    row = dict(row)
    row["heatmap"] = f"/v1/results/{row['id']}/heatmap.png" if row["heatmap"] else None
    return row


def _public_series(row: dict, progress: dict[str, int]) -> dict:
    """A DICOM series as the API shows it: no patient identifier; live slice counts."""
    row = {key: value for key, value in row.items() if key != "patient_id"}
    row["progress"] = progress
    return row


def create_server(config: ServerConfig, service: Service) -> Server:
    """Bind (raises OSError when the port is taken); `serve_forever()` to run, `stop()` to end."""
    return Server(config, service)

