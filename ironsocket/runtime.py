"""One running `ironsocket serve`: the proxy, its demo backend, control socket and admin
endpoint, signals, and the exec upgrade's two ends (start one; finish one we were exec'd by).

`Runtime.start()` either starts fresh or — when this process was exec'd by an upgrade
(``upgrade.ENV_STATE_FD`` in the environment) — adopts the listener, the control socket, the
demo backend's listener and every connection from the state document, then answers the
requester. Any failure before that point execs the previous program back (`upgrade_guard`).
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
last_error = ""  # the last start-up error shown to the user (for the rollback reason)


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
        try:
            doc = upgrade.read_memfd(fd)
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
            upgrade.rollback(doc, fd, last_error or f"{type(exc).__name__}: {exc}")
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
        self._upgrade_lock = threading.Lock()

    # -- start -----------------------------------------------------------------------------------
    def start(self) -> None:
        global _restored
        doc = _inherited[0] if _inherited else None
        if self.demo_wanted:
            from .demo import DemoBackend

            lookup = lambda addr: self.server.connection_for_backend_peer(addr) if self.server else None  # noqa: E731
            self.demo = DemoBackend(lookup, fd=doc.get("demo_fd") if doc else None)
            self.demo.start()
            self.config = dataclasses.replace(self.config, backend=self.demo.address)
            if doc is None:
                self.say(f"ironsocket: no --backend given: built-in demo backend on {self.demo.address[0]}:{self.demo.address[1]}")
        self.server = ProxyServer(self.config)
        if doc is not None:
            self.server.adopt(doc)
        else:  # systemd socket activation (ironsocket.activation): fd 3 instead of --listen
            from .activation import ActivationError, listen_socket
            from .server import StartupError

            try:
                self.server._listener = listen_socket()
            except ActivationError as exc:
                raise StartupError(str(exc)) from None
        self.server.start()
        from .launch import start_admin

        self.admin = start_admin(self.admin_address, [self.server], self.admin_allow_remote)
        from .control import ControlServer, Takeover
        from .inspect import control_handlers

        handlers: dict[str, Any] = {**control_handlers(self.server), "upgrade": Takeover(self._upgrade_command)}
        if doc is not None and doc.get("control_fd") is not None:
            self.control = ControlServer.from_fd(doc["control_fd"], handlers)
        else:
            self.control = ControlServer(self.control_socket, handlers)
        if doc is not None:
            self._finish_upgrade(doc)
            _restored = True

    def _finish_upgrade(self, doc: dict[str, Any]) -> None:
        assert _inherited is not None
        for fd in upgrade.inherited_fds(doc):
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        os.close(_inherited[1])
        pause_ms = (time.time() - doc["created"]) * 1000
        failed = os.environ.pop(upgrade.ENV_FAILED, None)
        n = len(doc["connections"])
        log.info("upgrade: restored %d connections in pid %d", n, os.getpid())
        log.info("upgrade: resumed after %.1f ms", pause_ms)
        if failed:
            upgrade.send_reply(doc, {"ok": False, "error": f"the new program failed: {failed}; rolled back, "
                                     f"{n} connections kept", "pid": os.getpid()})
        else:
            upgrade.send_reply(doc, {"ok": True, "pid": os.getpid(), "connections": n, "pause_ms": round(pause_ms, 1)})

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
                     "demo_fd": self.demo.fileno() if self.demo else None}
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
