"""Running a configuration file (`ironsocket serve --config FILE`) and the admin endpoint.

One process, one `ProxyServer` per ``[[listeners]]`` table, one optional `admin.AdminServer`
for all of them. Kept apart from `cli.py` so the command line only delegates here.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

import typer

from . import logs, sdnotify
from .admin import AdminError, AdminServer, parse_admin
from .config import ConfigError, load_file
from .logs import LogFormat
from .server import ProxyServer, StartupError

log = logging.getLogger("ironsocket")


def _fail(message: str) -> int:
    typer.echo(f"ironsocket: error: {message}", err=True)
    return 2


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


def admin_fd_matches(spec: str | None, fd: int) -> bool:
    """Whether the carried admin socket ``fd`` is the one ``--admin spec`` asks for (a port 0
    matches any port: keeping the one already bound is the point)."""
    if not spec:
        return False
    parsed = parse_admin(spec)
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            name = sock.getsockname()
            family = sock.family
    except OSError:
        return False
    if "unix" in parsed:
        return family == socket.AF_UNIX and os.path.abspath(parsed["unix"]) == os.path.abspath(name)
    host, port = parsed["listen"]
    if family == socket.AF_UNIX:
        return False
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)}
    except OSError:
        return False
    return name[0] in wanted and port in (0, name[1])


def serve_config_file(path: Path, *, admin: str | None = None, admin_allow_remote: bool = False,
                      stop: threading.Event | None = None, log_format: LogFormat | None = None) -> int:
    """Run every listener of ``path`` until SIGTERM/SIGINT (or ``stop``); the exit code.
    ``log_format``: ``--log-format`` if given (it wins over the file's ``log_format``)."""
    try:
        fc = load_file(path)
    except ConfigError as exc:
        return _fail(str(exc))
    logs.setup(fc.log_level, log_format or fc.log_format)
    for warning in fc.warnings:
        log.warning("%s", warning)
    servers: list[ProxyServer] = []
    admin_server: AdminServer | None = None
    stop = stop or threading.Event()
    try:
        for config in fc.listeners:
            server = ProxyServer(config)
            server.start()
            servers.append(server)
            host, port = server.address
            log.info("serving TLS 1.3 on %s:%d (%s), record layer: %s, backend %s:%d", host, port, config.name,
                     server.record_layer, *config.backend)
        if admin:
            admin_server = start_admin(admin, servers, admin_allow_remote)
        elif fc.admin is not None:
            admin_server = start_admin(None, servers, fc.admin.allow_remote or admin_allow_remote,
                                       listen=fc.admin.listen, unix=fc.admin.unix)
    except (StartupError, AdminError) as exc:
        for server in servers:
            server.stop()
        return _fail(explain_startup_error(str(exc)))
    refused: list[str] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):  # no drain here: SIGQUIT = SIGTERM
            signal.signal(sig, lambda *_: stop.set())
        for sig in (signal.SIGHUP, signal.SIGUSR2):  # the default action would kill every listener
            signal.signal(sig, lambda signum, _f: refused.append(signal.Signals(signum).name))
    sdnotify.ready(f"serving {len(servers)} listeners")
    while not stop.wait(0.5):
        while refused:
            log.warning("%s: reload/upgrade is not supported with --config yet (restart the service to apply "
                        "changes); ignored, still serving", refused.pop(0))
    sdnotify.stopping()
    log.info("stopping")
    if admin_server is not None:
        admin_server.stop()
    for server in servers:
        server.stop()
    return 0
