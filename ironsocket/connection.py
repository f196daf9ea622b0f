"""`ConnectionInfo`: what the registry knows about one connection (the proxy's
`ProxyServer.connections`, the demo page, the admin endpoint, the upgrade document).

A module of its own, with no import beyond the relay's, so that a program exec'd by an upgrade
can rebuild its connections (`resume.start_early`) without importing the proxy (`server.py` pulls
in the handshake code and its message parser, tens of milliseconds every client waits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .relay import RecordMode, Relay


@dataclass
class ConnectionInfo:
    """What the registry (and the demo page, admin endpoint) knows about one connection."""

    conn_id: int
    client_addr: tuple[str, int]
    started: float = field(default_factory=time.time)
    server_name: str | None = None
    alpn_protocol: str | None = None
    cipher_suite: str | None = None
    group: str | None = None
    mode: RecordMode | None = None
    backend_local_addr: tuple[str, int] | None = None
    relay: Relay | None = None
    backend_addr: tuple[str, int] | None = None  # the backend chosen for this connection (admin)
    closed: bool = False  # relay done, bytes counted in ProxyServer.bytes_closed (admin)
