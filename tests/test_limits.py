"""Timeouts, connection limits, backend failures, and proof that kTLS bytes move by splice.

Marked ``ktls``: on the host they run with the userspace record layer, in the kTLS VM with the
kernel's (``record_mode`` fails there if kTLS is missing). The proxy runs in-process; backends
are small threads of the test process unless an echo process is needed.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ironsocket import relay as relay_mod
from ironsocket.relay import RecordMode, UserspaceChannel
from ironsocket.server import ProxyConfig, ProxyServer
from ironsocket.tls13.server import ServerConfig
from ironsocket.tls13.session import Session
from tests.helpers import client_context, store
from tests.test_proxy import TIMEOUT, RecordClient, only_connection, record_mode, wait_until  # noqa: F401

pytestmark = pytest.mark.ktls


@pytest.fixture
def proxy() -> Iterator[Callable[..., ProxyServer]]:
    servers: list[ProxyServer] = []

    def make(backend: tuple[str, int], **kw) -> ProxyServer:
        kw.setdefault("handshake_timeout", 10.0)
        server = ProxyServer(ProxyConfig(listen=("127.0.0.1", 0), backend=backend,
                                         tls=ServerConfig(certificates=store("ecdsa-p256")), **kw))
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


class ThreadBackend:
    """A TCP backend in this process: ``handler(conn)`` runs in a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.handler = handler
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.fixture
def thread_backend() -> Iterator[Callable[[Callable[[socket.socket], None]], ThreadBackend]]:
    made: list[ThreadBackend] = []

    def make(handler: Callable[[socket.socket], None]) -> ThreadBackend:
        made.append(ThreadBackend(handler))
        return made[-1]

    yield make
    for b in made:
        b.close()


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def _sink(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


# -- idle timeout ---------------------------------------------------------------------------------
def test_idle_timeout_closes_with_close_notify(record_mode, thread_backend, proxy) -> None:
    server = proxy(thread_backend(_echo).address, idle_timeout=1.0)
    client = RecordClient(server.address)
    client.handshake()
    client.send(b"ping")
    assert client.recv_exact(4) == b"ping"
    info = only_connection(server)
    assert info.mode is record_mode
    start = time.monotonic()
    data, clean = client.recv_until_close()
    elapsed = time.monotonic() - start
    assert (data, clean) == (b"", True)  # close_notify, then EOF: a clean close
    assert 0.8 <= elapsed <= 3.0, elapsed
    wait_until(lambda: not server.connections, what="registry empty")
    assert info.relay.stats.close_reason == "idle for 1s"
    client.close()


@pytest.mark.parametrize("ending", ["idle timeout", "graceful stop", "protocol error"])
def test_ordinary_endings_log_no_crash(ending, record_mode, thread_backend, proxy, caplog) -> None:
    """Issue 12.5: an idle timeout, a graceful stop and a client's protocol error are ordinary
    endings: one log line with the reason, never an ERROR with a traceback (in userspace mode
    the backend's EOF after our close_notify used to reach Session.send_data(b"") and crash the
    pump, so any client could fill the log)."""
    caplog.set_level("INFO")
    server = proxy(thread_backend(_echo).address, idle_timeout=1.0 if ending == "idle timeout" else 30.0)
    client = RecordClient(server.address)
    client.handshake()
    client.send(b"ping")
    assert client.recv_exact(4) == b"ping"
    info = only_connection(server)
    if ending == "graceful stop":
        server.stop(drain=0.0)
    elif ending == "protocol error":
        client.sock.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # a record that cannot be opened
        with pytest.raises(ssl.SSLError, match="BAD_RECORD_MAC"):  # the alert we answer with
            client.recv_until_close()
    else:
        assert client.recv_until_close() == (b"", True)
    wait_until(lambda: not server.connections, what="registry empty")
    wait_until(lambda: info.relay is not None and info.relay.done.is_set(),
               what="both pumps ended")
    assert info.relay.stats.close_reason
    noisy = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]
    client.close()


def test_idle_connections_hold_only_their_sockets(record_mode, thread_backend, proxy) -> None:
    """Issue 15.2: a kTLS pump holds a splice pipe only while bytes are in it (from
    `relay.PipePool`); an idle connection holds its two sockets, so one process carries three
    times as many connections within its fd limit. (Userspace mode never had pipes.)"""
    server = proxy(thread_backend(_echo).address)
    warm = RecordClient(server.address)  # the pool gets the pipes the echoes need
    warm.handshake()
    warm.send(b"w" * 1000)
    assert warm.recv_exact(1000) == b"w" * 1000
    before, pooled = len(os.listdir("/proc/self/fd")), relay_mod._PIPES.free()
    clients = []
    for i in range(5):
        client = RecordClient(server.address)
        client.handshake()
        client.send(b"%d" % i * 1000)
        assert client.recv_exact(1000) == b"%d" % i * 1000
        clients.append(client)
    wait_until(lambda: len(server.connections) == 6, what="six connections")
    time.sleep(0.2)  # the pumps have gone back to waiting
    new_fds = len(os.listdir("/proc/self/fd")) - before - 2 * (relay_mod._PIPES.free() - pooled)
    # Per connection, all in this process: the client's socket, the proxy's client and backend
    # sockets, the thread backend's socket. With a pipe per pump held for life it was 8.
    assert new_fds == 4 * 5, new_fds
    for client in (warm, *clients):
        client.close_notify()
        client.sock.close()


def test_one_way_client_traffic_keeps_the_connection(record_mode, thread_backend, proxy) -> None:
    """Client → backend only (the backend never answers): not idle while bytes flow."""
    server = proxy(thread_backend(_sink).address, idle_timeout=1.0)
    client = RecordClient(server.address)
    client.handshake()
    info = only_connection(server)
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        client.send(b"x" * 100)
        time.sleep(0.2)
    assert info.conn_id in server.connections and not info.relay.stats.close_reason
    assert info.relay.stats.bytes_c2b > 0 and info.relay.stats.bytes_b2c == 0
    start = time.monotonic()
    assert client.recv_until_close() == (b"", True)  # now idle: closed after ~1 s
    assert time.monotonic() - start <= 3.0
    client.close()


def test_one_way_backend_traffic_keeps_the_connection(record_mode, thread_backend, proxy) -> None:
    """Backend → client only (the client never sends): not idle while bytes flow."""
    def ticker(conn: socket.socket) -> None:
        for _ in range(15):  # 3 s of ticks, then silence (the connection stays open)
            conn.sendall(b"tick\n")
            time.sleep(0.2)
        conn.recv(1)

    server = proxy(thread_backend(ticker).address, idle_timeout=1.0)
    client = RecordClient(server.address)
    client.handshake()
    assert client.recv_exact(5 * 15) == b"tick\n" * 15
    assert only_connection(server).relay.stats.bytes_c2b == 0
    data, clean = client.recv_until_close()
    assert (data, clean) == (b"", True)
    client.close()


# -- handshake timeout ----------------------------------------------------------------------------
def test_handshake_timeout_silent_client(record_mode, thread_backend, proxy) -> None:
    server = proxy(thread_backend(_echo).address, handshake_timeout=1.0)
    with socket.create_connection(server.address, timeout=TIMEOUT) as raw:
        start = time.monotonic()
        assert raw.recv(100) == b""  # closed by the proxy, nothing sent
        elapsed = time.monotonic() - start
    assert 0.8 <= elapsed <= 3.0, elapsed
    wait_until(lambda: not server.connections, what="registry empty")
    assert server.handshakes_failed == 1 and server.handshakes_ok == 0


# -- max_connections ------------------------------------------------------------------------------
def test_max_connections_third_waits_in_backlog(record_mode, thread_backend, proxy) -> None:
    server = proxy(thread_backend(_echo).address, max_connections=2)
    first, second = RecordClient(server.address), RecordClient(server.address)
    for c in (first, second):
        c.handshake()
        c.send(b"hi")
        assert c.recv_exact(2) == b"hi"
    third = RecordClient(server.address)  # TCP connect succeeds: the backlog holds it
    try:
        third.tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    third.sock.sendall(third.outgoing.read())  # the ClientHello
    third.sock.settimeout(1.5)
    with pytest.raises(TimeoutError):
        third.sock.recv(1)  # not served: no ServerHello
    assert len(server.connections) == 2
    first.close_notify()
    assert first.recv_until_close() == (b"", True)
    first.close()
    third.sock.settimeout(TIMEOUT)
    start = time.monotonic()
    third.handshake()  # served as soon as a slot is free
    assert time.monotonic() - start < 3.0
    third.send(b"third")
    assert third.recv_exact(5) == b"third"
    assert server.handshakes_failed == 0
    for c in (second, third):
        c.close_notify()
        assert c.recv_until_close() == (b"", True)
        c.close()
    wait_until(lambda: not server.connections, what="registry empty")
    fourth = RecordClient(server.address)  # the acceptor kept going after waiting for slots
    fourth.handshake()
    fourth.send(b"fourth")
    assert fourth.recv_exact(6) == b"fourth"
    fourth.close()


# -- backend failures -----------------------------------------------------------------------------
def _expect_internal_error_then_clean_close(address: tuple[str, int]) -> float:
    raw = socket.create_connection(address, timeout=TIMEOUT)
    peek = socket.socket(fileno=os.dup(raw.fileno()))
    try:
        with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            start = time.monotonic()
            with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR|internal error"):
                tls.recv(10)
            elapsed = time.monotonic() - start
            peek.settimeout(TIMEOUT)
            assert peek.recv(100) == b""  # FIN after the alert, not a reset
        return elapsed
    finally:
        peek.close()


def test_dead_backend_internal_error(record_mode, proxy) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connect refused
        server = proxy(s.getsockname())
        _expect_internal_error_then_clean_close(server.address)
    wait_until(lambda: not server.connections, what="registry empty")


def _full_backlog_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, its accept queue filled: further SYNs are dropped, so a
    connect to it times out (10.255.255.1 does not time out on every network)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers: list[socket.socket] = []
    for _ in range(16):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
        _, writable, _ = select.select([], [s], [], 0.3)
        if not writable:
            return listener, fillers
    raise AssertionError("the backlog never filled")


def test_backend_connect_timeout_internal_error(record_mode, proxy) -> None:
    listener, fillers = _full_backlog_listener()
    try:
        server = proxy(listener.getsockname(), connect_timeout=0.5)
        elapsed = _expect_internal_error_then_clean_close(server.address)
        assert 0.4 <= elapsed <= 3.0, elapsed
        wait_until(lambda: not server.connections, what="registry empty")
    finally:
        for s in fillers:
            s.close()
        listener.close()


# -- splice proof ---------------------------------------------------------------------------------
def _transfer(address: tuple[str, int], payload: bytes, on_ready: Callable[[], None]) -> bytes:
    """Send ``payload`` through an echo and read it back at the same time (one thread, poll)."""
    client = RecordClient(address)
    client.handshake()
    on_ready()
    sock, tls = client.sock, client.tls
    sock.setblocking(False)
    sent, out_buf, received = 0, bytearray(), bytearray()
    deadline = time.monotonic() + 120
    while len(received) < len(payload):
        assert time.monotonic() < deadline, f"stalled at {sent} sent, {len(received)} received"
        if not out_buf and sent < len(payload):
            tls.write(payload[sent : sent + 16384])
            sent = min(sent + 16384, len(payload))
            out_buf += client.outgoing.read()
        events = select.POLLIN | (select.POLLOUT if out_buf else 0)
        poller = select.poll()
        poller.register(sock, events)
        for _, ev in poller.poll(1000):
            if ev & select.POLLOUT and out_buf:
                try:
                    del out_buf[: sock.send(out_buf)]
                except BlockingIOError:
                    pass
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                try:
                    data = sock.recv(262144)
                except BlockingIOError:
                    continue
                assert data, "EOF during the transfer"
                client.incoming.write(data)
                while True:
                    try:
                        received += tls.read(262144)
                    except ssl.SSLWantReadError:
                        break
    sock.setblocking(True)
    sock.settimeout(TIMEOUT)
    client.close_notify()
    assert client.recv_until_close() == (b"", True)
    client.close()
    return bytes(received)


def test_splice_moves_every_byte(record_mode, thread_backend, proxy, monkeypatch) -> None:
    """With kTLS every application byte moves by splice, socket→pipe→socket, both ways, and
    no userspace record layer runs. In userspace mode, the Session does all of it instead."""
    server = proxy(thread_backend(_echo).address)
    calls: list[tuple[int, int, int]] = []  # (src fd, dst fd, bytes moved)
    session_in = [0]
    queued = [0]
    real_splice = relay_mod.os.splice
    real_receive, real_queue = Session.receive_data, UserspaceChannel.queue

    def splice(src: int, dst: int, count: int, *a, **kw) -> int:
        n = real_splice(src, dst, count, *a, **kw)
        calls.append((src, dst, n))
        return n

    def receive_data(self, data) -> None:
        session_in[0] += len(data)
        return real_receive(self, data)

    def queue(self, data) -> None:
        queued[0] += len(data)
        return real_queue(self, data)

    monkeypatch.setattr(relay_mod.os, "splice", splice)
    monkeypatch.setattr(Session, "receive_data", receive_data)
    monkeypatch.setattr(UserspaceChannel, "queue", queue)
    sock_io: list[tuple[int, str, int]] = []  # (fd, method, bytes) on the proxy's sockets
    fds: dict[str, int] = {}

    def wrap(name: str):
        real = getattr(socket.socket, name)

        def method(self, *a, **kw):
            n = real(self, *a, **kw)
            if self.fileno() in fds.values():
                sock_io.append((self.fileno(), name, n if isinstance(n, int) else len(n)))
            return n
        monkeypatch.setattr(socket.socket, name, method)

    for name in ("send", "sendall", "recv", "recv_into", "sendmsg", "recvmsg"):
        wrap(name)

    def ready() -> None:  # after the handshake: only application data from here on
        info = only_connection(server)
        fds["client"], fds["backend"] = info.relay.client.sock.fileno(), info.relay.backend.fileno()
        calls.clear()
        session_in[0] = queued[0] = 0

    size = 4 * 1024 * 1024
    payload = os.urandom(size)
    assert _transfer(server.address, payload, ready) == payload
    wait_until(lambda: not server.connections, what="connection closed")
    client_fd, backend_fd = fds["client"], fds["backend"]
    moved = {
        "client→pipe": sum(n for s, d, n in calls if s == client_fd),
        "pipe→backend": sum(n for s, d, n in calls if d == backend_fd),
        "backend→pipe": sum(n for s, d, n in calls if s == backend_fd),
        "pipe→client": sum(n for s, d, n in calls if d == client_fd),
    }
    print(f"\nrecord mode {record_mode.value}: splice moved {moved}; Session.receive_data {session_in[0]} B, "
          f"UserspaceChannel.queue {queued[0]} B; socket calls on proxy fds: {len(sock_io)}")
    if record_mode is RecordMode.USERSPACE:
        assert not calls
        assert queued[0] == size  # every backend byte sealed in userspace
        assert session_in[0] > size  # every client record opened in userspace (ciphertext > plaintext)
    else:
        assert moved == dict.fromkeys(moved, size), moved
        assert session_in[0] == 0 and queued[0] == 0
        data_io = [(fd, name, n) for fd, name, n in sock_io if name in ("send", "sendall", "recv", "recv_into") and n]
        assert not data_io, data_io[:10]
