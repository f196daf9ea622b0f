"""What `ironsocket serve` starts besides the proxies: the admin endpoint, and what a
configuration file (`serve --config FILE`) asks for.

A configuration file runs under the same `runtime.Runtime` as the flags (one `ProxyServer` per
``[[listeners]]`` table, one optional `admin.AdminServer` for all of them, the control socket,
signals, exec upgrade and rollback): `config_run` only turns the file and the command line into
the runtime's arguments. Kept apart from `cli.py` so the command line only delegates here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


from .admin import AdminServer, parse_admin
from .logs import LogFormat
from .config import load_file
from .server import ProxyConfig, ProxyServer

log = logging.getLogger("ironsocket")


def explain_startup_error(message: str) -> str:
    """A start-up error, with the fix to try when a port below 1024 was refused (EACCES)."""
    import re

    m = re.search(r"cannot listen on \S*:(\d+): Permission denied", message)
    if m and 0 < int(m.group(1)) < 1024:
        import sys

        python = os.path.realpath(sys.executable)
        message += (f"; ports below 1024 need root or CAP_NET_BIND_SERVICE: `setcap cap_net_bind_service=+ep {python}`, "
                    "AmbientCapabilities=CAP_NET_BIND_SERVICE under systemd, or systemd socket activation "
                    "(examples/ironsocket.socket: systemd binds the port and passes it)")
    return message


def start_admin(spec: str | None, servers: Sequence[ProxyServer], allow_remote: bool = False, *,
                unix: str | None = None, listen: tuple[str, int] | None = None,
                fd: int | None = None) -> AdminServer | None:
    """Start the admin endpoint from a ``--admin`` value (or explicit listen/unix); None if off.
    ``fd``: the listening socket a previous program carried over exec (used instead of binding)."""
    if spec:
        parsed = parse_admin(spec)
        listen, unix = parsed.get("listen"), parsed.get("unix")
    if listen is None and unix is None:
        return None
    admin = AdminServer(servers, listen=listen, unix=unix, allow_remote=allow_remote, fd=fd)
    admin.start()  # it logs "admin endpoint on ..."
    return admin


def admin_fd_matches(fd: int, *, listen: tuple[str, int] | None, unix: str | None) -> bool:
    """Whether the carried admin socket ``fd`` is the one asked for now (``listen`` or ``unix``;
    a port 0 matches any port: keeping the one already bound is the point)."""
    if listen is None and unix is None:
        return False
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            name = sock.getsockname()
            family = sock.family
    except OSError:
        return False
    if unix is not None:
        return family == socket.AF_UNIX and os.path.abspath(unix) == os.path.abspath(name)
    assert listen is not None
    host, port = listen
    if family == socket.AF_UNIX:
        return False
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)}
    except OSError:
        return False
    return name[0] in wanted and port in (0, name[1])


# -- serve --config FILE ----------------------------------------------------------------------------
CONFLICTS_WITH_CONFIG = {
    "listen": "--listen", "backend": "--backend", "cert": "--cert", "key": "--key", "alpn": "--alpn",
    "ciphers": "--ciphers", "groups": "--groups", "ktls_mode": "--ktls", "handshake_timeout": "--handshake-timeout",
    "idle_timeout": "--idle-timeout", "connect_timeout": "--connect-timeout", "max_connections": "--max-connections",
    "tickets": "--tickets", "ticket_key_file": "--ticket-key-file", "ticket_lifetime": "--ticket-lifetime",
    "ticket_psk_ke": "--ticket-psk-ke",
}
"""``serve`` options that are per-listener keys of a configuration file: with ``--config`` they
are an error (each listener says its own), never silently ignored. The others are honoured:
``--admin`` replaces the file's ``[admin]``, ``--log-level`` (if given) its ``log_level``;
``--drain-timeout``, ``--keylog`` and ``--reuse-port`` apply to every listener; ``--workers``,
``--control-socket``, ``--admin-allow-remote`` and ``--upgrade-state-dump`` mean what they mean
without ``--config``."""


@dataclass(frozen=True)
class ConfigRun:
    """What `serve --config FILE` runs: the listeners and the admin endpoint of the file, with
    the command line's honoured options applied."""

    listeners: list[ProxyConfig]
    admin_listen: tuple[str, int] | None
    admin_unix: str | None
    admin_allow_remote: bool
    log_level: str
    log_format: LogFormat
    warnings: list[str]
    pid_file: Path | None = None
    files: tuple[Path, ...] = ()  # what a reload reads again: the certificates and keys it names
    ticket_key_files: tuple[Path, ...] = ()  # and the secrets (ironsocket.secretfile's rules)


def config_run(path: Path, *, admin: str | None, admin_allow_remote: bool, drain_timeout: float,
               reuse_port: bool, keylog: Callable[[str], None] | None) -> ConfigRun:
    """Load ``path`` (certificates included) and apply the command line; ConfigError/AdminError."""
    fc = load_file(path)
    listeners = [dataclasses.replace(
        config, drain_timeout=drain_timeout, reuse_port=reuse_port or config.reuse_port,
        tls=dataclasses.replace(config.tls, keylog=keylog) if keylog is not None else config.tls)
        for config in fc.listeners]
    if admin:
        parsed = parse_admin(admin)
        admin_listen, admin_unix, remote = parsed.get("listen"), parsed.get("unix"), admin_allow_remote
    elif fc.admin is not None:
        admin_listen, admin_unix = fc.admin.listen, fc.admin.unix
        remote = fc.admin.allow_remote or admin_allow_remote
    else:
        admin_listen = admin_unix = None
        remote = admin_allow_remote
    return ConfigRun(listeners=listeners, admin_listen=admin_listen, admin_unix=admin_unix,
                     admin_allow_remote=remote, log_level=fc.log_level, log_format=fc.log_format,
                     warnings=list(fc.warnings), pid_file=fc.pid_file,
                     files=(path, *fc.files), ticket_key_files=tuple(fc.ticket_key_files))
