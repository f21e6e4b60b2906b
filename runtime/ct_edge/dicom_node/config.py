"""How `ct-edge listen` is configured: addresses, AE titles, allow-lists, TLS, limits."""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Forward:
    """Where series reports are sent by C-STORE: AE@HOST:PORT."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Forward:
        match = re.fullmatch(r"([^@\s]{1,16})@([^:\s]+|\[[0-9a-fA-F:]+\]):(\d{1,5})", text.strip())
        if not match or not 0 < int(match.group(3)) < 65536:
            raise ValueError(f"--forward must be AE@HOST:PORT (got {text!r})")
        return cls(match.group(1), match.group(2).strip("[]"), int(match.group(3)))


@dataclass
class NodeConfig:
    """How the node listens and what it accepts; see `ct-edge listen --help`."""

    data_dir: Path
    host: str = "0.0.0.0"
    port: int = 11112
    ae_title: str = "CTEDGE"
    allow_ae: tuple[str, ...] = ()
    allow_ip: tuple[str, ...] = ()
    stable_seconds: float = 30.0
    aggregate: str = "topk-mean"
    forward: Forward | None = None
    ssl_context: ssl.SSLContext | None = None
    reports: bool = True
    spool_max_bytes: int | None = None
    min_free_bytes: int = 256 * 1024 * 1024
    networks: list = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.networks = [ipaddress.ip_network(cidr.strip(), strict=False) for cidr in self.allow_ip]


def server_tls_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """TLS for the listener; with `ca`, senders must present a certificate it signed (mutual)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
