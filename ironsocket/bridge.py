"""The bridge: while the new program loads, a fork of the old one keeps relaying.

Theory of operation
-------------------
An exec upgrade replaces the program in place, and everything the new program does before its
pumps run again — interpreter start, imports, configuration, certificates — used to be a pause
for every connection (about a tenth of a second on a quiet host, seconds under emulation), and
rebuilding N connections in one go added to it. The bridge takes both out of the pause:

1. **Fork.** The old program (pid P) pauses as before (accept held, handshakes finished, relay
   loops parked between two steps), then forks. The child (the *bridge*, pid B) restarts the
   relay loops (`engine.Engine.after_fork`) and goes on moving every connection's bytes; it
   accepts nothing and closes its copies of the listeners. P then execs the new program. The
   connections' fds stay close-on-exec, so after the exec exactly one process holds them: the
   bridge. The state document names no connection, only the bridge (``bridge``: its end of a
   socket pair and its pid).
2. **Hand-over, a batch at a time.** Once the new program (still pid P) has loaded everything
   and is at the step where bytes may move (``runtime``'s ``relay`` step), it asks the bridge for
   connections (`BridgeClient.take`). The bridge parks its loops just long enough to release a
   batch (`engine.Loop.release`: no registration, no queued step), lets the others run again,
   describes the batch (`handover.connection_entry`: rec_seq read back from the kernel, userspace
   sessions' counters) and sends the descriptions with the fds (SCM_RIGHTS, at most
   ``BATCH_FDS`` per message), then closes its own copies. The new program rebuilds and starts
   the batch, and asks again, until the bridge has none left; then the bridge exits and is reaped.
   A connection's pause is its batch's hand-over: a few milliseconds, whatever the number of
   connections.
3. **One owner at any time.** A connection is moved by P until the fork, by the bridge until it
   released the connection's batch, by the new program after: never two writers, so never a
   nonce twice. A connection that ends in the bridge is closed there (the only holder: the peer
   sees the close).

Failures: if the exec fails, P takes its connections back from the bridge the same way (its own
copies are stale: released and closed first). If the new program fails before it asked, the
rollback execs the previous program with the same document: that one asks instead. If it fails
mid-way, the rollback document carries what it had taken (as it is now) and the bridge for the
rest. If the new program dies, the bridge keeps relaying what it holds until those connections
end (they have lost only the listener).
"""

from __future__ import annotations

import array
import collections
import dataclasses
import gc
import json
import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .handover import BridgeEntry, ConnectionEntry, StateError, connection_entry

log = logging.getLogger("ironsocket.upgrade")

BATCH_FDS = 16  # fds per hand-over message: 8 userspace connections (a batch waits for all of it: docs/design.md "Pause length")
TIMEOUT = 30.0  # one request and its answer, each way
_HEADER = struct.Struct("!I")
_MAX_FRAME = 256 << 20


class BridgeError(Exception):
    """The bridge could not be reached, or answered what it should not."""


# -- the messages: a JSON object and the fds it names, on a stream socket -------------------------
def send_frame(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    frame = _HEADER.pack(len(data)) + data
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([frame], ancillary)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and the fds that came with it (the caller owns them). EOF: BridgeError."""
    fds: list[int] = []
    head = b""
    try:
        while len(head) < _HEADER.size:
            # MSG_CMSG_CLOEXEC: like every fd of ours, close-on-exec until an upgrade names it
            data, ancdata, _flags, _addr = sock.recvmsg(_HEADER.size - len(head), socket.CMSG_SPACE(253 * 4),
                                                        socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                    fds += got
            if not data:
                raise BridgeError("the bridge closed the connection")
            head += data
        (size,) = _HEADER.unpack(head)
        if size > _MAX_FRAME:
            raise BridgeError(f"a message of {size} bytes")
        body = bytearray()
        while len(body) < size:
            chunk = sock.recv(min(1 << 20, size - len(body)))
            if not chunk:
                raise BridgeError("the bridge closed the connection mid-message")
            body += chunk
        message = json.loads(body)
    except BaseException:
        _close_all(fds)
        raise
    if not isinstance(message, dict):
        _close_all(fds)
        raise BridgeError("a message that is not an object")
    return message, fds


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- a batch: each connection's `handover.ConnectionEntry` and its listener's index ------------------
_LISTENER = "listener"  # the bridge's own key beside the entry's (the format older programs send)


def _batch_item(listener: int, entry: ConnectionEntry) -> dict[str, Any]:
    return {**entry.to_dict(), _LISTENER: listener}


def _batch_entry(item: object, n: int) -> tuple[int, ConnectionEntry]:
    entry = ConnectionEntry.from_dict(item, f"connections[{n}]")
    listener = item.get(_LISTENER) if isinstance(item, dict) else None
    if not isinstance(listener, int):
        raise StateError(f"connections[{n}]: no listener index")
    return listener, entry


# -- the bridge process ---------------------------------------------------------------------------------
def fork(engines: Sequence[Any], connections: list[tuple[Any, Any, int]], close_in_child: Sequence[int],
         totals: Callable[[], list[int]]) -> tuple[int, socket.socket]:
    """(while every engine is paused) Fork the bridge; in this process return its pid and our
    end of the socket pair (inheritable: it goes over the exec). Never returns in the child.
    ``connections``: (info, relay, listener) of every live connection, ``listener`` the index of
    its listener's entry in the document; ``close_in_child``: listeners and other fds the bridge
    must not keep; ``totals``: bytes of the connections that closed, read in the child (sent
    with the last answer)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for handler in logging.getLogger().handlers:
        handler.flush()
    pid = os.fork()
    if pid == 0:  # the bridge
        code = 70
        try:
            ours.close()
            _close_all(close_in_child)
            code = _Bridge(theirs, engines, connections, totals).run()
        except BaseException:  # noqa: BLE001 - a child never returns into the parent's code
            try:
                log.exception("upgrade bridge: crashed")
            except BaseException:  # noqa: BLE001
                pass
        finally:
            for handler in logging.getLogger().handlers:
                try:
                    handler.flush()
                except BaseException:  # noqa: BLE001
                    pass
            os._exit(code)
    theirs.close()
    ours.set_inheritable(True)
    return pid, ours


class _Bridge:
    """The forked process: relays until every connection is handed over (see the module doc)."""

    def __init__(self, sock: socket.socket, engines: Sequence[Any], connections: list[tuple[Any, Any, int]],
                 totals: Callable[[], list[int]]) -> None:
        self.sock, self.engines, self.totals = sock, list(engines), totals
        self.live = collections.deque(connections)
        self.base = list(totals())

    def run(self) -> int:
        for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)  # an upgrade or reload is the new program's
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        gc.disable()  # a collection here would stall every connection the bridge moves (heap.py)
        for engine in self.engines:
            engine.after_fork()
        for engine in self.engines:
            engine.resume()
        resumed_at = time.monotonic()
        self.sock.settimeout(TIMEOUT)  # once a request has begun, all of it comes at once
        try:
            return self._serve(resumed_at)
        except Exception as exc:  # noqa: BLE001 - a bug here must not drop what the loops relay
            log.exception("upgrade bridge (pid %d): the hand-over failed", os.getpid())
            return self._orphaned(exc)

    def _serve(self, resumed_at: float) -> int:
        """Answer the new program's requests until it says done (or is gone)."""
        first = True
        poller = select.poll()  # not select(): the socket pair's fd is above 1024 with many connections
        poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            # The new program asks when it is ready: seconds here, minutes under emulation.
            if not poller.poll(1000):
                continue
            try:
                request, fds = recv_frame(self.sock)
            except (BridgeError, OSError) as exc:  # EOF: the new program is gone
                return self._orphaned(exc)
            _close_all(fds)
            op = request.get("op")
            if op == "take":
                self._give(int(request.get("max_fds", BATCH_FDS)), resumed_at if first else None)
                first = False
            elif op == "done":
                return 0
            else:
                send_frame(self.sock, {"error": f"unknown request {op!r}"})

    def _give(self, max_fds: int, resumed_at: float | None) -> None:
        max_fds = max(6, min(max_fds, BATCH_FDS))
        chosen: list[tuple[Any, Any, int]] = []
        count = 0
        asked_at = time.monotonic()
        if not all(engine.pause(5.0) for engine in self.engines):
            for engine in self.engines:
                engine.resume()
            send_frame(self.sock, {"error": "the bridge's relay loops did not reach a safe point in 5s"})
            return
        paused_at = time.monotonic()
        try:  # from the front, only as far as the batch goes (a scan of all made it O(N²))
            while self.live:
                info, relay, listener = self.live[0]
                if relay.done.is_set():
                    self.live.popleft()
                    continue
                n = len(relay.fds())
                if count + n > max_fds:
                    break
                self.live.popleft()
                relay.engine.release(relay)
                chosen.append((info, relay, listener))
                count += n
        finally:
            for engine in self.engines:
                engine.resume()
        released_at = time.monotonic()
        entries = [(listener, connection_entry(info)) for info, _, listener in chosen]
        docs = [_batch_item(listener, entry) for listener, entry in entries]
        fds = [fd for _, entry in entries for fd in entry.fds]
        left = len(self.live)  # some may have ended meanwhile: the next answer skips them
        # The bridge's part of the batch's wait (monotonic; the new program's clock is the same):
        # parking the loops (asked → paused), releasing the batch, describing it (→ sent_at).
        message: dict[str, Any] = {"connections": docs, "left": left, "paused_at": paused_at, "asked_at": asked_at,
                                   "released_at": released_at, "sent_at": time.monotonic()}
        if resumed_at is not None:
            message["resumed_at"] = resumed_at
        if not docs and not left:
            now = self.totals()
            message["closed_bytes"] = [now[0] - self.base[0], now[1] - self.base[1]]
        send_frame(self.sock, message, fds)
        for _, relay, _ in chosen:  # in flight now: the receiver holds its own references
            relay.let_go()

    def _orphaned(self, exc: BaseException) -> int:
        """The new program is gone: keep what we hold moving until it ends."""
        left = [relay for _, relay, _ in self.live if not relay.done.is_set()]
        if left:
            log.error("upgrade bridge (pid %d): the new program is gone (%s); %d connections continue "
                      "here until they end", os.getpid(), exc, len(left))
        for relay in left:
            while not relay.done.wait(60.0):
                pass
        return 0



# -- the new program's side -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BatchTimes:
    """One batch's timeline (monotonic seconds; both processes read the same clock): its
    connections wait from ``paused_at`` (the bridge's loops parked) to ``done_at`` (the last
    one started here)."""

    paused_at: float
    released_at: float  # the bridge's loops run again (the batch is out of them)
    sent_at: float  # described and sent
    received_at: float  # here
    done_at: float = 0.0  # rebuilt and started here

    def describe(self) -> str:
        parts = (("release", self.released_at - self.paused_at), ("describe", self.sent_at - self.released_at),
                 ("transit", self.received_at - self.sent_at), ("rebuild", self.done_at - self.received_at))
        return ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in parts)


def _collections() -> int:
    return sum(generation["collections"] for generation in gc.get_stats())


def _float(reply: dict[str, Any], key: str, default: float) -> float:
    value = reply.get(key, default)  # an older bridge sends paused_at only
    return float(value) if isinstance(value, (int, float)) else default


class BridgeClient:
    """The new program's end: `take` batches until `drained`, then `finish`."""

    def __init__(self, fd: int, pid: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.settimeout(TIMEOUT)
        self.pid = pid
        self.drained = False
        self.resumed_at: float | None = None  # when the bridge's loops ran again (monotonic)
        self.closed_bytes = [0, 0]
        self.longest_wait: float | None = None  # after `drain`: the longest a connection waited (s)
        self.last_batch: BatchTimes | None = None  # the timeline of the last batch `take` received

    def take(self, max_fds: int = BATCH_FDS) -> tuple[list[tuple[int, ConnectionEntry]], float]:
        """One batch: (listener index, entry naming our fds) of each connection, and when the
        bridge paused them (monotonic). An empty list once the bridge holds no more connections."""
        if self.drained:
            return [], time.monotonic()
        try:
            send_frame(self.sock, {"op": "take", "max_fds": max_fds})
            reply, fds = recv_frame(self.sock)
            received_at = time.monotonic()
        except (OSError, ValueError) as exc:
            raise BridgeError(f"the upgrade bridge (pid {self.pid}) did not answer: {exc}") from None
        try:
            if "error" in reply:
                raise BridgeError(f"the upgrade bridge refused: {reply['error']}")
            docs = reply["connections"]
            out = []
            i = 0
            for n, item in enumerate(docs):
                listener, entry = _batch_entry(item, n)
                count = len(entry.fds)
                out.append((listener, entry.with_fds(fds[i:i + count])))
                i += count
            if i != len(fds):
                raise BridgeError(f"the upgrade bridge sent {len(fds)} fds for {i}")
        except (KeyError, TypeError, ValueError, IndexError, StateError) as exc:
            _close_all(fds)
            raise BridgeError(f"the upgrade bridge sent a malformed batch: {exc}") from None
        except BridgeError:
            _close_all(fds)
            raise
        if "resumed_at" in reply:
            self.resumed_at = float(reply["resumed_at"])
        if not docs and not reply.get("left"):
            self.drained = True
            self.closed_bytes = list(reply.get("closed_bytes", [0, 0]))
        paused_at = float(reply["paused_at"])
        self.last_batch = BatchTimes(paused_at=paused_at, released_at=_float(reply, "released_at", paused_at),
                                     sent_at=_float(reply, "sent_at", paused_at), received_at=received_at)
        return out, paused_at

    def finish(self, timeout: float = 5.0) -> None:
        """Tell the bridge to exit, and reap it (it is our child: we are the process that forked it)."""
        try:
            send_frame(self.sock, {"op": "done"})
        except OSError:
            pass
        self.sock.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                if os.waitstatus_to_exitcode(status) != 0:
                    log.warning("upgrade bridge (pid %d) exited with %d", self.pid, os.waitstatus_to_exitcode(status))
                return
            if time.monotonic() > deadline:
                log.warning("upgrade bridge (pid %d) still running %gs after the hand-over; killing it", self.pid, timeout)
                os.kill(self.pid, signal.SIGKILL)
                timeout, deadline = 0.0, time.monotonic() + 5.0
            time.sleep(0.01)

    def document(self) -> BridgeEntry:
        """For a rollback document: the bridge still holds connections."""
        return BridgeEntry(fd=self.sock.fileno(), pid=self.pid)

    def drain(self, take: Callable[[int, ConnectionEntry], None], paused_at: float | None) -> None:
        """Take every connection, a batch at a time: ``take(listener, entry)`` rebuilds and
        starts one (``listener``: its listener's index in the document). Logs the
        batches and the longest wait; ``paused_at``: when the previous program paused (the
        fork's own pause counts too). Then tells the bridge to exit. If the bridge is gone, what
        it held is lost: said once, at critical, and the rest of the start-up goes on."""
        worst, batches, carried = 0.0, 0, 0
        worst_batch: BatchTimes | None = None
        collections = _collections()
        began = time.monotonic()
        while not self.drained:
            try:
                batch, batch_paused = self.take()
            except BridgeError as exc:  # it is gone, and what it held with it: nobody can do better
                log.critical("upgrade: %s; the connections it still held are lost", exc)
                self.drained = True
                break
            for listener, conn in batch:
                take(listener, conn)
                carried += 1
            done_at = time.monotonic()
            waited = done_at - batch_paused
            if batch and waited > worst and self.last_batch is not None:
                worst, worst_batch = waited, dataclasses.replace(self.last_batch, done_at=done_at)
            batches += bool(batch)
        fork_pause = None
        if self.resumed_at is not None and paused_at is not None:
            fork_pause = self.resumed_at - paused_at
        self.longest_wait = max(worst, fork_pause or 0.0)
        log.info("upgrade: %d connections taken from the bridge (pid %d) in %d batches over %.1f ms, %d garbage "
                 "collections meanwhile; longest wait for a batch %.1f ms%s, for the fork %s", carried, self.pid, batches,
                 (time.monotonic() - began) * 1000, _collections() - collections, worst * 1000,
                 f" ({worst_batch.describe()})" if worst_batch else "",
                 "-" if fork_pause is None else f"{fork_pause * 1000:.1f} ms")
        self.finish()

