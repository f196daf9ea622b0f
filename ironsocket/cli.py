"""Command line: `ironsocket serve`, `ironsocket inspect-keys`, `ironsocket doctor`."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from . import ktls
from . import runtime as runtime_mod
from .runtime import Runtime, upgrade_guard
from .server import KtlsMode, ProxyConfig, StartupError, check_ktls_mode, parse_hostport
from .tls13.constants import CipherSuite, Group
from .tls13.credentials import CertificateStore, CredentialError, load_credential
from .tls13.tickets import TicketConfig

if TYPE_CHECKING:
    from .pidfile import PidFile
    from .privileges import Target

# This typer prints an argument's Python type after its name ("CONFIG <path>"); the help says
# what the argument is. (Options name their value with metavar=.)
if hasattr(typer.core, "TyperArgument") and hasattr(typer.core.TyperArgument, "display_type_rich"):
    typer.core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]

app = typer.Typer(add_completion=False, no_args_is_help=False, rich_markup_mode=None, pretty_exceptions_enable=False)
log = logging.getLogger("ironsocket")

SUITE_NAMES = {s.name: s for s in CipherSuite} | {s.name.removeprefix("TLS_"): s for s in CipherSuite}
GROUP_NAMES = {"x25519": Group.X25519, "p256": Group.SECP256R1, "secp256r1": Group.SECP256R1,
               "p384": Group.SECP384R1, "secp384r1": Group.SECP384R1}


CONFIG_HELP = ("TOML configuration: [[listeners]] tables (listen, backend, certs = [{cert = FILE, key = FILE}], "
               "alpn = [\"h2\", \"http/1.1\"], ciphers, groups, ktls, proxy_protocol, transparent, timeouts, "
               "[listeners.routes.\"SNI\"] backend/cert/key) and an optional [admin] listen/unix; run all its "
               "listeners (signals, upgrade and control socket as without it). The per-listener options (--listen, "
               "--backend, --cert, --key, --alpn, --ciphers, --groups, --ktls, the timeouts, --max-connections) "
               "are an error with it; --admin replaces [admin]; --drain-timeout, --keylog, --reuse-port apply to "
               "every listener. `ironsocket check FILE` validates a file and prints what it understood.")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ironsocket {version('ironsocket')}")
        except PackageNotFoundError:  # run from a source tree without installing
            typer.echo("ironsocket (not installed: version unknown)")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """ironsocket: a TLS 1.3 terminating proxy that hands connections to kernel TLS."""


def _fail(message: str, code: int = 2) -> None:
    runtime_mod.last_error = message
    typer.echo(f"ironsocket: error: {message}", err=True)
    raise typer.Exit(code)


def _require_server_process(pid: int) -> None:
    """Exit 1 with one line unless ``pid`` is an `ironsocket serve` process (the kernel-side
    fallback of inspect-keys would report "0 connections" of any process)."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except FileNotFoundError:
        _fail(f"no process with pid {pid}", 1)
    except OSError as exc:
        _fail(f"cannot read /proc/{pid}/cmdline: {exc.strerror}", 1)
    if not (any("ironsocket" in a for a in argv) and "serve" in argv):
        shown = " ".join(argv)[:80] or "(no command line: a kernel thread or a zombie)"
        _fail(f"pid {pid} is not an ironsocket server: {shown}", 1)
    workers = _workers_of(pid)
    if workers:
        _fail(f"pid {pid} is a --workers supervisor (workers: {', '.join(map(str, workers))}): it relays no "
              f"connection itself; `inspect-keys --pid {pid}` asks every worker, `--direct --pid WORKER` reads one", 1)


def _workers_of(pid: int) -> list[int]:
    """The children of ``pid`` that are its ``--workers`` workers (their environment names it)."""
    from .lifeline import ENV_SUPERVISOR

    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    mark = f"{ENV_SUPERVISOR}={pid}".encode()
    found = []
    for child in children:
        try:
            if mark in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                found.append(int(child))
        except OSError:
            continue
    return found


def _parse_list(text: str | None, table: dict, what: str) -> tuple:
    if not text:
        return ()
    out = []
    for item in text.split(","):
        key = item.strip()
        value = table.get(key) or table.get(key.upper()) or table.get(key.lower())
        if value is None:
            _fail(f"unknown {what} {key!r}; choose from {', '.join(sorted(set(table)))}")
        out.append(value)
    return tuple(out)


_KEYLOG_OWNER: tuple[int, int] | None = None  # --user as root: (uid, gid) a new keylog file is given


def _open_keylog(path: Path):
    from .secretfile import SecretFileError, open_secret

    try:  # created 0600; no symlink, no file of another user or readable by others (secretfile.py)
        handle = open_secret(path, append=True, what="keylog file", buffering=1)
    except SecretFileError as exc:
        _fail(str(exc))
    if _KEYLOG_OWNER is not None and os.fstat(handle.fileno()).st_uid == 0:
        # Root just made it (or it was root's): the user this process becomes must be able to
        # open it again (an upgrade or reload runs as that user).
        os.fchown(handle.fileno(), *_KEYLOG_OWNER)
    lock = threading.Lock()

    def write(line: str) -> None:
        with lock:
            handle.write(line + "\n")

    return write


def _ticket_config(count: int, key_file: Path | None, lifetime: int, psk_ke: bool) -> TicketConfig | None:
    """--tickets/--ticket-key-file/--ticket-lifetime/--ticket-psk-ke (ironsocket.ticketkeys,
    tls13/tickets.py)."""
    from .ticketkeys import TicketKeyFileError, keyring
    from .tls13.tickets import MAX_LIFETIME, PskKeyExchangeMode

    if not 0 <= count <= 16:
        _fail(f"--tickets {count}: must be 0..16")
    if not 1 <= lifetime <= MAX_LIFETIME:
        _fail(f"--ticket-lifetime {lifetime}: must be 1..{MAX_LIFETIME} seconds (RFC 8446 §4.6.1)")
    if count == 0 and key_file is None:
        return None
    try:
        modes = {PskKeyExchangeMode.PSK_DHE_KE} | ({PskKeyExchangeMode.PSK_KE} if psk_ke else set())
        return TicketConfig(keyring=keyring(key_file, lifetime), count=count, psk_modes=frozenset(modes))
    except TicketKeyFileError as exc:
        _fail(str(exc))


@app.command()
@upgrade_guard
def serve(
    ctx: typer.Context,
    listen: Annotated[str, typer.Option(metavar="HOST:PORT", help="Address to accept TLS on.")] = "127.0.0.1:8443",
    backend: Annotated[Optional[str], typer.Option(metavar="HOST:PORT", help="The plain TCP backend. Default: a built-in demo HTTP backend.")] = None,
    cert: Annotated[Optional[list[Path]], typer.Option(metavar="FILE", help="PEM certificate chain (leaf first); repeat together with --key.")] = None,
    key: Annotated[Optional[list[Path]], typer.Option(metavar="FILE", help="PEM private key for the --cert at the same position.")] = None,
    alpn: Annotated[Optional[str], typer.Option(metavar="PROTO,...", help="ALPN protocols, server preference, e.g. h2,http/1.1.")] = None,
    ciphers: Annotated[Optional[str], typer.Option(metavar="SUITE,...", help="Cipher suites in preference order, e.g. TLS_AES_256_GCM_SHA384,TLS_AES_128_GCM_SHA256 (the TLS_ prefix may be left out).")] = None,
    groups: Annotated[Optional[str], typer.Option(metavar="GROUP,...", help="Key exchange groups in preference order: x25519, p256, p384.")] = None,
    ktls_mode: Annotated[KtlsMode, typer.Option("--ktls", metavar="auto|require|off", help="auto: kernel TLS when available; require: refuse to start without it; off: userspace only.")] = KtlsMode.AUTO,
    handshake_timeout: Annotated[float, typer.Option(metavar="SECONDS", help="Time a client has to complete the handshake.")] = 10.0,
    idle_timeout: Annotated[float, typer.Option(metavar="SECONDS", help="Time without bytes in either direction before a connection is closed (0: never).")] = 300.0,
    connect_timeout: Annotated[float, typer.Option(metavar="SECONDS", help="Time to connect to the backend.")] = 5.0,
    max_connections: Annotated[int, typer.Option(metavar="N", help="Connections served at once; more wait in the listen backlog.")] = 10_000,
    tickets: Annotated[int, typer.Option(metavar="N", help="Session tickets (RFC 8446 §4.6.1) sent after each handshake, for resumption without a certificate signature; 0: no tickets, no resumption.")] = 2,
    ticket_key_file: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Ticket keys shared by several servers: one 64-hex-digit key per line, the first seals (0600, no symlink). Default: keys made in memory, rotated hourly, carried across upgrades.")] = None,
    ticket_lifetime: Annotated[int, typer.Option(metavar="SECONDS", help="How long a ticket may be resumed (at most 604800).")] = 7200,
    ticket_psk_ke: Annotated[bool, typer.Option("--ticket-psk-ke", help="Also accept psk_ke resumptions (no fresh ECDHE: cheaper, but such a session is only as safe as the ticket key). psk_dhe_ke is preferred when a client offers both; without this flag it is the only mode.")] = False,
    keylog: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Write TLS secrets in NSS key log format to this file (created 0600; a symlink, or a file of another user or readable by others, is refused). Only for debugging.")] = None,
    log_level: Annotated[str, typer.Option(metavar="LEVEL", help="debug, info, warning or error.")] = "info",
    log_format: Annotated[Optional[str], typer.Option(metavar="text|logfmt|json", help="Log line format: text (for people; the default), logfmt or json (one object per line). Timestamps are ISO 8601 UTC. With --config, overrides its log_format.")] = None,
    # -- config file and admin endpoint (ironsocket.launch / ironsocket.admin) --
    config_file: Annotated[Optional[Path], typer.Option("--config", metavar="FILE", help=CONFIG_HELP)] = None,
    admin: Annotated[Optional[str], typer.Option(metavar="HOST:PORT|PATH", help="Admin HTTP endpoint (/healthz, /connections, /metrics): HOST:PORT on loopback, or a unix socket path. Off by default.")] = None,
    admin_allow_remote: Annotated[bool, typer.Option("--admin-allow-remote", help="Allow --admin on a non-loopback address (it has no authentication).")] = False,
    user: Annotated[Optional[str], typer.Option(metavar="NAME", help="As root: switch to this user once the listeners, admin and control sockets are bound and the certificates loaded (upgrades and reloads then run as it: it must be able to read the certificate, key and --config files).")] = None,
    group: Annotated[Optional[str], typer.Option(metavar="NAME", help="With --user: this group instead of the user's own.")] = None,
    pid_file: Annotated[Optional[Path], typer.Option(metavar="PATH", help="Write the server's PID to this file (atomically, 0644; kept across upgrades and reloads, removed at a clean stop). A file naming a running ironsocket is refused, a stale one replaced. With --config, overrides its pid_file.")] = None,
    control_socket: Annotated[Optional[Path], typer.Option(metavar="PATH", help="Unix socket for `ironsocket inspect-keys` and `ironsocket upgrade`. Default: <run dir>/ironsocket-<pid>.sock.")] = None,
    workers: Annotated[str, typer.Option(metavar="N|auto", help="Worker processes sharing the port (SO_REUSEPORT), to use every core. auto (the default): one per CPU this process may run on; one process when a listen port is 0, with --reuse-port, with socket activation, or without SO_REUSEPORT. The supervisor's control socket upgrades them one after another (`ironsocket upgrade`) and gathers their connections (`inspect-keys`); the admin endpoint is the supervisor's, the sum of the workers'.")] = "auto",
    reuse_port: Annotated[bool, typer.Option("--reuse-port", help="Set SO_REUSEPORT on the listener (set for each worker by --workers).")] = False,
    drain_timeout: Annotated[float, typer.Option(metavar="SECONDS", help="On SIGTERM/SIGINT, time connections may finish before they are closed with close_notify (SIGQUIT: no drain).")] = 10.0,
    upgrade_state_dump: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Debugging: at each upgrade also write the state document, traffic secrets and session ticket keys included, to this file (0600), for `inspect-keys --state`.")] = None,
    upgrade_check: Annotated[bool, typer.Option("--upgrade-check", hidden=True, help="Load the configuration, report the upgrade state format, exit.")] = False,
) -> None:
    """Terminate TLS 1.3 on LISTEN and relay plaintext to BACKEND.

    Signals: SIGHUP reload (re-read program, certificates, configuration; same PID, connections
    kept), SIGUSR2 upgrade, SIGTERM/SIGINT graceful stop (--drain-timeout), SIGQUIT fast stop."""
    if log_level.lower() not in LOG_LEVELS:
        _fail(f"--log-level {log_level!r}: not a log level; choose from {', '.join(LOG_LEVELS)}")
    from . import logs

    try:
        fmt = logs.parse_format(log_format) if log_format is not None else logs.LogFormat.TEXT
    except ValueError as exc:
        _fail(f"--log-format {exc}")
    logs.setup(log_level, fmt)  # every line from here on goes through logging, in this format
    if user is not None and os.geteuid() == 0:  # before a secret file is read: the user's own are accepted
        _trust_user(user, group)
    from .admin import AdminError

    if upgrade_state_dump is not None:  # written at each upgrade: refuse a bad path now, not then
        from .secretfile import SecretFileError, check_secret

        try:
            check_secret(upgrade_state_dump, what="upgrade state dump")
        except SecretFileError as exc:
            _fail(str(exc))
    if admin:
        from .admin import parse_admin

        try:
            parse_admin(admin)
        except ValueError as exc:
            _fail(f"--admin {admin}: {exc}")
    demo = False
    admin_kw: dict = {"admin": admin, "admin_allow_remote": admin_allow_remote}
    # -- config file (ironsocket.launch): every listener of the file, optional admin --
    if config_file is not None:
        from .config import ConfigError
        from .launch import CONFLICTS_WITH_CONFIG, config_run

        for param, flag in CONFLICTS_WITH_CONFIG.items():
            if not _defaulted(ctx, param):
                _fail(f"{flag} cannot be used with --config: set it in the file's [[listeners]] tables "
                      f"(each listener has its own)")
        try:
            run = config_run(config_file, admin=admin, admin_allow_remote=admin_allow_remote,
                             drain_timeout=drain_timeout, reuse_port=reuse_port,
                             keylog=_open_keylog(keylog) if keylog else None)
        except (ConfigError, AdminError) as exc:
            _fail(str(exc))
        if _defaulted(ctx, "log_level") or log_format is None:  # the file's, unless given on the command line
            logs.setup(run.log_level if _defaulted(ctx, "log_level") else log_level,
                       fmt if log_format is not None else run.log_format)
        for warning in run.warnings:  # expiring certificates, key files readable by others
            log.warning("%s", warning)
        configs = run.listeners
        admin_kw = {"admin_listen": run.admin_listen, "admin_unix": run.admin_unix,
                    "admin_allow_remote": run.admin_allow_remote}
        has_admin = run.admin_listen is not None or run.admin_unix is not None
        pid_file = pid_file or run.pid_file
        read_again = list(run.files)
        secrets = [(p, "ticket key file", True) for p in run.ticket_key_files]
    else:
        ticket_config = _ticket_config(tickets, ticket_key_file, ticket_lifetime, ticket_psk_ke)
        configs = [_flag_listener(listen, backend, cert, key, alpn, ciphers, groups, ktls_mode, handshake_timeout,
                                  idle_timeout, connect_timeout, max_connections, keylog, drain_timeout, reuse_port,
                                  upgrade_check, ticket_config)]
        demo = backend is None
        has_admin = admin is not None
        read_again = [*(cert or []), *(key or [])]
        secrets = [(ticket_key_file, "ticket key file", True)] if ticket_key_file else []
    if upgrade_check:  # the exec upgrade's pre-flight: configuration loaded, state format known
        from .upgrade import check_report

        try:  # and the running listeners can be taken over (none gone with connections, none moved)
            runtime_mod.check_listeners(configs)
        except StartupError as exc:
            _fail(str(exc))
        typer.echo(check_report())
        raise typer.Exit(0)
    from . import lifeline

    if not lifeline.hold():  # a --workers worker: SIGTERM when the supervisor dies (again in every image)
        raise typer.Exit(1)
    secrets += [(p, what, False) for p, what in ((keylog, "keylog file"), (upgrade_state_dump, "upgrade state dump"))
                if p is not None]
    drop_to = _privileges(user, group, read_again, secrets)
    workers_n = _worker_count(workers, configs)
    if workers_n > 1:  # with --user: each worker binds, then drops; the supervisor (no listener) stays root
        if any(config.listen[1] == 0 for config in configs):
            where = "--listen port" if config_file is None else "listen port in every [[listeners]] table"
            _fail(f"--workers needs a fixed {where} (with port 0 each worker would get its own)")
        from .control import ControlError
        from .workers import main_argv, probe_listeners, supervise, worker_argv

        try:  # what a worker would fail at, said once here (not N times, and no restart loop)
            for config in configs:
                check_ktls_mode(config)
            probe_listeners([config.listen for config in configs])
        except StartupError as exc:
            from .launch import explain_startup_error

            _fail(explain_startup_error(str(exc)))

        where = ", ".join(f"{c.listen[0]}:{c.listen[1]}" for c in configs)
        log.info("%d workers on %s (SO_REUSEPORT)", workers_n, where)
        if demo:
            log.info("try: curl -k https://%s:%d/", *configs[0].listen)
        pid_record = _claim_pid_file(pid_file)
        try:  # the supervisor's PID is the file's (the workers' argv lose --pid-file)
            code = supervise(workers_n, worker_argv(main_argv()), admin=_supervisor_admin(admin_kw) if has_admin else None,
                             control_socket=control_socket)
        except (AdminError, ControlError) as exc:
            _fail(str(exc))
        finally:
            _release_pid_file(pid_record)
        raise typer.Exit(code)
    from .control import ControlError

    pid_file, moved_from = _pid_file_path(pid_file)
    pid_record = _claim_pid_file(pid_file)  # after the check child's exit: it has none
    runtime = Runtime(configs, demo=demo, control_socket=control_socket, state_dump=upgrade_state_dump, **admin_kw)
    runtime.pid_file = pid_record.path if pid_record is not None else None  # for the next upgrade's document
    runtime.install_signals()  # before start: a signal during a restore must not be the default (death)
    try:
        try:
            runtime.start()  # stops what it started on failure (a restore keeps it for the rollback)
        except BaseException:
            if pid_record is not None and not pid_record.kept:  # an exec'd program's rollback keeps its own
                _release_pid_file(pid_record)
            raise
    except (StartupError, AdminError, ControlError) as exc:
        from .launch import explain_startup_error

        _fail(explain_startup_error(str(exc)))
    if moved_from is not None:  # a reload that changed pid_file: restored, so the old file goes
        from .pidfile import PidFile

        _release_pid_file(PidFile(path=moved_from, pid=os.getpid(), kept=True))
        log.info("pid file moved from %s to %s", moved_from, pid_file if pid_file is not None else "(none)")
    assert runtime.control is not None
    if drop_to is not None:  # everything is bound and loaded: no more need of root
        from .privileges import PrivilegeError, drop

        try:
            drop(drop_to)
        except (PrivilegeError, OSError) as exc:
            runtime.stop()
            _release_pid_file(pid_record)
            _fail(f"--user {drop_to.user}: {getattr(exc, 'strerror', None) or exc}")
        log.info("running as user %s (uid %d, gid %d)", drop_to.user, drop_to.uid, drop_to.gid)
        if not lifeline.hold():  # the kernel cleared the parent-death signal with the credentials
            runtime.stop()
            _release_pid_file(pid_record)
            raise typer.Exit(1)
    supervisor = lifeline.supervisor_pid()
    if supervisor is not None:
        log.info("control socket %s (this worker; ironsocket inspect-keys / upgrade --pid %d for all the workers)",
                 runtime.control.path, supervisor)
    else:
        log.info("control socket %s (ironsocket inspect-keys / upgrade --pid %d)", runtime.control.path, os.getpid())
    for i, server in enumerate(runtime.servers):
        host, port = server.address
        label = f" ({server.config.name or f'listeners[{i}]'})" if config_file is not None else ""
        logs.notice(log, "serving TLS 1.3 on %s:%d%s, record layer: %s, backend %s:%d", host, port, label,
                    server.record_layer, *server.config.backend)
    if runtime.demo and supervisor is None:
        host, port = runtime.servers[0].address
        log.info("try: curl -k https://%s:%d/", host, port)
    runtime.run()
    _release_pid_file(pid_record)  # a clean stop (an exec upgrade never returns here)


def _trust_user(user: str, group: str | None) -> None:
    from .privileges import PrivilegeError, resolve
    from .secretfile import trust_owner

    global _KEYLOG_OWNER
    try:
        target = resolve(user, group)
    except PrivilegeError as exc:
        _fail(str(exc))
    trust_owner(target.uid)
    _KEYLOG_OWNER = (target.uid, target.gid)


def _privileges(user: str | None, group: str | None, files: list[Path],
                secrets: list[tuple[Path, str, bool]]) -> Target | None:
    """--user/--group: the user to switch to after start-up (None: none, or already it)."""
    if user is None:
        if group is not None:
            _fail("--group needs --user")
        return None
    from .privileges import PrivilegeError, already, preflight, resolve
    from .upgrade import current_program

    try:
        target = resolve(user, group)
        warnings = preflight(target, files, current_program()[0], secrets)
    except PrivilegeError as exc:
        _fail(str(exc))
    for warning in warnings:
        log.warning("%s", warning)
    return None if already(target) else target


def _worker_count(text: str, configs: list) -> int:
    """``--workers``: a number ≥ 1, or ``auto`` (the default: one per CPU of this process's
    affinity mask, or 1 where workers cannot be: see `_one_process`)."""
    if text.strip().lower() == "auto":
        why = _one_process(configs)
        if why is None:
            return max(1, len(os.sched_getaffinity(0)))
        if why:
            log.info("one process (--workers auto): %s", why)
        return 1
    try:
        n = int(text)
    except ValueError:
        _fail(f"--workers {text!r}: a number of workers or 'auto'")
    if n < 1:
        _fail(f"--workers {n}: at least 1")
    return n


def _one_process(configs: list) -> str | None:
    """Why ``--workers auto`` means one process here (None: it may have workers). An empty
    reason: this process is a worker, or a program exec'd by an upgrade (or rolled back to),
    which serves on as the process it replaces — nothing to say."""
    from .lifeline import supervisor_pid

    if supervisor_pid() is not None or runtime_mod.exec_by_upgrade():
        return ""
    if any(config.reuse_port for config in configs):  # workers would probe the port: held by the others
        return "--reuse-port given (one of the processes you run on the port)"
    from .activation import activated

    if activated():
        return "socket activation (systemd passed one listening socket)"
    if any(config.listen[1] == 0 for config in configs):
        return "listen port 0 (each worker would get a port of its own)"
    if not hasattr(socket, "SO_REUSEPORT"):
        return "no SO_REUSEPORT on this platform"
    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except OSError as exc:
            return f"this kernel refuses SO_REUSEPORT ({exc.strerror})"
    return None


def _supervisor_admin(admin_kw: dict) -> dict:
    """The --workers supervisor's admin endpoint (ironsocket.workersum), from the --admin flag or
    a configuration file's [admin]: AdminServer's listen/unix/allow_remote."""
    if admin_kw.get("admin"):
        from .admin import parse_admin

        where = parse_admin(admin_kw["admin"])
    else:
        where = {"listen": admin_kw.get("admin_listen"), "unix": admin_kw.get("admin_unix")}
        where = {k: v for k, v in where.items() if v is not None}
    return where | {"allow_remote": bool(admin_kw.get("admin_allow_remote"))}


def _pid_file_path(configured: Path | None) -> tuple[Path | None, Path | None]:
    """(the PID file to claim, the previous program's to remove once restored). A worker of
    ``--workers`` has none (the supervisor's, also when a --config file names one); a program
    exec'd by an upgrade or reload whose configuration names another path moves it; a rollback
    keeps the file the previous program had."""
    from .connection import ENV_WORKER

    if os.environ.get(ENV_WORKER):
        return None, None
    inherited = runtime_mod.inherited_pid_file()
    if inherited is None:  # a fresh start
        return configured, None
    previous, rolled_back = inherited
    if rolled_back:
        return previous, None
    if previous is not None and (configured is None or configured.absolute() != previous.absolute()):
        return configured, previous
    return configured, None


def _claim_pid_file(path: Path | None) -> PidFile | None:
    """--pid-file (or the configuration file's pid_file): written, or kept across an exec."""
    from .pidfile import PidFileError, claim

    if path is None:
        return None
    try:
        return claim(path)
    except PidFileError as exc:
        _fail(str(exc), 1)
    return None  # not reached: _fail exits


def _release_pid_file(record: PidFile | None) -> None:
    if record is not None:
        from .pidfile import release

        release(record)


def _defaulted(ctx: typer.Context, param: str) -> bool:
    """Whether option ``param`` was left at its default (not on the command line, nor in the env)."""
    source = ctx.get_parameter_source(param)
    return source is None or source.name in ("DEFAULT", "DEFAULT_MAP")


def _flag_listener(listen: str, backend: str | None, cert: list[Path] | None, key: list[Path] | None,
                   alpn: str | None, ciphers: str | None, groups: str | None, ktls_mode: KtlsMode,
                   handshake_timeout: float, idle_timeout: float, connect_timeout: float, max_connections: int,
                   keylog: Path | None, drain_timeout: float, reuse_port: bool, upgrade_check: bool,
                   tickets: TicketConfig | None) -> ProxyConfig:
    """The one listener the command-line options describe (without --config)."""
    from .tls13.server import DEFAULT_CIPHER_SUITES, DEFAULT_GROUPS, ServerConfig

    cert, key = cert or [], key or []
    if len(cert) != len(key):
        _fail(f"--cert and --key come in pairs: got {len(cert)} --cert and {len(key)} --key")
    from .secretfile import key_file_warning

    for key_file in key:
        if (warning := key_file_warning(key_file)) is not None:
            log.warning("%s", warning)
    try:
        if cert:
            credentials = tuple(load_credential(c, k) for c, k in zip(cert, key))
        else:
            from .selfsigned import demo_credential

            credentials = (demo_credential(),)  # the same across upgrades (pinned by clients)
            from .lifeline import supervisor_pid

            if supervisor_pid() is None:  # said once, by the supervisor (its workers share it)
                log.info("no --cert given: using a generated self-signed certificate for localhost")
        store = CertificateStore(credentials)
    except CredentialError as exc:
        _fail(str(exc))
    if cert and not upgrade_check:
        from .config import expiry_warnings

        for warning in expiry_warnings(credentials):
            log.warning("%s", warning)
    try:
        listen_addr = parse_hostport(listen)
        backend_addr = parse_hostport(backend) if backend else None
    except ValueError as exc:
        _fail(str(exc))
    tls = ServerConfig(
        certificates=store,
        cipher_suites=_parse_list(ciphers, SUITE_NAMES, "cipher suite") or DEFAULT_CIPHER_SUITES,
        groups=_parse_list(groups, GROUP_NAMES, "group") or DEFAULT_GROUPS,
        alpn_protocols=tuple(p.strip() for p in alpn.split(",") if p.strip()) if alpn else (),
        tickets=tickets,
        keylog=_open_keylog(keylog) if keylog else None,
    )
    return ProxyConfig(
        listen=listen_addr, backend=backend_addr or ("127.0.0.1", 0), tls=tls, ktls=ktls_mode,
        handshake_timeout=handshake_timeout, connect_timeout=connect_timeout,
        idle_timeout=idle_timeout or None, max_connections=max_connections,
        drain_timeout=drain_timeout, reuse_port=reuse_port,
    )


@app.command("upgrade", short_help="Replace the running server's program in place (same PID).")
def upgrade_command(
    pid: Annotated[Optional[int], typer.Option(metavar="PID", help="The server's pid (when several run). A --workers supervisor's: all its workers, one after another.")] = None,
    socket_path: Annotated[Optional[Path], typer.Option("--socket", metavar="PATH", help="The server's control socket path.")] = None,
    exec_path: Annotated[Optional[Path], typer.Option("--exec", metavar="PROGRAM", help="Switch to this ironsocket program (e.g. another venv's bin/ironsocket). Default: the running one.")] = None,
    timeout: Annotated[float, typer.Option(metavar="SECONDS", help="Time to wait for the outcome.")] = 120.0,
) -> None:
    """Replace the running server's program in place (same PID) without dropping a connection."""
    from .control import ControlError, request, resolve

    def phase(line: dict) -> None:  # printed as it happens (the server sends them as it goes)
        name = line.get("phase")
        # A --workers supervisor passes on each worker's lines, one worker after another.
        who = f"worker {line['worker']} (pid {line.get('worker_pid')}): " if "worker_pid" in line else ""
        if name == "check":
            typer.echo(f"{who}check: the new program loads the configuration and certificates ({line.get('program')} "
                       "--upgrade-check)")
        elif name == "quiesce":
            typer.echo(f"{who}quiesce: pausing {line.get('listeners')} listeners, {line.get('connections')} connections")
        elif name == "exec":
            typer.echo(f"{who}exec: {line.get('connections')} connections relayed by the bridge (pid {line.get('bridge')}) "
                       "while the new program loads")
        elif name == "worker done":
            typer.echo(f"worker {line.get('worker')} (pid {line.get('pid')}): restored {line.get('connections')} "
                       f"connections, pause {line.get('pause_ms')} ms")
        else:
            typer.echo(f"{who}{name}: {line}")

    try:
        path = resolve(pid, socket_path)
        answer = request(path, {"command": "upgrade", "exec": str(exec_path.resolve()) if exec_path else None},
                         timeout=timeout, on_progress=phase)
    except ControlError as exc:
        _fail(str(exc))
    if not answer.get("ok"):
        _fail(f"upgrade failed: {answer.get('error', 'no reason given')}")
    if "workers" in answer:
        typer.echo(f"upgraded: {len(answer['workers'])} workers of pid {answer.get('pid')}, one after another "
                   f"(same PIDs), restored {answer.get('connections')} connections, longest pause "
                   f"{answer.get('pause_ms')} ms")
        return
    typer.echo(f"upgraded: restored {answer.get('connections')} connections in pid {answer.get('pid')} "
               f"(the new program), pause {answer.get('pause_ms')} ms")


@app.command("inspect-keys", short_help="Each connection's record sequence numbers and key fingerprints.")
def inspect_keys(
    pid: Annotated[Optional[int], typer.Option(metavar="PID", help="The server's pid (when several run; a --workers supervisor's: every worker's connections). Without a control socket for it, falls back to --direct.")] = None,
    socket_path: Annotated[Optional[Path], typer.Option("--socket", metavar="PATH", help="The server's control socket path.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    reveal: Annotated[bool, typer.Option("--reveal", help="Also print the traffic keys and IVs (hex). Secret: anyone with them can read the traffic.")] = False,
    state: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Decode an upgrade state document (JSON) instead of asking a server.")] = None,
    direct: Annotated[bool, typer.Option("--direct", help="With --pid: pull the process's kTLS sockets with pidfd_getfd and read the kernel's state directly.")] = False,
) -> None:
    """Show each connection's record sequence numbers and key fingerprints, as the record
    layer holds them now (the kernel, for kTLS). Keys only with --reveal."""
    import json

    from .control import ControlError, request, resolve
    from .inspect import describe_state, format_table, rows_from_pid

    header: dict = {}
    try:
        if state is not None:
            try:
                doc = json.loads(state.read_text())
            except OSError as exc:
                _fail(f"cannot read {state}: {exc.strerror}")
            except ValueError as exc:
                _fail(f"{state}: not JSON: {exc}")
            try:
                rows = describe_state(doc, reveal=reveal)
            except ValueError as exc:
                _fail(f"{state}: {exc}")
            header = {"state": str(state)}
        elif direct:
            if pid is None:
                _fail("--direct needs --pid")
            _require_server_process(pid)
            rows = rows_from_pid(pid, reveal=reveal)
            header = {"pid": pid, "source": "pidfd_getfd"}
        else:
            try:
                path = resolve(pid, socket_path)
            except ControlError:
                if pid is None or socket_path is not None:
                    raise
                _require_server_process(pid)
                rows = rows_from_pid(pid, reveal=reveal)  # no control socket: ask the kernel
                header = {"pid": pid, "source": "pidfd_getfd"}
            else:
                answer = request(path, {"command": "inspect-keys", "reveal": reveal})
                if not answer.get("ok"):
                    _fail(f"{path}: {answer.get('error', 'request failed')}")
                rows = answer.get("connections", [])
                header = {"pid": answer.get("pid"), "socket": str(path), "source": "control socket"}
    except ControlError as exc:
        _fail(str(exc))
    if json_out:
        typer.echo(json.dumps({**header, "connections": rows}, indent=2))
        return
    where = ", ".join(f"{k} {v}" for k, v in header.items())
    typer.echo(f"# {where}: {len(rows)} connection(s); rec_seq = next record's sequence number; "
               "fingerprint = sha256(key||iv)[:8]")
    typer.echo(format_table(rows))


# -- `ironsocket check CONFIG` (ironsocket.config) --
@app.command(short_help="Validate a configuration file and print a summary.")
def check(config_file: Annotated[Path, typer.Argument(metavar="CONFIG", show_default=False, help="TOML configuration file.")]) -> None:
    """Validate a configuration file (keys, addresses, certificates) and print a summary."""
    from .config import ConfigError, load_file, summary

    try:
        fc = load_file(config_file)
    except ConfigError as exc:
        _fail(str(exc))
    for warning in fc.warnings:
        typer.echo(f"ironsocket: warning: {warning}", err=True)
    for line in summary(fc):
        typer.echo(line)


@app.command(short_help="What this kernel's kTLS can do (exit 1: none).")
def doctor() -> None:
    """Report what this kernel's TLS offload (kTLS) can do; exit 1 if it has none."""
    probe = ktls.probe()
    typer.echo(probe.describe())
    if not probe.available:
        typer.echo("to try: `modprobe tls` as root (add `tls` to /etc/modules-load.d/ to keep it); if there is "
                   "no such module, the kernel was built without CONFIG_TLS (it needs CONFIG_TLS=m or =y; "
                   "CONFIG_TLS_DEVICE for NIC offload). Meanwhile `serve` uses the userspace record layer.")
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
