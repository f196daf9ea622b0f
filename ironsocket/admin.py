"""The admin endpoint: plain HTTP on a loopback address or a unix socket (off by default).

- ``GET /healthz``: ``200 ok`` and the number of listeners;
- ``GET /connections``: JSON, one object per live connection of every listener;
- ``GET /metrics``: Prometheus text format 0.0.4.

It has no authentication, so it refuses a non-loopback address unless ``allow_remote`` is set
(``--admin-allow-remote`` / ``[admin] allow_remote = true``). It only reads the servers' state.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import ktls
from .relay import RecordMode

log = logging.getLogger("ironsocket.admin")


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
    try:
        host, port = server.address
    except Exception:  # noqa: BLE001 - not started
        host, port = server.config.listen
    return getattr(server.config, "name", "") or f"{host}:{port}"


def _live(server) -> list:
    with server._lock:
        return list(server.connections.values())


def connection_json(info, now: float) -> dict:
    relay = getattr(info, "relay", None)
    stats = getattr(relay, "stats", None)
    backend = getattr(info, "backend_addr", None)
    return {
        "id": info.conn_id,
        "client": f"{info.client_addr[0]}:{info.client_addr[1]}",
        "backend": f"{backend[0]}:{backend[1]}" if backend else None,
        "mode": info.mode.value if info.mode is not None else "handshake",
        "suite": info.cipher_suite,
        "group": info.group,
        "sni": info.server_name,
        "alpn": info.alpn_protocol,
        "bytes_in": getattr(stats, "bytes_from_client", 0),
        "bytes_out": getattr(stats, "bytes_to_client", 0),
        "age": round(now - info.started, 3),
    }


def connections_json(servers: Sequence) -> list[dict]:
    now = time.time()
    out = []
    for server in servers:
        name = _listener_name(server)
        for info in _live(server):
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

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def metrics_text(servers: Sequence, tls_stat: Callable[[], dict[str, int]] = ktls.tls_stat) -> str:
    m = _Metrics()
    conns, ktls_sessions, bytes_total, handshakes, failures = [], [], [], [], []
    for server in servers:
        listener = _listener_name(server)
        with server._lock:
            infos = list(server.connections.values())
            closed = list(getattr(server, "bytes_closed", (0, 0)))
            live_in = live_out = 0
            for info in infos:
                stats = getattr(getattr(info, "relay", None), "stats", None)
                if stats is not None and not getattr(info, "closed", False):
                    live_in += stats.bytes_from_client
                    live_out += stats.bytes_to_client
        by_mode = {"handshake": 0} | {mode.value: 0 for mode in RecordMode}
        for info in infos:
            by_mode[info.mode.value if info.mode is not None else "handshake"] += 1
        conns += [({"listener": listener, "mode": mode}, n) for mode, n in by_mode.items()]
        ktls_sessions += [({"listener": listener, "mode": mode.value.removeprefix("ktls-")}, by_mode[mode.value])
                          for mode in RecordMode if mode is not RecordMode.USERSPACE]
        bytes_total += [({"listener": listener, "direction": "in"}, closed[0] + live_in),
                        ({"listener": listener, "direction": "out"}, closed[1] + live_out)]
        handshakes.append(({"listener": listener}, server.handshakes_ok))
        for alert, n in sorted(getattr(server, "handshake_failures", {}).items()):
            failures.append(({"listener": listener, "alert": alert}, n))
    m.family("ironsocket_listeners", "gauge", "Listeners served by this process.", [({}, len(servers))])
    m.family("ironsocket_connections", "gauge", "Live connections by record layer (handshake: not yet relaying).", conns)
    m.family("ironsocket_bytes_total", "counter",
             "Plaintext bytes relayed: in = from clients to backends, out = from backends to clients.", bytes_total)
    m.family("ironsocket_handshakes_total", "counter", "Completed TLS handshakes.", handshakes)
    m.family("ironsocket_handshake_failures_total", "counter",
             "Failed TLS handshakes by the alert sent (received_X: the client's alert; none: timeout/EOF).", failures)
    m.family("ironsocket_ktls_sessions", "gauge", "Live connections whose record layer is in the kernel.", ktls_sessions)
    stats = tls_stat()
    if stats:
        m.family("ironsocket_kernel_tls_stat", "gauge", "Counters of /proc/net/tls_stat (host-wide).",
                 [({"counter": k}, v) for k, v in sorted(stats.items())])
    return m.text()


class _Handler(BaseHTTPRequestHandler):
    server_version = "ironsocket-admin"
    protocol_version = "HTTP/1.1"
    servers: Sequence = ()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._reply(200, "text/plain; charset=utf-8", f"ok\nlisteners {len(self.servers)}\n")
        elif path == "/connections":
            self._reply(200, "application/json", json.dumps(connections_json(self.servers), indent=1) + "\n")
        elif path == "/metrics":
            self._reply(200, "text/plain; version=0.0.4; charset=utf-8", metrics_text(self.servers))
        else:
            self._reply(404, "text/plain; charset=utf-8", "not found: try /healthz, /connections, /metrics\n")

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


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = True


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # type: ignore[override]
        sock, _ = self.socket.accept()
        return sock, ("unix", 0)


class AdminServer:
    """``AdminServer(servers, listen=("127.0.0.1", 9180))`` or ``unix="/run/x.sock"``; start/stop."""

    def __init__(self, servers: Sequence, *, listen: tuple[str, int] | None = None, unix: str | None = None,
                 allow_remote: bool = False, fd: int | None = None) -> None:
        if (listen is None) == (unix is None):
            raise AdminError("admin: give exactly one of a HOST:PORT or a unix socket path")
        if listen is not None and not allow_remote and not is_loopback(listen[0]):
            raise AdminError(f"admin: refusing to listen on {listen[0]}: not a loopback address and the admin "
                             "endpoint has no authentication (use --admin-allow-remote / allow_remote = true)")
        self.servers = list(servers)
        self.listen, self.unix = listen, unix
        handler = type("AdminHandler", (_Handler,), {"servers": self.servers})
        if fd is not None:  # carried over an exec upgrade: already bound and listening
            self._httpd = self._adopt(fd, handler)
            self._thread: threading.Thread | None = None
            return
        try:
            if unix is not None:
                path = Path(unix)
                if path.exists() or path.is_symlink():
                    if not stat.S_ISSOCK(path.lstat().st_mode):
                        raise AdminError(f"admin: {unix} exists and is not a socket")
                    path.unlink()
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
        self._thread: threading.Thread | None = None

    def _adopt(self, fd: int, handler: type) -> socketserver.BaseServer:
        sock = socket.socket(fileno=fd)
        try:
            if sock.family == socket.AF_UNIX:
                httpd: socketserver.BaseServer = _UnixServer(sock.getsockname(), handler, bind_and_activate=False)
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
        self._thread.start()
        log.info("admin endpoint on %s", self.address)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
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
