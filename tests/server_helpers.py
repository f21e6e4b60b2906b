"""What the `ct-edge serve` tests share: image files to upload, a server in this process with a
client over real sockets, and OIP v2 request bodies."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from ct_edge.classifier import Classifier
from ct_edge.limits import DECODE_BUDGET_BYTES
from ct_edge.server import Server, ServerConfig, Service, create_server
from ct_edge.store import Store

FIXTURES = Path(__file__).parent / "fixtures"
PNG = (FIXTURES / "gray8.png").read_bytes()
JPEG = (FIXTURES / "gray.jpg").read_bytes()
DICOM = (FIXTURES / "ct_small.dcm").read_bytes()
TOKEN = "s3cret-token-for-tests"


class Running:
    def __init__(self, server: Server, store: Store) -> None:
        self.server, self.store = server, store
        self.host, self.port = server.server_address[:2]

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def json(self, method: str, path: str, payload: object = None, **kwargs) -> tuple[int, dict]:
        body = json.dumps(payload).encode() if payload is not None else kwargs.pop("body", None)
        status, _, data = self.request(method, path, body, kwargs.pop("headers", None))
        return status, json.loads(data) if data else {}


@contextlib.contextmanager
def serving(classifier: Classifier, data_dir: Path, **config) -> Iterator[Running]:
    store = Store(data_dir)
    service = Service(classifier, store, workers=config.pop("workers", 2),
                      queue_size=config.pop("queue_size", 16),
                      timeout_s=config.pop("timeout_s", 30.0),
                      decode_budget=config.pop("decode_budget", DECODE_BUDGET_BYTES))
    server = create_server(ServerConfig(port=0, **config), service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Running(server, store)
    finally:
        server.stop()
        thread.join(10)
        store.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def infer_request(*files: bytes, **extra) -> dict:
    return {"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES",
                        "data": [b64(f) for f in files], "parameters": {"content_type": "base64"}}],
            **extra}


def raw_exchange(api: Running, data: bytes) -> bytes:
    with socket.create_connection((api.host, api.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)
