"""The proxy: listener, accept loop, per-connection handshake, hand-over to the relay.

Each accepted connection gets one thread: it runs the TLS 1.3 handshake (bounded by
``handshake_timeout``), connects to the backend, hands the record layer to the kernel (kTLS) or
keeps it in userspace, then becomes the client→backend pump of its `relay.Relay`.

While the handshake runs on a connection that may get kTLS, the thread reads exactly one record
at a time (``TLSServer.bytes_wanted()``): nothing past the client Finished leaves the kernel's
receive queue, so TLS_RX starts at the right byte with read rec_seq 0 (DESIGN.md "Danger").
"""

from __future__ import annotations

import enum
import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

from . import ktls
from .relay import ClientChannel, KtlsChannel, RecordMode, Relay, UserspaceChannel
from .tls13.alerts import RemoteProtocolError
from .tls13.constants import AlertDescription
from .tls13.events import NEED_DATA, ClientHelloReceived, HandshakeComplete
from .tls13.handoff import Handoff
from .tls13.server import ServerConfig, TLSServer
from .tls13.session import Session

log = logging.getLogger("ironsocket")

THREAD_STACK_SIZE = 256 * 1024  # relay threads hold a few frames; the default 8 MiB is waste


class KtlsMode(enum.Enum):
    AUTO = "auto"
    REQUIRE = "require"
    OFF = "off"


class StartupError(Exception):
    """The server cannot start; the message says why, for a human."""


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    listen: tuple[str, int]
    backend: tuple[str, int]
    tls: ServerConfig
    ktls: KtlsMode = KtlsMode.AUTO
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float | None = 300.0
    max_connections: int = 10_000
    backlog: int = 1024


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


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``PORT`` → (host, port), with a clear error."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{text!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{text!r}: port {number} out of range")
    return host, number


class ProxyServer:
    """Accepts TLS clients and relays them to one backend. `start()`, then `stop()`."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.ktls_probe = ktls.probe()
        if config.ktls is KtlsMode.REQUIRE and not self.ktls_probe.available:
            raise StartupError(
                f"--ktls require: kernel TLS is not available here: {self.ktls_probe.reason} "
                f"(kernel {self.ktls_probe.kernel_release}). Use --ktls auto to fall back to the "
                "userspace record layer."
            )
        self.use_ktls = config.ktls is not KtlsMode.OFF and self.ktls_probe.available
        self.connections: dict[int, ConnectionInfo] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self.handshakes_ok = 0
        self.handshakes_failed = 0

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        return self._listener.getsockname()[:2]

    @property
    def record_layer(self) -> str:
        if self.use_ktls:
            return "kTLS (kernel record layer)"
        if self.config.ktls is KtlsMode.OFF:
            return "userspace (kTLS off by --ktls off)"
        return f"userspace (kTLS unavailable: {self.ktls_probe.reason})"

    def start(self) -> None:
        host, port = self.config.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(self.config.backlog)
        except OSError as exc:
            listener.close()
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        listener.settimeout(0.5)
        self._listener = listener
        threading.stack_size(THREAD_STACK_SIZE)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="is-accept", daemon=True)
        self._accept_thread.start()
        log.info("listening on %s:%d → backend %s:%d; record layer: %s",
                 *self.address, *self.config.backend, self.record_layer)

    def stop(self, deadline: float = 5.0) -> None:
        """Stop accepting, close every connection (close_notify first), join the threads."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            infos = list(self.connections.values())
        for info in infos:
            if info.relay is not None:
                info.relay.abort("server stopping")
        end = time.monotonic() + deadline
        for t in list(self._threads):
            t.join(max(0.0, end - time.monotonic()))

    # -- accept ----------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            # At max_connections we stop calling accept(): new clients wait in the backlog.
            if not self._slots.acquire(timeout=0.5):
                continue
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                self._slots.release()
                continue
            except OSError as exc:
                self._slots.release()
                if self._stopping.is_set():
                    return
                log.warning("accept failed: %s", exc)
                time.sleep(0.05)
                continue
            conn_id = next(self._ids)
            info = ConnectionInfo(conn_id=conn_id, client_addr=addr[:2])
            thread = threading.Thread(target=self._serve_connection, args=(sock, info), name=f"is-{conn_id}-c2b", daemon=True)
            with self._lock:
                self.connections[conn_id] = info
                self._threads.add(thread)
            thread.start()

    # -- one connection --------------------------------------------------------------------------
    def _serve_connection(self, sock: socket.socket, info: ConnectionInfo) -> None:
        backend: socket.socket | None = None
        relay_started = False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            engine = TLSServer(self.config.tls)
            if not self._handshake(sock, engine, info):
                return
            handoff = engine.handoff(drain=not self.use_ktls)
            try:
                backend = socket.create_connection(self.config.backend, timeout=self.config.connect_timeout)
            except OSError as exc:
                log.warning("conn=%d backend %s:%d unreachable: %s", info.conn_id, *self.config.backend, exc)
                self._alert_after_handshake(sock, handoff, AlertDescription.internal_error)
                return
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            info.backend_local_addr = backend.getsockname()[:2]
            channel = self._client_channel(sock, handoff, info)
            info.mode = channel.mode
            log.info("conn=%d open client=%s:%d sni=%s alpn=%s suite=%s group=%s mode=%s",
                     info.conn_id, *info.client_addr, info.server_name, info.alpn_protocol,
                     info.cipher_suite, info.group, info.mode.value)
            relay = Relay(info.conn_id, channel, backend, idle_timeout=self.config.idle_timeout,
                          on_done=lambda r: self._log_close(info, r))
            info.relay = relay
            relay_started = True
            relay.run()
        except Exception:  # noqa: BLE001 - a bug must cost one connection, not the server
            log.exception("conn=%d internal error", info.conn_id)
        finally:
            if not relay_started:
                sock.close()
                if backend is not None:
                    backend.close()
            with self._lock:
                self.connections.pop(info.conn_id, None)
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def _handshake(self, sock: socket.socket, engine: TLSServer, info: ConnectionInfo) -> bool:
        deadline = time.monotonic() + self.config.handshake_timeout
        exact_reads = self.use_ktls
        buf = bytearray(16 * 1024)
        view = memoryview(buf)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._handshake_failed(info, "handshake timeout")
            sock.settimeout(remaining)
            try:
                n = sock.recv_into(view[: engine.bytes_wanted()] if exact_reads else view)
            except TimeoutError:
                return self._handshake_failed(info, f"handshake timeout ({self.config.handshake_timeout:g}s)")
            except OSError as exc:
                return self._handshake_failed(info, f"client socket error: {exc}")
            engine.receive_data(bytes(view[:n]))
            try:
                while (event := engine.next_event()) is not NEED_DATA:
                    if isinstance(event, ClientHelloReceived):
                        info.server_name = event.server_name
                    elif isinstance(event, HandshakeComplete):
                        info.cipher_suite = event.cipher_suite.name
                        info.group = event.group.name
                        info.alpn_protocol = event.alpn_protocol
                        self._send(sock, engine.data_to_send())
                        self.handshakes_ok += 1
                        return True
            except RemoteProtocolError as exc:
                self._send(sock, engine.data_to_send())
                return self._handshake_failed(info, str(exc))
            if not self._send(sock, engine.data_to_send()):
                return self._handshake_failed(info, "client went away")

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> bool:
        if not data:
            return True
        try:
            sock.sendall(data)
            return True
        except OSError:
            return False

    def _handshake_failed(self, info: ConnectionInfo, reason: str) -> bool:
        self.handshakes_failed += 1
        log.info("conn=%d handshake failed client=%s:%d: %s", info.conn_id, *info.client_addr, reason)
        return False

    def _client_channel(self, sock: socket.socket, handoff: Handoff, info: ConnectionInfo) -> ClientChannel:
        if self.use_ktls and not handoff.unprocessed and (
            handoff.record_size_limit is None or handoff.record_size_limit > 1 << 14
        ):
            try:
                ktls.install(sock, handoff)
                return KtlsChannel(sock, handoff)
            except ktls.KtlsError as exc:
                if exc.errno is not None and "TLS_RX" in str(exc):
                    raise  # TX is in the kernel already; we cannot go back to userspace
                if self.config.ktls is KtlsMode.REQUIRE:
                    raise
                log.warning("conn=%d kTLS install failed (%s); staying in userspace", info.conn_id, exc)
        return UserspaceChannel(sock, Session(handoff))

    def _alert_after_handshake(self, sock: socket.socket, handoff: Handoff, description: AlertDescription) -> None:
        session = Session(handoff)
        session.send_alert(description)
        self._send(sock, session.data_to_send())

    def _log_close(self, info: ConnectionInfo, relay: Relay) -> None:
        s = relay.stats
        log.info("conn=%d close client=%s:%d bytes_in=%d bytes_out=%d duration=%.3fs reason=%s",
                 info.conn_id, *info.client_addr, s.bytes_from_client, s.bytes_to_client,
                 time.monotonic() - s.started, s.close_reason)

    def connection_for_backend_peer(self, addr: tuple[str, int]) -> ConnectionInfo | None:
        """The connection whose backend socket has local address ``addr`` (for the demo page)."""
        with self._lock:
            for info in self.connections.values():
                if info.backend_local_addr == addr:
                    return info
        return None

