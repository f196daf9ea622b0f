"""Moving bytes between a TLS client and its backend after the handshake.

Theory of operation
-------------------
Two blocking threads per connection, one per direction (the design card's relay):

- ``c2b``: client channel → backend. Reads plaintext from the client channel (userspace AEAD
  or a kTLS socket), writes it to the backend.
- ``b2c``: backend → client channel. Reads the backend, writes plaintext into the channel,
  which seals it (userspace) or lets the kernel seal it (kTLS TX).

The client channel hides which record layer is in use: `UserspaceChannel` wraps a
`tls13.Session`; `KtlsChannel` wraps a socket with kTLS installed and handles control records
(alerts, KeyUpdate) via the record-type cmsg.

Half-close (RFC 8446 §6.1 lets each side close its write half): close_notify (or FIN) from the
client → ``shutdown(SHUT_WR)`` toward the backend, while backend → client keeps flowing; backend
EOF → close_notify to the client and ``shutdown(SHUT_WR)``, while client → backend keeps flowing.
The connection ends when both directions have ended, or at once on an error in either.

Guarantees:
- every socket belongs to one `Relay`, which closes both exactly once (``close()``);
- an error in one direction shuts both sockets down, which wakes the other thread;
- a blocking read waits at most ``idle_timeout``; a connection with no bytes in either direction
  for that long is closed.
"""

from __future__ import annotations

import enum
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import ktls
from .tls13.alerts import RemoteProtocolError
from .tls13.constants import AlertDescription, AlertLevel, ContentType, HandshakeType
from .tls13.events import NEED_DATA, ApplicationData, ConnectionClosed, KeyUpdateReceived
from .tls13.handoff import Handoff, TrafficKeys
from .tls13.keyschedule import derive_traffic_keys, next_traffic_secret
from .tls13.session import Session

log = logging.getLogger("ironsocket.relay")

READ_SIZE = 64 * 1024


class RecordMode(enum.Enum):
    USERSPACE = "userspace"
    KTLS_SW = "ktls-sw"
    KTLS_DEVICE = "ktls-device"


class RelayClosed(Exception):
    """The connection ended for a reason worth logging (not an error of ours)."""


class ClientChannel:
    """The client side of a relay: plaintext in and out, whatever the record layer."""

    mode: RecordMode
    sock: socket.socket

    def read(self) -> bytes:
        """Next plaintext; ``b""`` once the client closed its write half (close_notify/FIN)."""
        raise NotImplementedError

    def write(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def close_write(self) -> None:
        """close_notify, then TCP half-close."""
        raise NotImplementedError

    def send_fatal_alert(self, description: AlertDescription) -> None:
        raise NotImplementedError

    def rec_seqs(self) -> tuple[int, int]:
        """(next write seq, next read seq) as the record layer knows them now."""
        write, read = self.traffic_keys()
        return write.rec_seq, read.rec_seq

    def traffic_keys(self) -> tuple[TrafficKeys, TrafficKeys]:
        """(write, read) keys as the record layer holds them now: for kTLS, read back from
        the kernel (key, iv, rec_seq), for userspace from the Session."""
        raise NotImplementedError


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


class UserspaceChannel(ClientChannel):
    """Records sealed and opened in Python (`tls13.Session`), for kernels without kTLS."""

    mode = RecordMode.USERSPACE

    def __init__(self, sock: socket.socket, session: Session) -> None:
        self.sock = sock
        self.session = session
        self._send_lock = threading.Lock()
        self._buf = bytearray(READ_SIZE)
        self.truncated = False

    def _flush(self) -> None:
        with self._send_lock:
            out = self.session.data_to_send()
            if out:
                self.sock.sendall(out)

    def read(self) -> bytes:
        view = memoryview(self._buf)
        while True:
            try:
                event = self.session.next_event()
            except RemoteProtocolError:
                self._flush_quietly()
                raise
            if isinstance(event, ApplicationData):
                return event.data
            if isinstance(event, ConnectionClosed):
                return b""
            if isinstance(event, KeyUpdateReceived):
                self._flush()
                continue
            if event is not NEED_DATA:
                continue
            n = self.sock.recv_into(view)
            if n == 0:
                self.truncated = True  # FIN without close_notify: treat as a half-close
                return b""
            self.session.receive_data(view[:n])

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except OSError:
            pass

    def write(self, data: bytes | memoryview) -> None:
        with self._send_lock:
            self.session.send_data(data)
            self.sock.sendall(self.session.data_to_send())

    def close_write(self) -> None:
        with self._send_lock:
            self.session.send_close_notify()
            self.sock.sendall(self.session.data_to_send())
        _shutdown(self.sock, socket.SHUT_WR)

    def send_fatal_alert(self, description: AlertDescription) -> None:
        self.session.send_alert(description)
        self._flush_quietly()

    def traffic_keys(self) -> tuple[TrafficKeys, TrafficKeys]:
        snap = self.session.snapshot()
        return snap.write, snap.read


class KtlsChannel(ClientChannel):
    """A socket whose records the kernel seals and opens (tls.rst "Kernel TLS")."""

    mode = RecordMode.KTLS_SW

    def __init__(self, sock: socket.socket, handoff: Handoff) -> None:
        self.sock = sock
        self.cipher_suite = handoff.cipher_suite
        self._read_secret = handoff.read.traffic_secret
        self._write_secret = handoff.write.traffic_secret
        self._send_lock = threading.Lock()
        self._write_closed = False
        self.truncated = False
        # Plaintext the handshake already decrypted past Finished: delivered before the socket.
        self._pending = handoff.plaintext

    def read(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        while True:
            content_type, data = ktls.recv_record(self.sock, READ_SIZE)
            if content_type == ContentType.APPLICATION_DATA:
                if not data:
                    self.truncated = True
                return data
            if content_type == ContentType.ALERT:
                if len(data) == 2 and data[1] == AlertDescription.close_notify:
                    return b""
                if len(data) == 2 and data[1] == AlertDescription.user_canceled:
                    continue
                raise RemoteProtocolError(f"client sent alert {data.hex()}", received=data[1] if len(data) == 2 else None)
            if content_type == ContentType.HANDSHAKE:
                self._handle_post_handshake(data)
                continue
            self.send_fatal_alert(AlertDescription.unexpected_message)
            raise RemoteProtocolError(f"record type {content_type} after the handshake", alert=AlertDescription.unexpected_message)

    def _handle_post_handshake(self, data: bytes) -> None:
        if len(data) != 5 or data[0] != HandshakeType.KEY_UPDATE or data[1:4] != b"\x00\x00\x01" or data[4] > 1:
            self.send_fatal_alert(AlertDescription.unexpected_message)
            raise RemoteProtocolError("unexpected post-handshake message", alert=AlertDescription.unexpected_message)
        update_requested = bool(data[4])
        new_read = next_traffic_secret(self.cipher_suite, self._read_secret)
        try:
            ktls.update_rx(self.sock, self.cipher_suite, _keys(self.cipher_suite, new_read))
        except ktls.KtlsError as exc:
            # Linux 6.1 cannot rekey an installed RX: every later record would fail to decrypt.
            # Close cleanly rather than corrupt the stream (the client may reconnect).
            raise RelayClosed(f"client KeyUpdate but {exc}; closing the connection cleanly") from None
        self._read_secret = new_read
        if update_requested:
            with self._send_lock:
                ktls.send_record(self.sock, ContentType.HANDSHAKE, bytes((HandshakeType.KEY_UPDATE, 0, 0, 1, 0)))
                new_write = next_traffic_secret(self.cipher_suite, self._write_secret)
                ktls.update_tx(self.sock, self.cipher_suite, _keys(self.cipher_suite, new_write))
                self._write_secret = new_write

    def write(self, data: bytes | memoryview) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def close_write(self) -> None:
        with self._send_lock:
            if not self._write_closed:
                self._write_closed = True
                ktls.send_record(self.sock, ContentType.ALERT, bytes((AlertLevel.WARNING, AlertDescription.close_notify)))
        _shutdown(self.sock, socket.SHUT_WR)

    def send_fatal_alert(self, description: AlertDescription) -> None:
        with self._send_lock:
            if self._write_closed:
                return
            self._write_closed = True
            try:
                ktls.send_record(self.sock, ContentType.ALERT, bytes((AlertLevel.FATAL, description)))
            except (OSError, ktls.KtlsError):
                pass

    def traffic_keys(self) -> tuple[TrafficKeys, TrafficKeys]:
        state = ktls.read_back(self.sock)
        if state.tx is None or state.rx is None:
            raise ktls.KtlsError("kTLS is not installed in both directions on this socket")
        return (
            TrafficKeys(traffic_secret=self._write_secret, key=state.tx.key, iv=state.tx.iv, rec_seq=state.tx.rec_seq),
            TrafficKeys(traffic_secret=self._read_secret, key=state.rx.key, iv=state.rx.iv, rec_seq=state.rx.rec_seq),
        )


def _keys(cipher_suite: object, secret: bytes) -> TrafficKeys:
    key, iv = derive_traffic_keys(cipher_suite, secret)  # type: ignore[arg-type]
    return TrafficKeys(traffic_secret=secret, key=key, iv=iv, rec_seq=0)


@dataclass
class RelayStats:
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    close_reason: str = ""


class Relay:
    """Both directions of one connection; owns (and closes) the client and backend sockets."""

    def __init__(
        self,
        conn_id: int,
        client: ClientChannel,
        backend: socket.socket,
        *,
        idle_timeout: float | None = 300.0,
        on_done: Callable[[Relay], None] | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.client = client
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.stats = RelayStats()
        self._on_done = on_done
        self._lock = threading.Lock()
        self._ended = 0
        self._closed = False
        self._aborted = False
        for s in (client.sock, backend):
            s.settimeout(idle_timeout)

    # The thread calling run() is the c2b pump; it starts the b2c pump itself.
    def run(self) -> None:
        other = threading.Thread(target=self._pump, args=("b2c",), name=f"is-{self.conn_id}-b2c", daemon=True)
        other.start()
        self._pump("c2b")
        other.join()
        self.close()

    def _read(self, what: str, fn: Callable[[], bytes]) -> bytes:
        while True:
            try:
                return fn()
            except TimeoutError:
                idle = time.monotonic() - self.stats.last_activity
                if self.idle_timeout is not None and idle >= self.idle_timeout:
                    raise RelayClosed(f"idle for {idle:.0f}s") from None

    def _pump(self, direction: str) -> None:
        try:
            if direction == "c2b":
                while True:
                    data = self._read("client", self.client.read)
                    if not data:
                        _shutdown(self.backend, socket.SHUT_WR)
                        return
                    self.stats.last_activity = time.monotonic()
                    self.stats.bytes_from_client += len(data)
                    self.backend.sendall(data)
            else:
                buf = bytearray(READ_SIZE)
                view = memoryview(buf)
                while True:
                    n = self._read("backend", lambda: self.backend.recv_into(view))  # type: ignore[arg-type, return-value]
                    if not n:
                        self.client.close_write()
                        return
                    self.stats.last_activity = time.monotonic()
                    self.stats.bytes_to_client += n  # type: ignore[operator]
                    self.client.write(view[:n])  # type: ignore[misc]
        except RelayClosed as exc:
            self._abort(str(exc), graceful=True)
        except RemoteProtocolError as exc:
            self._abort(f"client protocol error: {exc}")
        except (OSError, ktls.KtlsError) as exc:
            if not self._aborted:
                self._abort(f"{direction}: {exc.__class__.__name__}: {exc}")

    def _abort(self, reason: str, *, graceful: bool = False) -> None:
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            self.stats.close_reason = reason
        if graceful:
            try:
                self.client.close_write()
            except (OSError, ktls.KtlsError):
                pass
        for s in (self.client.sock, self.backend):
            _shutdown(s, socket.SHUT_RDWR)

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
        if not self.stats.close_reason:
            self.stats.close_reason = "closed by both sides"
        if self._on_done is not None:
            self._on_done(self)
