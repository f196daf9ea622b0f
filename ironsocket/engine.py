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

`Engine` owns a small fixed set of `Loop` threads (``loops``, default 2: while one is in the
kernel — splice, AES-GCM of kTLS, a socket write — the other can run Python). A relay is pinned to
one loop for its life. A loop waits in ``epoll_wait`` for the fds its pumps wait on, then runs
the steps of the pumps whose fds are ready; a pump that keeps making progress is put back at the
end of the ready queue after ``STEP_BUDGET`` steps, so one bulk transfer cannot starve the
others. One fd can be waited on by both pumps of a relay for different events (the client
socket: readable for one, writable for the other).

Registrations. A pump whose fds never change while it runs (``stable_fds``: the relay's pumps,
whose sockets live as long as the relay) has each fd registered once, edge-triggered for both
directions (``EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET``), and never modified: waiting costs
no ``epoll_ctl``. An edge that no pump waits for is dropped, which is safe because of the rule
every such pump keeps: it waits for readable only after a read that found nothing (EAGAIN) or
read less than it asked for (the socket was empty then) *in the same step*, and for writable
only after a write that did not take everything (EAGAIN, or the kernel set SOCK_NOSPACE); any
byte that arrives or any space that frees after that point raises a new edge, which the next
``epoll_wait`` reports (the loop is one thread: a wait is recorded before it polls again).
Other pumps (a handshake, whose backend socket may be closed and replaced by the next address
while it waits) get one-shot registrations (``EPOLLONESHOT``), re-armed with ``modify`` for
each wait, as a closed fd number may be reused by another socket.

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
DEFAULT_LOOPS = 2
_ONESHOT = select.EPOLLONESHOT  # pumps wait for poll(2)'s POLLIN/POLLOUT: the same bits as epoll's
# A stable pump's fd: registered once for both directions, edge-triggered (see the module doc).
_EDGE = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_BROKEN = select.EPOLLERR | select.EPOLLHUP


class WaitFor(Exception):
    """Raised by a step: it cannot go on until ``fd`` has one of ``events`` (POLLIN/POLLOUT).
    ``WaitFor(fd, events)``: the two are its ``args`` (no Python ``__init__``: one per wait)."""

    __slots__ = ()

    @property
    def fd(self) -> int:
        fd: int = self.args[0]
        return fd

    @property
    def events(self) -> int:
        events: int = self.args[1]
        return events


class Pump(Protocol):
    """What a loop runs: `step()` (see the module doc) and `finished(exc)` when it has ended
    (``exc``: the exception that ended it, or None when the step returned True). A pump class
    may set ``stable_fds = True`` (its fds stay the same sockets while it runs, and it keeps
    the edge-triggered rule of the module doc): its fds are then registered once."""

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
        self._registered: set[int] = set()  # fds in the epoll set (one-shot or edge-triggered)
        self._edge: set[int] = set()  # of those, the edge-triggered ones (registered for good)
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
            kept = [p for p in self._ready if p not in pumps]
            self._ready.clear()  # the same deque: the loop thread holds it in a local
            self._ready.extend(kept)

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
            self._edge.discard(fd)
            if fd in self._registered:
                self._registered.discard(fd)
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass

    def _run(self) -> None:
        # The hot path of every relay: what it touches per iteration is in locals.
        poll = self._epoll.poll
        ready, inbox, waiting_on = self._ready, self._inbox, self._waiting
        edge, wake_r, budget = self._edge, self._wake_r, range(STEP_BUDGET)
        monotonic = time.monotonic
        try:
            while self._running:
                if self._pause_wanted:
                    self._park_if_asked()
                while inbox:
                    inbox.popleft()()
                for _ in range(len(ready)):
                    if self._pause_wanted:
                        break
                    pump = ready.popleft()
                    for _ in budget:
                        try:
                            if pump.step():
                                pump.finished(None)
                                break
                        except WaitFor as wait:
                            fd, events = wait.args
                            waiting = waiting_on.get(fd)
                            if waiting is not None and fd in edge:
                                waiting[pump] = events  # registered for good: nothing to arm
                            else:
                                self._wait(pump, fd, events)
                            break
                        except BaseException as exc:  # noqa: BLE001 - the pump decides what it means
                            pump.finished(exc)
                            break
                    else:
                        ready.append(pump)  # still busy: after the others
                if ready or inbox:
                    timeout = 0.0
                else:
                    timeout = max(0.0, self._next_scan - monotonic())
                try:
                    events = poll(timeout)
                except InterruptedError:
                    continue
                for fd, mask in events:
                    waiting = waiting_on.get(fd)
                    if waiting is None:
                        if fd == wake_r:
                            self._drain_wake()
                        continue  # an edge nobody waits for (see the module doc)
                    if fd not in edge:
                        self._fire(fd, mask)
                    elif mask & _BROKEN:
                        ready.extend(waiting)
                        del waiting_on[fd]
                    else:
                        for pump, events in list(waiting.items()):
                            if events & mask:
                                del waiting[pump]
                                ready.append(pump)
                if monotonic() >= self._next_scan:
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

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _wait(self, pump: Pump, fd: int, events: int) -> None:
        waiting = self._waiting.get(fd)
        if waiting is None:
            waiting = self._waiting[fd] = {}
        waiting[pump] = events
        if fd in self._edge:
            return  # registered for good
        if getattr(pump, "stable_fds", False):
            try:
                if fd in self._registered:  # one-shot until now (a handshake's): for good from here
                    self._epoll.modify(fd, _EDGE)
                else:
                    self._epoll.register(fd, _EDGE)
                    self._registered.add(fd)
                self._edge.add(fd)
            except OSError:
                self._waiting.pop(fd, None)
                self._registered.discard(fd)
                self._ready.extend(waiting)  # the fd is gone: let the pumps find out by running
            return
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
        broken = mask & _BROKEN
        woken = [p for p, events in waiting.items() if broken or events & mask]
        for pump in woken:
            del waiting[pump]
        self._ready.extend(woken)
        if waiting:
            self._arm(fd, waiting)  # one-shot: re-arm for the pumps still waiting
        else:
            del self._waiting[fd]

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
