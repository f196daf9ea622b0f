"""The proxy: listener, accept loop, per-connection handshake, hand-over to the relay.

Each accepted connection gets a thread for its handshake only: it runs the TLS 1.3 handshake
(bounded by ``handshake_timeout``), connects to the backend, hands the record layer to the
kernel (kTLS) or keeps it in userspace, gives its `relay.Relay` to the `engine.Engine` (a few
epoll loops that move every connection's bytes) and ends. Threads: the accept loop, the relay
loops and the handshakes in flight — never one per established connection.

The accept loop waits in ``poll``, and a wait is a safe point (`PauseControl`); the relay
loops park between two steps (`Engine.pause`); so `pause()` can bring the whole process to a
safe point for an exec upgrade (`upgrade.py`), and `adopt()` takes over the listener and
connections a previous program left in the state.

While the handshake runs on a connection that may get kTLS, the thread reads exactly one record
at a time (``TLSServer.bytes_wanted()``): nothing past the client Finished leaves the kernel's
receive queue, so TLS_RX starts at the right byte with read rec_seq 0 (DESIGN.md "Danger").
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import backend as backend_mod
from .backend import Routes
from . import ktls
from .engine import Engine
from .relay import ClientChannel, KtlsChannel, RecordMode, Relay, UserspaceChannel
from .tls13.alerts import RemoteProtocolError
from .tls13.constants import AlertDescription
from .tls13.events import NEED_DATA, ClientHelloReceived, HandshakeComplete
from .tls13.handoff import Handoff
from .tls13.server import ServerConfig, TLSServer
from .tls13.session import Session

log = logging.getLogger("ironsocket")


# -- admin /metrics: the label of a failed handshake (ironsocket.admin) --
def _alert_label(exc: RemoteProtocolError) -> str:
    if exc.alert is not None:
        return getattr(exc.alert, "name", str(exc.alert))
    if exc.received is not None:
        return "received_" + getattr(exc.received, "name", str(exc.received))
    return "none"

THREAD_STACK_SIZE = 256 * 1024  # relay threads hold a few frames; the default 8 MiB is waste


# -- pausing the accept loop (for the exec upgrade) -----------------------------------------------
class PauseControl:
    """Parks the accept loop at a safe point, and lets it go again (the relays' pumps are parked
    by `engine.Engine.pause`).

    ``running`` counts the threads between safe points. A thread waiting in ``poll`` is at one
    (`idle` before the wait, `busy` after it), so ``pause()`` wakes nobody: `wait_parked`
    returns once the ones that were running have parked (at `park`, or by starting a wait).
    """

    def __init__(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        lock = threading.Lock()
        # Two conditions on one lock: parking pumps wake only the upgrade thread, and resume
        # wakes only parked pumps (one shared condition made quiesce O(pumps²) in wake-ups).
        self._count_changed = threading.Condition(lock)
        self._resumed = threading.Condition(lock)
        self.paused = False
        self.running = 0

    def pause(self) -> None:
        with self._count_changed:
            self.paused = True

    def wait_parked(self, timeout: float) -> bool:
        with self._count_changed:
            return self._count_changed.wait_for(lambda: self.running == 0, timeout)

    def resume(self) -> None:
        with self._resumed:
            self.paused = False
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            self._resumed.notify_all()

    def enter(self) -> None:
        with self._count_changed:
            self.running += 1

    def idle(self) -> None:
        """The thread is about to wait (a safe point): it stops counting as running."""
        with self._count_changed:
            self.running -= 1
            if self.running == 0:
                self._count_changed.notify_all()

    def leave(self) -> None:
        """The thread ends: it stops counting, as at a wait that never ends."""
        self.idle()

    def busy(self) -> None:
        """The thread's wait is over: it counts as running again, once no pause is on."""
        with self._resumed:
            if self.paused:
                self._resumed.wait_for(lambda: not self.paused)
            self.running += 1

    def park(self) -> None:
        """Called by the thread at a safe point while paused: blocks until resumed."""
        with self._resumed:
            self.running -= 1
            if self.running == 0:
                self._count_changed.notify_all()
            self._resumed.wait_for(lambda: not self.paused)
            self.running += 1

    def close(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass



def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


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
    drain_timeout: float = 0.0  # on stop, seconds connections may finish before close_notify
    reuse_port: bool = False  # SO_REUSEPORT, for several worker processes on one port
    # -- backend selection (ironsocket.backend; defaults keep the single-backend behaviour) --
    routes: Routes | None = None  # SNI → BackendSpec; unmatched names fall back to `backend`
    proxy_protocol: str | None = None  # None, "v1" or "v2", for `backend`
    transparent: bool = False  # connect to `backend` from the client's own address
    name: str = ""  # a label for logs and the admin endpoint
    relay_loops: int = 2  # engine.Engine threads moving every connection's bytes


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
        self.handshake_failures: dict[str, int] = {}  # by alert name (admin /metrics)
        self.bytes_closed = [0, 0]  # [from client, to client] of closed connections (admin /metrics)
        self.control = PauseControl()  # the accept loop's safe points
        self.engine = Engine(config.relay_loops)  # every relay's pumps
        self._handshaking = 0
        self._handshake_cond = threading.Condition(self._lock)
        self._adopted: list[tuple[ConnectionInfo, Relay]] = []
        self.adopted = False  # adopt() took over a previous program's listener and connections
        self._hold_accept = False  # pause(): no new connections while handshakes finish
        self._in_handshake: dict[int, socket.socket] = {}  # conn_id → client socket, until relayed

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
        if self._listener is None:
            host, port = self.config.listen
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.config.reuse_port:  # --workers: each worker process binds the same port
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                listener.bind((host, port))
                listener.listen(self.config.backlog)
            except OSError as exc:
                listener.close()
                raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            self._listener = listener
        self._listener.setblocking(False)
        threading.stack_size(THREAD_STACK_SIZE)
        self.engine.start()
        for info, relay in self._adopted:  # no thread per connection: a registration each
            self._start_relay(info, relay)
        self._adopted = []
        self.control.enter()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="is-accept", daemon=True)
        self._accept_thread.start()
        log.info("listening on %s:%d → backend %s:%d; record layer: %s",
                 *self.address, *self.config.backend, self.record_layer)

    def stop(self, deadline: float = 5.0, drain: float | None = None) -> None:
        """Graceful stop: close the listener, let connections finish on their own for ``drain``
        seconds (default: the config's drain_timeout), then close the rest with close_notify
        and join every thread (``deadline``). Calling it again does nothing."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.control.resume()
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        drain_end = time.monotonic() + (self.config.drain_timeout if drain is None else drain)
        while self.connections and time.monotonic() < drain_end:
            time.sleep(0.05)
        end = time.monotonic() + deadline
        for t in list(self._threads):
            t.join(max(0.0, end - time.monotonic()))
        with self._lock:
            infos = list(self.connections.values())
        for info in infos:
            if info.relay is not None:
                info.relay.abort("server stopping")
        for info in infos:
            if info.relay is not None:
                info.relay.join(max(0.0, end - time.monotonic()))
        self.engine.stop(max(0.1, end - time.monotonic()))
        self.control.close()

    # -- pausing and the exec upgrade (upgrade.py) -----------------------------------------------
    def pause(self, handshake_deadline: float, park_deadline: float) -> None:
        """Bring everything to a safe point: no accept, no handshake, no pump moving bytes.

        New connections wait in the kernel backlog; handshakes in flight get ``handshake_deadline``
        to finish while the relays keep moving bytes. Handshakes still running then are cut
        (their clients retry): a client that never finishes its handshake must not be able to
        hold every upgrade off. Raises UpgradeError (after resuming) if the pumps do not reach a
        safe point within ``park_deadline``."""
        from .upgrade import UpgradeError

        self._hold_accept = True
        with self._lock:
            done = self._handshake_cond.wait_for(lambda: self._handshaking == 0, handshake_deadline)
            cut = [] if done else list(self._in_handshake.items())
        for conn_id, sock in cut:
            log.info("conn=%d handshake cut: not finished when the upgrade began", conn_id)
            _shutdown_quietly(sock)  # its thread sees EOF/an error and ends
        if cut:
            with self._lock:
                done = self._handshake_cond.wait_for(lambda: self._handshaking == 0, park_deadline)
            if not done:
                self._hold_accept = False
                raise UpgradeError(f"{self._handshaking} connections still between handshake and relay "
                                   f"after {handshake_deadline + park_deadline:g}s")
        self.control.pause()
        if not self.control.wait_parked(park_deadline):
            self.resume()
            raise UpgradeError(f"the accept loop did not reach a safe point in {park_deadline:g}s")
        if not self.engine.pause(park_deadline):
            self.resume()
            raise UpgradeError(f"the relay loops did not reach a safe point in {park_deadline:g}s")

    def resume(self) -> None:
        self._hold_accept = False
        self.engine.resume()
        self.control.resume()

    def snapshot(self) -> dict:
        """The upgrade document's server part (only while paused)."""
        from .upgrade import connection_doc

        assert self.control.paused and self.control.running == 0 and self.engine.paused
        assert self._listener is not None
        with self._lock:
            live = [i for i in self.connections.values() if i.relay is not None and not i.closed]
        return {
            "idle_timeout": self.config.idle_timeout,  # for the early resume (ironsocket.resume)
            "listener_fd": self._listener.fileno(),
            "listen": list(self.address),
            "next_conn_id": next(self._ids),
            "connections": [connection_doc(info) for info in live],
            "counters": {"handshakes_ok": self.handshakes_ok, "handshakes_failed": self.handshakes_failed,
                         "handshake_failures": self.handshake_failures, "bytes_closed": self.bytes_closed},
        }

    def adopt(self, doc: dict) -> None:
        """Take over the listener and connections of the previous program (before `start`).
        If they were resumed early (`resume.start_early`, before the configuration was loaded),
        take over that running set. On failure every inherited fd is left open (for the rollback
        to the previous program)."""
        from . import resume
        from .upgrade import restore_connection

        early = resume.resumed
        listener = socket.socket(fileno=doc["listener_fd"])
        if early is not None and early.doc is doc:
            try:
                self._adopt_running(early)
            except BaseException:
                listener.detach()
                raise
        else:
            restored: list[tuple[ConnectionInfo, Relay]] = []
            try:
                for conn in doc["connections"]:
                    restored.append(restore_connection(conn, self.engine, self.config.idle_timeout))
                if len(restored) > self.config.max_connections:
                    raise StartupError("more connections in the state than --max-connections")
            except BaseException:
                listener.detach()
                for _, relay in restored:
                    relay.client.sock.detach()
                    relay.backend.detach()
                raise
            for info, relay in restored:
                self._register(info, relay)
                self._adopted.append((info, relay))
        self._listener = listener
        self._ids = itertools.count(doc["next_conn_id"])
        counters = doc.get("counters", {})
        self.handshakes_ok = counters.get("handshakes_ok", 0)
        self.handshakes_failed = counters.get("handshakes_failed", 0)
        self.handshake_failures = dict(counters.get("handshake_failures", {}))
        self.bytes_closed = list(counters.get("bytes_closed", [0, 0]))
        self.adopted = True

    def _adopt_running(self, early: Any) -> None:
        """The relays `resume.start_early` already runs become ours, with their engine."""
        self.engine.stop(0)  # the one made in __init__: never started
        self.engine = early.engine
        self.engine.set_idle_timeout(self.config.idle_timeout)

        def adopt(alive: list[tuple[ConnectionInfo, Relay]], ended: list[tuple[ConnectionInfo, Relay]]) -> None:
            if len(alive) > self.config.max_connections:
                raise StartupError("more connections in the state than --max-connections")
            for info, relay in alive:
                relay.idle_timeout = self.config.idle_timeout
                self._register(info, relay)
            for info, relay in ended:  # ended before we were ready: counted and logged now
                self._log_close(info, relay)

        early.claim(adopt, self._relay_done)

    def _register(self, info: ConnectionInfo, relay: Relay) -> None:
        self._slots.acquire(blocking=False)
        info.relay = relay
        info.backend_local_addr = relay.backend.getsockname()[:2]
        with self._lock:
            self.connections[info.conn_id] = info

    def _start_relay(self, info: ConnectionInfo, relay: Relay) -> None:
        relay.on_done = lambda r: self._relay_done(info, r)
        relay.start()

    def _relay_done(self, info: ConnectionInfo, relay: Relay) -> None:
        self._log_close(info, relay)
        with self._lock:
            self.connections.pop(info.conn_id, None)
        self._slots.release()

    # -- accept ----------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self.control.wake_r, select.POLLIN)
        try:
            while not self._stopping.is_set():
                if self.control.paused:  # an upgrade: stop accepting, the backlog keeps clients
                    self.control.park()
                    continue
                if self._hold_accept:  # an upgrade is letting handshakes finish: accept none
                    self.control.idle()
                    try:
                        time.sleep(0.01)
                    finally:
                        self.control.busy()
                    continue
                # At max_connections we stop calling accept(): new clients wait in the backlog.
                # Both waits are safe points; after them, busy() holds us while paused.
                self.control.idle()
                try:
                    if not self._slots.acquire(timeout=0.5):
                        continue
                    ready = any(fd == self._listener.fileno() for fd, _ in poller.poll(500))
                finally:
                    self.control.busy()
                if not ready:
                    self._slots.release()
                    continue
                try:
                    sock, addr = self._listener.accept()
                except BlockingIOError:
                    self._slots.release()
                    continue
                except OSError as exc:
                    self._slots.release()
                    if self._stopping.is_set():
                        return
                    log.warning("accept failed: %s", exc)
                    time.sleep(0.05)
                    continue
                sock.setblocking(True)
                self._spawn(sock, addr)
        finally:
            self.control.leave()

    def _spawn(self, sock: socket.socket, addr: tuple) -> None:
        conn_id = next(self._ids)
        info = ConnectionInfo(conn_id=conn_id, client_addr=addr[:2])
        thread = threading.Thread(target=self._serve_connection, args=(sock, info), name=f"is-{conn_id}-hs", daemon=True)
        with self._lock:
            self.connections[conn_id] = info
            self._threads.add(thread)
            self._handshaking += 1
            self._in_handshake[conn_id] = sock
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
                # -- backend connect: ironsocket.backend (SNI routes, PROXY protocol, transparent) --
                spec = backend_mod.select(self.config, info.server_name)
                info.backend_addr = spec.address
                backend = backend_mod.connect(spec, client_addr=info.client_addr, local_addr=sock.getsockname()[:2],
                                              server_name=info.server_name, alpn=info.alpn_protocol,
                                              cipher=info.cipher_suite)
            except OSError as exc:
                log.warning("conn=%d backend %s:%d unreachable: %s", info.conn_id, *spec.address, exc)
                self._alert_after_handshake(sock, handoff, AlertDescription.internal_error)
                return
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            info.backend_local_addr = backend.getsockname()[:2]
            channel = self._client_channel(sock, handoff, info)
            info.mode = channel.mode
            log.info("conn=%d open client=%s:%d sni=%s alpn=%s suite=%s group=%s mode=%s",
                     info.conn_id, *info.client_addr, info.server_name, info.alpn_protocol,
                     info.cipher_suite, info.group, info.mode.value)
            relay = Relay(info.conn_id, channel, backend, engine=self.engine,
                          idle_timeout=self.config.idle_timeout)
            info.relay = relay
            relay_started = True
            self._start_relay(info, relay)  # from here the relay owns the sockets and the slot
        except Exception:  # noqa: BLE001 - a bug must cost one connection, not the server
            log.exception("conn=%d internal error", info.conn_id)
        finally:
            with self._lock:
                if not relay_started:
                    self.connections.pop(info.conn_id, None)
                self._threads.discard(threading.current_thread())
                self._in_handshake.pop(info.conn_id, None)
                self._handshaking -= 1
                self._handshake_cond.notify_all()
            if not relay_started:
                sock.close()
                if backend is not None:
                    backend.close()
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
                return self._handshake_failed(info, str(exc), alert=_alert_label(exc))
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

    def _handshake_failed(self, info: ConnectionInfo, reason: str, alert: str = "none") -> bool:
        self.handshakes_failed += 1
        self.handshake_failures[alert] = self.handshake_failures.get(alert, 0) + 1
        log.info("conn=%d handshake failed client=%s:%d: %s", info.conn_id, *info.client_addr, reason)
        return False

    def _client_channel(self, sock: socket.socket, handoff: Handoff, info: ConnectionInfo) -> ClientChannel:
        # A client record_size_limit below 2^14 + 1 needs TLS_TX_MAX_PAYLOAD_LEN (Linux 6.19+).
        if self.use_ktls and not handoff.unprocessed and (
            ktls.max_payload_for(handoff.record_size_limit) == ktls.MAX_PAYLOAD or self.ktls_probe.tx_max_payload_len
        ):
            try:
                ktls.install(sock, handoff)
                # tls.rst "TLS_RX_EXPECT_NO_PAD": decrypt straight into the destination; a padded
                # record is merely decrypted twice (TlsDecryptRetry), so this is always safe.
                ktls.set_rx_expect_no_pad(sock)
                return KtlsChannel.from_handoff(sock, handoff)
            except ktls.KtlsError as exc:
                if isinstance(exc, ktls.KtlsPartlyInstalled):
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
        with self._lock:  # admin /metrics: bytes of closed connections (live ones are summed apart)
            self.bytes_closed[0] += s.bytes_from_client
            self.bytes_closed[1] += s.bytes_to_client
            info.closed = True
        log.info("conn=%d close client=%s:%d bytes_in=%d bytes_out=%d duration=%.3fs reason=%s",
                 info.conn_id, *info.client_addr, s.bytes_from_client, s.bytes_to_client,
                 time.time() - s.started, s.close_reason)

    def connection_for_backend_peer(self, addr: tuple[str, int]) -> ConnectionInfo | None:
        """The connection whose backend socket has local address ``addr`` (for the demo page)."""
        with self._lock:
            for info in self.connections.values():
                if info.backend_local_addr == addr:
                    return info
        return None

