"""The built-in demo backend for `ironsocket serve` with no arguments.

A tiny HTTP/1.1 server on a loopback port that answers every request with a page showing the
TLS parameters of the connection it came through (suite, group, SNI, ALPN, record layer), found
in the proxy's registry by the backend connection's source address.
"""

from __future__ import annotations

import html
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .connection import conn_ref

Lookup = Callable[[tuple[str, int]], Any]


class _Handler(BaseHTTPRequestHandler):
    server_version = "ironsocket-demo"
    protocol_version = "HTTP/1.1"
    lookup: Lookup

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        info = self.lookup(self.client_address[:2])
        rows = {
            "cipher suite": getattr(info, "cipher_suite", None),
            "key exchange group": getattr(info, "group", None),
            "SNI": getattr(info, "server_name", None),
            "ALPN": getattr(info, "alpn_protocol", None),
            "record layer": getattr(getattr(info, "mode", None), "value", None),
            "connection id": conn_ref(info.conn_id) if info is not None else None,  # W.N in a worker
        }
        body = "<!doctype html><title>ironsocket</title><h1>ironsocket demo backend</h1><table>"
        body += "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v if v is not None else '-'))}</td></tr>"
            for k, v in rows.items()
        )
        body += "</table>\n"
        text = "".join(f"{k}: {v if v is not None else '-'}\n" for k, v in rows.items())
        plain = "text/plain" in self.headers.get("Accept", "")
        payload = (text if plain else body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain" if plain else "text/html")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the proxy logs connections
        pass


class DemoBackend:
    """Owns the demo HTTP server and its thread."""

    def __init__(self, lookup: Lookup, host: str = "127.0.0.1", port: int = 0, fd: int | None = None) -> None:
        handler = type("Handler", (_Handler,), {"lookup": staticmethod(lookup)})
        if fd is None:
            self._httpd = ThreadingHTTPServer((host, port), handler)
        else:  # the listener inherited across an exec upgrade
            self._httpd = ThreadingHTTPServer((host, port), handler, bind_and_activate=False)
            self._httpd.socket.close()
            self._httpd.socket = socket.socket(fileno=fd)
            self._httpd.server_address = self._httpd.socket.getsockname()
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="is-demo", daemon=True)

    def fileno(self) -> int:
        return self._httpd.socket.fileno()

    @property
    def address(self) -> tuple[str, int]:
        return self._httpd.server_address[:2]  # type: ignore[return-value]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
