"""One running `ironsocket serve`: its proxies (one `ProxyServer` per listener: one with flags,
one per ``[[listeners]]`` with ``--config``), the demo backend, control socket and admin
endpoint, signals, and the exec upgrade's two ends (start one; finish one we were exec'd by).
Flag mode and config mode differ only in where the listeners' `ProxyConfig`s come from.

`Runtime.start()` either starts fresh or — when this process was exec'd by an upgrade
(``upgrade.ENV_STATE_FD`` in the environment) — adopts the listeners, the admin and control
sockets, the demo backend's listener and every connection from the state document, then answers
the requester. Each configured listener takes over the document's entry of the same name
(unnamed ones: in order); a listener new in the configuration is bound, one that is gone is
refused while it has connections (the restore fails and rolls back: a reload cannot end
connections) and closed when it has none; one whose address changed is refused (the carried
socket keeps its address: restart to move it). It runs `STARTUP_STEPS` in order, and the order
is the safety argument:

- every step that can fail (configuration, adopting fds, binding what is new) comes before
  ``relay``, the step where the adopted pumps and the acceptor start: until then no byte
  has moved in this program, and the state document still describes every connection exactly;
- a failure at any step, before or after ``relay``, never closes what was inherited: the
  previous program is exec'd back (`upgrade_guard`) with the state *as it is now* — once this
  program has adopted the connections, it pauses them and writes a new document (rec_seq read
  back from the kernel, the userspace sessions' own counters), so no sequence number is ever
  used twice and no byte is replayed, whichever step failed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import handover, heap, logs, sdnotify, upgrade
from .counters import PROCESS
from .handover import Document, ListenerView, Sockets
from .server import ProxyConfig, ProxyServer

log = logging.getLogger("ironsocket")

_inherited: tuple[Document, int] | None = None
_restored = False
_live: Runtime | None = None  # the runtime restoring an inherited state (for the rollback)
last_error = ""  # the last start-up error shown to the user (for the rollback reason)

ENV_RELOAD = "IRONSOCKET_RELOAD"  # set across a reload's exec: the new program logs the outcome
ENV_STOP_PENDING = "IRONSOCKET_STOP_PENDING"  # a stop signal that came during an upgrade's exec

STARTUP_STEPS = ("demo", "proxy", "admin", "control", "relay", "confirm")
"""`Runtime.start()`'s steps, in order (a method ``_start_<step>`` each): only ``relay`` and
after move bytes, and nothing after ``relay`` can fail for a reason of configuration."""


def upgrade_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the `serve` command: in a process exec'd by an upgrade, a start-up failure of any
    kind (bad configuration, invalid state, a bug) rolls back to the previous program."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _inherited
        fd_text = os.environ.pop(upgrade.ENV_STATE_FD, None)
        if fd_text is None:
            return fn(*args, **kwargs)
        fd = int(fd_text)
        from . import resume

        early = resume.resumed
        try:
            doc = early.doc if early is not None else handover.read_memfd(fd)
        except handover.StateError as exc:
            # Without a readable document there is no previous program to go back to.
            log.critical("upgrade: state unreadable (%s); the carried connections are lost", exc)
            raise
        _inherited = (doc, fd)
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            if _restored:
                raise
            reason = last_error or f"{type(exc).__name__}: {exc}"
            # Who holds each listener entry now: a server that adopted it, the early resume's
            # `Early` (bytes moved: carried as they are now), or nobody (`upgrade.Carried`).
            owners = _live.owners if _live is not None and _live.owners else None
            if owners is None and early is not None:
                owners = list(early.listeners)
            if owners and not all(isinstance(o, upgrade.Carried) for o in owners):
                bridge = _live.bridge if _live is not None else None
                held = bridge.document() if bridge is not None and not bridge.drained else None  # it holds the rest
                # the previous program's own sockets, as it handed them over (the fd numbers
                # survive exec; nothing here closed them)
                upgrade.roll_back_live(owners, doc.sockets, held, doc, fd, reason,
                                       demo=_live.demo if _live is not None else None)
            else:  # nothing adopted, nothing moved: the document is still exact
                upgrade.rollback(doc, fd, reason)
            raise

    return wrapper


def exec_by_upgrade() -> bool:
    """This program was exec'd by an upgrade or a rollback, with a state document to restore
    (`upgrade_guard` took it from the environment)."""
    return _inherited is not None


def inherited_pid_file() -> tuple[Path | None, bool] | None:
    """In a program exec'd by an upgrade or a rollback: (the PID file the previous program held,
    whether this is a rollback). None in a fresh start."""
    if _inherited is None or _restored:
        return None
    path = _inherited[0].pid_file
    return (Path(path) if path is not None else None), upgrade.ENV_FAILED in os.environ


ENV_LISTENERS = "IRONSOCKET_UPGRADE_LISTENERS"
"""For the pre-flight check child: the running program's listeners (`handover.ListenerView`:
name, listen, connections), so that a configuration the restore would refuse is refused before the exec."""


def _same_address(bound: Sequence[Any], wanted: tuple[str, int]) -> bool:
    """Whether a listener bound at ``bound`` (host, port) is where ``wanted`` asks (port 0: any)."""
    host, port = bound[0], int(bound[1])
    if wanted[1] not in (0, port):
        return False
    try:
        names = {info[4][0] for info in socket.getaddrinfo(wanted[0], None, 0, socket.SOCK_STREAM)}
    except OSError:
        return False
    return host in names


def match_listeners(entries: Sequence[ListenerView], configs: Sequence[ProxyConfig]) -> list[int | None]:
    """For each configured listener, the index of the running listener it takes over (None: a
    new one, bound). A named listener takes the entry of its name; unnamed ones take the
    unnamed entries in order. StartupError if the configuration cannot take them over: a
    listener that is gone while it has connections (a reload does not end connections), or
    one whose address changed (the carried socket keeps its address; a socket systemd passed
    is not compared: its address is systemd's, not the configuration's)."""
    from .server import StartupError

    unnamed = iter([i for i, e in enumerate(entries) if not e.name])
    by_name = {e.name: i for i, e in enumerate(entries) if e.name}
    matched = [by_name.get(c.name) if c.name else next(unnamed, None) for c in configs]
    for index, entry in enumerate(entries):
        label = entry.name or f"listeners[{index}]"
        n = entry.connections  # carried in the document or held by the bridge (ironsocket.bridge)
        if index not in matched and n:
            raise StartupError(f"listener {label} is not in the configuration any more and has {n} connections: "
                               "a reload does not end connections (restart to remove a listener)")
    for config, slot in zip(configs, matched):
        if slot is None:
            continue
        entry = entries[slot]
        if not entry.passed and not _same_address(entry.listen, config.listen):
            label = config.name or f"listeners[{slot}]"
            raise StartupError(f"listener {label}: listen {config.listen[0]}:{config.listen[1]} but the running "
                               f"program listens on {entry.listen[0]}:{entry.listen[1]}; a reload keeps the "
                               "listening socket (restart to move a listener)")
    return matched


def check_listeners(configs: Sequence[ProxyConfig]) -> None:
    """In the pre-flight check child: StartupError if the restore would refuse ``configs``
    for the running program's listeners (`ENV_LISTENERS`; nothing to check without it)."""
    from .server import StartupError

    text = os.environ.get(ENV_LISTENERS)
    if text:
        try:
            running = handover.listener_views_from_json(text)
        except handover.StateError as exc:
            raise StartupError(f"{ENV_LISTENERS}: {exc}") from None
        match_listeners(running, configs)


def listeners_for_check(servers: Sequence[ProxyServer]) -> str:
    """`ENV_LISTENERS` for the check child of an upgrade of ``servers``."""
    return handover.listener_views_to_json([
        ListenerView(name=s.config.name, listen=tuple(s.address), connections=len(s.connections), passed=s.passed_listener)
        for s in servers])


class ListenerSet:
    """Every listener of the process as one registry, for the control socket (connection ids are
    unique per process: the listeners share one count)."""

    def __init__(self, servers: Sequence[ProxyServer]) -> None:
        self.servers = servers

    @property
    def connections(self) -> dict[int, Any]:
        merged: dict[int, Any] = {}
        for server in self.servers:
            merged.update(dict(server.connections))  # one C-level copy each: atomic under the GIL
        return merged

    @property
    def record_layer(self) -> str:
        return "; ".join(dict.fromkeys(server.record_layer for server in self.servers))


class Runtime:
    """Owns everything one `serve` process runs; `run()` blocks until SIGTERM/SIGINT/SIGQUIT.

    ``configs``: one `ProxyConfig` per listener. ``admin``: a ``--admin`` value, or
    ``admin_listen``/``admin_unix`` (a configuration file's ``[admin]``)."""

    def __init__(
        self,
        configs: ProxyConfig | Sequence[ProxyConfig],
        *,
        demo: bool = False,
        admin: str | None = None,
        admin_listen: tuple[str, int] | None = None,
        admin_unix: str | None = None,
        admin_allow_remote: bool = False,
        control_socket: Path | None = None,
        state_dump: Path | None = None,
    ) -> None:
        self.configs = [configs] if isinstance(configs, ProxyConfig) else list(configs)
        if not self.configs:
            raise ValueError("a runtime needs at least one listener")
        if demo and len(self.configs) != 1:
            raise ValueError("the demo backend is for one listener")
        self.demo_wanted = demo
        if admin:
            from .admin import parse_admin

            parsed = parse_admin(admin)
            admin_listen, admin_unix = parsed.get("listen"), parsed.get("unix")
        self.admin_listen, self.admin_unix = admin_listen, admin_unix
        self.admin_allow_remote = admin_allow_remote
        self.control_socket = control_socket
        self.state_dump = state_dump
        self.pid_file: Path | None = None  # the PID file this process holds (cli: `pidfile.claim`)
        self.servers: list[ProxyServer] = []
        self.owners: list[Any] = []  # during a restore: who holds each listener entry (rollback)
        self.bridge: Any = None  # bridge.BridgeClient: the previous program's fork holds connections
        self.demo: Any = None
        self.admin: Any = None
        self.control: Any = None
        self.stop_event = threading.Event()
        self._stale_fds: list[int] = []  # inherited sockets this program does not use
        self._upgrade_lock = threading.Lock()
        self._actions: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()  # for `run()`
        self._upgrading = False
        self._upgrade_queued = False  # a control-socket upgrade waits in _actions
        self._queue_lock = threading.Lock()
        self._signals_installed = False
        self._announced = False
        self._restart_failed: str | None = None

    @property
    def server(self) -> ProxyServer | None:
        """The first listener's server (the only one in flag mode)."""
        return self.servers[0] if self.servers else None

    @property
    def config(self) -> ProxyConfig:
        return self.configs[0]

    def connection_count(self) -> int:
        return sum(len(server.connections) for server in self.servers)

    # -- start ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Run `STARTUP_STEPS`. On failure, a fresh start stops what it started; a restore
        leaves everything inherited open for the rollback (`upgrade_guard`)."""
        global _live
        doc = _inherited[0] if _inherited and not _restored else None
        if doc is not None:
            from . import resume

            early = resume.resumed if resume.resumed is not None and resume.resumed.doc is doc else None
            self.owners = list(early.listeners) if early else [upgrade.Carried(e) for e in doc.listeners]
            _live = self
        try:
            for step in STARTUP_STEPS:
                getattr(self, f"_start_{step}")(doc)
        except BaseException:
            if doc is None:
                self.stop()
            raise

    def _start_demo(self, doc: Document | None) -> None:
        if not self.demo_wanted:
            return
        from .demo import DemoBackend

        lookup = lambda addr: self.server.connection_for_backend_peer(addr) if self.server else None  # noqa: E731
        # Its listener and connections come from the document; its loop starts at ``relay``.
        self.demo = DemoBackend(lookup, fd=doc.sockets.demo_fd if doc else None,
                                carried=doc.demo_connections if doc else ())
        self.configs[0] = dataclasses.replace(self.configs[0], backend=self.demo.address)
        if doc is None:
            log.info("no --backend given: built-in demo backend on %s:%d", *self.demo.address)
        else:
            log.info("upgrade: built-in demo backend carried with %d connections", self.demo.connections)

    def _start_proxy(self, doc: Document | None) -> None:
        from .server import StartupError

        entries = doc.listeners if doc is not None else ()
        if doc is not None and doc.bridge is not None:
            from .bridge import BridgeClient

            self.bridge = BridgeClient(doc.bridge.fd, doc.bridge.pid)
        start = max((e.next_conn_id for e in entries), default=1)
        ids = itertools.count(start)  # one count for every listener: an id names one connection
        # the check child ran the same (check_listeners)
        matched = match_listeners([e.view() for e in entries], self.configs)
        for index, entry in enumerate(entries):
            if index not in matched:  # gone from the configuration, without connections
                log.info("listener %s is not in the configuration any more: its socket is closed",
                         entry.name or f"listeners[{index}]")
                self._stale_fds.append(entry.listener_fd)
        for config, slot in zip(self.configs, matched):
            server = ProxyServer(config, ids)
            self.servers.append(server)
            if slot is None:
                continue
            entry = entries[slot]
            owner = self.owners[slot]
            server.adopt(entry, owner if not isinstance(owner, upgrade.Carried) else None)

            self.owners[slot] = server  # its connections are this server's now (rebuilt, or running)
        if doc is None and len(self.configs) > 1 and os.environ.get("LISTEN_PID") == str(os.getpid()):
            log.warning("socket activation: the configuration has %d listeners; the socket systemd passed is not "
                        "used (it applies to a file with one listener)", len(self.configs))
        if doc is None and len(self.configs) == 1:
            # systemd socket activation (ironsocket.activation): fd 3 instead of --listen
            from .activation import ActivationError, listen_socket

            try:
                self.servers[0].bind(listen_socket())
            except ActivationError as exc:
                raise StartupError(str(exc)) from None
        for server in self.servers:  # new listeners: a port taken fails here, before any byte moved
            server.bind()

    def _start_admin(self, doc: Document | None) -> None:
        from .launch import admin_fd_matches, start_admin

        # The admin listener is carried over exec like the TLS listener: never rebound (a port
        # taken meanwhile cannot fail the restore) and never refusing during an upgrade. Only
        # an admin address that changed is bound anew (the carried socket is closed once the
        # restore is confirmed; a rollback gives it back to the previous program).
        fd = doc.sockets.admin_fd if doc else None
        if fd is not None and not admin_fd_matches(fd, listen=self.admin_listen, unix=self.admin_unix):
            self._stale_fds.append(fd)
            fd = None
        self.admin = start_admin(None, self.servers, self.admin_allow_remote, listen=self.admin_listen,
                                 unix=self.admin_unix, fd=fd)

    def _start_control(self, doc: Document | None) -> None:
        from .control import ControlServer, Takeover
        from .inspect import control_handlers

        view = self.servers[0] if len(self.servers) == 1 else ListenerSet(self.servers)
        handlers: dict[str, Any] = {**control_handlers(view), "upgrade": Takeover(self._upgrade_command)}
        from .lifeline import supervisor_pid

        supervisor = supervisor_pid()  # a --workers worker: clients resolve to its supervisor
        about = (lambda: {"supervisor": supervisor}) if supervisor is not None else None
        if doc is not None and doc.sockets.control_fd is not None:
            self.control = ControlServer.from_fd(doc.sockets.control_fd, handlers, about=about)
        else:
            self.control = ControlServer(self.control_socket, handlers, about=about)

    def _start_relay(self, doc: Document | None) -> None:
        if not any(server.connections for server in self.servers):  # none adopted: ours is all loaded
            heap.settle()
        for server in self.servers:
            server.start()  # from here bytes move: the adopted pumps and the acceptors run
        if self.bridge is not None:  # the previous program's fork relayed them until now
            assert doc is not None
            by_entry = {i: owner for i, owner in enumerate(self.owners) if isinstance(owner, ProxyServer)}

            def take(listener: int, conn: handover.ConnectionEntry) -> None:
                server = by_entry.get(listener)
                if server is None:  # matched before the exec (the check), so never: but say so
                    raise handover.StateError(f"the bridge handed over connection {conn.id} of listener "
                                              f"{listener}, which no listener here took over")
                server.take_carried(conn)

            with heap.no_collection():  # a full collection inside a batch was most of its wait
                self.bridge.drain(take, doc.paused_at_monotonic)
        # Last: its carried connections move from here, and its pages find every connection
        # (all taken from the bridge now).
        if self.demo is not None:
            self.demo.start()
        elif doc is not None:  # demo connections of a previous program without one: nobody serves them
            self._stale_fds += [conn.fd for conn in doc.demo_connections]

    def _start_confirm(self, doc: Document | None) -> None:
        global _restored
        if doc is None:
            return
        assert _inherited is not None
        for fd in doc.fds:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        for fd in (_inherited[1], *self._stale_fds):
            try:
                os.close(fd)
            except OSError:
                pass
        _restored = True
        from . import resume

        # The connections' pause: until they moved again (early, if they were resumed before the
        # configuration was loaded), not until the whole start-up was done.
        moving = resume.resumed.resumed_at if resume.resumed is not None else time.time()
        pause_ms = (moving - doc.created) * 1000
        if self.bridge is not None and self.bridge.longest_wait is not None:  # handed over in batches
            pause_ms = self.bridge.longest_wait * 1000
        failed = os.environ.pop(upgrade.ENV_FAILED, None)
        PROCESS.count("rolled_back" if failed else "done")  # admin /metrics (carried in the document)
        n = sum(server.carried for server in self.servers)
        for owner in self.owners:  # an early-resumed listener nobody took (gone, without connections)
            if not isinstance(owner, (ProxyServer, upgrade.Carried)) and not owner.claimed:
                owner.engine.stop(0)
        self.owners = []
        log.info("upgrade: restored %d connections in pid %d (%d listeners)", n, os.getpid(), len(doc.listeners))
        log.info("upgrade: resumed after %.1f ms (start-up complete after %.1f ms)", pause_ms,
                 (time.time() - doc.created) * 1000)
        if failed:
            upgrade.send_reply(doc, {"ok": False, "error": f"the new program failed: {failed}; rolled back, "
                                     f"{n} connections kept", "pid": os.getpid()})
        else:
            upgrade.send_reply(doc, {"ok": True, "pid": os.getpid(), "connections": n, "pause_ms": round(pause_ms, 1)})

    # -- upgrade triggers --------------------------------------------------------------------------
    # Every upgrade runs on the main thread, from `run()`'s loop: the signal dispositions can only
    # be changed there, and one queue keeps upgrades and stops in order.
    def _upgrade_command(self, request: dict[str, Any], conn: Any) -> None:
        with self._queue_lock:
            busy = self._upgrade_lock.locked() or self._upgrade_queued
            self._upgrade_queued = self._upgrade_queued or not busy
        if busy:  # a queued second one would find its requester gone after the first one's exec
            conn.send({"ok": False, "error": "an upgrade is already running"})
            conn.close()
            return
        self._actions.put(("upgrade", request.get("exec"), conn, "upgrade"))

    def upgrade(self, exec_path: str | None = None, conn: Any = None, *, reason: str = "upgrade") -> None:
        """Run one upgrade (SIGUSR2, SIGHUP = ``reason="reload"``, or the control socket).
        Returns only if it did not happen (the old program keeps serving; the log says why)."""
        if not self._upgrade_lock.acquire(blocking=False):
            if conn is not None:
                conn.send({"ok": False, "error": "an upgrade is already running"})
                conn.close()
            return
        main = threading.current_thread() is threading.main_thread()
        saved: dict[signal.Signals, Any] = {}
        try:
            sdnotify.reloading(f"{reason} in progress")
            if main:
                # Across the exec the new program has the default dispositions until it installs
                # its handlers, and the default for SIGHUP/SIGUSR2 is to die: ignored ones stay
                # ignored across exec (and during this upgrade another could not run anyway).
                for sig in (signal.SIGHUP, signal.SIGUSR2):
                    saved[sig] = signal.signal(sig, signal.SIG_IGN)
            if reason == "reload":
                os.environ[ENV_RELOAD] = "SIGHUP"  # the new program logs the outcome (`run`)
            self._upgrading = True
            sockets = Sockets(control_fd=self.control.fileno() if self.control else None,
                              demo_fd=self.demo.fileno() if self.demo else None,
                              admin_fd=self.admin.fileno() if self.admin else None)
            upgrade.perform(self.servers, upgrade.target_program(exec_path), reply=conn.sock if conn else None,
                            sockets=sockets, check_env={ENV_LISTENERS: listeners_for_check(self.servers)}, dump_path=str(self.state_dump) if self.state_dump else None,
                            also_pause=[self.admin] if self.admin else [],
                            progress=self._progress(conn, reason),
                            pid_file=str(self.pid_file) if self.pid_file is not None else None,
                            demo=self.demo)
        except Exception as exc:  # noqa: BLE001 - on the main thread now: a bug must not end the process
            if not isinstance(exc, upgrade.UpgradeError):
                log.debug("upgrade: unexpected error", exc_info=True)  # the traceback at --log-level debug
                exc = upgrade.UpgradeError(f"{type(exc).__name__}: {exc}")
            PROCESS.count("refused")  # admin /metrics
            if reason == "reload":
                log.error("reload refused: %s; still serving with the current program and certificates", exc)
            else:
                log.error("upgrade: not done: %s", exc)
            sdnotify.ready(f"{reason} not done: {str(exc).splitlines()[0][:200]}", "IRONSOCKET_UPGRADE=failed")
            if conn is not None:
                try:
                    conn.send({"ok": False, "error": str(exc)})
                except OSError:
                    pass
        finally:
            self._upgrading = False
            os.environ.pop(ENV_RELOAD, None)
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            if conn is not None:
                conn.close()
            self._upgrade_lock.release()

    @staticmethod
    def _progress(conn: Any, reason: str) -> Callable[[str, dict[str, Any]], None]:  # upgrade.Progress
        """Each phase in the log, and to the `ironsocket upgrade` that asked (if it asked for
        progress lines: ``{"phase": ..., ...}`` before the answer, see control.py)."""

        def tell(phase: str, details: dict[str, Any]) -> None:
            log.debug("%s: phase %s %s", reason, phase, " ".join(f"{k}={v}" for k, v in details.items()))
            if conn is not None and conn.wants_progress:
                try:
                    conn.send({"phase": phase, **details})
                except OSError:
                    pass  # the requester left: the upgrade goes on

        return tell

    # -- signals -------------------------------------------------------------------------------------
    def install_signals(self) -> None:
        """SIGHUP reload, SIGUSR2 upgrade, SIGTERM/SIGINT graceful stop, SIGQUIT fast stop. Only
        queue the request: `run()` acts on it. Call it before `start()` (so a signal during a
        restore is not the default action, death) and from the main thread; `run()` calls it too."""
        if self._signals_installed:
            return
        self._signals_installed = True
        self._restart_failed = os.environ.get(upgrade.ENV_FAILED)  # `_start_confirm` pops it
        for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            if self._upgrading:  # the exec may come first: the new program stops then (`run`)
                os.environ[ENV_STOP_PENDING] = name
            self.stop_event.set()
        self._actions.put(("signal", signum))

    def announce_ready(self) -> None:
        """sd_notify READY=1 (MAINPID, STATUS, IRONSOCKET_UPGRADE=ok|failed) and, in a program
        exec'd by a reload (or rolled back to), the reload's outcome in the log. Once per
        program image: `run()` calls it; `_start_confirm` may call it first (then run() does
        not repeat it). Needs `install_signals()` before `start()` to see a rollback's reason."""
        if self._announced:
            return
        self._announced = True
        reload = os.environ.pop(ENV_RELOAD, None)
        n = self.connection_count()
        if reload and self._restart_failed:
            log.error("reload failed: the new program could not start (%s); rolled back, still serving with "
                      "the previous program and certificates, %d connections kept", self._restart_failed, n)
        elif reload:
            log.info("reload done (%s): program, certificates and configuration re-read; %d connections carried",
                     reload, n)
        if self._restart_failed:
            status = f"upgrade not done: {self._restart_failed.splitlines()[0][:200]}"
            sdnotify.ready(status, "IRONSOCKET_UPGRADE=failed")
        else:
            sdnotify.ready(self._serving_status(), "IRONSOCKET_UPGRADE=ok")

    def _serving_status(self) -> str:
        if not self.servers:
            return "serving"
        where = ", ".join("{}:{}".format(*server.address) for server in self.servers)
        return f"serving TLS 1.3 on {where}, {self.connection_count()} connections"

    # -- run and stop ------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (graceful stop) or SIGQUIT (fast stop); act on SIGHUP,
        SIGUSR2 and control-socket upgrades meanwhile. Sends sd_notify READY=1 first (also in a
        program exec'd by an upgrade: READY=1 after RELOADING=1)."""
        self.install_signals()
        self.announce_ready()
        pending = os.environ.pop(ENV_STOP_PENDING, None)
        if pending:
            log.info("stop requested (%s) during the upgrade: stopping now", pending)
            self._actions.put(("signal", int(signal.Signals[pending])))
        while True:
            try:
                action = self._actions.get(timeout=0.5)
            except queue.Empty:
                continue
            if action[0] == "upgrade":
                _, exec_path, conn, reason = action
                with self._queue_lock:
                    self._upgrade_queued = False
                self.upgrade(exec_path, conn, reason=reason)
                continue
            signum = action[1]
            if signum == signal.SIGHUP:
                log.info("reload requested (SIGHUP)")
                self.upgrade(reason="reload")
            elif signum == signal.SIGUSR2:
                log.info("upgrade requested (SIGUSR2)")
                self.upgrade()
            else:
                os.environ.pop(ENV_STOP_PENDING, None)
                self.shutdown(fast=signum == signal.SIGQUIT, why=signal.Signals(signum).name)
                return

    def shutdown(self, *, fast: bool = False, why: str = "") -> None:
        """Graceful (drain, logging progress every second) or fast (close_notify now) stop.
        A SIGQUIT while draining turns a graceful stop into a fast one."""
        servers = list(self.servers)
        drain = 0.0 if fast or not servers else max(server.config.drain_timeout for server in servers)
        n = self.connection_count()
        sdnotify.stopping(f"stopping ({why}): {n} connections")
        if fast:
            log.info("fast stop (%s): close_notify to %d connections now", why, n)
        else:
            log.info("graceful stop (%s): listener closed, %d connections have %gs to finish "
                     "(SIGQUIT: close them now)", why, n, drain)
        worker = threading.Thread(target=self.stop, kwargs={"drain": drain}, name="is-stop", daemon=True)
        worker.start()
        end = time.monotonic() + drain
        told_timeout = fast
        while worker.is_alive():
            try:
                action = self._actions.get(timeout=1.0)
            except queue.Empty:
                action = None
            if action is not None and action[0] == "upgrade" and action[2] is not None:
                try:
                    action[2].send({"ok": False, "error": "the server is stopping"})
                except OSError:
                    pass
                action[2].close()
            elif action is not None and action[0] == "signal" and action[1] == signal.SIGQUIT and not told_timeout:
                told_timeout = True
                left = self._abort_all("fast stop (SIGQUIT)")
                log.info("fast stop (SIGQUIT) while draining: close_notify to %d connections now", left)
                continue
            if not servers or not worker.is_alive():
                break
            left, to_go = self.connection_count(), end - time.monotonic()
            if not left:
                continue
            if to_go > 0 and not told_timeout:
                log.info("draining: %d connections left, %.0fs to go", left, to_go)
                sdnotify.status(f"draining: {left} connections left, {to_go:.0f}s to go")
            elif not told_timeout:
                told_timeout = True
                log.info("drain timeout: close_notify to the %d connections left", left)
        worker.join()
        logs.notice(log, "stopped")  # shown at every --log-level

    def _abort_all(self, reason: str) -> int:
        infos = [info for server in self.servers for info in list(server.connections.values())]
        for info in infos:
            if info.relay is not None:
                info.relay.abort(reason)
        return len(infos)

    def stop(self, drain: float | None = None) -> None:
        """Stop everything that was started (safe after a failed start, and twice). ``drain``:
        seconds connections may finish (default: the configuration's drain timeout)."""
        admin, control, demo = self.admin, self.control, self.demo
        self.admin = self.control = self.demo = None
        if admin is not None:
            admin.stop()
        if control is not None:
            control.close()
        # Every listener drains at once (one after another, N listeners would take N drains).
        stops = [threading.Thread(target=server.stop, kwargs={"drain": drain}, name="is-stop-listener", daemon=True)
                 for server in self.servers]
        for t in stops:
            t.start()
        for t in stops:
            t.join()
        if demo is not None:
            demo.stop()
