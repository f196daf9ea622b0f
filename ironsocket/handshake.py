"""One connection from accept to relay, as a pump on the relay engine: no thread of its own.

Theory of operation
-------------------
A `Handshake` is both what an `engine.Loop` runs (a `Pump`: `step`, `finished`) and what it
holds (a `RelayLike`: `pumps`, `fds`, `idle_for`, `idle_timeout_expired`). Its `step()` never
blocks; it moves through three phases, and everything it holds between two steps is in its
fields:

1. ``TLS`` — read what the client sent (with kTLS possible, exactly one record at a time:
   ``TLSServer.bytes_wanted()``, so nothing past the client Finished leaves the kernel's receive
   queue and TLS_RX starts at the right byte with read rec_seq 0, DESIGN.md "Danger"), feed the
   sans-IO `tls13.server.TLSServer`, write what it answers.
2. ``FLUSH`` — after ``HandshakeComplete``, the last flight (session tickets) goes out whole
   before the record layer is handed on: a byte of it left in userspace would be lost to kTLS.
3. ``CONNECT`` — the backend connect (`backend.start_connect`: routes, PROXY header,
   transparent), non-blocking.

It ends once, through ``on_end``, with a `Ready` (the owner builds the client channel and the
`relay.Relay`, which takes both sockets) or a `Failed` (the owner counts and logs it; this
module then closes the sockets). Each phase has a deadline (the handshake timeout, then the
backend's connect timeout): the loop's idle scan calls `idle_timeout_expired` once it has passed
(the scan runs a few times per timeout, so a timeout fires up to a quarter late).

`cut()` ends it from outside (an upgrade's pause, a stop): only on its loop thread
(``loop.call_soon``), like every other call here.

The handshake's CPU (key exchange, signature) runs on the loop thread; the relays of that loop
wait meanwhile, as they waited for the GIL when each handshake had its own thread.
"""

from __future__ import annotations

import enum
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from select import POLLIN, POLLOUT

from . import backend as backend_mod
from .backend import BackendSpec, Connecting
from .connection import ConnectionInfo
from .engine import Engine, Loop, Pump, RelayLike, WaitFor
from .logs import fields
from .tls13.alerts import RemoteProtocolError
from .tls13.events import NEED_DATA, ClientHelloReceived, HandshakeComplete
from .tls13.handoff import Handoff
from .tls13.server import ServerConfig, TLSServer

log = logging.getLogger("ironsocket")

PLAIN_HTTP = "plain HTTP request on the TLS port"
# A TLS record starts with a content type byte (20-24); an HTTP/1 request with a method in capitals.
_HTTP_REQUEST = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|CONNECT|TRACE|PRI) ")
_READ_SIZE = 16 * 1024 + 256  # one whole record (userspace record layer: as much as is there)


class Phase(enum.Enum):
    TLS = "tls"
    FLUSH = "flush"
    CONNECT = "connect"
    ENDED = "ended"


class Stage(enum.Enum):
    """Where a handshake failed (the owner's counters and log lines differ)."""

    HANDSHAKE = "handshake"  # the TLS handshake itself: bad input, timeout, client gone
    BACKEND = "backend"  # after it: the backend connect


@dataclass(frozen=True)
class Failed:
    stage: Stage
    reason: str  # for a human
    alert: str = "none"  # the alert's name (admin /metrics), HANDSHAKE only
    error: OSError | None = None  # BACKEND: the connect's error
    spec: BackendSpec | None = None  # BACKEND: where it tried
    handoff: Handoff | None = None  # BACKEND: to send the client an alert with


@dataclass(frozen=True)
class Ready:
    """Handshake done and backend connected: the owner takes both sockets."""

    sock: socket.socket
    handoff: Handoff
    backend: socket.socket
    spec: BackendSpec


def _alert_label(exc: RemoteProtocolError) -> str:
    """The label of a failed handshake in the admin /metrics."""
    if exc.alert is not None:
        return getattr(exc.alert, "name", str(exc.alert))
    if exc.received is not None:
        return "received_" + getattr(exc.received, "name", str(exc.received))
    return "none"


class Handshake:
    """One accepted connection until its relay starts; see the module doc."""

    def __init__(
        self,
        sock: socket.socket,
        info: ConnectionInfo,
        *,
        tls: ServerConfig,
        exact_reads: bool,
        timeout: float,
        route: Callable[[str | None], tuple[str, BackendSpec]],
        on_complete: Callable[[Handshake], None],
        on_end: Callable[[Handshake, Ready | Failed], None],
    ) -> None:
        """``route(server_name)`` → (route name, backend); ``on_complete`` runs once the TLS
        handshake is done (before the backend connect: the owner counts it); ``on_end`` once, at
        the end (see the module doc). ``exact_reads``: kTLS may follow (read record by record)."""
        self.sock = sock
        self.info = info
        self.relay: RelayLike = self  # engine.Pump: the RelayLike it belongs to is itself
        self.began = time.monotonic()
        self.phase = Phase.TLS
        self.deadline = self.began + timeout
        self._timeout = timeout
        self._tls = TLSServer(tls)
        self._exact_reads = exact_reads
        self._route = route
        self._on_complete = on_complete
        self._on_end = on_end
        self._out = b""  # written by the TLS engine, not yet taken by the socket
        self._first = b""  # the client's first bytes: plain HTTP is named as such
        self._connecting: Connecting | None = None
        self._handoff: Handoff | None = None
        self._spec: BackendSpec | None = None
        self._loop: Loop | None = None
        sock.setblocking(False)

    def start(self, engine: Engine, scan: float) -> None:
        """Give this handshake to a loop of ``engine`` (from any thread); it runs there from now.
        ``scan``: how often that loop looks for expired deadlines (a quarter of the shortest)."""
        loop = engine.next_loop()
        self._loop = loop
        loop.set_idle_scan(scan)
        loop.arrive(self)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on this handshake's loop thread (`cut` from another thread)."""
        assert self._loop is not None
        self._loop.call_soon(fn)

    # -- what the engine asks (engine.RelayLike) ------------------------------------------------
    def pumps(self) -> list[Pump]:
        return [] if self.phase is Phase.ENDED else [self]

    def fds(self) -> tuple[int, ...]:
        fds = [self.sock.fileno()]
        if self._connecting is not None:
            fds.append(self._connecting.fileno())
        return tuple(fd for fd in fds if fd >= 0)

    def idle_for(self, now: float) -> float | None:
        return None if self.phase is Phase.ENDED else self.deadline - now

    def idle_timeout_expired(self) -> None:
        if self.phase is Phase.CONNECT:
            assert self._connecting is not None
            self._fail_backend(self._connecting.timed_out())
        else:
            self._fail(f"handshake timeout ({self._timeout:g}s)")

    # -- the pump (engine.Pump) ------------------------------------------------------------------
    def step(self) -> bool:
        if self.phase is Phase.TLS:
            self._tls_step()
        if self.phase is Phase.FLUSH:
            self._flush()
            self._begin_connect()
        if self.phase is Phase.CONNECT:
            assert self._connecting is not None
            if not self._connecting.progress():
                raise WaitFor(self._connecting.fileno(), POLLOUT)
            self._end_ready()
        return True

    def finished(self, exc: BaseException | None) -> None:
        """The step ended (it always returns True or raises WaitFor unless something broke)."""
        if exc is None or self.phase is Phase.ENDED:
            return
        if isinstance(exc, backend_mod.BackendError):
            self._fail_backend(exc)
        elif isinstance(exc, OSError):
            self._fail(f"client socket error: {exc}")
        else:  # a bug costs one connection, not the loop
            log.error("internal error", exc_info=exc, extra=fields(conn=self.info.ref))
            self._fail("internal error")

    def cut(self, reason: str) -> None:
        """(loop thread) End it now, as failed for ``reason``."""
        if self.phase is not Phase.ENDED:
            self._fail(reason)

    # -- the phases ----------------------------------------------------------------------------
    def _tls_step(self) -> None:
        while True:
            self._send_pending()
            want = self._tls.bytes_wanted() if self._exact_reads else _READ_SIZE
            try:
                data = self.sock.recv(want)
            except BlockingIOError:
                raise WaitFor(self.sock.fileno(), POLLIN) from None
            if len(self._first) < 16:
                self._first += data[:16]
            self._tls.receive_data(data)
            try:
                while (event := self._tls.next_event()) is not NEED_DATA:
                    if isinstance(event, ClientHelloReceived):
                        self.info.server_name = event.server_name
                    elif isinstance(event, HandshakeComplete):
                        self.info.cipher_suite = event.cipher_suite.name
                        self.info.group = event.group.name if event.group is not None else None
                        self.info.alpn_protocol = event.alpn_protocol
                        self.info.resumed = event.resumed
                        self._out += self._tls.data_to_send()
                        self.phase = Phase.FLUSH
                        return
            except RemoteProtocolError as exc:
                self._out += self._tls.data_to_send()
                self._send_pending(best_effort=True)
                if len(self._first) < 16:  # read record by record: the rest may still be queued
                    try:
                        self._first += self.sock.recv(16 - len(self._first), socket.MSG_PEEK)
                    except OSError:
                        pass
                reason = PLAIN_HTTP if _HTTP_REQUEST.match(self._first) else str(exc)
                self._fail(reason, alert=_alert_label(exc))
                return
            self._out += self._tls.data_to_send()
            if not data:  # EOF, and the engine did not call it an error: nothing more will come
                self._fail("client went away")
                return

    def _send_pending(self, best_effort: bool = False) -> None:
        """Write what the engine answered; WaitFor the socket to take the rest (unless
        ``best_effort``: an alert before closing goes if it can)."""
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except BlockingIOError:
                if best_effort:
                    return
                raise WaitFor(self.sock.fileno(), POLLOUT) from None
            except OSError:
                if best_effort:
                    return
                raise
            self._out = self._out[sent:]

    def _flush(self) -> None:
        try:
            self._send_pending()
        except OSError:  # reset right after its Finished: the relay meets the error and logs the close
            self._out = b""
        self._on_complete(self)
        self._handoff = self._tls.handoff(drain=not self._exact_reads)

    def _begin_connect(self) -> None:
        route, spec = self._route(self.info.server_name)
        self.info.route = route
        self.info.backend_addr = spec.address
        self._spec = spec
        self.phase = Phase.CONNECT  # from here the deadline is the backend's
        self.deadline = time.monotonic() + spec.connect_timeout
        self._connecting = backend_mod.start_connect(
            spec, client_addr=self.info.client_addr, local_addr=self.sock.getsockname()[:2],
            server_name=self.info.server_name, alpn=self.info.alpn_protocol, cipher=self.info.cipher_suite)

    # -- ending --------------------------------------------------------------------------------
    def _fail(self, reason: str, alert: str = "none") -> None:
        self._end(Failed(Stage.HANDSHAKE, reason, alert=alert))

    def _fail_backend(self, exc: OSError) -> None:
        self._end(Failed(Stage.BACKEND, backend_mod.describe_error(exc), error=exc, spec=self._spec,
                         handoff=self._handoff))

    def _end_ready(self) -> None:
        assert self._connecting is not None and self._handoff is not None
        self._leave_loop()
        connecting = self._connecting
        backend = connecting.take()
        ready = Ready(self.sock, self._handoff, backend, connecting.spec)
        self._connecting = None
        self.phase = Phase.ENDED
        try:
            self._on_end(self, ready)  # the owner holds both sockets now
        except BaseException:
            backend.close()
            self.sock.close()
            raise

    def _end(self, failed: Failed) -> None:
        if self.phase is Phase.ENDED:
            return
        self._leave_loop()
        self.phase = Phase.ENDED
        try:
            self._on_end(self, failed)
        finally:
            if self._connecting is not None:
                self._connecting.close()
                self._connecting = None
            self.sock.close()

    def _leave_loop(self) -> None:
        """Drop the loop's registrations of our fds before they close or change hands."""
        if self._loop is not None:
            self._loop.forget(self)

