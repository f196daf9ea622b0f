"""The proxy: listener, acceptor, per-connection handshake, hand-over to the relay.

Connections are accepted by an `acceptor.Acceptor`, a pump on one of the relay loops of the
`engine.Engine`. Each becomes a `handshake.Handshake`: a pump on the same loop (no thread of its
own) that runs the TLS 1.3 handshake (bounded by ``handshake_timeout``) and the backend connect
(bounded by the backend's connect timeout), non-blocking. Then, on that loop thread, the record
layer goes to the kernel (kTLS) or stays in userspace, and the connection's `relay.Relay` goes to
the engine. Threads: the relay loops, whatever the number of connections or handshakes.

`Acceptor.hold` stops the accepting, and the relay loops park between two steps
(`Engine.pause`); so `pause()` can bring the whole process to a safe point for an exec upgrade
(`upgrade.py`), and `adopt()` takes over the listener and connections a previous program left in
the state.

While the handshake runs on a connection that may get kTLS, it reads exactly one record at a
time (ironsocket.handshake): nothing past the client Finished leaves the kernel's receive queue.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import backend as backend_mod
from .backend import BackendHealth, Routes
from . import ktls
from .counters import PROCESS, Histogram
from .logs import fields
from .acceptor import Acceptor
from .engine import DEFAULT_LOOPS, Engine
from .handover import ConnectionEntry, Counters, ListenerEntry, connection_entry
from .upgrade import UpgradeError, restore_connection
from .connection import ENV_WORKER, WORKER, ConnectionInfo, conn_ref  # noqa: F401 - re-exported
from .handshake import PLAIN_HTTP, Failed, Handshake, Ready, Stage  # noqa: F401 - PLAIN_HTTP re-exported
from .relay import ClientChannel, KtlsChannel, Relay, UserspaceChannel
from .tls13.constants import AlertDescription
from .tls13.handoff import Handoff
from .tls13.server import ServerConfig
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
    drain_timeout: float = 0.0  # on stop, seconds connections may finish before close_notify
    reuse_port: bool = False  # SO_REUSEPORT, for several worker processes on one port
    # -- backend selection (ironsocket.backend; defaults keep the single-backend behaviour) --
    routes: Routes | None = None  # SNI → BackendSpec; unmatched names fall back to `backend`
    proxy_protocol: str | None = None  # None, "v1" or "v2", for `backend`
    transparent: bool = False  # connect to `backend` from the client's own address
    name: str = ""  # a label for logs and the admin endpoint
    relay_loops: int = DEFAULT_LOOPS  # engine.Engine threads moving every connection's bytes


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


def bind_listener(address: tuple[str, int], *, reuse_port: bool = False, backlog: int | None = None) -> socket.socket:
    """A TCP socket bound to ``address`` (SO_REUSEADDR; SO_REUSEPORT if asked: each ``--workers``
    worker binds the same port), listening if ``backlog`` is given. StartupError
    (``cannot listen on HOST:PORT: <why>``) if it cannot be."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if backlog is not None:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def check_ktls_mode(config: ProxyConfig) -> ktls.KtlsProbe:
    """This kernel's kTLS (`ktls.probe`); StartupError if ``--ktls require`` cannot be met."""
    probe = ktls.probe()
    if config.ktls is KtlsMode.REQUIRE and not probe.available:
        raise StartupError(
            f"--ktls require: kernel TLS is not available here: {probe.reason} "
            f"(kernel {probe.kernel_release}). Use --ktls auto to fall back to the "
            "userspace record layer."
        )
    return probe


class ProxyServer:
    """Accepts TLS clients and relays them to one backend. `start()`, then `stop()`."""

    def __init__(self, config: ProxyConfig, ids: Iterator[int] | None = None) -> None:
        """``ids``: where connection ids come from, shared by the listeners of one process (so
        an id names one connection of the process); default: this server's own count from 1."""
        self.config = config
        self.ktls_probe = check_ktls_mode(config)
        self.use_ktls = config.ktls is not KtlsMode.OFF and self.ktls_probe.available
        self.connections: dict[int, ConnectionInfo] = {}
        self._lock = threading.Lock()
        self._shared_ids = ids is not None
        self._ids: Iterator[int] = ids if ids is not None else itertools.count(1)
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._listener_label: str | None = None  # listener_name, once the socket is bound
        self._acceptor: Acceptor | None = None  # from start()
        self.handshakes_ok = 0
        self.handshakes_failed = 0
        self.handshake_failures: dict[str, int] = {}  # by alert name (admin /metrics)
        self.bytes_closed = [0, 0]  # [from client, to client] of closed connections (admin /metrics)
        self.backend_health = BackendHealth()  # connect failures by reason, /healthz (admin)
        self.handshake_seconds = Histogram()  # completed handshakes' durations (admin /metrics)
        self.engine = Engine(config.relay_loops)  # every relay's pumps
        self._handshaking = 0
        self._handshake_cond = threading.Condition(self._lock)
        self._adopted: list[tuple[ConnectionInfo, Relay]] = []
        self.adopted = False  # adopt() took over a previous program's listener and connections
        self.parked_at: float | None = None  # (monotonic) when `pause` last parked the relay loops
        self.unstarted: list[ConnectionEntry] = []  # taken from a bridge, not started (for a rollback)
        self.carried = 0  # connections carried over the exec that started this program
        self.passed_listener = False  # listening on a socket systemd passed, not on config.listen
        self._in_handshake: dict[int, Handshake] = {}  # conn_id → its handshake, until relayed
        # How often a loop looks for a handshake past its deadline: a quarter of the shortest.
        self._deadline_scan = min([config.handshake_timeout, config.connect_timeout]
                                  + [spec.connect_timeout for spec in backend_mod.all_specs(config)]) / 4

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        return self._listener.getsockname()[:2]

    @property
    def listener_name(self) -> str:
        """The listener's name (config), else its HOST:PORT (for the logs and the admin endpoint)."""
        if self.config.name:
            return self.config.name
        if self._listener_label is None:
            if self._listener is None:  # not started: the configured address (port 0 stays 0)
                host, port = self.config.listen
                return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            host, port = self._listener.getsockname()[:2]  # once: the socket is closed at stop
            self._listener_label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self._listener_label

    @property
    def record_layer(self) -> str:
        if self.use_ktls:
            return "kTLS (kernel record layer)"
        if self.config.ktls is KtlsMode.OFF:
            return "userspace (kTLS off by --ktls off)"
        return f"userspace (kTLS unavailable: {self.ktls_probe.reason})"

    def bind(self, sock: socket.socket | None = None) -> None:
        """Listen now (before `start`): on ``sock`` if given (a socket systemd passed), else
        bind ``config.listen``. StartupError if the address cannot be bound. Does nothing if
        this server already has its listener (bound, or adopted from a previous program)."""
        if self._listener is not None:
            return
        if sock is not None:
            self._listener = sock
            self.passed_listener = True
            return
        self._listener = bind_listener(self.config.listen, reuse_port=self.config.reuse_port,
                                       backlog=self.config.backlog)

    def start(self) -> None:
        self.bind()
        assert self._listener is not None
        self._listener.setblocking(False)
        _ = self.listener_name  # fixed now (bound): a closed listener has no name
        threading.stack_size(THREAD_STACK_SIZE)
        self.engine.start()
        for info, relay in self._adopted:  # no thread per connection: a registration each
            self._start_relay(info, relay)
        self._adopted = []
        self._acceptor = Acceptor(self._listener, self.engine, name=self.listener_name,
                                  take_slot=functools.partial(self._slots.acquire, blocking=False),
                                  give_slot=self._slots.release, on_accept=self._spawn)
        self._acceptor.start()
        log.debug("accepting on %s:%d", *self.address)  # the caller logs "serving TLS 1.3 on ..."

    def stop(self, deadline: float = 5.0, drain: float | None = None) -> None:
        """Graceful stop: close the listener, let connections finish on their own for ``drain``
        seconds (default: the config's drain_timeout), then close the rest with close_notify
        and join every thread (``deadline``). Calling it again does nothing."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._acceptor is not None:  # no accept after this (a parked loop cannot say so: no wait)
            self._acceptor.stop(timeout=0.0 if self.engine.paused else deadline)
        if self._listener is not None:
            self._listener.close()
        drain_end = time.monotonic() + (self.config.drain_timeout if drain is None else drain)
        while self.connections and time.monotonic() < drain_end:
            time.sleep(0.05)
        end = time.monotonic() + deadline
        with self._lock:
            handshakes = list(self._in_handshake.values())
        for hs in handshakes:
            hs.call_soon(functools.partial(hs.cut, "server stopping"))
        with self._lock:
            self._handshake_cond.wait_for(lambda: self._handshaking == 0, max(0.0, end - time.monotonic()))
        with self._lock:
            infos = list(self.connections.values())
        for info in infos:
            if info.relay is not None:
                info.relay.abort("server stopping")
        for info in infos:
            if info.relay is not None:
                info.relay.join(max(0.0, end - time.monotonic()))
        self.engine.stop(max(0.1, end - time.monotonic()))

    # -- pausing and the exec upgrade (upgrade.py) -----------------------------------------------
    def pause(self, handshake_deadline: float, park_deadline: float) -> None:
        """Bring everything to a safe point: no accept, no handshake, no pump moving bytes.

        New connections wait in the kernel backlog; handshakes in flight get ``handshake_deadline``
        to finish while the relays keep moving bytes. Handshakes still running then are cut
        (their clients retry): a client that never finishes its handshake must not be able to
        hold every upgrade off. Raises UpgradeError (after resuming) if the pumps do not reach a
        safe point within ``park_deadline``."""
        # The accepting stops first: once it has, no handshake can begin (one accepted just
        # before would otherwise start after the count below reached 0, and be forked into the
        # bridge half-done). The relay loops keep running: they finish the handshakes in flight.
        if self._acceptor is not None and not self._acceptor.hold(park_deadline):  # None: never started
            self.resume()
            raise UpgradeError(f"the accept loop did not reach a safe point in {park_deadline:g}s")
        with self._lock:
            done = self._handshake_cond.wait_for(lambda: self._handshaking == 0, handshake_deadline)
            cut = [] if done else list(self._in_handshake.items())
        for conn_id, hs in cut:
            log.info("handshake cut: not finished when the upgrade began", extra=fields(conn=conn_ref(conn_id), pid=os.getpid()))
            hs.call_soon(functools.partial(hs.cut, "cut by an upgrade"))
        if cut:
            with self._lock:
                done = self._handshake_cond.wait_for(lambda: self._handshaking == 0, park_deadline)
            if not done:
                self.resume()
                raise UpgradeError(f"{self._handshaking} connections still between handshake and relay "
                                   f"after {handshake_deadline + park_deadline:g}s")
        if not self.engine.pause(park_deadline):
            self.resume()
            raise UpgradeError(f"the relay loops did not reach a safe point in {park_deadline:g}s")
        self.parked_at = time.monotonic()  # from here no byte moves: the connections' pause begins

    def resume(self) -> None:
        self.engine.resume()
        if self._acceptor is not None:
            self._acceptor.release()

    def registry(self) -> tuple[list[ConnectionInfo], list[int]]:
        """Every registered connection (handshaking ones too) and the byte totals of the closed
        ones [from client, to client], read together (the admin endpoint's view)."""
        with self._lock:
            return list(self.connections.values()), list(self.bytes_closed)

    def live_connections(self) -> list[tuple[ConnectionInfo, Relay]]:
        """(info, relay) of every connection being relayed (while paused: exactly what the
        state describes)."""
        with self._lock:
            return [(i, i.relay) for i in self.connections.values() if i.relay is not None and not i.closed]

    def snapshot(self, *, connections: bool = True) -> ListenerEntry:
        """This listener's entry in the upgrade document (only while paused). ``connections``
        False: a bridge (ironsocket.bridge) is about to hold them (``bridged`` counts them).
        What this program took from a bridge without starting it is always in."""
        assert self.engine.paused and (self._acceptor is None or self._acceptor.held)
        assert self._listener is not None
        live = self.live_connections()
        counters = Counters(handshakes_ok=self.handshakes_ok, handshakes_failed=self.handshakes_failed,
                            handshake_failures=dict(self.handshake_failures),
                            bytes_closed=(self.bytes_closed[0], self.bytes_closed[1]),
                            backend_failures=self.backend_health.failure_counts(),
                            handshake_seconds=self.handshake_seconds.to_entry(), upgrades=PROCESS.to_entry())
        return ListenerEntry(
            name=self.config.name, idle_timeout=self.config.idle_timeout, listener_fd=self._listener.fileno(),
            listen=tuple(self.address), passed=self.passed_listener, next_conn_id=next(self._ids),
            connections=(*(connection_entry(info) for info, _ in live if connections), *self.unstarted),
            bridged=0 if connections else len(live), counters=counters,
            # The session ticket keys (tls13/tickets.py): tickets issued before the upgrade resume
            # after it. Only in the sealed memfd, never on disk (unless --upgrade-state-dump).
            ticket_keys=tuple(self.config.tls.tickets.keyring.export()) if self.config.tls.tickets else ())

    # -- the bridge (ironsocket.bridge): connections a fork of the previous program relayed ------
    def take_carried(self, conn: ConnectionEntry) -> None:
        """Rebuild one connection a bridge handed over (its description, naming our fds), and
        start it. On failure its fds stay open (``unstarted``: for the rollback document)."""
        self.unstarted.append(conn)
        info, relay = restore_connection(conn, self.engine, self.config.idle_timeout)
        self._register(info, relay)  # from here a rollback describes it from the relay, as it is
        self.unstarted.remove(conn)
        self._start_relay(info, relay)
        self.carried += 1

    def release_stale(self) -> None:
        """(paused; the exec failed after the bridge was forked) Our relays are stale copies:
        let them go without a byte or a shutdown (the bridge gives the connections back)."""
        for info, relay in self.live_connections():
            self.engine.release(relay)
            relay.let_go()
            with self._lock:
                self.connections.pop(info.conn_id, None)
            self._release_slot()
            self.carried -= 1

    def adopt(self, entry: ListenerEntry, early: Any = None) -> None:
        """Take over one listener and its connections of the previous program (before `start`):
        ``entry`` is its entry in the upgrade document. If they were resumed early
        (``early``: its `resume.Early`, resumed before the configuration was loaded), take over
        that running set. On failure every inherited fd is left open (for the rollback to the
        previous program)."""
        listener = socket.socket(fileno=entry.listener_fd)
        if early is not None:
            try:
                self._adopt_running(early)
            except BaseException:
                listener.detach()
                raise
        else:
            restored: list[tuple[ConnectionInfo, Relay]] = []
            try:
                for conn in entry.connections:
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
        self.carried = len(entry.connections)
        self.passed_listener = entry.passed
        if not self._shared_ids:  # shared: the runtime continues the count of every listener
            self._ids = itertools.count(entry.next_conn_id)
        counters = entry.counters
        self.handshakes_ok = counters.handshakes_ok
        self.handshakes_failed = counters.handshakes_failed
        self.handshake_failures = dict(counters.handshake_failures)
        self.bytes_closed = list(counters.bytes_closed)
        if self.config.tls.tickets is not None and entry.ticket_keys is not None:
            self.config.tls.tickets.keyring.load(entry.ticket_keys)  # a key file's ring keeps its keys
        self.backend_health = BackendHealth(dict(counters.backend_failures))
        self.handshake_seconds.restore(counters.handshake_seconds)
        PROCESS.restore(counters.upgrades)
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
        if info.route is None:  # carried over exec: the route by this program's configuration,
            route, spec = backend_mod.select_route(self.config, info.server_name)
            info.route = route if spec.address == info.backend_addr else "carried"  # unless a reload moved it
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
        self._release_slot()

    # -- accept (acceptor.Acceptor calls _spawn on its loop thread) ------------------------------
    def _release_slot(self) -> None:
        """A connection (or its handshake) ended: its slot is free, and the acceptor may wait
        for one (max_connections)."""
        self._slots.release()
        if self._acceptor is not None:
            self._acceptor.slot_freed()

    def _spawn(self, sock: socket.socket, addr: tuple) -> None:
        conn_id = next(self._ids)
        info = ConnectionInfo(conn_id=conn_id, client_addr=addr[:2])
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # the client is gone already: the handshake finds out
        hs = Handshake(sock, info, tls=self.config.tls, exact_reads=self.use_ktls,
                       timeout=self.config.handshake_timeout, route=self._route,
                       on_complete=self._handshake_complete, on_end=self._handshake_end)
        with self._lock:
            self.connections[conn_id] = info
            self._handshaking += 1
            self._in_handshake[conn_id] = hs
        hs.start(self.engine, scan=self._deadline_scan)

    # -- one connection: its handshake (ironsocket.handshake, on a relay loop), then its relay ---
    def _route(self, server_name: str | None) -> tuple[str, backend_mod.BackendSpec]:
        return backend_mod.select_route(self.config, server_name)

    def _handshake_complete(self, hs: Handshake) -> None:
        self.handshakes_ok += 1
        self.handshake_seconds.observe(time.monotonic() - hs.began)

    def _handshake_end(self, hs: Handshake, result: Ready | Failed) -> None:
        """(loop thread) The handshake's end: start its relay, or count and log the failure."""
        info = hs.info
        relayed = False
        try:
            if isinstance(result, Ready):
                self._relay(info, result)
                relayed = True
            elif result.stage is Stage.HANDSHAKE:
                self._handshake_failed(info, result.reason, alert=result.alert)
            else:
                self._backend_failed(hs, info, result)
        except Exception:  # noqa: BLE001 - a bug must cost one connection, not the server
            log.exception("internal error", extra=fields(conn=info.ref, pid=os.getpid()))
        finally:
            with self._lock:
                if not relayed:
                    self.connections.pop(info.conn_id, None)
                self._in_handshake.pop(info.conn_id, None)
                self._handshaking -= 1
                self._handshake_cond.notify_all()
            if not relayed:
                if isinstance(result, Ready):
                    result.backend.close()
                    result.sock.close()
                self._release_slot()

    def _relay(self, info: ConnectionInfo, ready: Ready) -> None:
        """Hand the connection to its relay, which owns the sockets and the slot from here."""
        self.backend_health.succeeded(ready.spec.address)
        ready.backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        info.backend_local_addr = ready.backend.getsockname()[:2]
        channel = self._client_channel(ready.sock, ready.handoff, info)
        info.mode = channel.mode
        if log.isEnabledFor(logging.INFO):  # the fields cost a few µs per connection (and a getpid)
            log.info("open", extra=fields(
                conn=info.ref, pid=os.getpid(), listener=self.listener_name, route=info.route,
                client=info.client_addr, sni=info.server_name, alpn=info.alpn_protocol, suite=info.cipher_suite,
                group=info.group, mode=info.mode, backend=ready.spec.address,
                resumed=True if info.resumed else None))
        relay = Relay(info.conn_id, channel, ready.backend, engine=self.engine,
                      idle_timeout=self.config.idle_timeout)
        info.relay = relay
        self._start_relay(info, relay)

    def _backend_failed(self, hs: Handshake, info: ConnectionInfo, failed: Failed) -> None:
        assert failed.spec is not None and failed.error is not None
        self.backend_health.failed(failed.spec.address, failed.error)
        log.warning("backend unreachable", extra=fields(
            conn=info.ref, pid=os.getpid(), listener=self.listener_name, route=info.route,
            client=info.client_addr, sni=info.server_name, backend=failed.spec.address,
            reason=backend_mod.failure_reason(failed.error), error=failed.reason))
        if failed.handoff is not None:  # the client gets internal_error, not a silent close
            session = Session(failed.handoff)
            session.send_alert(AlertDescription.internal_error)
            try:
                hs.sock.send(session.data_to_send())  # a few bytes into an empty buffer
            except OSError:
                pass

    def _handshake_failed(self, info: ConnectionInfo, reason: str, alert: str = "none") -> None:
        self.handshakes_failed += 1
        self.handshake_failures[alert] = self.handshake_failures.get(alert, 0) + 1
        log.info("handshake failed", extra=fields(conn=info.ref, pid=os.getpid(), listener=self.listener_name,
                                                  client=info.client_addr, sni=info.server_name, alert=alert,
                                                  reason=reason))

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
                log.warning("kTLS install failed; staying in userspace",
                            extra=fields(conn=info.ref, pid=os.getpid(), error=str(exc)))
        return UserspaceChannel(sock, Session(handoff))

    def _log_close(self, info: ConnectionInfo, relay: Relay) -> None:
        s = relay.stats
        with self._lock:  # admin /metrics: bytes of closed connections (live ones are summed apart)
            self.bytes_closed[0] += s.bytes_c2b
            self.bytes_closed[1] += s.bytes_b2c
            info.closed = True
        # The access-log line: one per connection that reached the relay, in the chosen format.
        if log.isEnabledFor(logging.INFO):  # as for "open"
            log.info("close", extra=fields(
                conn=info.ref, pid=os.getpid(), listener=self.listener_name, route=info.route,
                client=info.client_addr, sni=info.server_name, backend=info.backend_addr,
                bytes_c2b=s.bytes_c2b, bytes_b2c=s.bytes_b2c,
                duration=round(time.time() - s.started, 3), reason=s.close_reason))

    def connection_for_backend_peer(self, addr: tuple[str, int]) -> ConnectionInfo | None:
        """The connection whose backend socket has local address ``addr`` (for the demo page)."""
        with self._lock:
            for info in self.connections.values():
                if info.backend_local_addr == addr:
                    return info
        return None

