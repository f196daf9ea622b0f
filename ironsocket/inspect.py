"""`ironsocket inspect-keys`: what the record layer holds for each connection, right now.

Rows (dicts, JSON-ready), one per relayed connection::

    {"id": 3, "client": "127.0.0.1:51234", "backend": "127.0.0.1:8080", "sni": "localhost",
     "alpn": null, "suite": "TLS_AES_128_GCM_SHA256", "mode": "ktls-sw",
     "tx": {"rec_seq": 5, "fingerprint": "1f2e..."}, "rx": {"rec_seq": 4, "fingerprint": "..."}}

``tx`` is server→client, ``rx`` client→server. ``rec_seq`` is the sequence number of the *next*
record, read at that moment from where the record layer lives: the kernel (``getsockopt(SOL_TLS)``)
for kTLS, the userspace `Session` otherwise. ``fingerprint`` is the first 8 bytes of
SHA-256(key || iv) in hex: enough to compare two views of one connection, useless to decrypt.
Only with ``reveal`` do ``key`` and ``iv`` (hex) appear; traffic secrets never do.

Three sources give the same rows: the running server (`connection_rows`, over the control
socket), another process's kTLS sockets pulled with pidfd_getfd (`rows_from_pid`), and an
upgrade state document (`describe_state`).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import hashlib
import os
import platform
import socket
from typing import Any

from . import ktls
from .control import ControlError
from .connection import describe, format_addr
from .handover import StateError, key_views

SYS_PIDFD_OPEN = 434  # x86_64 (and every arch since 5.3's unified numbering)
SYS_PIDFD_GETFD = 438


def fingerprint(key: bytes, iv: bytes) -> str:
    return hashlib.sha256(key + iv).digest()[:8].hex()




def _direction(keys: Any, reveal: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"rec_seq": keys.rec_seq, "fingerprint": fingerprint(keys.key, keys.iv)}
    if reveal:
        out["key"] = keys.key.hex()
        out["iv"] = keys.iv.hex()
    return out


def _mode(channel: Any) -> str:
    mode = str(channel.mode.value)
    if mode != "userspace":
        kind = ktls.session_mode(channel.sock)
        if kind == "device":
            return "ktls-device"
        if kind == "sw":
            return "ktls-sw"
    return mode


def connection_rows(server: Any, *, reveal: bool) -> list[dict[str, Any]]:
    """One row per relayed connection of a running `ProxyServer` (see the module docstring)."""
    snapshot = dict(server.connections)  # one C-level copy: atomic under the GIL
    infos = [snapshot[k] for k in sorted(snapshot)]
    rows = []
    for info in infos:
        relay = info.relay
        if relay is None:
            continue  # still in the handshake: nothing in the record layer yet
        row: dict[str, Any] = describe(info)
        try:
            row["backend"] = format_addr(relay.backend.getpeername())
        except OSError:
            pass
        try:
            row["mode"] = _mode(relay.client)
            write, read = relay.client.traffic_keys()
        except (OSError, ktls.KtlsError) as exc:
            row["error"] = f"cannot read the record layer: {exc}"  # closing right now
            row["tx"] = row["rx"] = None
        else:
            row["tx"] = _direction(write, reveal)
            row["rx"] = _direction(read, reveal)
        rows.append(row)
    return rows


def reveal_requested(request: dict[str, Any]) -> bool:
    """An ``inspect-keys`` request's ``reveal``, allowed only to root and the server's own uid
    (ControlError otherwise); each reveal is logged."""
    if not request.get("reveal"):
        return False
    uid = request.get("_peer_uid")
    if uid is not None and uid not in (0, os.getuid()):
        raise ControlError(f"--reveal refused: uid {uid} is neither root nor the server's uid")
    import logging

    logging.getLogger("ironsocket.control").warning("inspect-keys --reveal: traffic keys handed to a control client (uid %s)", uid)
    return True


def control_handlers(server: Any) -> dict[str, Any]:
    """The control-socket commands a serving `ProxyServer` answers."""

    def inspect_keys(request: dict[str, Any]) -> dict[str, Any]:
        reveal = reveal_requested(request)
        return {"pid": os.getpid(), "record_layer": server.record_layer, "connections": connection_rows(server, reveal=reveal)}

    def connections(request: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "connections": connection_rows(server, reveal=False)}

    return {"inspect-keys": inspect_keys, "connections": connections}


# -- the table ----------------------------------------------------------------------------------
_COLUMNS = [("ID", "id"), ("CLIENT", "client"), ("BACKEND", "backend"), ("SNI", "sni"), ("ALPN", "alpn"),
            ("SUITE", "suite"), ("MODE", "mode")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table; with revealed keys, one indented ``tx``/``rx`` line per direction."""
    if not rows:
        return "no relayed connections"
    header = [h for h, _ in _COLUMNS] + ["TX_SEQ", "RX_SEQ", "TX_KEY_FP", "RX_KEY_FP"]
    table = []
    for row in rows:
        cells = ["-" if row.get(k) is None else str(row[k]) for _, k in _COLUMNS]
        cells += [str((row.get(d) or {}).get(field, "-")) for field in ("rec_seq", "fingerprint") for d in ("tx", "rx")]
        table.append(cells)
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    for row, cells in zip(rows, table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        if row.get("error"):
            lines.append(f"    error: {row['error']}")
        for d in ("tx", "rx"):
            keys = row.get(d) or {}
            if "key" in keys:
                lines.append(f"    {d} key={keys['key']} iv={keys['iv']}")
    return "\n".join(lines)


# -- upgrade state documents (read by ironsocket.handover) ---------------------------------------
def describe_state(doc: object, *, reveal: bool = False) -> list[dict[str, Any]]:
    """Rows for an upgrade state document: what `ironsocket serve --upgrade-state-dump` writes,
    or the minimal documented shape (`handover.key_views`)::

        {"format": "ironsocket-upgrade", "version": 1, "connections": [
            {"id": 1, "client": "127.0.0.1:5000", "backend": "127.0.0.1:8080", "sni": "localhost",
             "alpn": null, "suite": "TLS_AES_128_GCM_SHA256", "mode": "ktls-sw",
             "tx": {"rec_seq": 3, "key": "<hex>", "iv": "<hex>"}, "rx": {...}}, ...]}

    Unknown extra fields are ignored; ``key``/``iv`` become fingerprints (kept only with reveal).
    Raises ValueError with a human message on anything else.
    """
    try:
        views = key_views(doc)
    except StateError as exc:
        raise ValueError(str(exc)) from None
    rows = []
    for view in views:
        row: dict[str, Any] = {"id": view.id, "client": view.client, "backend": view.backend, "sni": view.sni,
                               "alpn": view.alpn, "suite": view.suite, "mode": view.mode}
        for k in ("client", "backend"):  # the upgrade writes [host, port]
            if isinstance(row[k], list) and len(row[k]) == 2:
                row[k] = f"{row[k][0]}:{row[k][1]}"
        for d, keys in (("tx", view.tx), ("rx", view.rx)):
            if keys is None:
                row[d] = None
                continue
            row[d] = {"rec_seq": keys.rec_seq, "fingerprint": fingerprint(keys.key, keys.iv)}
            if reveal:
                row[d] |= {"key": keys.key.hex(), "iv": keys.iv.hex()}
        rows.append(row)
    return rows


# -- another process's kTLS sockets via pidfd_getfd ---------------------------------------------
def _syscall(number: int, *args: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = int(libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _explain(what: str, exc: OSError, pid: int) -> ControlError:
    if exc.errno in (_errno.EPERM, _errno.EACCES):
        return ControlError(f"{what} on pid {pid}: permission denied (needs ptrace rights over the "
                            "target: same uid and ptrace_scope 0, or root / CAP_SYS_PTRACE)")
    if exc.errno == _errno.ENOSYS:
        return ControlError(f"{what}: not supported by this kernel ({platform.release()}; needs Linux 5.6+)")
    if exc.errno == _errno.ESRCH:
        return ControlError(f"no process with pid {pid}")
    return ControlError(f"{what} on pid {pid} failed: {exc.strerror}")


def rows_from_pid(pid: int, *, reveal: bool) -> list[dict[str, Any]]:
    """Duplicate every socket of process ``pid`` with pidfd_getfd and read back the kTLS state of
    those that have it (the kernel's view; no help from the target process)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise ControlError(f"--direct: pidfd syscall numbers are only wired for x86_64, not {platform.machine()}")
    try:
        pidfd = _syscall(SYS_PIDFD_OPEN, pid, 0)
    except OSError as exc:
        raise _explain("pidfd_open", exc, pid) from None
    rows: list[dict[str, Any]] = []
    try:
        try:
            fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
        except PermissionError:
            raise ControlError(f"listing /proc/{pid}/fd: permission denied") from None
        except FileNotFoundError:
            raise ControlError(f"no process with pid {pid}") from None
        for target_fd in fds:
            try:
                if not os.readlink(f"/proc/{pid}/fd/{target_fd}").startswith("socket:"):
                    continue
            except OSError:
                continue
            try:
                fd = _syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0)
            except OSError as exc:
                if exc.errno == _errno.EBADF:
                    continue  # closed meanwhile
                raise _explain("pidfd_getfd", exc, pid) from None
            sock = socket.socket(fileno=fd)
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    continue
                try:
                    state = ktls.read_back(sock)
                except ktls.KtlsError:
                    continue
                if state.tx is None and state.rx is None:
                    continue
                kind = ktls.session_mode(sock)
                row: dict[str, Any] = {
                    "id": f"fd{target_fd}",
                    "client": format_addr(_peer(sock)),
                    "backend": None,  # the pairing lives in the server's memory only
                    "sni": None,
                    "alpn": None,
                    "suite": state.cipher_suite.name if state.cipher_suite else None,
                    "mode": "ktls-device" if kind == "device" else "ktls-sw",
                }
                for d, st in (("tx", state.tx), ("rx", state.rx)):
                    row[d] = _direction(st, reveal) if st is not None else None
                rows.append(row)
            finally:
                sock.close()
    finally:
        os.close(pidfd)
    return rows


def _peer(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None
