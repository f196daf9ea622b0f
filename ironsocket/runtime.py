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
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import upgrade
from .server import ProxyConfig, ProxyServer

log = logging.getLogger("ironsocket")

_inherited: tuple[dict[str, Any], int] | None = None
_restored = False
_live: Runtime | None = None  # the runtime restoring an inherited state (for the rollback)
last_error = ""  # the last start-up error shown to the user (for the rollback reason)

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
    """Owns everything one `serve` process runs; `run()` blocks until SIGTERM/SIGINT."""

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
            self.say(f"ironsocket: no --backend given: built-in demo backend on {self.demo.address[0]}:{self.demo.address[1]}")

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
    def _upgrade_command(self, request: dict[str, Any], conn: Any) -> None:
        exec_path = request.get("exec")
        threading.Thread(target=self.upgrade, args=(exec_path, conn), name="is-upgrade", daemon=True).start()

    def upgrade(self, exec_path: str | None = None, conn: Any = None) -> None:
        """Run one upgrade (SIGUSR2 or the control socket). Returns only if it did not happen."""
        if not self._upgrade_lock.acquire(blocking=False):
            if conn is not None:
                conn.send({"ok": False, "error": "an upgrade is already running"})
                conn.close()
            return
        try:
            assert self.server is not None
            extra = {"control_fd": self.control.fileno() if self.control else None,
                     "demo_fd": self.demo.fileno() if self.demo else None,
                     "admin_fd": self.admin.fileno() if self.admin else None}
            upgrade.perform(self.server, upgrade.target_program(exec_path), reply=conn.sock if conn else None, extra=extra,
                            dump_path=str(self.state_dump) if self.state_dump else None)
        except upgrade.UpgradeError as exc:
            log.error("upgrade: not done: %s", exc)
            if conn is not None:
                try:
                    conn.send({"ok": False, "error": str(exc)})
                except OSError:
                    pass
        finally:
            if conn is not None:
                conn.close()
            self._upgrade_lock.release()

    # -- run and stop ------------------------------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGUSR2, lambda *_: threading.Thread(target=self.upgrade, name="is-upgrade",
                                                                  daemon=True).start())
        self.stop_event.wait()
        self.say("ironsocket: stopping")
        self.stop()

    def stop(self) -> None:
        """Stop everything that was started (safe after a failed start, and twice)."""
        admin, control, server, demo = self.admin, self.control, self.server, self.demo
        self.admin = self.control = self.demo = None
        if admin is not None:
            admin.stop()
        if control is not None:
            control.close()
        if server is not None:
            server.stop()
        if demo is not None:
            demo.stop()
