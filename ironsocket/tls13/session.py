"""The connection after the handshake, in userspace (RFC 8446 §5 records, §4.6.3 KeyUpdate, §6.1).

`Session` is the sans-IO record layer used when the kernel cannot carry the connection. It is
built from a `Handoff` and can give one back (`snapshot()`), which is how the userspace mode
survives an exec upgrade: the new program rebuilds the Session from the exact same state.

Key usage (§5.5): before the write key comes within `WRITE_KEY_UPDATE_MARGIN` records of its
AEAD limit the Session sends its own KeyUpdate (update_not_requested) and switches keys. The
last record a write key may protect is only ever used for a fatal alert, so even a Session
built at the limit ends with a clean alert (`RecordLimitReached`), never a reused nonce.

What a peer may make the Session do is bounded by limits.py (empty records in a row,
KeyUpdates without data, post-handshake message size).
"""

from __future__ import annotations

import threading

from .alerts import Alert, AlertUnexpectedMessage, LocalProtocolError, RecordLimitReached, RemoteProtocolError
from .constants import AlertDescription, AlertLevel, CipherSuite, ContentType
from .events import NEED_DATA, ApplicationData, ConnectionClosed, Event, KeyUpdateReceived
from .handoff import Handoff
from .keyschedule import next_traffic_secret
from .limits import WRITE_KEY_UPDATE_MARGIN
from .post_handshake import KEY_UPDATE_NOT_REQUESTED, KEY_UPDATE_REQUESTED, PeerRecords
from .records import HEADER_SIZE, MAX_PLAINTEXT, RecordProtection, SequenceExhausted, split_record

_APPLICATION_DATA = int(ContentType.APPLICATION_DATA)  # per record: an int, not an Enum attribute


class Session:
    """Application data both ways over userspace AEAD, with close_notify and KeyUpdate."""

    def __init__(self, handoff: Handoff) -> None:
        self.cipher_suite: CipherSuite = handoff.cipher_suite
        self._read = RecordProtection.from_keys(handoff.cipher_suite, handoff.read)
        self._write = RecordProtection.from_keys(handoff.cipher_suite, handoff.write)
        self._buffer = bytearray(handoff.unprocessed)
        self._pending_plaintext = handoff.plaintext
        self._send_buffer = bytearray()
        limit = handoff.record_size_limit
        self.max_fragment = MAX_PLAINTEXT if limit is None else min(MAX_PLAINTEXT, limit - 1)
        self.handoff_template = handoff
        self.read_closed = False
        self.write_closed = False
        self.errored = False
        self._peer = PeerRecords()  # alerts, KeyUpdate, the bounds of limits.py (post_handshake.py)
        # The reading side touches the write state only to answer a KeyUpdate; this lock keeps
        # that from racing a writer thread (sealing and queueing stay in record order).
        self._write_lock = threading.Lock()

    # -- receiving -------------------------------------------------------------------------------
    def receive_data(self, data: bytes | memoryview) -> None:
        if self.read_closed and data:
            raise LocalProtocolError("data after close_notify")  # caller must stop reading
        self._buffer += data

    def next_event(self) -> Event | type[NEED_DATA]:
        """Next event from buffered records; raise `RemoteProtocolError` on a protocol error
        (the fatal alert is already queued in `data_to_send()`)."""
        if not self._buffer and not self._pending_plaintext and not self.errored:
            return NEED_DATA  # the common answer, without the framing below
        if self._pending_plaintext:
            data, self._pending_plaintext = self._pending_plaintext, b""
            return ApplicationData(data=data)
        if self.errored:
            raise LocalProtocolError("session already failed")
        try:
            while True:
                if self.read_closed:
                    return NEED_DATA
                framed = split_record(self._buffer)
                if framed is None or len(self._buffer) < framed[2]:
                    return NEED_DATA
                outer_type, header, total = framed
                body = memoryview(self._buffer)[HEADER_SIZE:total]
                if outer_type != _APPLICATION_DATA:
                    body.release()
                    raise AlertUnexpectedMessage(f"plaintext {ContentType(outer_type).name} record after the handshake")
                try:
                    inner_type, content = self._read.open(header, body)
                finally:
                    body.release()
                del self._buffer[:total]
                event = self._handle_record(inner_type, content)
                if event is not None:
                    return event
        except Alert as exc:
            self.errored = True
            self.send_alert(exc.description)
            raise RemoteProtocolError(str(exc), alert=exc.description) from exc

    def _handle_record(self, inner_type: ContentType, content: bytes) -> Event | None:
        try:
            event = self._peer.record(inner_type, content)
        except RemoteProtocolError:  # the client's fatal alert: nothing to answer
            self.errored = True
            raise
        if isinstance(event, ConnectionClosed):
            self.read_closed = True
        elif isinstance(event, KeyUpdateReceived):
            return self.apply_key_update(event.update_requested)
        return event

    def apply_key_update(self, update_requested: bool) -> KeyUpdateReceived:
        """§4.6.3: the peer's next records use the next read secret; answer if asked."""
        secret = next_traffic_secret(self.cipher_suite, self._read.traffic_secret)
        self._read = RecordProtection.from_secret(self.cipher_suite, secret)
        if update_requested:
            self.update_write_key(request_peer_update=False)
        return KeyUpdateReceived(update_requested=update_requested)

    def update_write_key(self, *, request_peer_update: bool) -> None:
        """Send KeyUpdate under the old key, then switch (§4.6.3).

        Raises `SequenceExhausted` (an internal_error `Alert`) if the old key has no record to
        spare for it (see `_seal_locked`); `next_event()` turns that into the fatal alert."""
        with self._write_lock:
            if self.write_closed:
                return
            self._key_update_locked(request_peer_update)

    def _key_update_locked(self, request_peer_update: bool) -> None:
        # §4.6.3 KeyUpdate, built here: the record layer needs no message parser (tlslite-ng is
        # not imported on the restore path of an exec upgrade).
        self._seal_locked(ContentType.HANDSHAKE, KEY_UPDATE_REQUESTED if request_peer_update else KEY_UPDATE_NOT_REQUESTED)
        secret = next_traffic_secret(self.cipher_suite, self._write.traffic_secret)
        self._write = RecordProtection.from_secret(self.cipher_suite, secret)

    def _seal_locked(self, content_type: ContentType, data: bytes | memoryview) -> None:
        """Seal one record (caller holds the write lock). The key's last record is kept for a
        fatal alert; anything else there raises `SequenceExhausted` before a nonce is formed."""
        if content_type is not ContentType.ALERT and self._write.records_left() < 2:
            raise SequenceExhausted(f"write key at its usage limit ({self._write.rec_seq} records)")
        self._send_buffer += self._write.seal(content_type, data)

    # -- sending ---------------------------------------------------------------------------------
    def send_data(self, data: bytes | memoryview) -> None:
        """Seal ``data`` as application_data records (rekeying first near the §5.5 limit).

        Raises `LocalProtocolError` after our close_notify/alert, `RecordLimitReached` if the
        write key is exhausted and cannot be updated (the fatal alert is then queued)."""
        with self._write_lock:
            if self.write_closed:
                raise LocalProtocolError("send after close_notify")
            write = self._write
            if 0 < len(data) <= self.max_fragment and write.records_left() > WRITE_KEY_UPDATE_MARGIN:
                # One record, far from the key's limit (every echo): the loop below, once.
                self._send_buffer += write.seal(_APPLICATION_DATA, data)
                return
            view = memoryview(data)
            try:
                for i in range(0, len(view), self.max_fragment):
                    if self._write.records_left() <= WRITE_KEY_UPDATE_MARGIN:
                        # §5.5 "Implementations SHOULD do a key update ... prior to reaching
                        # these limits": ours, update_not_requested (the peer's key is its own).
                        self._key_update_locked(request_peer_update=False)
                    self._seal_locked(ContentType.APPLICATION_DATA, view[i : i + self.max_fragment])
            except SequenceExhausted as exc:
                self._send_alert_locked(AlertDescription.internal_error)
                raise RecordLimitReached(str(exc)) from exc

    def send_close_notify(self) -> None:
        if not self.write_closed:
            self.send_alert(AlertDescription.close_notify)

    def send_alert(self, description: AlertDescription) -> None:
        with self._write_lock:
            self._send_alert_locked(description)

    def _send_alert_locked(self, description: AlertDescription) -> None:
        level = AlertLevel.WARNING if description == AlertDescription.close_notify else AlertLevel.FATAL
        if self.write_closed:
            return
        self.write_closed = True
        if self._write.records_left() < 1:
            return  # not one record left under this key: closing without an alert is all we can do
        self._seal_locked(ContentType.ALERT, bytes((level, description)))

    def data_to_send(self) -> bytes:
        with self._write_lock:
            out = bytes(self._send_buffer)
            self._send_buffer.clear()
        return out

    # -- state -----------------------------------------------------------------------------------
    def snapshot(self) -> Handoff:
        """The exact state now (for an exec upgrade); only valid with no buffered records."""
        t = self.handoff_template
        return Handoff(
            cipher_suite=t.cipher_suite,
            group=t.group,
            read=self._read.traffic_keys(),
            write=self._write.traffic_keys(),
            server_name=t.server_name,
            alpn_protocol=t.alpn_protocol,
            plaintext=self._pending_plaintext,
            unprocessed=bytes(self._buffer),
            record_size_limit=t.record_size_limit,
        )
