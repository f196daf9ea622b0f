"""ironsocket.handover: the upgrade document, its one writer and one reader.

In-process: round trips, every validation error, version 1 ↔ 2, and a document exactly as the
program before this module wrote it (main at 5c8f180, captured below with fake keys) read by
the new reader. The upgrades themselves (real server, real exec) are tests/test_upgrade.py,
tests/test_bridge.py and tests/test_config_upgrade.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
from typing import Any

import pytest

from ironsocket import handover
from ironsocket.handover import (
    LEGACY_VERSION, STATE_FORMAT, STATE_VERSION, BridgeEntry, ConnectionEntry, Counters, Document, HistogramEntry,
    KtlsEntry, ListenerEntry, ListenerView, PumpEntry, Sockets, StateError, UpgradeCounts, UserspaceEntry,
)
from ironsocket.relay import RecordMode
from ironsocket.tls13.constants import CipherSuite
from ironsocket.tls13.handoff import TrafficKeys
from ironsocket.tls13.tickets import TicketKey

SECRET = "5e" * 32  # fake key material: recognisable in a repr that would leak it


def keys(seq: int) -> TrafficKeys:
    return TrafficKeys(traffic_secret=bytes.fromhex(SECRET), key=b"\x11" * 16, iv=b"\x22" * 12, rec_seq=seq)


def userspace_conn(conn_id: int = 1, fds: tuple[int, int] = (10, 11)) -> ConnectionEntry:
    return ConnectionEntry(
        id=conn_id, client_fd=fds[0], backend_fd=fds[1], client=("127.0.0.1", 5000), backend=("127.0.0.1", 8080),
        sni="localhost", alpn="h2", suite=CipherSuite.TLS_AES_128_GCM_SHA256, group="X25519",
        mode=RecordMode.USERSPACE, started=1700000000.5, bytes_c2b=12, bytes_b2c=34,
        c2b=PumpEntry(pending=b"half"), b2c=PumpEntry(done=True), tx=keys(3), rx=keys(4),
        userspace=UserspaceEntry(unprocessed=b"\x17\x03", plaintext=b"hi", out=b"", record_size_limit=None,
                                 read_closed=False, write_closed=True))


def ktls_conn(conn_id: int = 2, fds: tuple[int, ...] = (12, 13, 14, 15)) -> ConnectionEntry:
    return ConnectionEntry(
        id=conn_id, client_fd=fds[0], backend_fd=fds[1], client=("::1", 5001, 0, 0), backend=None,
        sni=None, alpn=None, suite=CipherSuite.TLS_CHACHA20_POLY1305_SHA256, group=None,
        mode=RecordMode.KTLS_SW, started=1700000001.0, bytes_c2b=0, bytes_b2c=7,
        c2b=PumpEntry(pipe=(fds[2], fds[3])), b2c=PumpEntry(), tx=keys(0), rx=keys(1),
        ktls=KtlsEntry(write_closed=False, tx_update_owed=True))


def full_document() -> Document:
    web = ListenerEntry(
        name="web", listener_fd=5, listen=("127.0.0.1", 8443), idle_timeout=30.0, next_conn_id=3,
        connections=(userspace_conn(), ktls_conn()), bridged=0,
        counters=Counters(handshakes_ok=2, handshakes_failed=1, handshake_failures={"decode_error": 1},
                          bytes_closed=(100, 200), backend_failures={"refused": 4},
                          handshake_seconds=HistogramEntry(buckets=(0.01, 0.1), counts=(1, 1, 0), sum=0.05),
                          upgrades=UpgradeCounts(done=1)),
        ticket_keys=(TicketKey(b"\x01" * 16, b"\x02" * 32, 1700000000.0),))
    other = ListenerEntry(name="", listener_fd=6, listen=("0.0.0.0", 9000), bridged=5, passed=True, ticket_keys=())
    return Document(listeners=(web, other), pid=4242, created=1700000002.0, paused_at_monotonic=123.5,
                    previous_exec=("/usr/bin/python3", "-m", "ironsocket", "serve"),
                    sockets=Sockets(control_fd=7, admin_fd=8, reply_fd=9), bridge=BridgeEntry(fd=16, pid=4343))


def test_round_trip() -> None:
    doc = full_document()
    text = doc.to_json()
    assert Document.from_json(text) == doc
    assert Document.from_json(text.encode()) == doc
    raw = json.loads(text)
    assert (raw["format"], raw["version"]) == (STATE_FORMAT, STATE_VERSION)
    assert ConnectionEntry.from_dict(userspace_conn().to_dict()) == userspace_conn()


def test_fds_in_order_and_renamed() -> None:
    doc = full_document()
    assert doc.fds == [7, 8, 9, 16, 5, 10, 11, 12, 13, 14, 15, 6]
    moved = ktls_conn().with_fds([22, 23, 24, 25])
    assert moved.fds == [22, 23, 24, 25] and moved.c2b.pipe == (24, 25) and moved.b2c.pipe is None
    assert ktls_conn().fds == [12, 13, 14, 15]  # the original is untouched
    with pytest.raises(StateError, match="4 fds expected, 2 given"):
        ktls_conn().with_fds([1, 2])


def test_secrets_never_in_a_repr() -> None:
    text = repr(full_document())
    assert SECRET not in text and "02" * 32 not in text and "b'half'" not in text and "b'hi'" not in text
    assert SECRET in full_document().to_json()  # they are in the document itself (memfd only)


# -- a document written by the code before this module (main 5c8f180), fake keys ------------------
def _main_keys(seq: int) -> dict[str, Any]:
    return {"traffic_secret": SECRET, "key": "11" * 16, "iv": "22" * 12, "rec_seq": seq}


MAIN_DOCUMENT: dict[str, Any] = {  # upgrade.document + server.snapshot + connection_doc, then "bridge"
    "listeners": [{
        "name": "web", "idle_timeout": 30.0, "listener_fd": 5, "listen": ["127.0.0.1", 8443], "passed": False,
        "next_conn_id": 3,
        "connections": [
            {"id": 1, "client_fd": 10, "backend_fd": 11, "client": ["127.0.0.1", 5000], "backend": ["127.0.0.1", 8080],
             "sni": "localhost", "alpn": "h2", "suite": "TLS_AES_128_GCM_SHA256", "group": "X25519", "mode": "userspace",
             "started": 1700000000.5, "bytes_from_client": 12, "bytes_to_client": 34,
             "c2b": {"done": False, "pending": "aGFsZg==", "pipe": None}, "b2c": {"done": True, "pending": "", "pipe": None},
             "tx": _main_keys(3), "rx": _main_keys(4),
             "userspace": {"unprocessed": "FwM=", "plaintext": "aGk=", "out": "", "record_size_limit": None,
                           "read_closed": False, "write_closed": True}},
            {"id": 2, "client_fd": 12, "backend_fd": 13, "client": ["::1", 5001, 0, 0], "backend": [],
             "sni": None, "alpn": None, "suite": "TLS_CHACHA20_POLY1305_SHA256", "group": None, "mode": "ktls-sw",
             "started": 1700000001.0, "bytes_from_client": 0, "bytes_to_client": 7,
             "c2b": {"done": False, "pending": "", "pipe": [14, 15]}, "b2c": {"done": False, "pending": "", "pipe": None},
             "tx": _main_keys(0), "rx": _main_keys(1), "ktls": {"write_closed": False, "tx_update_owed": True}},
        ],
        "bridged": 0,
        "counters": {"handshakes_ok": 2, "handshakes_failed": 1, "handshake_failures": {"decode_error": 1},
                     "bytes_closed": [100, 200], "backend_failures": {"refused": 4},
                     "handshake_seconds": {"buckets": [0.01, 0.1], "counts": [1, 1, 0], "sum": 0.05},
                     "upgrades": {"done": 1, "rolled_back": 0, "refused": 0}},
        "ticket_keys": [{"id": "01" * 16, "key": "02" * 32, "created": 1700000000.0}],
    }, {
        "name": "", "idle_timeout": None, "listener_fd": 6, "listen": ["0.0.0.0", 9000], "passed": True,
        "next_conn_id": 1, "connections": [], "bridged": 5,
        "counters": {"handshakes_ok": 0, "handshakes_failed": 0, "handshake_failures": {}, "bytes_closed": [0, 0],
                     "backend_failures": {}},
        "ticket_keys": [],
    }],
    "control_fd": 7, "demo_fd": None, "admin_fd": 8, "reply_fd": 9,
    "format": "ironsocket-upgrade", "version": 2, "pid": 4242, "created": 1700000002.0,
    "paused_at_monotonic": 123.5, "previous_exec": ["/usr/bin/python3", "-m", "ironsocket", "serve"],
    "bridge": {"fd": 16, "pid": 4343},
}


def test_a_document_of_the_previous_code_reads_the_same() -> None:
    assert Document.from_dict(copy.deepcopy(MAIN_DOCUMENT)) == full_document()
    # ...and what we write is what that code reads: the same keys and values.
    assert json.loads(full_document().to_json()) == MAIN_DOCUMENT


# -- version 1 ------------------------------------------------------------------------------------
V1_DOCUMENT: dict[str, Any] = {  # what a version-1 program (f6592ee) writes: one listener at the top level
    "idle_timeout": 30.0, "listener_fd": 5, "listen": ["127.0.0.1", 8443], "next_conn_id": 2,
    "connections": [{k: v for k, v in MAIN_DOCUMENT["listeners"][0]["connections"][0].items()}],
    "counters": {"handshakes_ok": 2, "handshakes_failed": 1, "handshake_failures": {}, "bytes_closed": [1, 2]},
    "control_fd": 7, "demo_fd": None, "admin_fd": None, "reply_fd": 9,
    "format": "ironsocket-upgrade", "version": 1, "pid": 4242, "created": 1700000002.0,
    "paused_at_monotonic": 123.5, "previous_exec": ["/usr/bin/python3", "-m", "ironsocket", "serve"],
}


def test_version_1_is_read_as_version_2_and_written_back() -> None:
    doc = Document.from_dict(copy.deepcopy(V1_DOCUMENT))
    assert doc.from_version == LEGACY_VERSION
    (entry,) = doc.listeners
    assert entry.name == "" and entry.listener_fd == 5 and entry.connections == (userspace_conn(),)
    assert entry.counters == Counters(handshakes_ok=2, handshakes_failed=1, bytes_closed=(1, 2))
    assert entry.ticket_keys is None  # not in version 1: the ring keeps its own keys
    assert doc.fds == [7, 9, 5, 10, 11]
    back = json.loads(doc.to_json(version=LEGACY_VERSION))
    assert "listeners" not in back and back["version"] == LEGACY_VERSION
    for key, value in V1_DOCUMENT.items():  # everything a version-1 program reads, as it wrote it
        if key != "counters":
            assert back[key] == value, key
    assert {k: back["counters"][k] for k in V1_DOCUMENT["counters"]} == V1_DOCUMENT["counters"]
    assert Document.from_json(doc.to_json(version=LEGACY_VERSION)) == doc
    # The same state as version 2 is a version-2 document of one unnamed listener.
    assert Document.from_json(doc.to_json()).listeners == doc.listeners


def test_version_1_has_one_listener() -> None:
    with pytest.raises(StateError, match="a version-1 program has one listener, the state has 2"):
        full_document().to_json(version=LEGACY_VERSION)
    with pytest.raises(StateError, match="this program writes 2 and 1"):
        full_document().to_json(version=3)


# -- every validation error -------------------------------------------------------------------------
def _edit(path: str, value: Any) -> dict[str, Any]:
    """MAIN_DOCUMENT with ``path`` (dots; list indexes as numbers) set to ``value`` (deleted: DELETE)."""
    doc = copy.deepcopy(MAIN_DOCUMENT)
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return doc


DELETE = object()
C0 = "listeners.0.connections.0"
C1 = "listeners.0.connections.1"


@pytest.mark.parametrize("doc, message", [
    ([], "not an ironsocket-upgrade document"),
    ({"format": "something-else", "version": 2}, "not an ironsocket-upgrade document"),
    (_edit("version", 3), r"state version 3 \(this program reads 2 and 1\)"),
    (_edit("version", None), r"state version None"),
    (_edit("listeners", []), "the document names no listener"),
    (_edit("listeners", {}), "listeners: list expected, not dict"),
    (_edit("listeners.1", 7), r"listeners\[1\]: an object is expected, not int"),
    (_edit("listeners.1.name", "web"), "listener name 'web' twice in the document"),
    (_edit("listeners.0.listener_fd", DELETE), r"listeners\[0\].listener_fd: missing"),
    (_edit("listeners.0.listener_fd", "5"), r"listeners\[0\].listener_fd: int expected, not str"),
    (_edit("listeners.0.connections", None), r"listeners\[0\].connections: list expected, not null"),
    (_edit("listeners.0.name", 3), r"listeners\[0\].name: str expected, not int"),
    (_edit("listeners.0.counters.bytes_closed", [1]), r"bytes_closed: two counts expected"),
    (_edit("bridge", {"fd": 16}), r"bridge: needs fd and pid \(bridge.pid: missing\)"),
    (_edit("pid", DELETE), "pid: missing"),
    (_edit("previous_exec", ["ok", 3]), "previous_exec: a list of strings expected"),
    (_edit("admin_fd", True), "admin_fd: int expected, not bool"),
    (_edit(f"{C0}.suite", "TLS_RSA_WITH_RC4"), r"connections\[0\].suite: 'TLS_RSA_WITH_RC4' is not a TLS 1.3 cipher suite"),
    (_edit(f"{C0}.mode", "zerocopy"), r"connections\[0\].mode: 'zerocopy' is not a record mode \(userspace, ktls-sw, ktls-device\)"),
    (_edit(f"{C0}.client_fd", DELETE), r"connections\[0\].client_fd: missing"),
    (_edit(f"{C0}.id", "one"), r"connections\[0\].id: int expected, not str"),
    (_edit(f"{C0}.started", "noon"), r"connections\[0\].started: float expected, not str"),
    (_edit(f"{C0}.c2b.pending", "!!"), r"connections\[0\].c2b.pending: not base64"),
    (_edit(f"{C0}.tx.key", "xyz"), r"connections\[0\].tx.key: not hex"),
    (_edit(f"{C0}.rx", None), r"connections\[0\].rx: an object is expected, not null"),
    (_edit(f"{C0}.userspace", DELETE), "connection 1: mode userspace needs the userspace state, and only that"),
    (_edit(f"{C1}.ktls", DELETE), "connection 2: mode ktls-sw needs the ktls state, and only that"),
    (_edit(f"{C1}.c2b.pipe", [14, 15, 16]), r"connections\[1\].c2b.pipe: two fds expected, not 3"),
    (_edit(f"{C1}.c2b.pipe", ["14", 15]), r"connections\[1\].c2b.pipe: a list of integers expected"),
])
def test_every_structural_error_is_one_line(doc: Any, message: str) -> None:
    with pytest.raises(StateError, match=message):
        Document.from_dict(doc)


def test_not_json() -> None:
    with pytest.raises(StateError, match="state document is not JSON"):
        Document.from_json(b"{nope")


def test_malformed_counters_and_ticket_keys_are_dropped_not_fatal() -> None:
    """The worst case of a bad counter or ticket key is a count from zero or a full handshake."""
    doc = _edit("listeners.0.ticket_keys", [{"id": "zz"}, {"nonsense": 1}, 5, {"id": "01" * 16, "key": "02" * 32, "created": 1}])
    doc["listeners"][0]["counters"]["handshake_failures"] = {"decode_error": "many", "bad_record_mac": 2}
    entry = Document.from_dict(doc).listeners[0]
    assert [k.key_id for k in entry.ticket_keys] == [b"\x01" * 16]
    assert entry.counters.handshake_failures == {"bad_record_mac": 2}


# -- the fds it names, checked against this process -------------------------------------------------
@pytest.fixture
def real_fds():
    """A document whose fds are real: sockets where sockets are named, a pipe for the splice pipe."""
    socks = [socket.socketpair() for _ in range(4)]
    r, w = os.pipe()
    s = [a.fileno() for a, _ in socks]
    entry = ListenerEntry(listener_fd=s[0], listen=("127.0.0.1", 1),
                          connections=(userspace_conn(1, (s[1], s[2])), ktls_conn(2, (s[2], s[3], r, w))))
    doc = Document(listeners=(entry,), pid=os.getpid(), created=1.0, sockets=Sockets(control_fd=s[3]), bridge=BridgeEntry(fd=s[1], pid=1))
    yield doc, s, (r, w)
    for a, b in socks:
        a.close()
        b.close()
    os.close(r)
    os.close(w)


def test_check_fds(real_fds) -> None:
    doc, s, (r, w) = real_fds
    doc.check_fds()
    with pytest.raises(StateError, match=f"listener 0 listener_fd: fd {r} is not a socket"):
        Document(listeners=(ListenerEntry(listener_fd=r, listen=("h", 1)),), pid=1, created=1.0).check_fds()
    bad = ktls_conn(7, (s[0], s[1], s[2], w))
    with pytest.raises(StateError, match=f"listener web connection 7 c2b pipe: fd {s[2]} is not a pipe"):
        Document(listeners=(ListenerEntry(name="web", listener_fd=s[0], listen=("h", 1), connections=(bad,)),),
                 pid=1, created=1.0).check_fds()
    closed = os.dup(s[0])
    os.close(closed)
    for field_name, what in (("control_fd", "control_fd"), ("demo_fd", "demo_fd"), ("admin_fd", "admin_fd")):
        with pytest.raises(StateError, match=f"{what}: fd {closed} is not open"):
            Document(listeners=doc.listeners, pid=1, created=1.0, sockets=Sockets(**{field_name: closed})).check_fds()
    with pytest.raises(StateError, match=f"bridge fd: fd {closed} is not open"):
        Document(listeners=doc.listeners, pid=1, created=1.0, bridge=BridgeEntry(fd=closed, pid=1)).check_fds()


def test_memfd_round_trip_sealed(real_fds) -> None:
    doc = real_fds[0]
    fd = handover.write_memfd(doc)
    try:
        assert handover.read_memfd(fd) == doc
        with pytest.raises(OSError):
            os.write(fd, b"x")  # sealed
    finally:
        os.close(fd)
    legacy = handover.write_memfd(doc, LEGACY_VERSION)
    try:
        again = handover.read_memfd(legacy)
        assert again.from_version == LEGACY_VERSION and again.listeners == doc.listeners
    finally:
        os.close(legacy)
    with pytest.raises(StateError, match=f"state fd {legacy}: Bad file descriptor"):
        handover.read_memfd(legacy)


def test_listener_views_for_the_check_child() -> None:
    views = [entry.view() for entry in full_document().listeners]
    assert views == [ListenerView(name="web", listen=("127.0.0.1", 8443), connections=2),
                     ListenerView(name="", listen=("0.0.0.0", 9000), connections=5, passed=True)]
    assert handover.listener_views_from_json(handover.listener_views_to_json(views)) == views
    with pytest.raises(StateError, match=r"listeners\[0\].connections: missing"):
        handover.listener_views_from_json('[{"name": "a", "listen": ["h", 1]}]')


def test_a_leaf_module_and_no_server_upgrade_cycle() -> None:
    """handover imports neither the server nor the upgrade, and the upgrade not the server (the
    server imports both at its top)."""
    import subprocess
    import sys

    code = ("import sys, ironsocket.handover as h; a = {'ironsocket.server', 'ironsocket.upgrade'} & set(sys.modules); "
            "import ironsocket.upgrade; b = 'ironsocket.server' in sys.modules; print(sorted(a), b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["[]", "False"], out.stdout + out.stderr


def test_the_pid_file_is_carried_and_optional() -> None:
    """``pid_file`` (the PID file the process holds: a reload that changes it moves it) is
    written only when set, so a document without one is what the code before it wrote."""
    doc = dataclasses.replace(full_document(), pid_file="/run/is.pid")
    assert Document.from_json(doc.to_json()).pid_file == "/run/is.pid"
    assert Document.from_dict(copy.deepcopy(MAIN_DOCUMENT)).pid_file is None
    assert "pid_file" not in json.loads(full_document().to_json())


def test_the_demo_backends_connections_are_carried_and_optional() -> None:
    """``demo_connections`` (the built-in demo backend's: socket, partial request, unsent
    answer) round-trip, are named by ``fds`` (so they survive the exec), and are written only
    when there are some: a document without them reads as none."""
    from ironsocket.handover import DemoConnectionEntry

    demo = (DemoConnectionEntry(fd=20, received=b"GET / HT", unsent=b"HTTP/1.1 200 OK\r\n", close_after=True),
            DemoConnectionEntry(fd=21))
    doc = dataclasses.replace(full_document(), demo_connections=demo)
    back = Document.from_json(doc.to_json())
    assert back.demo_connections == demo and {20, 21} <= set(back.fds)
    assert "GET" not in repr(back.demo_connections)  # application data: never in a log
    assert Document.from_dict(copy.deepcopy(MAIN_DOCUMENT)).demo_connections == ()
    assert "demo_connections" not in json.loads(full_document().to_json())
    bad = json.loads(doc.to_json())
    bad["demo_connections"][0]["fd"] = "20"
    with pytest.raises(StateError, match=r"demo_connections\[0\]\.fd: int expected"):
        Document.from_dict(bad)
