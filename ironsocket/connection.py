"""`ConnectionInfo`: what the registry knows about one connection (the proxy's
`ProxyServer.connections`, the demo page, the admin endpoint, the upgrade document), and
`describe`, the one way the admin ``/connections`` view and ``inspect-keys`` name its fields.

A module of its own, with no import beyond the relay's, so that a program exec'd by an upgrade
can rebuild its connections (`resume.start_early`) without importing the proxy (`server.py` pulls
in the handshake code and its message parser, tens of milliseconds every client waits).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .relay import RecordMode, Relay


ENV_WORKER = "IRONSOCKET_WORKER"  # set by the --workers supervisor: this worker's index (workers.py)
WORKER = os.environ.get(ENV_WORKER) or None


def conn_ref(conn_id: int) -> int | str:
    """How logs and the control socket name a connection: its id, or ``<worker>.<id>`` in a
    worker of ``--workers`` (ids count per process: the worker index makes them unique per
    machine, across upgrades too: the index survives the exec in the environment)."""
    return f"{WORKER}.{conn_id}" if WORKER else conn_id


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
    route: str | None = None  # the route that chose the backend (backend.select_route), for the logs
    resumed: bool = False  # the handshake resumed a session ticket's PSK (RFC 8446 §4.2.11)

    @property
    def ref(self) -> int | str:
        """The connection's name in logs and on the control socket (`conn_ref`)."""
        return conn_ref(self.conn_id)


def format_addr(addr: tuple[str, int] | None) -> str | None:
    """``host:port`` (``[v6]:port``), or None."""
    if not addr:
        return None
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def describe(info: ConnectionInfo) -> dict[str, Any]:
    """The fields every view of a live connection shows, under one set of names (the admin
    ``/connections`` view and ``inspect-keys`` add their own to these)."""
    return {
        "id": info.ref,  # unique per machine with --workers ("W.N")
        "client": format_addr(info.client_addr),
        "backend": format_addr(info.backend_addr),
        "mode": info.mode.value if info.mode is not None else "handshake",
        "suite": info.cipher_suite,
        "group": info.group,
        "sni": info.server_name,
        "alpn": info.alpn_protocol,
    }
