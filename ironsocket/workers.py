"""``serve --workers N``: N worker processes accept on one port (SO_REUSEPORT), so every core
works despite the GIL; each worker owns its connections, control socket and upgrades.

The parent only supervises, and never touches a connection:

- SIGTERM/SIGINT → graceful stop of every worker (SIGTERM); SIGQUIT → fast stop (SIGQUIT);
- SIGHUP (reload) / SIGUSR2 (upgrade) → a *rolling* upgrade: the signal goes to one worker,
  the supervisor waits until that worker reports the upgrade done, then the next. One worker at a
  time is paused, so the port always has acceptors; a worker whose upgrade is refused (a broken
  certificate fails the pre-flight check) stops the roll: the others keep the current program;
- a worker that dies unexpectedly is restarted after a second; one that exits before it ever
  served (it could not bind or load what the supervisor could not check) stops them all, exit 1:
  a restart would fail the same way. What a worker would fail at binding is tried once by the
  supervisor first (`probe_listeners`), so such an error is one line, as without workers;
- if the supervisor itself dies (even by SIGKILL), every worker gets SIGTERM from the kernel
  (``PR_SET_PDEATHSIG``, set by the worker itself: `lifeline`) and stops: no orphan keeps
  serving the port.

The supervisor has a control socket of its own (`control`; its default path is named by its PID,
or ``--control-socket``), so ``ironsocket upgrade`` and ``inspect-keys`` work against the PID an
operator knows (the PID file's, systemd's MAINPID) — and without ``--pid``, since a worker's
``ping`` names its supervisor and clients resolve to it:

- ``upgrade`` is the same rolling upgrade as SIGUSR2, but asked of each worker through that
  worker's own control socket (with ``exec``: another program), its progress lines passed on
  with the worker's index and PID, then one answer for all;
- ``inspect-keys`` and ``connections`` gather every worker's rows (ids ``W.N``).

How a worker reports: the supervisor is its systemd. It binds an AF_UNIX datagram socket and
gives it to the workers as ``$NOTIFY_SOCKET``; each worker sends ``READY=1`` once serving,
``RELOADING=1`` when an upgrade starts and ``READY=1`` after it (from the new program, same PID,
``IRONSOCKET_UPGRADE=ok|failed``). The sender is known from SCM_CREDENTIALS. The supervisor
itself notifies the real ``$NOTIFY_SOCKET`` (systemd): READY=1 once every worker is ready,
RELOADING=1/READY=1 around a rolling upgrade, STOPPING=1.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import lifeline, sdnotify
from .connection import ENV_WORKER

log = logging.getLogger("ironsocket.workers")

RESTART_DELAY = 1.0
UPGRADE_START_TIMEOUT = 30.0  # from the signal to the worker's RELOADING=1
UPGRADE_TIMEOUT = 240.0  # from RELOADING=1 to READY=1 (the pre-flight check may take minutes on slow machines)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


_SUPERVISOR_OPTIONS = ("--workers", "--pid-file", "--admin", "--control-socket")  # with a value; the supervisor's own
_SUPERVISOR_FLAGS = ("--admin-allow-remote",)


def worker_argv(argv: list[str]) -> list[str]:
    """This program's argv without what is the supervisor's (``--workers N``, ``--pid-file
    PATH``, ``--control-socket PATH``: each worker has its default one, ``--admin WHERE``: each
    worker gets an admin socket of its own, `workersum`) and with ``--workers 1 --reuse-port``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _SUPERVISOR_OPTIONS:
            skip = True
            continue
        if arg in _SUPERVISOR_FLAGS or arg.startswith(tuple(f"{o}=" for o in _SUPERVISOR_OPTIONS)):
            continue
        out.append(arg)
    return [*out, "--workers", "1", "--reuse-port"]


def probe_listeners(addresses: list[tuple[str, int]]) -> None:
    """Bind each address once, as a single process would (no SO_REUSEPORT), and let it go:
    StartupError (``cannot listen on HOST:PORT: <why>``) for a port below 1024 without the right,
    an address not ours, or a port someone already serves — also another ironsocket's workers,
    which the workers' SO_REUSEPORT would otherwise silently join."""
    from .server import bind_listener

    for address in addresses:
        bind_listener(address).close()


class _Notifications:
    """The supervisor's own NOTIFY_SOCKET (abstract namespace): (pid, fields) of each datagram."""

    def __init__(self) -> None:
        self.name = f"@ironsocket-workers-{os.getpid()}-{os.urandom(4).hex()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.messages: queue.SimpleQueue[tuple[int, dict[str, str]]] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="is-notify", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    pid = _UCRED.unpack_from(payload)[0]
            self.messages.put((pid, sdnotify.parse(data)))


def supervise(count: int, argv: list[str], admin: dict[str, Any] | None = None,
              control_socket: Path | None = None) -> int:
    """Run ``count`` workers of ``argv`` until SIGTERM/SIGINT/SIGQUIT; the exit code. ``admin``:
    the admin endpoint's ``listen``/``unix``/``allow_remote`` (`admin.AdminServer`), served here
    as the sum of the workers' (`workersum`). ``control_socket``: the supervisor's control
    socket (default: named by its PID). Raises AdminError or ControlError if either cannot be
    bound."""
    return _Supervisor(count, argv, admin, control_socket).run()


class _ControlUpgrade:
    """A control client's ``upgrade``, queued for the main loop (where every roll runs)."""

    def __init__(self, exec_path: str | None, conn: Any) -> None:
        self.exec_path = exec_path
        self.conn = conn  # control.ControlConnection, ours until answered

    def tell(self, line: dict[str, Any]) -> None:
        if self.conn.wants_progress:
            try:
                self.conn.send(line)
            except OSError:
                pass  # the client went away: the roll goes on

    def answer(self, obj: dict[str, Any]) -> None:
        try:
            self.conn.send(obj)
        except OSError:
            pass
        self.conn.close()


class _Supervisor:
    def __init__(self, count: int, argv: list[str], admin: dict[str, Any] | None = None,
                 control_socket: Path | None = None) -> None:
        self.argv = argv
        self.control_path = control_socket
        self.control: Any = None
        self.rolling = False  # a roll runs (main loop) or is queued: a second control request is refused
        self.roll_lock = threading.Lock()
        self.asks: list[threading.Thread] = []  # control requests to workers in flight (joined at exit)
        self.admin_sockets: list[Path] = []
        self.admin: Any = None
        if admin is not None:
            from .admin import AdminServer
            from .control import control_dir
            from .workersum import WorkersView, worker_socket

            run_dir = control_dir()
            self.admin_sockets = [worker_socket(run_dir, os.getpid(), i) for i in range(count)]
            self.admin = AdminServer([], view=WorkersView(self.admin_sockets), **admin)
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * count
        # Signal numbers (from the handlers) and control clients' upgrades (`_ControlUpgrade`).
        self.actions: queue.SimpleQueue[int | _ControlUpgrade] = queue.SimpleQueue()
        self.stop_signal: int | None = None
        self.failed = False  # a worker exited before it ever served: the supervisor exits 1
        self.notify = _Notifications()
        self.ready: set[int] = set()  # pids that sent READY=1
        self.told_ready = False
        self.upstream = dict(os.environ)  # where our own notifications go (systemd's NOTIFY_SOCKET)
        self.env = dict(os.environ) | {sdnotify.ENV: self.notify.name}
        # One ticket key secret for every worker: a ticket resumes at any of them (ticketkeys.py).
        from .ticketkeys import SHARED_SECRET_ENV, new_shared_secret

        self.env.setdefault(SHARED_SECRET_ENV, new_shared_secret())

    # -- workers -----------------------------------------------------------------------------------
    def spawn(self, i: int) -> None:
        # The worker index names its connections (``conn=<worker>.<n>``: unique per machine).
        argv = [*self.argv, "--admin", f"unix:{self.admin_sockets[i]}"] if self.admin_sockets else self.argv
        # The demo certificate (no --cert): made once here, the same memfd for every worker.
        from .selfsigned import shared_fds

        # The worker asks for SIGTERM when we die (lifeline.py); it checks our PID against its parent.
        env = self.env | {ENV_WORKER: str(i), lifeline.ENV_SUPERVISOR: str(os.getpid())}
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env, pass_fds=shared_fds())
        self.workers[i] = proc
        log.info("worker %d started, pid %d", i, proc.pid)

    def alive(self) -> list[tuple[int, subprocess.Popen[bytes]]]:
        return [(i, w) for i, w in enumerate(self.workers) if w is not None and w.poll() is None]

    def forward(self, signum: int) -> None:
        for _, w in self.alive():
            w.send_signal(signum)

    def _notify_up(self, *lines: str) -> None:
        sdnotify.notify(*lines, env=self.upstream)

    def drain_messages(self, timeout: float = 0.0) -> tuple[int, dict[str, str]] | None:
        """One worker notification (None after ``timeout``); READY=1 also marks the pid ready."""
        try:
            pid, fields = self.notify.messages.get(timeout=timeout) if timeout > 0 else self.notify.messages.get_nowait()
        except queue.Empty:
            return None
        if fields.get("READY") == "1":
            self.ready.add(pid)
            if not self.told_ready and all(w is not None and w.pid in self.ready for w in self.workers):
                self.told_ready = True
                log.info("all %d workers serving", len(self.workers))
                self._notify_up("READY=1", f"MAINPID={os.getpid()}", f"STATUS={len(self.workers)} workers serving")
        return pid, fields

    # -- signals -------------------------------------------------------------------------------------
    def on_signal(self, signum: int, _frame: object) -> None:
        self.actions.put(signum)

    def take_signal(self) -> int | _ControlUpgrade | None:
        """The next action; stop signals are acted on here (forwarded to every worker)."""
        try:
            signum = self.actions.get_nowait()
        except queue.Empty:
            return None
        if isinstance(signum, _ControlUpgrade):
            if self.stop_signal is not None:
                signum.answer({"ok": False, "error": "the server is stopping"})
                return None
            return signum
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT) and self.stop_signal is None:
            self.stop_signal = signal.SIGQUIT if signum == signal.SIGQUIT else signal.SIGTERM
            name = signal.Signals(signum).name
            log.info("%s: %s stop of every worker", name, "fast" if signum == signal.SIGQUIT else "graceful")
            self._notify_up("STOPPING=1")
            self.forward(self.stop_signal)
        elif signum == signal.SIGQUIT and self.stop_signal == signal.SIGTERM:
            self.stop_signal = signal.SIGQUIT
            log.info("SIGQUIT while stopping: fast stop of every worker")
            self.forward(signal.SIGQUIT)
        return signum

    # -- the rolling upgrade ---------------------------------------------------------------------------
    def rolling_upgrade(self, signum: int | _ControlUpgrade) -> None:
        """One worker after another (SIGHUP: reload, SIGUSR2 or a control client: upgrade); the
        first that is not done stops the roll. A control client gets each worker's progress and
        one answer."""
        asked = signum if isinstance(signum, _ControlUpgrade) else None
        signal_number = signum if isinstance(signum, int) else signal.SIGUSR2
        what = "reload" if signal_number == signal.SIGHUP else "upgrade"
        name = "control socket" if asked is not None else signal.Signals(signal_number).name
        with self.roll_lock:
            self.rolling = True
        try:
            log.info("%s requested (%s): upgrading the %d workers one after another", what, name, len(self.workers))
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self._notify_up("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={what} of the workers in progress")
            done: list[dict[str, Any]] = []
            for i, w in enumerate(self.workers):
                if w is None or w.poll() is not None:
                    continue
                report: dict[str, Any] = {}
                if asked is not None:
                    outcome = self.upgrade_one(i, w, lambda: self.ask_upgrade(i, w, asked, report), report)
                else:
                    outcome = self.upgrade_one(i, w, lambda: w.send_signal(signal_number))
                if self.stop_signal is not None:
                    log.info("%s of the workers interrupted by a stop", what)
                    if asked is not None:
                        asked.answer({"ok": False, "error": "interrupted by a stop", "workers": done})
                    return
                if outcome != "ok":
                    log.error("worker %d (pid %d): %s not done: %s; the other workers keep their current program",
                              i, w.pid, what, outcome)
                    self._notify_up("READY=1", f"STATUS={what} not done: {outcome[:200]}")
                    if asked is not None:
                        asked.answer({"ok": False, "error": f"worker {i} (pid {w.pid}): {outcome}; the other workers "
                                      "keep their current program", "workers": done})
                    return
                done.append({"worker": i, "pid": w.pid, "connections": report.get("connections"),
                             "pause_ms": report.get("pause_ms")})
                if asked is not None:
                    asked.tell({"phase": "worker done", **done[-1]})
                log.info("worker %d (pid %d): %s done", i, w.pid, what)
            log.info("%s done: %d workers upgraded in place", what, len(done))
            self._notify_up("READY=1", f"MAINPID={os.getpid()}", f"STATUS={len(self.workers)} workers serving")
            if asked is not None:
                asked.answer({"ok": True, "pid": os.getpid(), "workers": done,
                              "connections": sum(d["connections"] or 0 for d in done),
                              "pause_ms": max((d["pause_ms"] or 0 for d in done), default=0)})
        finally:
            with self.roll_lock:
                self.rolling = False

    def ask_upgrade(self, i: int, w: subprocess.Popen[bytes], asked: _ControlUpgrade, report: dict[str, Any]) -> None:
        """Start the worker's upgrade through its control socket, in a thread (the main loop
        goes on taking signals): its progress goes to ``asked``'s client, its answer (``ok``,
        ``connections``, ``pause_ms``, or ``error``) into ``report``, which `upgrade_one` waits
        for. The request's timeout bounds the thread."""
        from .control import ControlError, default_socket_path, request

        def run() -> None:
            try:
                answer = request(default_socket_path(w.pid), {"command": "upgrade", "exec": asked.exec_path},
                                 timeout=UPGRADE_START_TIMEOUT + UPGRADE_TIMEOUT,
                                 on_progress=lambda line: asked.tell({**line, "worker": i, "worker_pid": w.pid}))
            except ControlError as exc:
                answer = {"ok": False, "error": str(exc)}
            if not answer.get("ok"):
                answer.setdefault("error", "refused")
            report.update(answer)  # one update: `upgrade_one` reads it from the main loop meanwhile

        thread = threading.Thread(target=run, name=f"is-upgrade-worker-{i}", daemon=True)
        self.asks = [t for t in self.asks if t.is_alive()] + [thread]
        thread.start()

    def take_during_roll(self) -> None:
        """`take_signal` while a roll runs: a control client's upgrade queued meanwhile is refused."""
        got = self.take_signal()
        if isinstance(got, _ControlUpgrade):
            got.answer({"ok": False, "error": "an upgrade of the workers is already running"})

    def control_upgrade(self, request: dict[str, Any], conn: Any) -> None:
        """The control socket's ``upgrade`` (a Takeover handler, in a control thread)."""
        with self.roll_lock:
            busy, self.rolling = self.rolling, True
        up = _ControlUpgrade(request.get("exec"), conn)
        if busy:
            up.answer({"ok": False, "error": "an upgrade of the workers is already running"})
            return
        self.actions.put(up)

    def gather(self, request: dict[str, Any]) -> dict[str, Any]:
        """``inspect-keys`` / ``connections``: every worker's rows, asked of its control socket."""
        from .control import ControlError, default_socket_path, request as ask
        from .inspect import reveal_requested

        command = request["command"]
        query: dict[str, Any] = {"command": command}
        if command == "inspect-keys":
            query["reveal"] = reveal_requested(request)
        rows: list[Any] = []
        workers = []
        layers = set()
        for i, w in self.alive():
            try:
                answer = ask(default_socket_path(w.pid), query)
            except ControlError as exc:
                raise ControlError(f"worker {i} (pid {w.pid}): {exc}") from None
            if not answer.get("ok"):
                raise ControlError(f"worker {i} (pid {w.pid}): {answer.get('error', 'request failed')}")
            rows += answer.get("connections", [])
            workers.append({"worker": i, "pid": w.pid, "connections": len(answer.get("connections", []))})
            if answer.get("record_layer"):
                layers.add(str(answer["record_layer"]))
        out: dict[str, Any] = {"pid": os.getpid(), "workers": workers, "connections": rows}
        if command == "inspect-keys":
            out["record_layer"] = ", ".join(sorted(layers)) or None
        return out

    def upgrade_one(self, i: int, w: subprocess.Popen[bytes], start: Any, report: dict[str, Any] | None = None) -> str:
        """Start one worker's upgrade (``start()``: a signal, or a control request) once it is
        ready, and wait for its report: "ok", or why not. The report is the worker's READY=1
        after its RELOADING=1, or with ``report`` (a control request's) its answer there."""
        while self.drain_messages() is not None:  # what came before is not about this upgrade
            pass
        deadline = time.monotonic() + UPGRADE_TIMEOUT
        while w.pid not in self.ready:  # still starting: a signal now would be the default action
            self.take_during_roll()
            if self.stop_signal is not None:
                return "stopping"
            if w.poll() is not None or time.monotonic() > deadline:
                return "the worker never became ready"
            self.drain_messages(timeout=0.2)
        start()
        started = False
        deadline = time.monotonic() + UPGRADE_START_TIMEOUT
        while True:
            self.take_during_roll()
            if self.stop_signal is not None:
                return "stopping"
            if w.poll() is not None:
                return f"the worker exited with {w.returncode}"
            if report is not None and "ok" in report:
                return "ok" if report["ok"] else str(report.get("error"))
            if time.monotonic() > deadline:
                if started:
                    return f"no report within {UPGRADE_TIMEOUT:g}s"
                return f"the worker did not start an upgrade within {UPGRADE_START_TIMEOUT:g}s (another one running?)"
            got = self.drain_messages(timeout=0.2)
            if got is None or got[0] != w.pid:
                continue
            fields = got[1]
            if fields.get("RELOADING") == "1" and not started:
                started = True
                deadline = time.monotonic() + UPGRADE_TIMEOUT
            elif fields.get("READY") == "1" and started and report is None:  # else its answer is the report
                if fields.get("IRONSOCKET_UPGRADE") == "failed":
                    return re.sub(r"^\w+ not done: ", "", fields.get("STATUS", "refused"))
                return "ok"

    # -- main loop ---------------------------------------------------------------------------------------
    def run(self) -> int:
        from .control import ControlServer, Takeover, default_socket_path

        self.control = ControlServer(self.control_path or default_socket_path(),
                                     {"upgrade": Takeover(self.control_upgrade), "inspect-keys": self.gather,
                                      "connections": self.gather},
                                     about=lambda: {"workers": [w.pid for _, w in self.alive()]})
        try:
            if self.admin is not None:
                self.admin.start()  # up before the workers, and through every rolling upgrade
            try:
                return self._run()
            finally:
                if self.admin is not None:
                    self.admin.stop()
        finally:
            self.control.close()
            for thread in self.asks:  # each ends with its worker's answer or exit (its request has a timeout)
                thread.join(5)

    def _run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(sig, self.on_signal)
        for i in range(len(self.workers)):
            self.spawn(i)
        while True:
            signum = self.take_signal()
            if (isinstance(signum, _ControlUpgrade) or signum in (signal.SIGHUP, signal.SIGUSR2)) and self.stop_signal is None:
                assert signum is not None
                self.rolling_upgrade(signum)
                continue
            while self.drain_messages() is not None:
                pass
            alive = 0
            for i, w in enumerate(self.workers):
                if w is None:
                    continue
                code = w.poll()
                if code is None:
                    alive += 1
                elif self.stop_signal is not None:
                    self.workers[i] = None
                elif w.pid not in self.ready:  # it never served: a restart would fail the same way
                    log.error("worker %d (pid %d) exited with %s before serving (its error is above); stopping every "
                              "worker", i, w.pid, code)
                    self.failed = True
                    self.stop_signal = signal.SIGTERM
                    self._notify_up("STOPPING=1")
                    self.forward(signal.SIGTERM)
                    self.workers[i] = None
                else:
                    log.error("worker %d (pid %d) exited with %s; restarting in %gs", i, w.pid, code, RESTART_DELAY)
                    time.sleep(RESTART_DELAY)
                    if self.stop_signal is None:
                        self.spawn(i)
                        alive += 1
            if self.stop_signal is not None and alive == 0:
                log.info("every worker stopped")
                return 1 if self.failed else 0
            time.sleep(0.2)


def main_argv() -> list[str]:
    return [sys.executable, *sys.orig_argv[1:]]
