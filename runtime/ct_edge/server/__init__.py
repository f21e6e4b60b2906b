"""`ct-edge serve`: the Open Inference Protocol (v2), plain /v1 endpoints, a web page, /metrics.

Standard library only (http.server, sqlite3) on top of the ct_edge library; see docs/serve.md.
"""

from __future__ import annotations

from .app import Server, ServerConfig, create_server, is_loopback
from .service import Service

__all__ = ["Server", "ServerConfig", "Service", "create_server", "is_loopback"]
