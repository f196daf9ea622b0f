"""The built-in demo backend for `ironsocket serve` with no arguments.

A tiny HTTP/1.1 server on a loopback port that answers every request with a page showing the
TLS parameters of the connection it came through (suite, group, SNI, ALPN, record layer,
connection id), found in the proxy's registry by the backend connection's source address.

Theory of operation
-------------------
Its connections are carried across an exec upgrade like the proxy's own: one thread runs a
non-blocking ``poll`` loop over the listener and every connection, and each connection's whole
state between two turns of the loop is its socket and two buffers, the bytes received that do
not make a whole request yet and the answer not yet written, plus whether to close once that is
written (`handover.DemoConnectionEntry`). So:

- `pause` parks the loop between two turns (the upgrade does, with the proxy's loops) and
  `snapshot` describes every connection; the upgrade puts that in the hand-over document,
  whose fds survive the exec. What a client sends meanwhile waits in the kernel.
- The new program builds its `DemoBackend` from the document (``fd``: the listener,
  ``carried``: the connections) at its ``demo`` start-up step, but starts the loop only at
  ``relay`` (`start`), with the proxy: until then nothing has moved here either, so a rollback
  before ``relay`` passes the same document on, and one after pauses this loop too and passes
  its state as it is then (`upgrade.roll_back_live`).

Requests are ``GET`` and ``HEAD`` (others: 501), kept alive unless the client says
``Connection: close`` (or speaks HTTP/1.0 without keep-alive); a request body
(``Content-Length``) is read and ignored; a request head over `MAX_HEAD` bytes is answered 431
and closed.
"""

from __future__ import annotations

import email.utils
import errno
import html
import logging
import select
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .connection import conn_ref
from .handover import DemoConnectionEntry

log = logging.getLogger("ironsocket")

Lookup = Callable[[tuple[str, int]], Any]

MAX_HEAD = 64 * 1024
_READ = select.POLLIN | select.POLLPRI
_REASONS = {200: "OK", 400: "Bad Request", 431: "Request Header Fields Too Large", 501: "Not Implemented"}


class _Conn:
    """One demo connection: its socket and the state `DemoConnectionEntry` carries."""

    def __init__(self, sock: socket.socket, received: bytes = b"", unsent: bytes = b"",
                 close_after: bool = False) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.received = bytearray(received)
        self.unsent = bytearray(unsent)
        self.close_after = close_after
        try:
            self.peer: tuple[str, int] | None = sock.getpeername()[:2]
        except OSError:
            self.peer = None

    def entry(self) -> DemoConnectionEntry:
        return DemoConnectionEntry(fd=self.sock.fileno(), received=bytes(self.received), unsent=bytes(self.unsent),
                                   close_after=self.close_after)


def page(info: Any, plain: bool) -> tuple[str, bytes]:
    """(content type, body) of the demo page for the connection ``info`` (None: not known)."""
    rows = {
        "cipher suite": getattr(info, "cipher_suite", None),
        "key exchange group": getattr(info, "group", None),
        "SNI": getattr(info, "server_name", None),
        "ALPN": getattr(info, "alpn_protocol", None),
        "record layer": getattr(getattr(info, "mode", None), "value", None),
        "connection id": conn_ref(info.conn_id) if info is not None else None,  # W.N in a worker
    }
    if plain:
        return "text/plain", "".join(f"{k}: {v if v is not None else '-'}\n" for k, v in rows.items()).encode()
    body = "<!doctype html><title>ironsocket</title><h1>ironsocket demo backend</h1><table>"
    body += "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v if v is not None else '-'))}</td></tr>"
        for k, v in rows.items()
    )
    return "text/html", (body + "</table>\n").encode()


def _response(status: int, content_type: str, body: bytes, *, head: bool = False, close: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", "Server: ironsocket-demo",
             f"Date: {email.utils.formatdate(usegmt=True)}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


class DemoBackend:
    """The demo HTTP server: its listener, connections and loop thread (see the module doc).
    ``fd``/``carried``: the listener and connections inherited across an exec upgrade."""

    def __init__(self, lookup: Lookup, host: str = "127.0.0.1", port: int = 0, fd: int | None = None,
                 carried: Sequence[DemoConnectionEntry] = ()) -> None:
        self.lookup = lookup
        if fd is None:
            self._listener = socket.create_server((host, port))
        else:  # the listener inherited across an exec upgrade
            self._listener = socket.socket(fileno=fd)
        self._listener.setblocking(False)
        self._conns: dict[int, _Conn] = {}
        for entry in carried:
            conn = _Conn(socket.socket(fileno=entry.fd), entry.received, entry.unsent, entry.close_after)
            self._conns[conn.sock.fileno()] = conn
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._pause_wanted = False
        self._stopping = False
        self._parked = threading.Event()
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._run, name="is-demo", daemon=True)

    def fileno(self) -> int:
        return self._listener.fileno()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def connections(self) -> int:
        return len(self._conns)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._thread.is_alive() and not self._stopping:
            self._thread.start()

    def pause(self, deadline: float = 5.0) -> None:
        """Park the loop between two turns (a no-op before `start`). TimeoutError if it does not
        park within ``deadline`` seconds (then it runs on)."""
        with self._lock:
            self._pause_wanted = True
            self._go.clear()
        if not self._thread.is_alive():
            return
        self._wake()
        if not self._parked.wait(deadline):
            self.resume()
            raise TimeoutError(f"the demo backend did not pause within {deadline:g}s")

    def resume(self) -> None:
        with self._lock:
            self._pause_wanted = False
            self._go.set()

    def snapshot(self) -> tuple[DemoConnectionEntry, ...]:
        """Every connection as it is (while paused, or before `start`)."""
        return tuple(conn.entry() for conn in self._conns.values())

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._go.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(10)
        for conn in list(self._conns.values()):
            self._close(conn)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full: a wake-up is pending anyway

    # -- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    stopping, pausing = self._stopping, self._pause_wanted
                if stopping:
                    return
                if pausing:  # a safe point: every connection's state is in its buffers
                    self._parked.set()
                    self._go.wait()
                    self._parked.clear()
                    continue
                self._turn()
        except Exception:  # noqa: BLE001 - a bug here must not pass silently
            log.exception("demo backend: loop failed")

    def _turn(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, _READ)
        poller.register(self._listener, _READ)
        for fd, conn in self._conns.items():
            events = select.POLLOUT if conn.unsent else 0
            if not conn.close_after:
                events |= _READ
            poller.register(fd, events)
        for fd, events in poller.poll(1000):
            if fd == self._wake_r.fileno():
                try:
                    while self._wake_r.recv(64):
                        pass
                except OSError:
                    pass
            elif fd == self._listener.fileno():
                self._accept()
            elif (ready := self._conns.get(fd)) is not None:
                self._service(ready, events)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("demo backend: accept: %s", exc.strerror)
                return
            conn = _Conn(sock)
            self._conns[sock.fileno()] = conn

    def _service(self, conn: _Conn, events: int) -> None:
        if events & (select.POLLERR | select.POLLNVAL):
            self._close(conn)
            return
        if events & (_READ | select.POLLHUP) and not conn.close_after:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self._close(conn)
                return
            if data == b"":  # the proxy closed (or half-closed) its side: answer what is whole, then close
                conn.close_after = True
            elif data:
                conn.received += data
            self._answer(conn)
        if conn.unsent:
            try:
                sent = conn.sock.send(conn.unsent)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            del conn.unsent[:sent]
        if conn.close_after and not conn.unsent:
            self._close(conn)

    def _answer(self, conn: _Conn) -> None:
        """Turn every whole request in ``conn.received`` into its answer in ``conn.unsent``."""
        while not (conn.close_after and not conn.received):
            end = conn.received.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.received) > MAX_HEAD:
                    conn.unsent += _response(431, "text/plain", b"request head too long\n", close=True)
                    conn.received.clear()
                    conn.close_after = True
                return
            head = bytes(conn.received[:end]).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                length = -1
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or length < 0:
                conn.unsent += _response(400, "text/plain", b"bad request\n", close=True)
                conn.received.clear()
                conn.close_after = True
                return
            if len(conn.received) < end + 4 + length:
                return  # the body is not all here yet
            del conn.received[:end + 4 + length]
            method, _, version = parts
            connection = headers.get("connection", "").lower()
            close = connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive")
            if method not in ("GET", "HEAD"):
                conn.unsent += _response(501, "text/plain", b"GET or HEAD\n", close=close)
            else:
                info = self.lookup(conn.peer) if conn.peer is not None else None
                kind, body = page(info, "text/plain" in headers.get("accept", ""))
                conn.unsent += _response(200, kind, body, head=method == "HEAD", close=close)
            if close:
                conn.close_after = True
                conn.received.clear()
                return

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        try:
            conn.sock.close()
        except OSError:
            pass
