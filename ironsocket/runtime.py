"""One running `ironsocket serve`: the proxy, its demo backend, control socket and admin
endpoint, signals, and the exec upgrade's two ends (start one; finish one we were exec'd by).

`Runtime.start()` either starts fresh or — when this process was exec'd by an upgrade
(``upgrade.ENV_STATE_FD`` in the environment) — adopts the listener, the admin and control
sockets, the demo backend's listener and every connection from the state document, then answers
the requester. It runs `STARTUP_STEPS` in order, and the order is the safety argument:

- every step that can fail (configuration, adopting fds, binding what is new) comes before
  ``relay``, the step where the adopted pumps and the accept loop start: until then no byte
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
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import sdnotify, upgrade
from .counters import PROCESS
from .server import ProxyConfig, ProxyServer

log = logging.getLogger("ironsocket")

_inherited: tuple[dict[str, Any], int] | None = None
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
            doc = early.doc if early is not None else upgrade.read_memfd(fd)
        except upgrade.StateError as exc:
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
            live = _live
            if live is not None and live.server is not None and live.server.adopted:
                # The connections are ours now (and may have moved bytes): carry them as they are.
                upgrade.roll_back_live(live.server, Runtime.carried_fds(doc), doc, fd, reason)
            elif early is not None:  # resumed before the configuration was loaded: the same
                upgrade.roll_back_live(early, Runtime.carried_fds(doc), doc, fd, reason)
            else:  # nothing adopted, nothing moved: the document is still exact
                upgrade.rollback(doc, fd, reason)
            raise

    return wrapper


class Runtime:
    """Owns everything one `serve` process runs; `run()` blocks until SIGTERM/SIGINT/SIGQUIT."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        demo: bool = False,
        admin: str | None = None,
        admin_allow_remote: bool = False,
        control_socket: Path | None = None,
        state_dump: Path | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.config = config
        self.demo_wanted = demo
        self.admin_address = admin
        self.admin_allow_remote = admin_allow_remote
        self.control_socket = control_socket
        self.state_dump = state_dump
        self.say = say
        self.server: ProxyServer | None = None
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

    # -- start ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Run `STARTUP_STEPS`. On failure, a fresh start stops what it started; a restore
        leaves everything inherited open for the rollback (`upgrade_guard`)."""
        global _live
        doc = _inherited[0] if _inherited and not _restored else None
        if doc is not None:
            _live = self
        try:
            for step in STARTUP_STEPS:
                getattr(self, f"_start_{step}")(doc)
        except BaseException:
            if doc is None:
                self.stop()
            raise

    def _start_demo(self, doc: dict[str, Any] | None) -> None:
        if not self.demo_wanted:
            return
        from .demo import DemoBackend

        lookup = lambda addr: self.server.connection_for_backend_peer(addr) if self.server else None  # noqa: E731
        self.demo = DemoBackend(lookup, fd=doc.get("demo_fd") if doc else None)
        self.demo.start()
        self.config = dataclasses.replace(self.config, backend=self.demo.address)
        if doc is None:
            log.info("no --backend given: built-in demo backend on %s:%d", *self.demo.address)

    def _start_proxy(self, doc: dict[str, Any] | None) -> None:
        self.server = ProxyServer(self.config)
        if doc is not None:
            self.server.adopt(doc)  # connections rebuilt, not started
        else:  # systemd socket activation (ironsocket.activation): fd 3 instead of --listen
            from .activation import ActivationError, listen_socket
            from .server import StartupError

            try:
                self.server._listener = listen_socket()
            except ActivationError as exc:
                raise StartupError(str(exc)) from None

    def _start_admin(self, doc: dict[str, Any] | None) -> None:
        assert self.server is not None
        from .launch import start_admin

        from .launch import admin_fd_matches

        # The admin listener is carried over exec like the TLS listener: never rebound (a port
        # taken meanwhile cannot fail the restore) and never refusing during an upgrade. Only
        # an admin address that changed is bound anew (the carried socket is closed once the
        # restore is confirmed; a rollback gives it back to the previous program).
        fd = doc.get("admin_fd") if doc else None
        if fd is not None and not admin_fd_matches(self.admin_address, fd):
            self._stale_fds.append(fd)
            fd = None
        self.admin = start_admin(self.admin_address, [self.server], self.admin_allow_remote, fd=fd)

    def _start_control(self, doc: dict[str, Any] | None) -> None:
        assert self.server is not None
        from .control import ControlServer, Takeover
        from .inspect import control_handlers

        handlers: dict[str, Any] = {**control_handlers(self.server), "upgrade": Takeover(self._upgrade_command)}
        if doc is not None and doc.get("control_fd") is not None:
            self.control = ControlServer.from_fd(doc["control_fd"], handlers)
        else:
            self.control = ControlServer(self.control_socket, handlers)

    def _start_relay(self, doc: dict[str, Any] | None) -> None:
        assert self.server is not None
        self.server.start()  # from here bytes move: the adopted pumps and the accept loop run

    def _start_confirm(self, doc: dict[str, Any] | None) -> None:
        global _restored
        if doc is None:
            return
        assert _inherited is not None
        for fd in upgrade.inherited_fds(doc):
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
        pause_ms = (moving - doc["created"]) * 1000
        failed = os.environ.pop(upgrade.ENV_FAILED, None)
        PROCESS.count("rolled_back" if failed else "done")  # admin /metrics (carried in the document)
        n = len(doc["connections"])
        log.info("upgrade: restored %d connections in pid %d", n, os.getpid())
        log.info("upgrade: resumed after %.1f ms (start-up complete after %.1f ms)", pause_ms,
                 (time.time() - doc["created"]) * 1000)
        if failed:
            upgrade.send_reply(doc, {"ok": False, "error": f"the new program failed: {failed}; rolled back, "
                                     f"{n} connections kept", "pid": os.getpid()})
        else:
            upgrade.send_reply(doc, {"ok": True, "pid": os.getpid(), "connections": n, "pause_ms": round(pause_ms, 1)})

    @staticmethod
    def carried_fds(doc: dict[str, Any]) -> dict[str, Any]:
        """What a rollback carries besides the server's part: the previous program's own
        sockets, as it handed them over (the fd numbers survive exec; nothing here closed them)."""
        return {key: doc.get(key) for key in ("control_fd", "demo_fd", "admin_fd", "reply_fd")}

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
        saved: dict[int, Any] = {}
        try:
            assert self.server is not None
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
            extra = {"control_fd": self.control.fileno() if self.control else None,
                     "demo_fd": self.demo.fileno() if self.demo else None,
                     "admin_fd": self.admin.fileno() if self.admin else None}
            upgrade.perform(self.server, upgrade.target_program(exec_path), reply=conn.sock if conn else None, extra=extra,
                            dump_path=str(self.state_dump) if self.state_dump else None,
                            also_pause=[self.admin] if self.admin else [])
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
        n = len(self.server.connections) if self.server else 0
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
        if self.server is None:
            return "serving"
        host, port = self.server.address
        return f"serving TLS 1.3 on {host}:{port}, {len(self.server.connections)} connections"

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
        server = self.server
        drain = 0.0 if fast or server is None else server.config.drain_timeout
        n = len(server.connections) if server else 0
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
            if server is None or not worker.is_alive():
                break
            left, to_go = len(server.connections), end - time.monotonic()
            if not left:
                continue
            if to_go > 0 and not told_timeout:
                log.info("draining: %d connections left, %.0fs to go", left, to_go)
                sdnotify.status(f"draining: {left} connections left, {to_go:.0f}s to go")
            elif not told_timeout:
                told_timeout = True
                log.info("drain timeout: close_notify to the %d connections left", left)
        worker.join()
        log.info("stopped")

    def _abort_all(self, reason: str) -> int:
        server = self.server
        if server is None:
            return 0
        infos = list(server.connections.values())
        for info in infos:
            if info.relay is not None:
                info.relay.abort(reason)
        return len(infos)

    def stop(self, drain: float | None = None) -> None:
        """Stop everything that was started (safe after a failed start, and twice). ``drain``:
        seconds connections may finish (default: the configuration's drain timeout)."""
        admin, control, server, demo = self.admin, self.control, self.server, self.demo
        self.admin = self.control = self.demo = None
        if admin is not None:
            admin.stop()
        if control is not None:
            control.close()
        if server is not None:
            server.stop(drain=drain)
        if demo is not None:
            demo.stop()
