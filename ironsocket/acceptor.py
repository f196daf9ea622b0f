"""Accepting connections as a pump on a relay loop: no accept thread.

Theory of operation
-------------------
An `Acceptor` is both what an `engine.Loop` runs (a `Pump`) and what it holds (a `RelayLike`),
like `handshake.Handshake`. Its `step()` accepts one connection from the (non-blocking)
listening socket and gives it to ``on_accept`` (the server starts its `Handshake`); when the
backlog is empty it waits for the listener to be readable (`WaitFor`). The loop runs up to
`engine.STEP_BUDGET` steps in a row and then the other pumps: a burst of connections cannot
starve the relays, and a handshake accepted on this loop starts without a cross-thread hand-off.

Before, a thread of its own waited in ``poll`` and accepted; with every handshake and relay on
the loops, each accept then went through the GIL twice and the loop's wake-up pipe, and that
thread's wake-ups contended with the loops for the GIL (docs/benchmarks.md, 2026-12-04: server
CPU per resumed handshake 1.07 → 0.84 ms with this and one loop).

It waits on one of two things:

- the listener (readable: a client is in the backlog);
- its own eventfd, when it may not accept: ``max_connections`` reached (``take_slot`` said no;
  `slot_freed` wakes it), or accept() failed for lack of fds (EMFILE/ENFILE: it retries when a
  slot is freed or at the loop's first deadline scan `RETRY_AFTER` later, never in a busy loop).

`hold()` and `release()` (from any thread: the exec upgrade's pause and resume) stop and restart
it. `hold()` returns once no accept can happen any more: the acceptor has left its loop (no
registration of the listener in the loop's epoll set, so a forked bridge inherits none) and a
step still queued sees ``held`` and ends at once. `release()` gives it to the loop again.
`stop()` is a `hold()` for good; the owner closes the listener after it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from select import POLLIN

from .engine import Engine, Loop, Pump, RelayLike, WaitFor
from .logs import fields

log = logging.getLogger("ironsocket")

HOLD_TIMEOUT = 5.0  # hold()/stop(): how long to wait for the loop to take the acceptor off
RETRY_AFTER = 0.05  # accept() failed for lack of fds: wait at least this long before the next
_NO_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Acceptor:
    """Accepts on ``listener`` (non-blocking) from a loop of ``engine``; see the module doc.

    ``take_slot()`` is asked before each accept (False: at the connection limit, wait for
    `slot_freed`); ``give_slot()`` returns a slot that was not used; ``on_accept(sock, addr)``
    takes the accepted socket and its slot (it owns both once it returns; if it raises, the
    acceptor closes the socket and gives the slot back)."""

    def __init__(self, listener: socket.socket, engine: Engine, *, name: str,
                 take_slot: Callable[[], bool], give_slot: Callable[[], None],
                 on_accept: Callable[[socket.socket, tuple[Any, ...]], None]) -> None:
        self.relay: RelayLike = self  # engine.Pump: the RelayLike it belongs to is itself
        self._listener = listener
        self._listener_fd = listener.fileno()
        self._loop: Loop = engine.next_loop()
        self._name = name
        self._take_slot = take_slot
        self._give_slot = give_slot
        self._on_accept = on_accept
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self.held = True  # until start()
        self._stopped = False
        self._starved = False  # waiting on the eventfd for a slot
        self._retry_at: float | None = None  # waiting after EMFILE/ENFILE
        self._warned_at = 0.0

    # -- from any thread -------------------------------------------------------------------------
    def start(self) -> None:
        self.release()

    def release(self) -> None:
        """Accept again (after `hold`)."""
        with self._lock:
            if self._stopped or not self.held:
                return
            self.held = False
        self._loop.arrive(self)

    def hold(self, timeout: float = HOLD_TIMEOUT) -> bool:
        """Stop accepting; True once no accept can happen any more (False: the loop did not
        answer within ``timeout``, e.g. it is parked)."""
        with self._lock:
            self.held = True
        done = threading.Event()

        def leave() -> None:
            self._loop.forget(self)
            done.set()

        self._loop.call_soon(leave)
        return done.wait(timeout)

    def stop(self, timeout: float = HOLD_TIMEOUT) -> None:
        """Stop for good, then close the eventfd. The owner closes the listener after this."""
        with self._lock:
            self._stopped = True
        self.hold(timeout)
        try:
            os.close(self._wake_fd)
        except OSError:
            pass

    def slot_freed(self) -> None:
        """A connection ended: if the acceptor waits for a slot or for fds, wake it."""
        if self._starved or self._retry_at is not None:
            self._retry_at = None  # an fd may be free now: the back-off ends with this wake-up
            self._wake()

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass  # closed at stop (nothing to wake), or the counter is full (it is due to wake)

    # -- what the engine asks (engine.RelayLike) ------------------------------------------------
    def pumps(self) -> list[Pump]:
        return [] if self.held else [self]

    def fds(self) -> tuple[int, ...]:
        return (self._listener_fd, self._wake_fd)

    def idle_for(self, now: float) -> float | None:
        return None if self._retry_at is None else self._retry_at - now

    def idle_timeout_expired(self) -> None:
        """(loop thread) The EMFILE back-off is over: try again."""
        self._retry_at = None
        if not self.held:
            self._wake()

    # -- the pump (engine.Pump) ------------------------------------------------------------------
    def step(self) -> bool:
        if self.held:
            return True  # hold(): leaves the loop (its `forget` is queued, or has run)
        self._drain_wake()
        if self._retry_at is not None:
            raise WaitFor(self._wake_fd, POLLIN)
        if not self._take_slot():
            self._starved = True
            if not self._take_slot():  # a slot freed between the two is seen by one or the other
                raise WaitFor(self._wake_fd, POLLIN)
        self._starved = False
        try:
            sock, addr = self._listener.accept()
        except BlockingIOError:
            self._give_slot()
            raise WaitFor(self._listener_fd, POLLIN) from None
        except OSError as exc:
            self._give_slot()
            return self._accept_failed(exc)
        try:
            self._on_accept(sock, addr)
        except BaseException:  # not taken: the socket and its slot are still ours
            sock.close()
            self._give_slot()
            raise
        return False

    def finished(self, exc: BaseException | None) -> None:
        if exc is None:
            return
        # A bug: say so, and keep accepting after the back-off rather than never again.
        log.error("internal error in the accept loop", exc_info=exc, extra=fields(listener=self._name))
        self._retry_at = time.monotonic() + RETRY_AFTER
        self._loop.call_soon(self._resume_after_error)

    def _resume_after_error(self) -> None:
        if not self.held:
            self._loop.add(self)

    def _accept_failed(self, exc: OSError) -> bool:
        if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
            return False  # that client gave up in the backlog: the next one
        now = time.monotonic()
        if now - self._warned_at >= 1.0:  # at most a line a second, however often it fails
            self._warned_at = now
            hint = " (out of file descriptors: retrying as connections close)" if exc.errno in _NO_FDS else ""
            log.warning("accept failed: %s%s", exc, hint, extra=fields(listener=self._name))
        self._retry_at = now + RETRY_AFTER
        raise WaitFor(self._wake_fd, POLLIN)

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except OSError:
            pass  # nothing to read (BlockingIOError)
