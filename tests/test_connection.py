"""ironsocket.connection: the registry's record of a connection, and its one description."""

from __future__ import annotations

from ironsocket.admin import connection_json
from ironsocket.connection import ConnectionInfo, describe, format_addr
from ironsocket.relay import RecordMode


def test_format_addr() -> None:
    assert format_addr(("127.0.0.1", 443)) == "127.0.0.1:443"
    assert format_addr(("::1", 443)) == "[::1]:443"
    assert format_addr(None) is None


def test_describe_in_the_handshake_and_after() -> None:
    info = ConnectionInfo(conn_id=7, client_addr=("::1", 5000))
    assert describe(info) == {"id": 7, "client": "[::1]:5000", "backend": None, "mode": "handshake",
                              "suite": None, "group": None, "sni": None, "alpn": None}
    info.mode, info.backend_addr, info.server_name = RecordMode.USERSPACE, ("127.0.0.1", 8080), "a.example"
    assert describe(info)["mode"] == "userspace" and describe(info)["backend"] == "127.0.0.1:8080"


def test_admin_view_is_the_description_plus_its_counters() -> None:
    """One set of names: the admin /connections view (and inspect-keys) start from `describe`."""
    info = ConnectionInfo(conn_id=3, client_addr=("127.0.0.1", 1), started=100.0)
    view = connection_json(info, now=101.5)
    assert view == describe(info) | {"bytes_c2b": 0, "bytes_b2c": 0, "age": 1.5}
