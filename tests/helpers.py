"""Shared test helpers: fixtures paths, an in-memory CPython ssl client, fd/thread counting."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ironsocket.tls13.credentials import CertificateStore, load_credential
from ironsocket.tls13.events import NEED_DATA, Event
from ironsocket.tls13.server import ServerConfig, TLSServer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CERTS = FIXTURES / "certs"


def rfc8448(name: str) -> dict[str, bytes]:
    raw = json.loads((FIXTURES / "rfc8448" / f"{name}.json").read_text())
    return {k: bytes.fromhex(v) for k, v in raw.items() if isinstance(v, str) and k not in ("source",) and not k.endswith("_pem")} | {
        k: v.encode() for k, v in raw.items() if k.endswith("_pem")
    }


def credential(name: str):
    return load_credential(CERTS / f"{name}.pem", CERTS / f"{name}.key")


def store(*names: str) -> CertificateStore:
    return CertificateStore(tuple(credential(n) for n in names or ("ecdsa-p256",)))


def client_context(**kw) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(CERTS / "ca.pem"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def drain(engine: TLSServer) -> list[Event]:
    events = []
    while (ev := engine.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


class MemoryClient:
    """CPython's ssl over MemoryBIOs, wired to a TLSServer in memory (h11's ConnectionPair idea)."""

    def __init__(self, ctx: ssl.SSLContext, server_hostname: str | None = "localhost") -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)

    def step(self) -> bool:
        try:
            self.obj.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False


def handshake(engine: TLSServer, client: MemoryClient, max_rounds: int = 6) -> list[Event]:
    events: list[Event] = []
    for _ in range(max_rounds):
        done = client.step()
        engine.receive_data(client.outgoing.read())
        events += drain(engine)
        client.incoming.write(engine.data_to_send())
        if done and any(type(e).__name__ == "HandshakeComplete" for e in events):
            return events
    client.step()
    return events


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    return threading.active_count()


def config(**kw) -> ServerConfig:
    kw.setdefault("certificates", store())
    return ServerConfig(**kw)


def wait_until(predicate: Callable[[], object], timeout: float, what: str = "condition", interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``timeout`` s.
    Test modules bind their own TIMEOUT with functools.partial."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def serve_outcome(*extra: str, control_socket: Path | None = None) -> tuple[bool, str]:
    """Run `ironsocket serve ... extra` until it serves or reports an error: (started?, output).
    Stops it either way. The control socket goes to a fresh private directory unless given."""
    from tests.conftest import ManagedProcess, cert_args

    run_dir = Path(tempfile.mkdtemp(prefix="is-t-"))  # short: unix socket paths are limited to 107 bytes
    proc = ManagedProcess([sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0",
                           "--backend", "127.0.0.1:9", *cert_args("ecdsa-p256"),
                           "--control-socket", str(control_socket or run_dir / "ctl.sock"), *extra],
                          "ironsocket serve")
    try:
        m = proc.wait_for_line(r"ironsocket: serving TLS 1\.3|ironsocket: error:")
        started = m.group(0).startswith("ironsocket: serving")
        if not started:
            proc.proc.wait(timeout=30)
        return started, proc.output
    finally:
        proc.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def assert_refused(started: bool, output: str, *needles: str) -> None:
    assert not started, f"serve started although it should have refused:\n{output}"
    assert "Traceback" not in output, output
    [line] = [l for l in output.splitlines() if "error" in l.lower()]  # one line, naming the file and why
    assert line.startswith("ironsocket: error: "), line
    for needle in needles:
        assert needle in line, line


class RecordClient:
    """CPython ssl over MemoryBIOs on a plain socket, counting records each way after the
    handshake (one `send` of <= 16 KiB is exactly one record with OpenSSL)."""

    def __init__(self, address: tuple[str, int], timeout: float = 20.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context().wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.records_sent = 0
        self.records_received = 0
        self._raw = bytearray()
        self.handshake_done = False

    def handshake(self, *, hold_finished: bool = False) -> bytes:
        """Run the handshake; with ``hold_finished`` return the client's last flight unsent."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed during the handshake")
                self.incoming.write(data)
        self.handshake_done = True
        flight = self.outgoing.read()
        if hold_finished:
            return flight
        self.sock.sendall(flight)
        return b""

    def send(self, data: bytes, *, extra_prefix: bytes = b"") -> None:
        for i in range(0, len(data), 16384):
            self.tls.write(data[i : i + 16384])
            self.records_sent += 1
        self.sock.sendall(extra_prefix + self.outgoing.read())

    def _pump(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self._raw += data
        while len(self._raw) >= 5:
            total = 5 + int.from_bytes(self._raw[3:5], "big")
            if len(self._raw) < total:
                break
            self.records_received += 1
            self.incoming.write(bytes(self._raw[:total]))
            del self._raw[:total]
        return True

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                out += self.tls.read(n - len(out))
            except ssl.SSLWantReadError:
                if not self._pump():
                    raise ConnectionError(f"EOF after {len(out)} of {n} bytes") from None
        return bytes(out)

    def recv_until_close(self) -> tuple[bytes, bool]:
        """Read until the server's close_notify (True) or a bare EOF (False)."""
        out = bytearray()
        while True:
            try:
                chunk = self.tls.read(65536)
                if not chunk:
                    return bytes(out), True
                out += chunk
            except ssl.SSLZeroReturnError:
                return bytes(out), True
            except ssl.SSLWantReadError:
                if not self._pump():
                    return bytes(out), False

    def close_notify(self) -> None:
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.sock.sendall(self.outgoing.read())
        self.records_sent += 1

    def close(self) -> None:
        self.sock.close()
