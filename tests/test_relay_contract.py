"""The relay's contract, one suite for every record layer (like trio's ``check_two_way_stream``).

A `Pair` is one relayed connection with both far ends in the test's hands: a CPython ssl client
(`tests.helpers.RecordClient`, MemoryBIOs on a plain socket, so the test drives it without
threads) and the backend's end of the plain TCP connection (the test owns the backend's
listener). In between is a real, in-process `ProxyServer` (`engine.Engine` loops, pumps,
`tls13.Session` or kTLS). The same tests run over each record layer:

- ``userspace``: the userspace record layer (`--ktls off`), here on the host and anywhere;
- ``ktls``: kTLS TX+RX with splice (`--ktls require`). Marked ``ktls``: it runs in the kTLS VM
  (``tools/vm/ktls-vm``, part of `make test`); on a kernel without kTLS it is skipped, and
  with ``IRONSOCKET_REQUIRE_KTLS`` (set in the VM) it fails instead.

What every record layer must do: exact bytes each way, both at once, in tiny (1-byte) and large
writes; half-close each way (the other direction keeps flowing); an abort at either end reaches
the other end, also while the relay is blocked on a full socket; pausing at any safe point
loses and repeats nothing; a hand-over at any safe point (pause, describe with
`ProxyServer.snapshot`, a second server adopts the description — what an exec upgrade does, in
one process) loses and repeats nothing; the idle timeout closes an idle connection and only
that.
"""

from __future__ import annotations

import os
import selectors
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest

from ironsocket import ktls
from ironsocket.handover import ConnectionEntry, ListenerEntry
from ironsocket.relay import RecordMode
from ironsocket.server import KtlsMode, ProxyConfig, ProxyServer
from ironsocket.tls13.server import ServerConfig
from tests.helpers import RecordClient, store, wait_until

TIMEOUT = 30.0 if os.environ.get("IRONSOCKET_IN_VM") else 15.0  # the VM's CPU is emulated


def _ktls_available() -> None:
    probe = ktls.probe()
    if probe.available:
        return
    if os.environ.get("IRONSOCKET_REQUIRE_KTLS"):
        pytest.fail(f"IRONSOCKET_REQUIRE_KTLS is set but kTLS is unavailable: {probe.reason}")
    pytest.skip(f"kTLS unavailable here ({probe.reason}): this case runs in the VM (tools/vm/ktls-vm)")


LAYERS = [pytest.param(KtlsMode.OFF, id="userspace"),
          pytest.param(KtlsMode.REQUIRE, id="ktls", marks=pytest.mark.ktls)]


# -- the pair -------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One relayed connection: the TLS client, the backend's socket, the server between them."""

    layer: KtlsMode
    server: ProxyServer
    client: RecordClient
    backend: socket.socket
    listener: socket.socket  # the backend's listener (the test's)
    servers: list[ProxyServer]

    @property
    def mode(self) -> RecordMode:
        return RecordMode.USERSPACE if self.layer is KtlsMode.OFF else RecordMode.KTLS_SW

    def connections(self) -> int:
        return len(self.server.connections)

    def pause_and_resume(self) -> None:
        """A safe point: every loop parked between steps, then moving again."""
        self.server.pause(handshake_deadline=TIMEOUT, park_deadline=TIMEOUT)
        assert self.server.engine.paused
        self.server.resume()

    def hand_over(self) -> None:
        """At a safe point, a second server takes the listener and the connection over from
        their description, as the next program does after an exec; the first lets its copies
        go without a byte or a shutdown."""
        old = self.server
        old.pause(handshake_deadline=TIMEOUT, park_deadline=TIMEOUT)
        entry = old.snapshot()
        moved = _dup_fds(entry)  # the exec keeps the fd numbers; one process needs copies
        old.release_stale()
        old.stop()
        new = _server(self.layer, old.config.backend, idle_timeout=old.config.idle_timeout)
        new.adopt(moved)
        new.start()
        self.servers.append(new)
        self.server = new


def _dup_fds(entry: ListenerEntry) -> ListenerEntry:
    conns: list[ConnectionEntry] = [c.with_fds([os.dup(fd) for fd in c.fds]) for c in entry.connections]
    return replace(entry, listener_fd=os.dup(entry.listener_fd), connections=tuple(conns))


def _server(layer: KtlsMode, backend: tuple[str, int], idle_timeout: float | None) -> ProxyServer:
    tls = ServerConfig(certificates=store("ecdsa-p256"))
    return ProxyServer(ProxyConfig(listen=("127.0.0.1", 0), backend=backend, tls=tls, ktls=layer,
                                   handshake_timeout=TIMEOUT, idle_timeout=idle_timeout))


def _make_pair(layer: KtlsMode, idle_timeout: float | None = None) -> Iterator[Pair]:
    if layer is not KtlsMode.OFF:
        _ktls_available()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    server = _server(layer, listener.getsockname()[:2], idle_timeout)
    server.start()
    servers = [server]
    client = backend = None
    try:
        client = RecordClient(server.address, timeout=TIMEOUT)
        client.handshake()
        backend, _ = listener.accept()
        backend.settimeout(TIMEOUT)
        pair = Pair(layer=layer, server=server, client=client, backend=backend, listener=listener, servers=servers)
        wait_until(lambda: any(i.relay is not None for i in pair.server.connections.values()),
                   TIMEOUT, "the connection relayed")
        info = next(iter(pair.server.connections.values()))
        assert info.mode is pair.mode
        yield pair
    finally:
        for s in servers:
            s.stop()
        for sock in (client.sock if client else None, backend, listener):
            if sock is not None:
                sock.close()


@pytest.fixture(params=LAYERS)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    yield from _make_pair(request.param)


@pytest.fixture(params=LAYERS)
def idle_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    yield from _make_pair(request.param, idle_timeout=IDLE_TIMEOUT)


# -- moving bytes both ways at once, in one thread --------------------------------------------------
@dataclass
class Progress:
    c2b_received: int = 0  # bytes the backend has received
    b2c_received: int = 0  # bytes the client has received


def exchange(pair: Pair, c2b: bytes, b2c: bytes, write_size: int,
             every: int = 0, at_safe_point: Callable[[], None] | None = None) -> None:
    """Send ``c2b`` from the client and ``b2c`` from the backend at the same time, ``write_size``
    bytes per write (a client write of <= 16 KiB is one TLS record), until each end has
    received everything; check it byte for byte. Each time ``every`` more bytes have arrived
    in total, call ``at_safe_point`` (a pause, a hand-over) with bytes in flight."""
    client, backend = pair.client, pair.backend
    got_c2b, got_b2c = bytearray(), bytearray()
    sent_c2b = sent_b2c = 0
    client_out = bytearray()  # TLS records not yet on the socket
    next_call = every
    client.sock.setblocking(False)
    backend.setblocking(False)
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + TIMEOUT * 4
    try:
        while len(got_c2b) < len(c2b) or len(got_b2c) < len(b2c):
            assert time.monotonic() < deadline, (f"stalled: backend has {len(got_c2b)}/{len(c2b)}, "
                                                 f"client has {len(got_b2c)}/{len(b2c)}")
            while sent_c2b < len(c2b) and len(client_out) < 256 * 1024:
                chunk = c2b[sent_c2b:sent_c2b + min(write_size, 16384)]
                client.tls.write(chunk)
                sent_c2b += len(chunk)
                client_out += client.outgoing.read()
            for sock, events in ((client.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if client_out else 0)),
                                 (backend, selectors.EVENT_READ | (selectors.EVENT_WRITE if sent_b2c < len(b2c) else 0))):
                sel.register(sock, events)
            ready = sel.select(0.5)
            for sock in (client.sock, backend):
                sel.unregister(sock)
            for key, mask in ready:
                sock = key.fileobj
                if sock is client.sock and mask & selectors.EVENT_WRITE:
                    n = _send(client.sock, client_out)
                    del client_out[:n]
                if sock is backend and mask & selectors.EVENT_WRITE:
                    sent_b2c += _send(backend, b2c[sent_b2c:sent_b2c + write_size])
                if sock is client.sock and mask & selectors.EVENT_READ:
                    data = client.sock.recv(1 << 20)
                    assert data, f"the client saw EOF after {len(got_b2c)} of {len(b2c)} bytes"
                    client.incoming.write(data)
                    while True:
                        try:
                            piece = client.tls.read(1 << 20)
                        except ssl.SSLWantReadError:
                            break
                        assert piece, "close_notify in the middle of the exchange"
                        got_b2c += piece
                if sock is backend and mask & selectors.EVENT_READ:
                    data = backend.recv(1 << 20)
                    assert data, f"the backend saw EOF after {len(got_c2b)} of {len(c2b)} bytes"
                    got_c2b += data
            # One call per ``every`` bytes, also when one read brought several of them (a fast
            # relay: the count of safe points must not depend on how the reads fell).
            while at_safe_point is not None and every and len(got_c2b) + len(got_b2c) >= next_call:
                next_call += every
                at_safe_point()
        while client_out:  # (nothing left: everything arrived, so everything was sent)
            del client_out[:_send(client.sock, client_out)]
    finally:
        sel.close()
        client.sock.settimeout(TIMEOUT)
        backend.settimeout(TIMEOUT)
    assert bytes(got_c2b) == c2b, "client → backend bytes differ"
    assert bytes(got_b2c) == b2c, "backend → client bytes differ"


def _send(sock: socket.socket, data: bytes | bytearray) -> int:
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def _backend_sees_eof(backend: socket.socket) -> bytes:
    """Everything the backend reads until EOF (a reset counts as the end too)."""
    out = bytearray()
    while True:
        try:
            data = backend.recv(65536)
        except ConnectionResetError:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


def _abort(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- the contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "write_size"), [(3000, 1), (100_000, 1000), (2 << 20, 16384), (4 << 20, 1 << 20)],
                         ids=["tiny-1B", "small-1KB", "records-16KB", "large-1MB"])
def test_exact_bytes_both_ways_at_once(pair: Pair, size: int, write_size: int) -> None:
    exchange(pair, os.urandom(size), os.urandom(size), write_size)
    assert pair.connections() == 1  # and still open


def test_one_way_then_the_other(pair: Pair) -> None:
    up, down = os.urandom(300_000), os.urandom(300_000)
    exchange(pair, up, b"", 16384)
    exchange(pair, b"", down, 65536)
    exchange(pair, b"x", b"y", 1)


def test_client_half_close_the_other_way_keeps_flowing(pair: Pair) -> None:
    exchange(pair, b"before", b"before", 1000)
    pair.client.send(b"last words")
    pair.client.close_notify()  # the client's direction ends; it still reads
    assert _backend_sees_eof(pair.backend) == b"last words"
    tail = os.urandom(500_000)
    pair.backend.sendall(tail)
    pair.backend.shutdown(socket.SHUT_WR)
    data, clean = pair.client.recv_until_close()
    assert data == tail and clean  # every byte, then the server's close_notify
    wait_until(lambda: pair.connections() == 0, TIMEOUT, "the connection closed")


def test_backend_half_close_the_other_way_keeps_flowing(pair: Pair) -> None:
    exchange(pair, b"before", b"before", 1000)
    greeting = os.urandom(200_000)
    pair.backend.sendall(greeting)
    pair.backend.shutdown(socket.SHUT_WR)  # the backend's direction ends; it still reads
    data, clean = pair.client.recv_until_close()
    assert data == greeting and clean
    late = os.urandom(500_000)
    pair.client.send(late)  # after the server's close_notify: the client's direction still flows
    pair.client.close_notify()
    assert _backend_sees_eof(pair.backend) == late
    wait_until(lambda: pair.connections() == 0, TIMEOUT, "the connection closed")


def test_backend_abort_reaches_the_client(pair: Pair) -> None:
    exchange(pair, b"ping", b"pong", 4)
    _abort(pair.backend)
    data, _clean = pair.client.recv_until_close()  # returns: close_notify or EOF, not a hang
    assert data == b""
    wait_until(lambda: pair.connections() == 0, TIMEOUT, "the connection closed")


def test_client_abort_reaches_the_backend(pair: Pair) -> None:
    exchange(pair, b"ping", b"pong", 4)
    _abort(pair.client.sock)
    assert _backend_sees_eof(pair.backend) == b""
    wait_until(lambda: pair.connections() == 0, TIMEOUT, "the connection closed")


def test_abort_wakes_a_direction_blocked_on_a_full_socket(pair: Pair) -> None:
    """The client reads nothing, so backend → client fills every buffer and its pump waits
    for the client's socket; the client's reset must still end both directions."""
    pair.backend.setblocking(False)
    pushed = 0
    deadline = time.monotonic() + TIMEOUT
    stuck_since = None
    while time.monotonic() < deadline:  # until the backend's writes stop being taken for 0.5 s
        n = _send(pair.backend, b"\0" * 65536)
        pushed += n
        if n:
            stuck_since = None
        elif stuck_since is None:
            stuck_since = time.monotonic()
        elif time.monotonic() - stuck_since > 0.5:
            break
        else:
            time.sleep(0.01)
    assert pushed > 0 and stuck_since is not None, "the buffers never filled"
    pair.backend.settimeout(TIMEOUT)
    _abort(pair.client.sock)
    assert _backend_sees_eof(pair.backend) == b""
    wait_until(lambda: pair.connections() == 0, TIMEOUT, "the connection closed")


@pytest.mark.parametrize("write_size", [7, 16384], ids=["7B", "16KB"])
def test_pause_at_safe_points_loses_nothing(pair: Pair, write_size: int) -> None:
    size = 40_000 if write_size < 100 else 1 << 20
    exchange(pair, os.urandom(size), os.urandom(size), write_size, every=size // 10, at_safe_point=pair.pause_and_resume)


@pytest.mark.parametrize("write_size", [7, 16384], ids=["7B", "16KB"])
def test_hand_over_at_safe_points_loses_nothing(pair: Pair, write_size: int) -> None:
    size = 40_000 if write_size < 100 else 1 << 20
    exchange(pair, os.urandom(size), os.urandom(size), write_size, every=size // 5, at_safe_point=pair.hand_over)
    assert len(pair.servers) >= 6  # five hand-overs at least
    info = next(iter(pair.server.connections.values()))
    assert info.mode is pair.mode
    pair.client.close_notify()  # and it still closes cleanly after them
    assert _backend_sees_eof(pair.backend) == b""
    pair.backend.shutdown(socket.SHUT_WR)
    assert pair.client.recv_until_close() == (b"", True)


IDLE_TIMEOUT = 2.0


def test_idle_timeout_spares_a_busy_connection_and_closes_an_idle_one(idle_pair: Pair) -> None:
    pair = idle_pair
    end = time.monotonic() + IDLE_TIMEOUT * 2
    while time.monotonic() < end:  # traffic every IDLE_TIMEOUT / 8, either way: never idle
        exchange(pair, b"c", b"", 1)
        time.sleep(IDLE_TIMEOUT / 16)
        exchange(pair, b"", b"b", 1)
        time.sleep(IDLE_TIMEOUT / 16)
    assert pair.connections() == 1
    data, clean = pair.client.recv_until_close()  # idle now: the server closes, with close_notify
    assert (data, clean) == (b"", True)
    assert _backend_sees_eof(pair.backend) == b""
    wait_until(lambda: pair.connections() == 0, TIMEOUT, "the connection closed")
