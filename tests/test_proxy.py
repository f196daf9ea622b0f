"""The proxy end to end: real clients, a real backend process, the record layer this kernel has.

These tests are marked ``ktls`` and run twice in CI: on the host (no kTLS: the userspace record
layer) and inside the kTLS VM (``tools/vm/ktls-vm``), where every connection must be in kTLS
mode (the ``record_mode`` fixture fails the test if the VM kernel cannot do kTLS).

The proxy runs in-process (`ProxyServer`) so a test can read the kernel's view of a connection
(`ktls.read_back`) from the proxy's own socket; clients and the backend are separate processes,
except `RecordClient`, a CPython ssl client over MemoryBIOs on a raw socket that counts the
records it sends and receives (so the kernel's rec_seq can be checked exactly).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from ironsocket import ktls
from ironsocket.relay import RecordMode
from ironsocket.server import KtlsMode, ProxyConfig, ProxyServer
from ironsocket.tls13.constants import CipherSuite, ContentType
from ironsocket.tls13.records import RecordProtection
from ironsocket.tls13.server import ServerConfig
from tests.helpers import CERTS, ROOT, RecordClient, client_context, store
from tests import helpers

pytestmark = pytest.mark.ktls

SUITES = list(CipherSuite)
TIMEOUT = 20.0


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def record_mode() -> RecordMode:
    probe = ktls.probe()
    if probe.available:
        return RecordMode.KTLS_SW
    if os.environ.get("IRONSOCKET_REQUIRE_KTLS"):
        pytest.fail(f"IRONSOCKET_REQUIRE_KTLS is set but kTLS is unavailable: {probe.reason}")
    return RecordMode.USERSPACE


def _start_backend(script: str) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, "-c", script] if not script.endswith(".py") else [sys.executable, script],
                            stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    host, port = line.rsplit(" ", 1)[-1].strip().rsplit(":", 1)
    return proc, (host, int(port))


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(5)
    if proc.stdout:
        proc.stdout.close()


@pytest.fixture(scope="module")
def echo_backend() -> Iterator[tuple[str, int]]:
    proc, addr = _start_backend(str(ROOT / "tests" / "echo_backend.py"))
    yield addr
    _stop(proc)


# A backend that sends a greeting and closes first (the backend-initiated close_notify case).
GREETER = """
import socket
s = socket.create_server(("127.0.0.1", 0))
print("greeter: listening on %s:%d" % s.getsockname(), flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello from the backend\\n")
    c.shutdown(socket.SHUT_WR)
    c.settimeout(10)
    try:
        while c.recv(4096):
            pass
    except OSError:
        pass
    c.close()
"""


@pytest.fixture(scope="module")
def greeter_backend() -> Iterator[tuple[str, int]]:
    proc, addr = _start_backend(GREETER)
    yield addr
    _stop(proc)


# A backend that reads each connection to its end (EOF or reset) and then prints how many bytes
# it got and their SHA-256: what reached the backend, independent of what came back.
SINK = """
import hashlib, socket, threading
s = socket.create_server(("127.0.0.1", 0))
print("sink: listening on %s:%d" % s.getsockname(), flush=True)
def one(c):
    h, n = hashlib.sha256(), 0
    c.settimeout(30)
    try:
        while data := c.recv(65536):
            h.update(data)
            n += len(data)
    except OSError:
        pass
    c.close()
    print("sink: %d %s" % (n, h.hexdigest()), flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=one, args=(c,), daemon=True).start()
"""


@pytest.fixture
def sink_backend() -> Iterator[tuple[subprocess.Popen[str], tuple[str, int]]]:
    proc, addr = _start_backend(SINK)
    yield proc, addr
    _stop(proc)


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., ProxyServer]]:
    servers: list[ProxyServer] = []

    def make(backend: tuple[str, int], *, suites: tuple[CipherSuite, ...] = tuple(SUITES), keylog: list[str] | None = None,
             ktls_mode: KtlsMode = KtlsMode.AUTO) -> ProxyServer:
        tls = ServerConfig(certificates=store("ecdsa-p256"), cipher_suites=suites,
                           keylog=keylog.append if keylog is not None else None)
        server = ProxyServer(ProxyConfig(listen=("127.0.0.1", 0), backend=backend, tls=tls, ktls=ktls_mode,
                                         handshake_timeout=10))
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


wait_until = functools.partial(helpers.wait_until, timeout=TIMEOUT, interval=0.02)


def only_connection(server: ProxyServer):
    wait_until(lambda: len(server.connections) == 1 and next(iter(server.connections.values())).relay is not None,
               what="one relayed connection")
    return next(iter(server.connections.values()))


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_bytes_exact_both_ways_and_rec_seq(suite: CipherSuite, record_mode, echo_backend, make_proxy) -> None:
    before = ktls.tls_stat()
    server = make_proxy(echo_backend, suites=(suite,))
    client = RecordClient(server.address)
    client.handshake()
    payload = os.urandom(200_000)
    client.send(payload)
    assert client.recv_exact(len(payload)) == payload
    info = only_connection(server)
    assert info.mode is record_mode
    assert info.cipher_suite == suite.name
    if record_mode is not RecordMode.USERSPACE:
        during = ktls.tls_stat()
        assert during["TlsCurrTxSw"] >= before.get("TlsCurrTxSw", 0) + 1
        assert during["TlsCurrRxSw"] >= before.get("TlsCurrRxSw", 0) + 1
        assert during["TlsTxSw"] >= before.get("TlsTxSw", 0) + 1
    # The kernel's (or the userspace layer's) sequence numbers are exactly the records since the
    # handover: every record the client sent, every record it received.
    tx, rx = info.relay.client.rec_seqs()
    assert rx == client.records_sent
    assert tx == client.records_received
    if record_mode is not RecordMode.USERSPACE:
        state = ktls.read_back(info.relay.client.sock)
        assert state.cipher_suite is suite
        assert (state.tx_rec_seq, state.rx_rec_seq) == (client.records_received, client.records_sent)
    client.close_notify()
    data, clean = client.recv_until_close()
    assert (data, clean) == (b"", True)
    wait_until(lambda: not server.connections, what="connection closed")
    client.close()


def test_backend_closes_first_close_notify_to_client(record_mode, greeter_backend, make_proxy) -> None:
    server = make_proxy(greeter_backend)
    client = RecordClient(server.address)
    client.handshake()
    data, clean = client.recv_until_close()
    assert data == b"hello from the backend\n" and clean
    # Half-close: the client can still send after the server's close_notify.
    client.send(b"late bytes")
    client.close_notify()
    wait_until(lambda: not server.connections, what="connection closed")
    client.close()


def test_app_data_in_the_same_segment_as_finished(record_mode, echo_backend, make_proxy) -> None:
    server = make_proxy(echo_backend)
    payload = b"first bytes right behind Finished" * 100
    client = RecordClient(server.address)
    flight = client.handshake(hold_finished=True)
    assert flight  # the client Finished, not yet sent
    # One sendall: Finished and two application records leave in one TCP segment.
    client.tls.write(payload[:1500])
    client.tls.write(payload[1500:])
    client.records_sent += 2
    client.sock.sendall(flight + client.outgoing.read())
    assert client.recv_exact(len(payload)) == payload
    info = only_connection_with_data(server)
    assert info.mode is record_mode
    tx, rx = info.relay.client.rec_seqs()
    assert rx == 2
    client.close_notify()
    assert client.recv_until_close() == (b"", True)  # nothing delivered twice
    client.close()


def only_connection_with_data(server: ProxyServer):
    wait_until(lambda: any(i.relay is not None and i.relay.stats.bytes_c2b for i in server.connections.values()),
               what="a relayed connection with data")
    return next(i for i in server.connections.values() if i.relay is not None and i.relay.stats.bytes_c2b)


def test_client_fatal_alert_closes_both_sides(record_mode, echo_backend, make_proxy, caplog) -> None:
    keylog: list[str] = []
    server = make_proxy(echo_backend, suites=(CipherSuite.TLS_AES_128_GCM_SHA256,), keylog=keylog)
    client = RecordClient(server.address)
    client.handshake()
    client.send(b"ping")
    assert client.recv_exact(4) == b"ping"
    info = only_connection(server)
    # Seal a fatal alert (unexpected_message) under the client's application key ourselves,
    # with the keylog secret: CPython has no API to send an arbitrary alert.
    secret = bytes.fromhex(next(l for l in keylog if l.startswith("CLIENT_TRAFFIC_SECRET_0")).split()[2])
    protection = RecordProtection.from_secret(CipherSuite.TLS_AES_128_GCM_SHA256, secret, rec_seq=client.records_sent)
    with caplog.at_level(logging.INFO, logger="ironsocket"):
        client.sock.sendall(protection.seal(ContentType.ALERT, b"\x02\x0a"))
        wait_until(lambda: not server.connections, what="connection closed after the alert")
    assert info.relay.stats.close_reason.startswith("client protocol error")
    assert "alert" in info.relay.stats.close_reason
    client.close()


def test_bad_record_after_data_everything_before_it_reaches_the_backend(record_mode, sink_backend, make_proxy) -> None:
    """Twenty records and then one that fails authentication, in one write: the kTLS pump
    splices several records into its pipe ahead of draining it, and the kernel reports the bad
    record (EBADMSG) only once: the twenty records must still reach the backend, then the
    connection ends with the reason logged."""
    proc, backend = sink_backend
    keylog: list[str] = []
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    server = make_proxy(backend, suites=(suite,), keylog=keylog)
    client = RecordClient(server.address)
    client.handshake()
    info = only_connection(server)
    payload = os.urandom(20 * 16384)
    for i in range(0, len(payload), 16384):
        client.tls.write(payload[i : i + 16384])
    good = client.outgoing.read()
    secret = bytes.fromhex(next(l for l in keylog if l.startswith("CLIENT_TRAFFIC_SECRET_0")).split()[2])
    bad = bytearray(RecordProtection.from_secret(suite, secret, rec_seq=20).seal(ContentType.APPLICATION_DATA, b"x" * 1000))
    bad[100] ^= 0x01  # one flipped ciphertext bit: the tag no longer matches
    client.sock.sendall(good + bytes(bad))
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    assert ready, "the backend connection did not end after the bad record"
    n, digest = proc.stdout.readline().split()[1:]
    assert int(n) == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()
    wait_until(lambda: not server.connections, what="connection closed after the bad record")
    assert info.relay.stats.close_reason.startswith("client protocol error: bad_record_mac")
    with pytest.raises(ssl.SSLError, match="BAD_RECORD_MAC"):  # the alert RFC 8446 §5.2 asks for
        client.recv_until_close()
    client.close()


def test_dead_backend_gets_alert(record_mode, make_proxy) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()  # bound, never listening: connect is refused
        server = make_proxy(dead)
        raw = socket.create_connection(server.address, timeout=TIMEOUT)
        with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR|internal error"):
                tls.recv(10)
    wait_until(lambda: not server.connections, what="connection gone")


def _s_client(port: int, *args: str) -> list[str]:
    return ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-CAfile", str(CERTS / "ca.pem"), "-verify_return_error", *args]


_S_CLIENTS: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _kill_s_clients() -> Iterator[None]:
    yield
    while _S_CLIENTS:
        proc = _S_CLIENTS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            if stream and not stream.closed:
                stream.close()


class SClient:
    """An interactive ``openssl s_client`` (no -quiet/-ign_eof: stdin EOF sends close_notify)."""

    def __init__(self, port: int, *args: str) -> None:
        self.proc = subprocess.Popen(_s_client(port, *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, bufsize=0)
        _S_CLIENTS.append(self.proc)
        self.seen: list[str] = []
        self._partial = b""

    def send(self, text: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(text.encode())

    def expect(self, line: str, timeout: float = TIMEOUT) -> None:
        assert self.proc.stdout
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while line not in self.seen:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"s_client did not print {line!r}; saw {self.seen[-10:]}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"s_client exited before printing {line!r}; saw {self.seen[-10:]}")
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            self.seen += [l.decode(errors="replace") for l in lines]

    def close(self) -> tuple[int, str]:
        """Close stdin (s_client sends close_notify), return (exit status, rest of output)."""
        assert self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        rest = self.proc.stdout.read().decode(errors="replace")
        self.proc.stdout.close()
        return self.proc.wait(TIMEOUT), rest


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_openssl_s_client(suite: CipherSuite, record_mode, echo_backend, make_proxy) -> None:
    server = make_proxy(echo_backend, suites=(suite,))
    client = SClient(server.address[1])
    for i in range(20):
        client.send(f"line {i} through {suite.name}\n")
    for i in range(20):
        client.expect(f"line {i} through {suite.name}")
    assert any(f"Cipher is {suite.name}" in line for line in client.seen)
    assert only_connection(server).mode is record_mode
    status, rest = client.close()
    assert status == 0, rest
    wait_until(lambda: not server.connections, what="connection closed after s_client's close_notify")


def test_openssl_key_update(record_mode, echo_backend, make_proxy) -> None:
    """s_client's ``k`` sends a KeyUpdate (update_requested). Userspace, or kTLS on a kernel
    that can rekey (6.14+): rekey and carry on. kTLS on a kernel that cannot rekey RX (6.1,
    6.12): close cleanly, with the reason logged."""
    server = make_proxy(echo_backend)
    client = SClient(server.address[1])
    client.send("before\n")
    client.expect("before")
    info = only_connection(server)
    client.send("k\n")
    client.expect("KEYUPDATE")
    if record_mode is RecordMode.USERSPACE or ktls.probe().rekey_rx:
        client.send("after\n")
        client.expect("after")
        status, _ = client.close()
        assert status == 0
    else:
        wait_until(lambda: not server.connections, what="clean close after KeyUpdate")
        assert "KeyUpdate" in info.relay.stats.close_reason and "rekey" in info.relay.stats.close_reason
        try:
            client.send("after\n")
        except BrokenPipeError:
            pass  # s_client already saw the close and exited
        _, rest = client.close()
        assert "after" not in rest
    # Either way the proxy still serves.
    again = SClient(server.address[1])
    again.send("still here\n")
    again.expect("still here")
    assert again.close()[0] == 0


def test_curl_through_demo_backend(record_mode, make_proxy) -> None:
    from ironsocket.demo import DemoBackend

    holder: list[ProxyServer] = []
    demo = DemoBackend(lambda addr: holder[0].connection_for_backend_peer(addr))
    demo.start()
    try:
        server = make_proxy(demo.address)
        holder.append(server)
        out = subprocess.run(["curl", "-sS", "--cacert", str(CERTS / "ca.pem"), "--tlsv1.3", "-H", "Accept: text/plain",
                              f"https://localhost:{server.address[1]}/"], capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert f"record layer: {record_mode.value}" in out.stdout
        assert "cipher suite: TLS_" in out.stdout
    finally:
        demo.stop()


def test_ktls_require(record_mode) -> None:
    """``--ktls require`` starts only where the kernel has kTLS, and says why not elsewhere."""
    proc = subprocess.run([sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0", "--ktls", "require",
                           "--backend", "127.0.0.1:9"], capture_output=True, text=True, timeout=TIMEOUT,
                          env=os.environ | {"PYTHONPATH": str(ROOT)}) if record_mode is RecordMode.USERSPACE else None
    if proc is not None:
        assert proc.returncode == 2
        assert "kernel TLS is not available here" in proc.stderr
        assert "Traceback" not in proc.stderr
    else:
        server = ProxyServer(ProxyConfig(listen=("127.0.0.1", 0), backend=("127.0.0.1", 9),
                                         tls=ServerConfig(certificates=store()), ktls=KtlsMode.REQUIRE))
        assert server.use_ktls
