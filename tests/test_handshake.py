"""ironsocket.handshake: one connection from accept to relay, as a pump on the relay engine.

The module's own tests drive a real `Handshake` on a real `engine.Engine` loop, with a real TLS
client (Python's ssl) and a real backend listener on loopback; the last ones run the whole
`ProxyServer`.
"""

from __future__ import annotations

import functools
import socket
import ssl
import threading
from collections.abc import Iterator

import pytest

from ironsocket.backend import BackendSpec
from ironsocket.connection import ConnectionInfo
from ironsocket.engine import Engine
from ironsocket.handshake import PLAIN_HTTP, Failed, Handshake, Ready, Stage
from ironsocket.server import ProxyConfig, ProxyServer
from ironsocket.tls13.server import ServerConfig
from tests.helpers import client_context, store, thread_count
from tests.helpers import wait_until as _wait_until

TIMEOUT = 20.0
wait_until = functools.partial(_wait_until, timeout=TIMEOUT)


@pytest.fixture
def engine() -> Iterator[Engine]:
    e = Engine(1)
    e.start()
    yield e
    e.stop(5.0)


@pytest.fixture
def backend_listener() -> Iterator[socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener
    listener.close()


class Outcome:
    """What a handshake reported, from its loop thread."""

    def __init__(self) -> None:
        self.completed = threading.Event()
        self.ended = threading.Event()
        self.result: Ready | Failed | None = None

    def on_complete(self, hs: Handshake) -> None:
        self.completed.set()

    def on_end(self, hs: Handshake, result: Ready | Failed) -> None:
        assert self.result is None, "on_end called twice"
        self.result = result
        self.ended.set()

    def wait(self) -> Ready | Failed:
        assert self.ended.wait(TIMEOUT), "the handshake never ended"
        assert self.result is not None
        return self.result


def start_handshake(engine: Engine, backend: tuple[str, int], *, exact_reads: bool, timeout: float = 10.0,
                    connect_timeout: float = 5.0) -> tuple[socket.socket, Handshake, Outcome]:
    """A connected pair: the client's end, and the server's end in a running Handshake."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        server_sock, addr = listener.accept()
    outcome = Outcome()
    spec = BackendSpec(address=backend, connect_timeout=connect_timeout)
    hs = Handshake(server_sock, ConnectionInfo(conn_id=1, client_addr=addr[:2]),
                   tls=ServerConfig(certificates=store("ecdsa-p256")), exact_reads=exact_reads, timeout=timeout,
                   route=lambda name: ("default", spec), on_complete=outcome.on_complete, on_end=outcome.on_end)
    hs.start(engine, scan=min(timeout, connect_timeout) / 4)
    return client, hs, outcome


def close_ready(result: Ready | Failed) -> None:
    if isinstance(result, Ready):
        result.sock.close()
        result.backend.close()


@pytest.mark.parametrize("exact_reads", [True, False], ids=["ktls-possible", "userspace"])
def test_handshake_then_backend_connect(engine, backend_listener, exact_reads: bool) -> None:
    client, hs, outcome = start_handshake(engine, backend_listener.getsockname()[:2], exact_reads=exact_reads)
    with client, client_context().wrap_socket(client, server_hostname="localhost") as tls:
        tls.sendall(b"right after Finished")  # may reach the server with the client Finished
        result = outcome.wait()
        assert outcome.completed.is_set()
        assert isinstance(result, Ready), result
        try:
            assert result.backend.getpeername() == backend_listener.getsockname()
            assert hs.info.cipher_suite and hs.info.server_name == "localhost" and hs.info.route == "default"
            if exact_reads:
                # Not one byte past the client Finished was read: the application record waits in
                # the kernel for TLS_RX (read rec_seq 0).
                assert result.handoff.unprocessed == b"" and result.handoff.plaintext == b""
                result.sock.settimeout(TIMEOUT)
                assert result.sock.recv(1, socket.MSG_PEEK) == b"\x17"  # application_data
            else:  # userspace: whatever came with Finished is decrypted at the hand-off, or later
                pass
        finally:
            close_ready(result)


def test_plain_http_is_named_even_record_by_record(engine, backend_listener) -> None:
    """Reading record by record, the first read is 5 bytes: "OPTIONS " is longer than that."""
    client, hs, outcome = start_handshake(engine, backend_listener.getsockname()[:2], exact_reads=True)
    with client:
        client.sendall(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        result = outcome.wait()
        assert isinstance(result, Failed) and result.stage is Stage.HANDSHAKE
        assert result.reason == PLAIN_HTTP
        client.settimeout(TIMEOUT)
        assert client.recv(100)[:1] == b"\x15"  # an alert, then the close
    assert hs.sock.fileno() == -1


def test_handshake_timeout(engine, backend_listener) -> None:
    client, hs, outcome = start_handshake(engine, backend_listener.getsockname()[:2], exact_reads=True,
                                          timeout=0.5)
    with client:
        client.sendall(b"\x16\x03\x01")  # the start of a record, and nothing more
        result = outcome.wait()
        assert isinstance(result, Failed) and result.reason == "handshake timeout (0.5s)"
        client.settimeout(TIMEOUT)
        assert client.recv(100) == b""


def test_backend_refused_keeps_the_handoff_for_the_alert(engine) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    address = dead.getsockname()
    dead.close()
    client, hs, outcome = start_handshake(engine, address, exact_reads=True)
    with client, client_context().wrap_socket(client, server_hostname="localhost"):
        result = outcome.wait()
        assert isinstance(result, Failed) and result.stage is Stage.BACKEND, result
        assert result.reason == f"connect to 127.0.0.1:{address[1]}: Connection refused"
        assert result.handoff is not None and result.spec is not None and result.spec.address == address


def test_cut_from_another_thread(engine, backend_listener) -> None:
    client, hs, outcome = start_handshake(engine, backend_listener.getsockname()[:2], exact_reads=True)
    with client:
        hs.call_soon(functools.partial(hs.cut, "cut by an upgrade"))
        result = outcome.wait()
        assert isinstance(result, Failed) and result.reason == "cut by an upgrade"
        hs.call_soon(functools.partial(hs.cut, "again"))  # an ended handshake ignores it
        client.settimeout(TIMEOUT)
        assert client.recv(100) == b""


# -- in the server ---------------------------------------------------------------------------------
@pytest.fixture
def server(backend_listener) -> Iterator[ProxyServer]:
    threading.Thread(target=_echo_forever, args=(backend_listener,), daemon=True).start()
    proxy = ProxyServer(ProxyConfig(listen=("127.0.0.1", 0), backend=backend_listener.getsockname()[:2],
                                    tls=ServerConfig(certificates=store("ecdsa-p256"))))
    proxy.start()
    yield proxy
    proxy.stop()


def _echo_forever(listener: socket.socket) -> None:
    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def test_handshakes_in_flight_take_no_thread(server) -> None:
    """Issue 15: a handshake is a pump on a relay loop, not a thread (it was one each)."""
    before = thread_count()
    stalled = [socket.create_connection(server.address, timeout=TIMEOUT) for _ in range(40)]
    try:
        for s in stalled:
            s.sendall(b"\x16\x03\x01\x02")  # a record header, cut short
        wait_until(lambda: len(server.connections) == 40, what="40 handshakes in flight")
        assert thread_count() - before < 5, thread_count() - before
        # ... and they hold no one else up: a real client gets through and is relayed.
        with socket.create_connection(server.address, timeout=TIMEOUT) as raw, \
                client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"ping")
            assert tls.recv(4) == b"ping"
    finally:
        for s in stalled:
            s.close()
    wait_until(lambda: not server.connections, what="the stalled handshakes end")
    assert server.handshakes_ok == 1


def test_stop_cuts_handshakes_in_flight(backend_listener) -> None:
    proxy = ProxyServer(ProxyConfig(listen=("127.0.0.1", 0), backend=backend_listener.getsockname()[:2],
                                    tls=ServerConfig(certificates=store("ecdsa-p256"))))
    proxy.start()
    raw = socket.create_connection(proxy.address, timeout=TIMEOUT)
    with raw:
        wait_until(lambda: len(proxy.connections) == 1, what="a handshake in flight")
        proxy.stop()
        assert raw.recv(100) == b""
    assert not proxy.connections and proxy.handshakes_failed == 1


def test_tls_alert_for_garbage(server) -> None:
    with socket.create_connection(server.address, timeout=TIMEOUT) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x05hello")  # a handshake record that is no ClientHello
        data = raw.recv(100)
        assert data[:1] == b"\x15", data  # a TLS alert record
    wait_until(lambda: server.handshakes_failed == 1, what="the failure counted")
    with pytest.raises((ssl.SSLError, OSError)):
        with socket.create_connection(server.address, timeout=TIMEOUT) as raw, \
                ssl.create_default_context().wrap_socket(raw, server_hostname="localhost"):
            pass  # the client does not trust our test CA: it aborts, the server logs a failure
