"""systemd socket activation (sd_listen_fds(3)): take the listening socket systemd passed us.

systemd (or ``systemd-socket-activate``) passes sockets as fds starting at 3
(``SD_LISTEN_FDS_START``) and says so in ``LISTEN_FDS`` (how many) and ``LISTEN_PID`` (for which
process: a forked child must not take its parent's sockets). `listen_socket()` checks both,
takes fd 3 if it is a listening TCP socket, and unsets the variables (like
``sd_listen_fds(unset_environment=1)``) so nothing we exec later — an exec upgrade carries the
listener in its own state document — believes the fds are for it.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("ironsocket")

SD_LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The environment says we were socket-activated but the fd is not usable."""


def _unset() -> None:
    for name in _VARIABLES:
        os.environ.pop(name, None)


def activated(environ: os._Environ[str] | dict[str, str] | None = None) -> bool:
    """LISTEN_PID names this process and LISTEN_FDS is set (before `listen_socket` takes the
    socket and unsets them; it is also the one to say what is wrong with them)."""
    env = os.environ if environ is None else environ
    return env.get("LISTEN_PID") == str(os.getpid()) and bool(env.get("LISTEN_FDS"))


def listen_socket(environ: os._Environ[str] | dict[str, str] | None = None) -> socket.socket | None:
    """The listening TCP socket systemd passed as fd 3, or None when not socket-activated.

    Raises ActivationError (with a message for a human) if LISTEN_PID/LISTEN_FDS are for us but
    fd 3 is missing or is not a listening TCP stream socket."""
    env = os.environ if environ is None else environ
    pid_text, fds_text = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid_text is None or fds_text is None:
        return None
    try:
        pid, count = int(pid_text), int(fds_text)
    except ValueError:
        raise ActivationError(f"socket activation: LISTEN_PID={pid_text!r} LISTEN_FDS={fds_text!r} are not numbers") from None
    if pid != os.getpid():
        return None  # for another process (our parent); leave them alone
    if environ is None:
        _unset()
    if count < 1:
        return None
    if count > 1:
        log.warning("socket activation: %d sockets passed; using fd %d only", count, SD_LISTEN_FDS_START)
    fd = SD_LISTEN_FDS_START
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"socket activation: fd {fd} is not a socket ({exc.strerror})") from None
    try:
        problem = None
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            problem = f"its family is {sock.family.name}, not AF_INET/AF_INET6"
        elif sock.type != socket.SOCK_STREAM:
            problem = f"its type is {sock.type.name}, not SOCK_STREAM"
        elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            problem = "it is not listening (ListenStream= in the .socket unit, or listen() first)"
    except OSError as exc:
        problem = exc.strerror or str(exc)
    if problem is not None:
        sock.detach()  # not ours to close: report and leave the fd as it was
        raise ActivationError(f"socket activation: fd {fd} is not a listening TCP socket: {problem}")
    os.set_inheritable(fd, False)  # sd_listen_fds sets FD_CLOEXEC
    log.info("socket activation: listening on fd %d (%s), --listen ignored", fd, _fmt(sock.getsockname()))
    return sock


def _fmt(addr: tuple) -> str:
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
