"""The admin endpoint: plain HTTP on a loopback address or a unix socket (off by default).

- ``GET /healthz``: ``200 ok`` and the number of listeners, or ``503 unhealthy: <reason>`` when
  a backend of a listener is unreachable. Each backend's health is the outcome of the last
  attempt to connect to it — a client's connect, or, when that is older than
  `backend.PROBE_INTERVAL` (1 s), a TCP connect probe with a 1 s timeout made for this request
  (`backend.BackendHealth.check`) — so ``/healthz`` follows a backend going down and coming back
  within about a second, with or without client traffic. A listener whose SNI routes name
  several backends is unhealthy when any of them is unreachable (the reason names which);
- ``GET /connections``: JSON, one object per live connection of every listener;
- ``GET /metrics``: Prometheus text format 0.0.4 (`metrics_text`: connections, bytes,
  handshakes and their duration histogram, backend connect failures by reason, upgrades,
  rollbacks and refused upgrades, certificate expiry, build info, the kernel's tls_stat).

It has no authentication, so it refuses a non-loopback address unless ``allow_remote`` is set
(``--admin-allow-remote`` / ``[admin] allow_remote = true``). It only reads the servers' state.

Limits, so that clients which never finish a request cannot pin it: a client has
``REQUEST_TIMEOUT`` seconds to send each whole request (request line and headers; on a kept-alive
connection the wait for the next request counts too), after which the connection is closed
without an answer; at most ``MAX_CONNECTIONS`` connections are served at once (one thread each):
when all are taken, a new connection closes the one that has waited longest for its request, or,
if every connection is busy answering, waits in the listen backlog (``BACKLOG``).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import platform
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from . import backend as backend_mod
from . import ktls
from .connection import ConnectionInfo, describe
from .counters import PROCESS
from .relay import Direction, RecordMode

log = logging.getLogger("ironsocket.admin")
announce = logging.getLogger("ironsocket")  # the start-up line tests and operators grep for

REQUEST_TIMEOUT = 5.0  # seconds a client has to send one whole request
MAX_CONNECTIONS = 64  # admin connections served at once (a thread each)
BACKLOG = 128  # listen backlog of the admin socket


class AdminError(Exception):
    """The admin endpoint cannot start; the message says why."""


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%", 1)[0]).is_loopback for i in infos)


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _listener_name(server) -> str:
    name = getattr(server, "listener_name", None)  # a ProxyServer: the same label as in its log lines
    if isinstance(name, str):
        return name
    try:
        host, port = server.address
    except Exception:  # noqa: BLE001 - not started
        host, port = server.config.listen
    return getattr(server.config, "name", "") or f"{host}:{port}"


def connection_json(info: ConnectionInfo, now: float) -> dict[str, Any]:
    stats = info.relay.stats if info.relay is not None else None
    return describe(info) | {
        "bytes_c2b": stats.bytes_c2b if stats is not None else 0,
        "bytes_b2c": stats.bytes_b2c if stats is not None else 0,
        "age": round(now - info.started, 3),
    }


def connections_json(servers: Sequence) -> list[dict]:
    now = time.time()
    out = []
    for server in servers:
        name = _listener_name(server)
        infos, _ = server.registry()
        for info in infos:
            out.append({"listener": name} | connection_json(info, now))
    return out


class _Metrics:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, object], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")

    def histogram(self, name: str, help_text: str,
                  series: list[tuple[dict[str, object], list[tuple[str, int]], float, int]]) -> None:
        """``series``: (labels, cumulative buckets [(le, n)...], sum, count) per label set."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, buckets, total, count in series:
            base = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            sep = "," if base else ""
            for le, n in buckets:
                self.lines.append(f'{name}_bucket{{{base}{sep}le="{le}"}} {n}')
            self.lines.append(f"{name}_sum{{{base}}} {total!r}" if base else f"{name}_sum {total!r}")
            self.lines.append(f"{name}_count{{{base}}} {count}" if base else f"{name}_count {count}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@functools.lru_cache(maxsize=256)
def _leaf_facts(der: bytes) -> tuple[float, str] | None:
    """(notAfter as a Unix time, subject) of a DER certificate; None if it does not parse."""
    from cryptography import x509

    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return leaf.not_valid_after_utc.timestamp(), leaf.subject.rfc4514_string()


def certificate_expiry(servers: Sequence, now: float | None = None) -> list[tuple[dict[str, object], float]]:
    """Per listener and certificate (leaf): seconds until it expires (negative: expired)."""
    now = time.time() if now is None else now
    out: list[tuple[dict[str, object], float]] = []
    for server in servers:
        listener = _listener_name(server)
        store = getattr(getattr(server.config, "tls", None), "certificates", None)
        seen: set[bytes] = set()
        for cred in getattr(store, "credentials", ()):
            if not cred.chain or cred.chain[0] in seen:
                continue
            seen.add(cred.chain[0])
            facts = _leaf_facts(cred.chain[0])
            if facts is None:
                continue
            not_after, subject = facts
            source = cred.source.split(" + ")[0] if cred.source else ""
            out.append(({"listener": listener, "cert": source or "-", "subject": subject}, round(not_after - now, 3)))
    return out


def build_info() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("ironsocket")
    except PackageNotFoundError:
        ours = "unknown"
    return {"version": ours, "python": platform.python_version()}


def health(servers: Sequence) -> list[str]:
    """Why the proxy is unhealthy: one reason per unreachable backend (empty: healthy)."""
    problems = []
    for server in servers:
        checker = getattr(server, "backend_health", None)
        if checker is None:
            continue
        for spec in backend_mod.all_specs(server.config):
            outcome = checker.check(spec)
            if not outcome.ok:
                host, port = spec.address
                problems.append(f"backend {host}:{port} of listener {_listener_name(server)} unreachable: "
                                f"{outcome.reason}")
    return problems


def metrics_text(servers: Sequence, tls_stat: Callable[[], dict[str, int]] = ktls.tls_stat) -> str:
    m = _Metrics()
    conns, ktls_sessions, bytes_total, handshakes, failures = [], [], [], [], []
    backend_failures: list[tuple[dict[str, object], float]] = []
    durations: list[tuple[dict[str, object], list[tuple[str, int]], float, int]] = []
    for server in servers:
        listener = _listener_name(server)
        infos, closed = server.registry()
        live_in = live_out = 0
        for info in infos:
            stats = info.relay.stats if info.relay is not None else None
            if stats is not None and not info.closed:
                live_in += stats.bytes_c2b
                live_out += stats.bytes_b2c
        by_mode = {"handshake": 0} | {mode.value: 0 for mode in RecordMode}
        for info in infos:
            by_mode[info.mode.value if info.mode is not None else "handshake"] += 1
        conns += [({"listener": listener, "mode": mode}, n) for mode, n in by_mode.items()]
        ktls_sessions += [({"listener": listener, "mode": mode.value.removeprefix("ktls-")}, by_mode[mode.value])
                          for mode in RecordMode if mode is not RecordMode.USERSPACE]
        bytes_total += [({"listener": listener, "direction": Direction.CLIENT_TO_BACKEND.value}, closed[0] + live_in),
                        ({"listener": listener, "direction": Direction.BACKEND_TO_CLIENT.value}, closed[1] + live_out)]
        handshakes.append(({"listener": listener}, server.handshakes_ok))
        for alert, n in sorted(getattr(server, "handshake_failures", {}).items()):
            failures.append(({"listener": listener, "alert": alert}, n))
        checker = getattr(server, "backend_health", None)
        if checker is not None:
            for reason, n in sorted(checker.failure_counts().items()):
                backend_failures.append(({"listener": listener, "reason": reason}, n))
        hist = getattr(server, "handshake_seconds", None)
        if hist is not None:
            buckets, total, count = hist.cumulative()
            durations.append(({"listener": listener}, buckets, total, count))
    m.family("ironsocket_listeners", "gauge", "Listeners served by this process.", [({}, len(servers))])
    m.family("ironsocket_connections", "gauge", "Live connections by record layer (handshake: not yet relaying).", conns)
    m.family("ironsocket_bytes_total", "counter",
             "Plaintext bytes relayed by direction: c2b = client to backend, b2c = backend to client.", bytes_total)
    m.family("ironsocket_handshakes_total", "counter", "Completed TLS handshakes.", handshakes)
    m.family("ironsocket_handshake_failures_total", "counter",
             "Failed TLS handshakes by the alert sent (received_X: the client's alert; none: timeout/EOF).", failures)
    m.histogram("ironsocket_handshake_duration_seconds",
                "Completed TLS handshakes' duration, from the connection's accept to the client Finished.", durations)
    m.family("ironsocket_backend_connect_failures_total", "counter",
             "Failed backend connects of clients' connections, by reason (the errno name).", backend_failures)
    m.family("ironsocket_ktls_sessions", "gauge", "Live connections whose record layer is in the kernel.", ktls_sessions)
    upgrades = PROCESS.to_entry()
    m.family("ironsocket_upgrades_total", "counter",
             "Exec upgrades (and reloads) completed by this process (same PID, across execs).",
             [({}, upgrades.done)])
    m.family("ironsocket_upgrade_rollbacks_total", "counter",
             "Upgrades whose new program failed to start: the previous program was exec'd back.",
             [({}, upgrades.rolled_back)])
    m.family("ironsocket_upgrades_refused_total", "counter",
             "Upgrades not done before the exec (start-up check, pause): the running program kept serving.",
             [({}, upgrades.refused)])
    m.family("ironsocket_certificate_expiry_seconds", "gauge",
             "Seconds until each certificate (leaf) expires; negative once expired.", certificate_expiry(servers))
    m.family("ironsocket_build_info", "gauge", "The ironsocket and Python versions running.", [(build_info(), 1)])
    stats = tls_stat()
    if stats:
        # TlsCurr* are the sessions open now (gauges); the other fields only ever grow (counters).
        current = [({"stat": k}, v) for k, v in sorted(stats.items()) if k.startswith("TlsCurr")]
        totals = [({"stat": k}, v) for k, v in sorted(stats.items()) if not k.startswith("TlsCurr")]
        m.family("ironsocket_kernel_tls_total", "counter",
                 "Cumulative counters of /proc/net/tls_stat (host-wide: every process's kTLS sockets).", totals)
        m.family("ironsocket_kernel_tls_current", "gauge",
                 "The TlsCurr* fields of /proc/net/tls_stat: kTLS sessions open now, host-wide.", current)
    return m.text()


TEXT = "text/plain; charset=utf-8"
METRICS = "text/plain; version=0.0.4; charset=utf-8"
Reply = tuple[int, str, str]  # HTTP status, Content-Type, body


class LocalView:
    """What the endpoint shows of this process's listeners (``servers``)."""

    def __init__(self, servers: Sequence) -> None:
        self.servers = servers

    def healthz(self) -> Reply:
        problems = health(self.servers)
        if problems:
            return 503, TEXT, f"unhealthy: {'; '.join(problems)}\nlisteners {len(self.servers)}\n"
        return 200, TEXT, f"ok\nlisteners {len(self.servers)}\n"

    def connections(self) -> Reply:
        return 200, "application/json", json.dumps(connections_json(self.servers), indent=1) + "\n"

    def metrics(self) -> Reply:
        return 200, METRICS, metrics_text(self.servers)


class _Handler(BaseHTTPRequestHandler):
    server_version = "ironsocket-admin"
    protocol_version = "HTTP/1.1"
    view: Any = None  # a LocalView, or workersum.WorkersView (the --workers supervisor's)
    timeout = REQUEST_TIMEOUT  # socket timeout per read/write: a backstop for the deadline below

    def handle_one_request(self) -> None:
        if not self.server.watch(self.connection):  # type: ignore[attr-defined]
            self.close_connection = True
            return
        try:
            super().handle_one_request()
        finally:
            self.server.unwatch(self.connection)  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self.server.unwatch(self.connection):  # type: ignore[attr-defined]
            self.close_connection = True  # the deadline passed (or we were evicted) while reading
            return
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._reply(*self.view.healthz())
        elif path == "/connections":
            self._reply(*self.view.connections())
        elif path == "/metrics":
            self._reply(*self.view.metrics())
        else:
            self._reply(404, TEXT, "not found: try /healthz, /connections, /metrics\n")

    def _reply(self, code: int, ctype: str, body: str) -> None:
        data = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("admin: " + format, *args)

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"


class _Limits:
    """Mixed into the threading servers: the listen backlog, the per-request deadline (a reaper
    thread shuts down connections whose request is not complete in time) and the bound on
    connections served at once."""

    request_queue_size = BACKLOG
    daemon_threads = True
    block_on_close = False

    def setup_limits(self, request_timeout: float, max_connections: int) -> None:
        self.request_timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        self._reading: dict[socket.socket, float] = {}  # connection -> deadline of its request
        self._guard = threading.Lock()
        self.closing = threading.Event()

    def drain(self, timeout: float) -> bool:
        """Wait until no request is being answered (every slot free); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        taken = 0
        try:
            while taken < self._max_connections:
                if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    return False
                taken += 1
            return True
        finally:
            for _ in range(taken):
                self._slots.release()

    def watch(self, sock: socket.socket) -> bool:
        with self._guard:
            if self.closing.is_set():
                return False
            self._reading[sock] = time.monotonic() + self.request_timeout
            return True

    def unwatch(self, sock: socket.socket) -> bool:
        """Stop the deadline; False if it had already passed (the connection is being closed)."""
        with self._guard:
            return self._reading.pop(sock, None) is not None

    def _cut(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # the handler's blocked read returns EOF
        except OSError:
            pass

    def reap(self) -> None:
        """Until closing: close every connection whose request deadline has passed."""
        interval = min(0.2, self.request_timeout / 5)
        while not self.closing.wait(interval):
            now = time.monotonic()
            with self._guard:
                late = [sock for sock, deadline in self._reading.items() if deadline <= now]
                for sock in late:
                    del self._reading[sock]
            for sock in late:
                log.debug("admin: request not complete within %gs: closing the connection", self.request_timeout)
                self._cut(sock)

    def _evict_oldest(self) -> bool:
        with self._guard:
            if not self._reading:
                return False
            sock = min(self._reading, key=self._reading.__getitem__)
            del self._reading[sock]
        log.debug("admin: connection limit reached: closing the one waiting longest for its request")
        self._cut(sock)
        return True

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        while not self._slots.acquire(blocking=False):
            if self.closing.is_set():
                self.shutdown_request(request)  # type: ignore[attr-defined]
                return
            self._evict_oldest()  # else every connection is answering: wait for one to end
            if self._slots.acquire(timeout=0.1):
                break
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        log.debug("admin: error serving a request", exc_info=True)  # a client cut off: no traceback on stderr


class _TCPServer(_Limits, ThreadingHTTPServer):
    pass


class _UnixServer(_Limits, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    pass

    def get_request(self):  # type: ignore[override]
        sock, _ = self.socket.accept()
        return sock, ("unix", 0)


class AdminServer:
    """``AdminServer(servers, listen=("127.0.0.1", 9180))`` or ``unix="/run/x.sock"``; start/stop.
    With ``--workers`` the supervisor runs one with a `workersum.WorkersView` (no servers of its own)."""

    def __init__(self, servers: Sequence, *, listen: tuple[str, int] | None = None, unix: str | None = None,
                 allow_remote: bool = False, request_timeout: float = REQUEST_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, fd: int | None = None, view: Any = None) -> None:
        """``view``: what it shows (default: a `LocalView` of ``servers``)."""
        if (listen is None) == (unix is None):
            raise AdminError("admin: give exactly one of a HOST:PORT or a unix socket path")
        if listen is not None and not allow_remote and not is_loopback(listen[0]):
            raise AdminError(f"admin: refusing to listen on {listen[0]}: not a loopback address and the admin "
                             "endpoint has no authentication (use --admin-allow-remote / allow_remote = true)")
        self.servers = list(servers)
        self.listen, self.unix = listen, unix
        handler = type("AdminHandler", (_Handler,), {"view": view or LocalView(self.servers),
                                                     "timeout": request_timeout})
        self._thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        if fd is not None:  # carried over an exec upgrade: already bound and listening
            self._httpd = self._adopt(fd, handler)
            self._httpd.setup_limits(request_timeout, max_connections)
            return
        try:
            if unix is not None:
                from .control import ControlError, remove_if_stale

                try:  # only a socket nobody listens on (left by a process that died) is removed
                    remove_if_stale(Path(unix), what="admin socket")
                except ControlError as exc:
                    raise AdminError(f"admin: {exc}") from None
                old = os.umask(0o177)  # the socket is 0600: only our user may talk to it
                try:
                    self._httpd = _UnixServer(unix, handler)
                finally:
                    os.umask(old)
            else:
                family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET  # type: ignore[index]
                server_cls = type("AdminTCPServer", (_TCPServer,), {"address_family": family})
                self._httpd = server_cls(listen, handler)  # type: ignore[arg-type]
        except OSError as exc:
            where = unix or f"{listen[0]}:{listen[1]}"  # type: ignore[index]
            raise AdminError(f"admin: cannot listen on {where}: {exc.strerror}") from None
        self._httpd.setup_limits(request_timeout, max_connections)

    def _adopt(self, fd: int, handler: type) -> _TCPServer | _UnixServer:
        sock = socket.socket(fileno=fd)
        try:
            if sock.family == socket.AF_UNIX:
                httpd: _TCPServer | _UnixServer = _UnixServer(sock.getsockname(), handler, bind_and_activate=False)
            else:
                server_cls = type("AdminTCPServer", (_TCPServer,), {"address_family": sock.family})
                httpd = server_cls(sock.getsockname()[:2], handler, bind_and_activate=False)
                httpd.server_name, httpd.server_port = "localhost", sock.getsockname()[1]  # type: ignore[attr-defined]
        except BaseException:
            sock.detach()  # the fd stays open for whoever rolls back
            raise
        httpd.socket.close()  # the unbound socket the constructor made
        httpd.socket = sock
        return httpd

    def fileno(self) -> int:
        """The listening socket (carried over an exec upgrade)."""
        return self._httpd.socket.fileno()

    @property
    def address(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/" if ":" not in str(host) else f"http://[{host}]:{port}/"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="is-admin", daemon=True)
        self._reaper = threading.Thread(target=self._httpd.reap, name="is-admin-reaper", daemon=True)
        self._thread.start()
        self._reaper.start()
        announce.info("admin endpoint on %s", self.address)

    def pause(self, timeout: float) -> None:
        """Before an exec upgrade: accept nothing new (the listening socket stays open: a probe
        waits in the backlog and the next program answers it) and let the requests being
        answered finish (the exec would cut them: a load balancer would see a reset)."""
        if self._thread is not None:
            self._httpd.shutdown()  # serve_forever returns; the socket stays open
            self._thread.join(timeout)
            self._thread = None
        self._httpd.drain(timeout)

    def resume(self) -> None:
        """The upgrade did not happen: answer again."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name="is-admin", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._httpd.closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for thread in (self._thread, self._reaper):
            if thread is not None:
                thread.join(5)
        if self.unix is not None:
            try:
                os.unlink(self.unix)
            except OSError:
                pass


def parse_admin(text: str) -> dict:
    """``--admin`` value: ``HOST:PORT``, ``PORT`` or a unix socket path (``unix:/p`` or ``/p``)."""
    from .server import parse_hostport

    if text.startswith("unix:"):
        return {"unix": text[5:]}
    if text.startswith("/") or text.startswith("./"):
        return {"unix": text}
    return {"listen": parse_hostport(text)}
