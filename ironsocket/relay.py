"""Moving bytes between a TLS client and its backend after the handshake.

Theory of operation
-------------------
Two pumps per connection, one per `Direction`, each a *step* run by an `engine.Engine` loop
(a few threads for every connection of the process; the design card's blocking-thread relay
became this: threads that block in the kernel — epoll_wait, splice — never one per connection).
A pump is one small class per record layer and direction (`SpliceToBackend`, `SpliceToClient`,
`OpenToBackend`, `SealToClient`), its `PumpState` all it holds:

- ``c2b``: client → backend. With kTLS the client socket yields plaintext and the bytes move
  ``client ─splice→ pipe ─splice→ backend`` without entering Python. In userspace mode the
  pump reads ciphertext, opens records with the `tls13.Session` and writes plaintext.
- ``b2c``: backend → client. With kTLS, ``backend ─splice→ pipe ─splice→ client`` and the kernel
  seals records. In userspace mode the pump seals what it reads into the client channel's
  outgoing stream and writes that.

Sockets are non-blocking. A step does what it can and returns, or raises `engine.WaitFor` (fd,
events) when it cannot go on; the loop runs it again when the fd is ready. Between two steps is a
safe point: whatever a pump holds is described by its state — bytes in a splice pipe (the pipe
fd is carried over exec) or in a Python buffer (carried in the upgrade document); nothing is
ever held only in a local variable across a wait. That is what makes the exec upgrade possible:
parking the loops (`Engine.pause`) parks every pump at a safe point. Splice pipes come from
`PipePool` and are held only while bytes are in them.

Half-close (RFC 8446 §6.1 lets each side close its write half): close_notify (or FIN) from the
client → ``shutdown(SHUT_WR)`` toward the backend while backend → client keeps flowing; backend
EOF → close_notify to the client and ``shutdown(SHUT_WR)`` while client → backend keeps
flowing. The connection ends when both directions have ended, or at once on an error.

Control records on a kTLS socket (tls.rst "Receive TLS control messages"): splice stops at a
non-data record (EINVAL/EIO); the pump then reads it with ``recvmsg`` and its record-type cmsg.
close_notify → half-close; another alert → close both; KeyUpdate → rekey the kernel if it can
(`KtlsChannel`: RX at once, TX with our own KeyUpdate before our next record), else close
cleanly with the reason logged (Linux 6.1 and 6.12 cannot rekey an installed RX).

Guarantees:
- every socket and pipe belongs to one `Relay`, which closes each exactly once (``close()``);
- an error in one direction shuts both sockets down, which wakes the other pump;
- a connection with no bytes either way for ``idle_timeout`` is closed with close_notify (the
  loop's idle scan);
- while paused, a pump touches nothing and no idle timer runs.
"""

from __future__ import annotations

import array
import contextlib
import enum
import errno
import fcntl
import logging
import os
import select
import socket
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

from . import ktls
from .engine import Engine, Loop, WaitFor
from .tls13.alerts import Alert, RemoteProtocolError
from .tls13.constants import AlertDescription, AlertLevel, CipherSuite, ContentType
from .tls13.events import NEED_DATA, ApplicationData, ConnectionClosed, KeyUpdateReceived
from .tls13.handoff import Handoff, TrafficKeys
from .tls13.keyschedule import derive_traffic_keys, next_traffic_secret
from .tls13.limits import WRITE_KEY_UPDATE_MARGIN
from .tls13.records import record_limit
from .tls13.post_handshake import KEY_UPDATE_NOT_REQUESTED, PeerRecords
from .tls13.session import Session

log = logging.getLogger("ironsocket.relay")

READ_SIZE = 64 * 1024
SPLICE_CHUNK = 256 * 1024
PIPE_SIZE = 256 * 1024
F_SETPIPE_SZ = 1031
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class RecordMode(enum.Enum):
    USERSPACE = "userspace"
    KTLS_SW = "ktls-sw"
    KTLS_DEVICE = "ktls-device"


class RelayClosed(Exception):
    """The connection ends for a reason worth logging that is not an error of ours."""


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


# -- client channels ------------------------------------------------------------------------------
class ClientChannel:
    """The client side of a relay, whatever the record layer."""

    mode: RecordMode
    sock: socket.socket
    cipher_suite: CipherSuite

    def traffic_keys(self) -> tuple[TrafficKeys, TrafficKeys]:
        """(write, read) keys as the record layer holds them now: for kTLS, read back from
        the kernel (key, iv, rec_seq), for userspace from the Session."""
        raise NotImplementedError

    def rec_seqs(self) -> tuple[int, int]:
        """(next write seq, next read seq) as the record layer knows them now."""
        write, read = self.traffic_keys()
        return write.rec_seq, read.rec_seq

    def send_fatal_alert(self, description: AlertDescription) -> None:
        raise NotImplementedError

    def send_close_notify(self) -> None:
        raise NotImplementedError


class UserspaceChannel(ClientChannel):
    """Records sealed and opened in Python (`tls13.Session`), for kernels without kTLS.

    The outgoing byte stream to the client (sealed records) is one buffer, appended to under
    ``out_lock`` by whichever thread seals (b2c for data, c2b for a KeyUpdate answer), so
    records never interleave; the b2c pump writes it out.
    """

    mode = RecordMode.USERSPACE

    def __init__(self, sock: socket.socket, session: Session, out: bytes = b"") -> None:
        self.sock = sock
        self.session = session
        self.cipher_suite = session.cipher_suite
        self.out = bytearray(out)
        self.out_lock = threading.Lock()
        self.truncated = False

    def traffic_keys(self) -> tuple[TrafficKeys, TrafficKeys]:
        snap = self.session.snapshot()
        return snap.write, snap.read

    def queue(self, data: bytes | memoryview) -> None:
        with self.out_lock:
            self.session.send_data(data)
            self.out += self.session.data_to_send()

    def queue_pending_session_output(self) -> None:
        with self.out_lock:
            self.out += self.session.data_to_send()

    def send_close_notify(self) -> None:
        with self.out_lock:
            self.session.send_close_notify()
            self.out += self.session.data_to_send()

    def send_fatal_alert(self, description: AlertDescription) -> None:
        """Best effort, non-blocking: used on the way out."""
        with self.out_lock:
            self.session.send_alert(description)
            self.out += self.session.data_to_send()
            try:
                n = self.sock.send(self.out)
                del self.out[:n]
            except OSError:
                pass

    def flush(self) -> bool:
        """Write what the kernel takes now; True when nothing is left."""
        with self.out_lock:
            while self.out:
                try:
                    n = self.sock.send(self.out)
                except BlockingIOError:
                    return False
                del self.out[:n]
            return True


class KtlsChannel(ClientChannel):
    """A socket whose records the kernel seals and opens (tls.rst "Kernel TLS").

    KeyUpdate (RFC 8446 §4.6.3; tls.rst "TLS 1.3 Key Updates", Linux >= 6.14). The client's
    KeyUpdate reaches us as a handshake record (`control_record`, read by the one post-handshake
    reader of both record layers, `tls13.post_handshake.PeerRecords`); the kernel has then paused
    RX until we set TLS_RX with the next client secret (rec_seq 0), which `_key_update_received`
    does at once. If it asked for update_requested, we owe a KeyUpdate of ours before our next record
    (``tx_update_owed``). We also owe one when our TX key nears its §5.5 usage limit
    (``tx_rekey_at``, checked by the backend→client pump before each write). `send_key_update`
    pays it: the KeyUpdate under the old key, then TLS_TX with the next server secret. A kernel
    that refuses the second TLS_RX (6.1, 6.12) makes a client KeyUpdate a clean close.

    ``read_secret``/``write_secret`` are always the secrets of the keys the kernel holds: an
    upgrade carries them (`traffic_keys`) and checks that the kernel's keys derive from them.
    """

    mode = RecordMode.KTLS_SW

    def __init__(self, sock: socket.socket, cipher_suite: CipherSuite, read_secret: bytes, write_secret: bytes,
                 *, tx_update_owed: bool = False) -> None:
        self.sock = sock
        self.cipher_suite = cipher_suite
        self.read_secret = read_secret
        self.write_secret = write_secret
        self.send_lock = threading.Lock()
        self.write_closed = False
        self.truncated = False
        self.tx_update_owed = tx_update_owed  # a KeyUpdate of ours is due before our next record
        # §5.5: our own KeyUpdate once TX's rec_seq reaches this (limits.WRITE_KEY_UPDATE_MARGIN
        # records before the AEAD limit); the kernel's rec_seq counts every record, so this
        # holds across an upgrade too. Public so a test can bring the limit near.
        self.tx_rekey_at = record_limit(cipher_suite) - WRITE_KEY_UPDATE_MARGIN
        self.peer = PeerRecords()  # what the client sends besides data (tls13.post_handshake)
        self.rekeys_rx = 0
        self.rekeys_tx = 0

    @classmethod
    def from_handoff(cls, sock: socket.socket, handoff: Handoff) -> KtlsChannel:
        return cls(sock, handoff.cipher_suite, handoff.read.traffic_secret, handoff.write.traffic_secret)

    def traffic_keys(self) -> tuple[TrafficKeys, TrafficKeys]:
        state = ktls.read_back(self.sock)
        if state.tx is None or state.rx is None:
            raise ktls.KtlsError("kTLS is not installed in both directions on this socket")
        for secret, held in ((self.write_secret, state.tx), (self.read_secret, state.rx)):
            if derive_traffic_keys(self.cipher_suite, secret) != (held.key, held.iv):
                raise ktls.KtlsError("the kernel's keys do not derive from the traffic secrets we hold")
        return (
            TrafficKeys(traffic_secret=self.write_secret, key=state.tx.key, iv=state.tx.iv, rec_seq=state.tx.rec_seq),
            TrafficKeys(traffic_secret=self.read_secret, key=state.rx.key, iv=state.rx.iv, rec_seq=state.rx.rec_seq),
        )

    def _send_control(self, content_type: int, body: bytes) -> None:
        # The socket is non-blocking; a 2-byte record always fits unless the peer stopped reading.
        ktls.send_record(self.sock, content_type, body)

    def send_close_notify(self) -> None:
        """May raise BlockingIOError (socket full): then nothing was sent; call again."""
        with self.send_lock:
            if not self.write_closed:
                self._send_control(ContentType.ALERT, bytes((AlertLevel.WARNING, AlertDescription.close_notify)))
                self.write_closed = True

    def send_fatal_alert(self, description: AlertDescription) -> None:
        with self.send_lock:
            if self.write_closed:
                return
            self.write_closed = True
            try:
                self._send_control(ContentType.ALERT, bytes((AlertLevel.FATAL, description)))
            except (OSError, ktls.KtlsError):
                pass

    def raise_record_error(self, exc: OSError) -> None:
        """The kernel refused a client record: answer with the alert RFC 8446 §5.2 asks for and
        raise it as a protocol error (EBADMSG: failed to authenticate; EMSGSIZE: too long)."""
        alert = {errno.EBADMSG: AlertDescription.bad_record_mac,
                 errno.EMSGSIZE: AlertDescription.record_overflow}.get(exc.errno)  # fmt: skip
        if alert is None:
            return
        # The kernel also left the error pending on the socket (sk_err), which would fail the
        # alert's sendmsg with the same errno: reading SO_ERROR consumes it.
        with contextlib.suppress(OSError):
            self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.send_fatal_alert(alert)
        raise RemoteProtocolError(f"{alert.name}: the kernel refused a client record ({errno.errorcode[exc.errno]})",
                                  alert=alert) from None

    def control_record(self) -> bool:
        """Read and act on one non-data record (`tls13.post_handshake` says what it is).
        Returns True at close_notify (client EOF)."""
        content_type, data = ktls.recv_record(self.sock, READ_SIZE)
        if content_type == ContentType.APPLICATION_DATA:
            raise ktls.KtlsRecordError("splice refused an application-data record")
        try:
            event = self.peer.record(content_type, data)
        except Alert as exc:
            self.send_fatal_alert(exc.description)
            raise RemoteProtocolError(str(exc), alert=exc.description) from None
        if isinstance(event, ConnectionClosed):
            return True
        if isinstance(event, KeyUpdateReceived):
            self._key_update_received(event.update_requested)
        return False  # user_canceled, or a message not whole yet

    def data_seen(self) -> None:
        """The pump spliced application data from the client (the limits' counts restart)."""
        self.peer.data_seen()

    def _key_update_received(self, update_requested: bool) -> None:
        """The kernel paused RX at the client's KeyUpdate: the next read key, at once."""
        new_read = next_traffic_secret(self.cipher_suite, self.read_secret)
        try:
            ktls.update_rx(self.sock, self.cipher_suite, _keys(self.cipher_suite, new_read))
        except ktls.KtlsError as exc:
            # Every later record would fail to decrypt: close cleanly instead of corrupting.
            raise RelayClosed(f"client KeyUpdate but {exc}; closing the connection cleanly") from None
        self.read_secret = new_read
        self.rekeys_rx += 1
        if update_requested:
            self.tx_update_owed = True  # several requests before we answer: one answer (§4.6.3)
            with contextlib.suppress(BlockingIOError):  # socket full: the b2c pump pays it
                self.send_key_update()

    def key_update_due(self) -> bool:
        """Whether a KeyUpdate of ours must go out before our next record (owed to the client,
        or TX's rec_seq has reached ``tx_rekey_at``)."""
        if not self.tx_update_owed and not self.write_closed:
            seq = ktls.tx_rec_seq(self.sock, self.cipher_suite)
            self.tx_update_owed = seq is not None and seq >= self.tx_rekey_at
        return self.tx_update_owed and not self.write_closed

    def send_key_update(self) -> None:
        """Pay the KeyUpdate we owe: send it (update_not_requested) under the current TX key,
        then set TLS_TX with the next server secret, rec_seq 0. BlockingIOError (socket full):
        nothing was sent, still owed. A kernel that then refuses TLS_TX leaves a client that
        already switched keys: we stop writing and the error ends the connection."""
        with self.send_lock:
            if not self.tx_update_owed or self.write_closed:
                self.tx_update_owed = False
                return
            self._send_control(ContentType.HANDSHAKE, KEY_UPDATE_NOT_REQUESTED)
            new_write = next_traffic_secret(self.cipher_suite, self.write_secret)
            try:
                ktls.update_tx(self.sock, self.cipher_suite, _keys(self.cipher_suite, new_write))
            except ktls.KtlsError:
                self.write_closed = True
                raise
            self.write_secret = new_write
            self.tx_update_owed = False
            self.rekeys_tx += 1


def _keys(cipher_suite: CipherSuite, secret: bytes) -> TrafficKeys:
    key, iv = derive_traffic_keys(cipher_suite, secret)
    return TrafficKeys(traffic_secret=secret, key=key, iv=iv, rec_seq=0)


class BufferPool:
    """Read buffers lent for one read at a time, so an idle connection holds none (two 64 KiB
    buffers per connection were most of its memory)."""

    def __init__(self, size: int, keep: int = 64) -> None:
        self.size, self.keep = size, keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[memoryview]:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = bytearray(self.size)
        view = memoryview(buf)
        try:
            yield view
        finally:
            view.release()
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(buf)


_BUFFERS = BufferPool(READ_SIZE)


def _recv_pooled(sock: socket.socket, consume: Callable[[memoryview], object]) -> int:
    """One ``recv_into`` a pooled buffer, whose bytes go to ``consume`` (it must copy them: the
    buffer goes back to the pool). Bytes read, 0 at EOF, -1 if there was nothing to read."""
    with _BUFFERS.borrow() as view:
        try:
            n = sock.recv_into(view)
        except BlockingIOError:
            return -1
        if n:  # at EOF there is nothing to hand on (a Session closed for writing refuses even b"")
            consume(view[:n])
        return n


class PipePool:
    """Splice pipes lent to a pump only while bytes are in it, so an idle kTLS connection holds
    its two sockets and nothing else (two pipes per connection were 4 of its 6 fds, and the fd
    limit is what caps a process's connections). Only empty pipes are ever put back."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._free: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def get(self) -> tuple[int, int]:
        with self._lock:
            if self._free:
                return self._free.pop()
        return make_pipe()

    def put(self, pipe: tuple[int, int]) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(pipe)
                return
        for fd in pipe:
            os.close(fd)

    def free(self) -> int:
        with self._lock:
            return len(self._free)


def make_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return r, w


def pipe_bytes(fd: int) -> int:
    """Bytes currently in a pipe (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]


PIPE_POOL_KEEP = 64  # empty pipes kept for reuse (per process)
_PIPES = PipePool(PIPE_POOL_KEEP)


# -- the relay ------------------------------------------------------------------------------------
@dataclass
class RelayStats:
    bytes_c2b: int = 0
    bytes_b2c: int = 0
    started: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.monotonic)
    close_reason: str = ""


@dataclass
class PumpState:
    """What one direction holds at a safe point (all of it is carried over an exec)."""

    done: bool = False  # this direction has ended (EOF passed on)
    pending: bytearray = field(default_factory=bytearray)  # bytes read, not yet written
    pipe: tuple[int, int] | None = None  # splice pipe (kTLS), held only while bytes are in it
    # an error met while filling the pipe ahead, raised once the pipe is drained (not carried:
    # a connection failing during an upgrade meets the error again, or EOF, in the new program)
    deferred_error: OSError | None = field(default=None, compare=False)


class Direction(enum.Enum):
    """The one name of a direction: the upgrade document's keys and the close reasons use it."""

    CLIENT_TO_BACKEND = "c2b"
    BACKEND_TO_CLIENT = "b2c"


class Relay:
    """Both directions of one connection; owns (and closes) sockets and pipes. Its pumps run on
    one loop of an `engine.Engine` (no thread of its own)."""

    def __init__(
        self,
        conn_id: int,
        client: ClientChannel,
        backend: socket.socket,
        *,
        engine: Engine,
        idle_timeout: float | None = 300.0,
        on_done: Callable[[Relay], None] | None = None,
        c2b: PumpState | None = None,
        b2c: PumpState | None = None,
        stats: RelayStats | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.client = client
        self.backend = backend
        self.engine = engine
        self.idle_timeout = idle_timeout
        self.stats = stats or RelayStats()
        self.splice = isinstance(client, KtlsChannel)
        self.c2b = c2b or PumpState()  # pipes come from _PIPES while bytes are in them
        self.b2c = b2c or PumpState()
        self.on_done = on_done  # called once, after close()
        self._lock = threading.Lock()
        self._closed = False
        self._aborted = False
        self._pumps: list[Pump] = []
        self._live = 0
        self._loop: Loop | None = None
        self.done = threading.Event()  # set once closed
        for s in (client.sock, backend):
            s.setblocking(False)

    def start(self) -> None:
        """Hand both pumps (those not done) to the engine."""
        kinds: tuple[type[Pump], type[Pump]] = (
            (SpliceToBackend, SpliceToClient) if self.splice else (OpenToBackend, SealToClient))
        self._pumps = [kind(self) for kind in kinds if not self.state(kind.direction).done]
        self._live = len(self._pumps)
        if not self._pumps:
            self.close()
            return
        self._loop = self.engine.add(self, self.idle_timeout)

    def join(self, timeout: float | None = None) -> None:
        self.done.wait(timeout)

    # -- what the engine asks (engine.RelayLike) --------------------------------------------------
    def pumps(self) -> list[Pump]:
        return list(self._pumps)

    def state(self, direction: Direction) -> PumpState:
        """What the pump of ``direction`` holds (carried over an exec)."""
        return self.c2b if direction is Direction.CLIENT_TO_BACKEND else self.b2c

    def fds(self) -> tuple[int, ...]:
        fds = [self.client.sock.fileno(), self.backend.fileno()]
        for state in (self.c2b, self.b2c):
            fds += state.pipe or ()
        return tuple(fd for fd in fds if fd >= 0)

    def idle_for(self, now: float) -> float | None:
        """Seconds left before the idle timeout (None: no timeout)."""
        if self.idle_timeout is None or self._aborted:
            return None
        return self.idle_timeout - (now - self.stats.last_activity)

    def idle_timeout_expired(self) -> None:
        self._abort(f"idle for {self.idle_timeout:g}s", graceful=True)

    def _pump_finished(self, direction: Direction, exc: BaseException | None) -> None:
        """(loop thread) A pump ended: normally, or by ``exc``."""
        name = direction.value
        try:
            if exc is not None:
                raise exc
        except RelayClosed as e:
            self._abort(str(e), graceful=True)
        except RemoteProtocolError as e:
            self._abort(f"client protocol error: {e}")
        except (OSError, ktls.KtlsError) as e:
            if not self._aborted:
                self._abort(f"{name}: {e.__class__.__name__}: {e}")
        except Exception:  # noqa: BLE001 - a bug costs one connection, not the process
            if not self._aborted:
                log.exception("conn=%d %s pump crashed", self.conn_id, name)
                self._abort(f"{name}: internal error")
            # else: `abort()` from another thread (a stop) closed the session under this step
        self._live -= 1
        if self._live == 0:
            if self._loop is not None:
                self._loop.forget(self)
            self.close()

    # -- ending --------------------------------------------------------------------------------
    def _abort(self, reason: str, *, graceful: bool = False) -> None:
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            self.stats.close_reason = reason
        try:
            if graceful:
                self.client.send_close_notify()
                if isinstance(self.client, UserspaceChannel):
                    self.client.flush()
        except (OSError, ktls.KtlsError):
            pass
        for s in (self.client.sock, self.backend):
            _shutdown(s, socket.SHUT_RDWR)

    def let_go(self) -> None:
        """(not on any loop: released, or never started) Close this process's copies of the
        fds without a byte or a shutdown: another process holds the connection now (the exec
        upgrade's bridge and the programs on either side of it)."""
        held = self.fds()
        self.client.sock.detach()
        self.backend.detach()
        for fd in held:
            try:
                os.close(fd)
            except OSError:
                pass

    def abort(self, reason: str) -> None:
        """Close from outside (server stop): close_notify to the client, both sockets down."""
        self._abort(reason, graceful=True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for s in (self.client.sock, self.backend):
            try:
                s.close()
            except OSError:
                pass
        for state in (self.c2b, self.b2c):
            for fd in state.pipe or ():
                try:
                    os.close(fd)
                except OSError:
                    pass
        if not self.stats.close_reason:
            self.stats.close_reason = "closed by both sides"
        try:
            if self.on_done is not None:
                self.on_done(self)
        finally:
            self.done.set()


# -- the pumps: one class per record layer and direction ------------------------------------------
def _wait(fd: int, events: int) -> NoReturn:
    """This step cannot go on until ``fd`` is ready: the loop runs it again then."""
    raise WaitFor(fd, events)


class Pump:
    """One direction of a relay, as an `engine.Loop` runs it (`engine.Pump`): `step()` moves
    what it can without blocking, ``state`` is all it holds between two steps."""

    direction: Direction

    def __init__(self, relay: Relay) -> None:
        self.relay: Relay = relay
        self.state = relay.state(self.direction)

    def step(self) -> bool:
        raise NotImplementedError

    def finished(self, exc: BaseException | None) -> None:
        self.relay._pump_finished(self.direction, exc)

    def _moved(self, n: int) -> None:
        stats = self.relay.stats
        if self.direction is Direction.CLIENT_TO_BACKEND:
            stats.bytes_c2b += n
        else:
            stats.bytes_b2c += n
        stats.last_activity = time.monotonic()

    def _client_eof(self) -> bool:
        """The client's half is closed (close_notify or FIN): pass it on to the backend."""
        _shutdown(self.relay.backend, socket.SHUT_WR)
        self.state.done = True
        return True

    def _write_pending(self, sock: socket.socket) -> bool:
        try:
            n = sock.send(self.state.pending)
        except BlockingIOError:
            _wait(sock.fileno(), select.POLLOUT)
        del self.state.pending[:n]
        return False

    def _drain_pipe(self, dst: socket.socket, lock: threading.Lock | None = None) -> bool:
        """Splice what the pump's pipe holds into ``dst`` (waiting if ``dst`` is full); False if
        the pump holds no bytes (an emptied pipe goes back to the pool here)."""
        state = self.state
        if state.pipe is None:
            return False
        pipe_r = state.pipe[0]
        in_pipe = pipe_bytes(pipe_r)
        if not in_pipe:
            _PIPES.put(state.pipe)
            state.pipe = None
            return False
        try:
            with lock or contextlib.nullcontext():
                os.splice(pipe_r, dst.fileno(), in_pipe, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            _wait(dst.fileno(), select.POLLOUT)
        return True

    def _fill_pipe(self, src: socket.socket) -> int:
        """Splice from ``src`` into a pipe from the pool, which the pump then holds: bytes moved,
        or 0 at EOF; waits if ``src`` has nothing. Other errors (a kTLS control record) raise.
        A splice that fails moved nothing, so the pipe goes back to the pool empty."""
        pipe = _PIPES.get()
        try:
            n = os.splice(src.fileno(), pipe[1], SPLICE_CHUNK, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            _PIPES.put(pipe)
            raise WaitFor(src.fileno(), select.POLLIN) from None
        except BaseException:
            _PIPES.put(pipe)
            raise
        if n:
            self.state.pipe = pipe
        else:
            _PIPES.put(pipe)
        return n


class _KernelRecords(Pump):
    """A pump of a kTLS connection: the kernel seals and opens, bytes move by splice."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        assert isinstance(relay.client, KtlsChannel)
        self.channel: KtlsChannel = relay.client


class _UserspaceRecords(Pump):
    """A pump of a userspace connection: the `tls13.Session` seals and opens."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        assert isinstance(relay.client, UserspaceChannel)
        self.channel: UserspaceChannel = relay.client


class SpliceToBackend(_KernelRecords):
    """kTLS, client → backend: the kernel opens the records, ``client ─splice→ pipe ─splice→
    backend``; a control record stops the splice and is read apart (`KtlsChannel.control_record`)."""

    direction = Direction.CLIENT_TO_BACKEND

    def step(self) -> bool:
        state, channel = self.state, self.channel
        if state.pending:
            return self._write_pending(self.relay.backend)
        if self._drain_pipe(self.relay.backend):
            return False
        try:
            if state.deferred_error is not None:
                exc, state.deferred_error = state.deferred_error, None
                raise exc
            n = self._fill_pipe(channel.sock)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EIO):
                channel.raise_record_error(exc)
                raise
            # A control record is next (splice moves only application data).
            if channel.control_record():
                return self._client_eof()
            return False
        if n == 0:
            channel.truncated = True
            return self._client_eof()
        assert state.pipe is not None
        channel.data_seen()
        self._moved(n + self._fill_pipe_more(channel.sock, state.pipe[1], n))
        return False

    def _fill_pipe_more(self, src: socket.socket, pipe_w: int, have: int) -> int:
        """Keep splicing what ``src`` already holds into the pipe, up to SPLICE_CHUNK: bytes added.

        A kTLS RX socket gives one record (at most 16 KiB) per splice, so without this every
        record would cost a drain and a pass through the pump loop. It never waits. EOF and a
        control record (EINVAL/EIO: it stays queued) stop it and are met again by the next
        ``_fill_pipe``; any other error is reported once by the kernel, so it is kept in
        ``state`` and raised after the pipe has been drained: nothing read before it is lost."""
        added = 0
        while have + added < SPLICE_CHUNK:
            try:
                n = os.splice(src.fileno(), pipe_w, SPLICE_CHUNK - have - added, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EIO):
                    self.state.deferred_error = exc
                break
            if not n:
                break
            added += n
        return added


class OpenToBackend(_UserspaceRecords):
    """Userspace, client → backend: records opened by the `tls13.Session`, plaintext written."""

    direction = Direction.CLIENT_TO_BACKEND

    def step(self) -> bool:
        try:
            return self._step()
        except RemoteProtocolError:
            self.channel.queue_pending_session_output()  # the alert the Session queued
            self.channel.flush()
            raise

    def _step(self) -> bool:
        state, channel = self.state, self.channel
        if state.pending:
            return self._write_pending(self.relay.backend)
        if channel.out and not channel.flush():  # e.g. our answer to a KeyUpdate
            _wait(channel.sock.fileno(), select.POLLOUT)
        event = channel.session.next_event()
        if isinstance(event, ApplicationData):
            state.pending += event.data
            self._moved(len(event.data))
            return False
        if isinstance(event, ConnectionClosed):
            return self._client_eof()
        if isinstance(event, KeyUpdateReceived):
            channel.queue_pending_session_output()  # flushed first on the next steps
            return False
        if event is not NEED_DATA:
            return False
        n = _recv_pooled(channel.sock, channel.session.receive_data)
        if n < 0:
            _wait(channel.sock.fileno(), select.POLLIN)
        if n == 0:
            channel.truncated = True
            return self._client_eof()
        return False


class SpliceToClient(_KernelRecords):
    """kTLS, backend → client: ``backend ─splice→ pipe ─splice→ client``, the kernel seals;
    a KeyUpdate of ours goes out first when one is due (`KtlsChannel.key_update_due`)."""

    direction = Direction.BACKEND_TO_CLIENT

    def step(self) -> bool:
        state, channel = self.state, self.channel
        if state.pipe is not None and channel.key_update_due():  # before our next record
            try:
                channel.send_key_update()
            except BlockingIOError:
                _wait(channel.sock.fileno(), select.POLLOUT)
        if self._drain_pipe(channel.sock, channel.send_lock):
            return False
        n = self._fill_pipe(self.relay.backend)
        if n == 0:
            try:
                channel.send_close_notify()
            except BlockingIOError:
                _wait(channel.sock.fileno(), select.POLLOUT)  # the next step reads EOF again
            _shutdown(channel.sock, socket.SHUT_WR)
            state.done = True
            return True
        self._moved(n)
        return False


class SealToClient(_UserspaceRecords):
    """Userspace, backend → client: what the backend sends is sealed into the channel's
    outgoing stream (`UserspaceChannel.queue`), which this pump writes."""

    direction = Direction.BACKEND_TO_CLIENT

    def step(self) -> bool:
        state, channel = self.state, self.channel
        if channel.out:
            if not channel.flush():
                _wait(channel.sock.fileno(), select.POLLOUT)
            return False
        if state.done:
            _shutdown(channel.sock, socket.SHUT_WR)
            return True
        n = _recv_pooled(self.relay.backend, channel.queue)  # queue seals into channel.out
        if n < 0:
            _wait(self.relay.backend.fileno(), select.POLLIN)
        if n == 0:
            channel.send_close_notify()
            state.done = True  # flushed on the next steps, then SHUT_WR
            return False
        self._moved(n)
        return False
