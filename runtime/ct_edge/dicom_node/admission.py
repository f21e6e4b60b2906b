"""Which association requests the node accepts: called and calling AE titles, peer address,
free disk space. Each refusal carries its A-ASSOCIATE-RJ result, source and diagnostic."""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import NodeConfig


@dataclass(frozen=True)
class Refusal:
    """Why an association is rejected, and the codes its A-ASSOCIATE-RJ carries."""

    why: str
    result: int
    source: int
    diagnostic: int


def refusal(config: NodeConfig, calling: str, called: str, address: str,
            spool: Path) -> Refusal | None:
    """The reason to reject an association request, None to accept it."""
    if called != config.ae_title:
        return Refusal(f"called AE title {called!r} is not {config.ae_title!r}", 0x01, 0x01, 0x07)
    if config.allow_ae and calling not in config.allow_ae:
        return Refusal(f"calling AE title {calling!r} is not allowed", 0x01, 0x01, 0x03)
    if config.networks and not address_allowed(config, address):
        return Refusal(f"address {address} is not allowed", 0x01, 0x01, 0x01)
    if shutil.disk_usage(spool).free < config.min_free_bytes:
        return Refusal("low disk space", 0x02, 0x03, 0x02)
    return None


def address_allowed(config: NodeConfig, address: str) -> bool:
    """Whether `--allow-ip` admits a peer; on a dual-stack socket an IPv4 peer shows as
    ::ffff:a.b.c.d and is matched as a.b.c.d too."""
    ip = ipaddress.ip_address(address)
    candidates = {ip, getattr(ip, "ipv4_mapped", None) or ip}  # IPv4Address has no such field
    return any(candidate in network for candidate in candidates for network in config.networks)
