"""systemd's readiness protocol (sd_notify(3)), without a dependency.

When systemd (``Type=notify``) or a supervisor starts us, ``$NOTIFY_SOCKET`` names an AF_UNIX
datagram socket (a path, or ``@name`` for the abstract namespace). Each message is one
datagram of ``KEY=VALUE`` lines. Without ``$NOTIFY_SOCKET`` every call does nothing.

The variable is left in the environment on purpose: the exec upgrade keeps the PID and the
environment, so the new program notifies the same socket (``RELOADING=1`` before the exec,
``READY=1`` from the new program once it serves).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("ironsocket")

ENV = "NOTIFY_SOCKET"


def _address(value: str) -> str | bytes:
    if value.startswith("@"):  # abstract namespace
        return b"\0" + value[1:].encode()
    return value


def notify(*lines: str, env: dict[str, str] | None = None) -> bool:
    """Send ``lines`` (``"READY=1"``, ...) as one datagram; False if not sent (no socket, or
    an error: logged once at debug level, never raised — readiness must not stop the proxy)."""
    value = (env if env is not None else os.environ).get(ENV)
    if not value:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), _address(value))
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", value, exc)
        return False
    return True


def ready(status: str | None = None, *extra: str) -> bool:
    """``READY=1`` with ``MAINPID`` (the same after an exec upgrade), ``extra`` lines after."""
    return notify("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status else []), *extra)


def reloading(status: str | None = None) -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd ≥ 253 wants it for Type=notify-reload)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *([f"STATUS={status}"] if status else []))


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def parse(datagram: bytes) -> dict[str, str]:
    """One datagram's fields (for a supervisor receiving its workers' notifications)."""
    out: dict[str, str] = {}
    for line in datagram.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out
