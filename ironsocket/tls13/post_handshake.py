"""What a client may send after the handshake besides application data, sans-IO.

RFC 8446 §6 (alerts) and §4.6 (post-handshake messages: for a server that sends no
CertificateRequest and takes no post-handshake authentication, only KeyUpdate, §4.6.3), with the
bounds of limits.py. Both record layers use this one reader: the userspace `session.Session`
feeds it every opened record, the kernel's record layer (`relay.KtlsChannel`) the control
records kTLS hands up (tls.rst "Receive TLS control messages"). So an alert, a KeyUpdate, a
split or oversized post-handshake message or a flood of KeyUpdates gets the same answer
whichever layer holds the keys.

`PeerRecords.record(inner_type, content)` returns an event (`ApplicationData`,
`ConnectionClosed`, `AlertReceived` for user_canceled, `KeyUpdateReceived`) or None (nothing to
report yet), raises the `Alert` the RFC names for a malformed record (the caller sends it and
fails the connection), or `RemoteProtocolError` (``received``) when the client sent a fatal
alert. Acting on a KeyUpdate (the next read key, an answer) is the record layer's: this module
holds no keys.
"""

from __future__ import annotations

from .alerts import AlertDecodeError, AlertIllegalParameter, AlertUnexpectedMessage, RemoteProtocolError
from .constants import AlertDescription, ContentType, HandshakeType
from .events import AlertReceived, ApplicationData, ConnectionClosed, Event, KeyUpdateReceived
from .limits import MAX_CONSECUTIVE_EMPTY_RECORDS, MAX_KEY_UPDATES_WITHOUT_DATA, MAX_POST_HANDSHAKE_MESSAGE_SIZE

# -- KeyUpdate (§4.6.3), as the record layers send it ------------------------------------------------
KEY_UPDATE_NOT_REQUESTED = bytes((HandshakeType.KEY_UPDATE, 0, 0, 1, 0))
KEY_UPDATE_REQUESTED = bytes((HandshakeType.KEY_UPDATE, 0, 0, 1, 1))
_APPLICATION_DATA = int(ContentType.APPLICATION_DATA)


def parse_key_update(message: bytes) -> bool:
    """One whole post-handshake message (4-byte header included) that must be a KeyUpdate:
    return its request_update (True: update_requested). Raises the `Alert` §4.6.3 names."""
    if len(message) < 4 or message[0] != HandshakeType.KEY_UPDATE:
        kind = message[0] if message else None
        raise AlertUnexpectedMessage(f"post-handshake message type {kind} not expected")
    if int.from_bytes(message[1:4], "big") != 1 or len(message) != 5:
        raise AlertDecodeError("KeyUpdate body must be one byte")
    if message[4] not in (0, 1):
        # §4.6.3: any request_update other than 0 or 1 MUST be illegal_parameter.
        raise AlertIllegalParameter(f"KeyUpdate request_update {message[4]} is neither 0 nor 1")
    return bool(message[4])


class PeerRecords:
    """The client's records after the handshake, as events; see the module doc."""

    def __init__(self) -> None:
        self._handshake_buffer = bytearray()  # a post-handshake message split across records
        self._empty_records = 0  # application-data records with no content, in a row
        self.key_updates_without_data = 0  # KeyUpdates since the client's last data

    def record(self, inner_type: int, content: bytes) -> Event | None:
        """One opened record (its TLSInnerPlaintext type and content)."""
        if inner_type == _APPLICATION_DATA:  # per record: an int, not an Enum attribute
            if content and not self._handshake_buffer:
                self._empty_records = self.key_updates_without_data = 0
                return ApplicationData(data=content)
            return self._application_data(content)
        if inner_type == ContentType.ALERT:
            return self._alert(content)
        if inner_type == ContentType.HANDSHAKE:
            return self._handshake(content)
        name = ContentType(inner_type).name if inner_type in ContentType._value2member_map_ else str(inner_type)
        raise AlertUnexpectedMessage(f"{name} record after the handshake")

    def data_seen(self) -> None:
        """The client sent application data the caller moved without `record` (kTLS splice)."""
        self._empty_records = self.key_updates_without_data = 0

    def _application_data(self, content: bytes) -> Event | None:
        if self._handshake_buffer:
            raise AlertUnexpectedMessage("application data interleaved with a handshake message")
        if content:
            self.data_seen()
            return ApplicationData(data=content)
        self._empty_records += 1
        if self._empty_records > MAX_CONSECUTIVE_EMPTY_RECORDS:
            raise AlertUnexpectedMessage(f"more than {MAX_CONSECUTIVE_EMPTY_RECORDS} empty records in a row")
        return None

    def _alert(self, content: bytes) -> Event:
        if not content:
            # §5.4: Handshake and Alert records MUST NOT have a zero-length
            # TLSInnerPlaintext.content; receiving one MUST be unexpected_message.
            raise AlertUnexpectedMessage("alert record with no content (§5.4)")
        if len(content) != 2:
            raise AlertDecodeError("alert record must be two bytes")
        code = content[1]
        if code == AlertDescription.close_notify:
            return ConnectionClosed()
        if code == AlertDescription.user_canceled:
            return AlertReceived(description=AlertDescription.user_canceled)
        try:
            received: AlertDescription | int = AlertDescription(code)
        except ValueError:
            received = code
        name = received.name if isinstance(received, AlertDescription) else str(received)
        raise RemoteProtocolError(f"client sent alert {name}", received=received)

    def _handshake(self, content: bytes) -> Event | None:
        if not content:
            raise AlertUnexpectedMessage("handshake record with no content (§5.4)")
        self._handshake_buffer += content
        if len(self._handshake_buffer) < 4:
            return None
        length = int.from_bytes(self._handshake_buffer[1:4], "big")
        if length > MAX_POST_HANDSHAKE_MESSAGE_SIZE:
            raise AlertUnexpectedMessage("post-handshake message too large")
        if len(self._handshake_buffer) < 4 + length:
            return None
        message = bytes(self._handshake_buffer[: 4 + length])
        del self._handshake_buffer[: 4 + length]
        update_requested = parse_key_update(message)
        if self._handshake_buffer:
            raise AlertUnexpectedMessage("KeyUpdate must end its record (§5.1)")
        self.key_updates_without_data += 1
        if self.key_updates_without_data > MAX_KEY_UPDATES_WITHOUT_DATA:
            raise AlertUnexpectedMessage(f"more than {MAX_KEY_UPDATES_WITHOUT_DATA} KeyUpdates without application data")
        return KeyUpdateReceived(update_requested=update_requested)
