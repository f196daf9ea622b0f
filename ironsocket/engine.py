"""The relay engine: a few epoll loops move the bytes of every connection.

Theory of operation
-------------------
A relay has two pumps (client → backend, backend → client). A pump is a *step*: a function
that does as much as it can without blocking and then either returns (True: this direction has
ended; False: call me again) or raises `WaitFor(fd, events)` — it cannot go on until ``fd`` is
ready. Everything a pump holds between two steps is in its fields (`relay.PumpState`, the
client channel), never in a local variable, so *between two steps is a safe point*: that is
what lets the exec upgrade snapshot a connection, and what lets one thread run thousands of
pumps.

`Engine` owns a small fixed set of `Loop` threads (``loops``, default 1 per process: worker
processes use the other cores; a second loop in one process mostly contended for the GIL). A relay is pinned to
one loop for its life. A loop waits in ``epoll_wait`` for the fds its pumps wait on, then runs
the steps of the pumps whose fds are ready; a pump that keeps making progress is put back at the
end of the ready queue after ``STEP_BUDGET`` steps, so one bulk transfer cannot starve the
others. Registrations are one-shot (``EPOLLONESHOT``): an fd fires once per wait, and one fd can
be waited on by both pumps of a relay for different events (the client socket: readable for one,
writable for the other).

Pausing (the exec upgrade): `Engine.pause()` asks every loop to stop at the top of its next
iteration — between steps, so every pump is at a safe point — and returns once all have; the
loops then touch nothing until `resume()`. Nothing else is needed: no pump can be "between two
waits" while its loop is parked. A relay given to a loop just before the pause still waits in the
loop's inbox (``arrive``); `release` takes it from there too, so a relay the hand-over let go of
never runs a step after the resume.

Idle timeout: each loop scans its relays a few times per ``idle_timeout`` and aborts (with
close_notify) those with no bytes either way for that long. While paused, no timer runs.

Threads: the loops, whatever the number of connections. Calls from other threads (`add`,
`Relay.abort`) go through the loop's inbox and its wake-up pipe, or are plain syscalls
(``shutdown``) whose effect the loop sees as readiness.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("ironsocket.engine")

STEP_BUDGET = 16  # steps a pump may run in a row before the others get their turn
# One loop per process: Python runs on one core at a time anyway (the GIL), and a second loop
# only made the two contend for it (every socket call releases the GIL; with two loops each was
# a futex hand-off): 15-19% less CPU per handshake with one (docs/benchmarks.md, 2026-12-04).
# The cores are used by worker processes (`serve --workers auto`, the default).
DEFAULT_LOOPS = 1
_ONESHOT = select.EPOLLONESHOT  # pumps wait for poll(2)'s POLLIN/POLLOUT: the same bits as epoll's


class WaitFor(Exception):
    """Raised by a step: it cannot go on until ``fd`` has one of ``events`` (POLLIN/POLLOUT)."""

    __slots__ = ("fd", "events")

    def __init__(self, fd: int, events: int) -> None:
        self.fd = fd
        self.events = events


class Pump(Protocol):
    """What a loop runs: `step()` (see the module doc) and `finished(exc)` when it has ended
    (``exc``: the exception that ended it, or None when the step returned True)."""

    relay: RelayLike

    def step(self) -> bool: ...

    def finished(self, exc: BaseException | None) -> None: ...


class RelayLike(Protocol):
    """What a loop needs of a relay (ironsocket.relay.Relay)."""

    def pumps(self) -> list[Pump]: ...

    def fds(self) -> tuple[int, ...]: ...

    def idle_for(self, now: float) -> float | None: ...

    def idle_timeout_expired(self) -> None: ...


class Loop:
    """One epoll loop in one thread; see the module doc."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._waiting: dict[int, dict[Pump, int]] = {}  # fd → {pump: events it waits for}
        self._registered: set[int] = set()
        self._ready: collections.deque[Pump] = collections.deque()
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self.relays: set[RelayLike] = set()
        self._arriving: set[RelayLike] = set()  # given to this loop, not yet added (in the inbox)
        self._lock = threading.Lock()
        self._resumed = threading.Condition(self._lock)
        self._pause_wanted = False
        self.parked = False
        self._parked_changed = threading.Condition(self._lock)
        self._running = True
        self._idle_scan = 1.0
        self._next_scan = time.monotonic() + self._idle_scan
        self._thread = threading.Thread(target=self._run, name=f"is-{name}", daemon=True)

    # -- from other threads ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._inbox.append(fn)
        if threading.get_ident() != self._thread.ident:  # the loop itself drains it before it waits
            self._wake()

    def arrive(self, relay: RelayLike) -> None:
        """Give ``relay`` to this loop (from any thread): its pumps start at the loop's next
        turn, unless it is released first (`release`: a pause may come between the two)."""
        with self._lock:
            self._arriving.add(relay)
        self.call_soon(functools.partial(self._arrived, relay))

    def holds(self, relay: RelayLike) -> bool:
        """Whether ``relay`` is this loop's, added or still arriving."""
        with self._lock:
            return relay in self.relays or relay in self._arriving

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is already due to wake

    def request_pause(self) -> None:
        with self._lock:
            self._pause_wanted = True
        self._wake()

    def wait_parked(self, deadline: float) -> bool:
        with self._parked_changed:
            return self._parked_changed.wait_for(lambda: self.parked or not self._thread.is_alive(),
                                                 max(0.0, deadline - time.monotonic()))

    def resume(self) -> None:
        with self._resumed:
            self._pause_wanted = False
            self._resumed.notify_all()

    def stop(self, timeout: float) -> None:
        self._running = False
        self.resume()
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._epoll.close()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def set_idle_scan(self, seconds: float) -> None:
        self._idle_scan = min(self._idle_scan, max(0.05, seconds))

    # -- while parked (the exec upgrade's bridge, ironsocket.bridge) ----------------------------
    def release(self, relay: RelayLike) -> None:
        """(while parked) Let go of ``relay`` as if it had never been added: no registration, no
        pump queued. Its fds stay open; the caller hands them on."""
        assert self.parked or not self._thread.is_alive()
        with self._lock:
            self._arriving.discard(relay)  # still in the inbox: it will not be added
        self.forget(relay)  # its fds: no registration, no pump waiting on them
        if self._ready:
            pumps = set(relay.pumps())
            self._ready = collections.deque(p for p in self._ready if p not in pumps)

    def after_fork(self) -> None:
        """(in a child forked while this loop was parked) A thread of its own again, with fresh
        locks, parked: `resume()` lets it run. The epoll set and its registrations carry over."""
        self._lock = threading.Lock()
        self._resumed = threading.Condition(self._lock)
        self._parked_changed = threading.Condition(self._lock)
        self._pause_wanted = True
        self.parked = False
        self._thread = threading.Thread(target=self._run, name=f"is-{self.name}", daemon=True)
        self._thread.start()

    # -- in the loop thread ----------------------------------------------------------------------
    def _arrived(self, relay: RelayLike) -> None:
        with self._lock:
            if relay not in self._arriving:
                return  # released while it waited in the inbox (`release`)
            self._arriving.discard(relay)
        self.add(relay)

    def add(self, relay: RelayLike) -> None:
        """(loop thread) Start ``relay``'s pumps: each runs its first step soon."""
        self.relays.add(relay)
        self._ready.extend(relay.pumps())

    def forget(self, relay: RelayLike) -> None:
        """(loop thread) Before the relay closes its fds: drop every registration of them (a
        closed fd number is soon reused by another connection)."""
        self.relays.discard(relay)
        for fd in relay.fds():
            self._waiting.pop(fd, None)
            if fd in self._registered:
                self._registered.discard(fd)
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass

    def _run(self) -> None:
        try:
            while self._running:
                self._park_if_asked()
                self._drain_inbox()
                self._run_ready()
                timeout = 0.0 if self._ready or self._inbox else self._until_scan()
                try:
                    events = self._epoll.poll(timeout)
                except InterruptedError:
                    continue
                for fd, mask in events:
                    if fd == self._wake_r:
                        self._drain_wake()
                    else:
                        self._fire(fd, mask)
                if time.monotonic() >= self._next_scan:
                    self._scan_idle()
        except Exception:  # noqa: BLE001 - a bug in the loop itself: say so loudly
            log.exception("relay loop %s crashed", self.name)
            raise

    def _park_if_asked(self) -> None:
        if not self._pause_wanted:
            return
        with self._lock:
            self.parked = True
            self._parked_changed.notify_all()
            self._resumed.wait_for(lambda: not self._pause_wanted)
            self.parked = False
        # The pause may have been long: no idle timeout counts it.
        self._next_scan = time.monotonic() + self._idle_scan

    def _drain_inbox(self) -> None:
        while self._inbox:
            self._inbox.popleft()()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _run_ready(self) -> None:
        for _ in range(len(self._ready)):
            if self._pause_wanted:
                return
            self._run_pump(self._ready.popleft())

    def _run_pump(self, pump: Pump) -> None:
        for _ in range(STEP_BUDGET):
            try:
                if pump.step():
                    pump.finished(None)
                    return
            except WaitFor as wait:
                self._wait(pump, wait.fd, wait.events)
                return
            except BaseException as exc:  # noqa: BLE001 - the pump decides what it means
                pump.finished(exc)
                return
        self._ready.append(pump)  # still busy: after the others

    def _wait(self, pump: Pump, fd: int, events: int) -> None:
        waiting = self._waiting.setdefault(fd, {})
        waiting[pump] = events
        self._arm(fd, waiting)

    def _arm(self, fd: int, waiting: dict[Pump, int]) -> None:
        mask = _ONESHOT
        for events in waiting.values():
            mask |= events
        try:
            if fd in self._registered:
                self._epoll.modify(fd, mask)
            else:
                self._epoll.register(fd, mask)
                self._registered.add(fd)
        except OSError:
            # The fd is gone (closed under us): let the pumps find out by running.
            self._waiting.pop(fd, None)
            self._registered.discard(fd)
            self._ready.extend(waiting)

    def _fire(self, fd: int, mask: int) -> None:
        waiting = self._waiting.get(fd)
        if not waiting:
            return
        broken = mask & (select.EPOLLERR | select.EPOLLHUP)
        woken = [p for p, events in waiting.items() if broken or events & mask]
        for pump in woken:
            del waiting[pump]
        self._ready.extend(woken)
        if waiting:
            self._arm(fd, waiting)  # one-shot: re-arm for the pumps still waiting
        else:
            del self._waiting[fd]

    def _until_scan(self) -> float:
        return max(0.0, self._next_scan - time.monotonic())

    def _scan_idle(self) -> None:
        now = time.monotonic()
        self._next_scan = now + self._idle_scan
        for relay in list(self.relays):
            left = relay.idle_for(now)
            if left is not None and left <= 0:
                relay.idle_timeout_expired()


class Engine:
    """A few `Loop` threads for all the relays of a process; see the module doc."""

    def __init__(self, loops: int = DEFAULT_LOOPS, name: str = "relay") -> None:
        self.loops = [Loop(f"{name}-{i}") for i in range(max(1, loops))]
        self._next = itertools.cycle(self.loops)
        self._started = False
        self.paused = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            for loop in self.loops:
                loop.start()

    def next_loop(self) -> Loop:
        """The loop the next relay (or handshake) goes to: round robin. Thread-safe."""
        return next(self._next)

    def add(self, relay: RelayLike, idle_timeout: float | None) -> Loop:
        """Give ``relay`` to a loop (round robin); its pumps start there. Thread-safe."""
        loop = self.next_loop()
        if idle_timeout:
            loop.set_idle_scan(idle_timeout / 4)
        loop.arrive(relay)
        return loop

    def set_idle_timeout(self, idle_timeout: float | None) -> None:
        """The relays' idle timeout changed (a configuration loaded after an early resume)."""
        if idle_timeout:
            scan = idle_timeout / 4
            for loop in self.loops:
                loop.call_soon(functools.partial(loop.set_idle_scan, scan))

    def pause(self, timeout: float) -> bool:
        """Park every loop between two steps; True once all are (then no byte moves)."""
        self.paused = True
        for loop in self.loops:
            loop.request_pause()
        deadline = time.monotonic() + timeout
        return all(loop.wait_parked(deadline) for loop in self.loops)

    def resume(self) -> None:
        self.paused = False
        for loop in self.loops:
            loop.resume()

    def release(self, relay: RelayLike) -> None:
        """(while paused) ``relay`` leaves this engine (`Loop.release`)."""
        for loop in self.loops:
            if loop.holds(relay):
                loop.release(relay)

    def after_fork(self) -> None:
        """(in a child forked while paused) Loop threads again, still paused (`Loop.after_fork`)."""
        for loop in self.loops:
            loop.after_fork()
        for loop in self.loops:
            loop.wait_parked(time.monotonic() + 5.0)

    def stop(self, timeout: float = 5.0) -> None:
        for loop in self.loops:
            loop.stop(timeout)
