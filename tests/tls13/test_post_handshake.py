"""tls13/post_handshake.py: the one reader of what a client sends after the handshake.

Both record layers use it (userspace Session, kTLS control records); the end-to-end paths are in
tests/tls13/test_session.py, tests/test_ktls_rekey.py and the VM's kTLS suites.
"""

from __future__ import annotations

import pytest

from ironsocket.tls13.alerts import Alert, RemoteProtocolError
from ironsocket.tls13.constants import AlertDescription, AlertLevel, ContentType
from ironsocket.tls13.events import AlertReceived, ApplicationData, ConnectionClosed, KeyUpdateReceived
from ironsocket.tls13.limits import MAX_CONSECUTIVE_EMPTY_RECORDS, MAX_KEY_UPDATES_WITHOUT_DATA
from ironsocket.tls13.post_handshake import KEY_UPDATE_NOT_REQUESTED, KEY_UPDATE_REQUESTED, PeerRecords

HS, ALERT, DATA = ContentType.HANDSHAKE, ContentType.ALERT, ContentType.APPLICATION_DATA


def alert(description: AlertDescription, level: AlertLevel = AlertLevel.FATAL) -> bytes:
    return bytes((level, description))


def raises_alert(peer: PeerRecords, inner_type: int, content: bytes) -> AlertDescription:
    with pytest.raises(Alert) as info:
        peer.record(inner_type, content)
    return info.value.description


def test_data_is_delivered() -> None:
    assert PeerRecords().record(DATA, b"hello") == ApplicationData(data=b"hello")


def test_close_notify_and_user_canceled() -> None:
    peer = PeerRecords()
    assert peer.record(ALERT, alert(AlertDescription.user_canceled, AlertLevel.WARNING)) == \
        AlertReceived(description=AlertDescription.user_canceled)
    assert isinstance(peer.record(ALERT, alert(AlertDescription.close_notify, AlertLevel.WARNING)), ConnectionClosed)


@pytest.mark.parametrize("code, name", [(AlertDescription.handshake_failure, "handshake_failure"), (250, "250")])
def test_fatal_alert_received(code: int, name: str) -> None:
    with pytest.raises(RemoteProtocolError, match=f"client sent alert {name}$") as info:
        PeerRecords().record(ALERT, bytes((AlertLevel.FATAL, code)))
    assert info.value.received == code and info.value.alert is None  # nothing to answer


@pytest.mark.parametrize("content, expected", [
    (b"", AlertDescription.unexpected_message),  # §5.4: no zero-length alert
    (b"\x02", AlertDescription.decode_error),
    (b"\x02\x28\x00", AlertDescription.decode_error),
])
def test_malformed_alert(content: bytes, expected: AlertDescription) -> None:
    assert raises_alert(PeerRecords(), ALERT, content) is expected


@pytest.mark.parametrize("message, requested", [(KEY_UPDATE_NOT_REQUESTED, False), (KEY_UPDATE_REQUESTED, True)])
def test_key_update_whole_or_split(message: bytes, requested: bool) -> None:
    assert PeerRecords().record(HS, message) == KeyUpdateReceived(update_requested=requested)
    split = PeerRecords()
    assert split.record(HS, message[:2]) is None
    assert split.record(HS, message[2:4]) is None
    assert split.record(HS, message[4:]) == KeyUpdateReceived(update_requested=requested)


@pytest.mark.parametrize("records, expected", [
    ([KEY_UPDATE_REQUESTED + b"\x18"], AlertDescription.unexpected_message),  # §5.1: KeyUpdate ends its record
    ([b"\x18\x00\x00\x01\x02"], AlertDescription.illegal_parameter),  # request_update 2
    ([b"\x18\x00\x00\x02\x00\x00"], AlertDescription.decode_error),
    ([b"\x04\x00\x00\x01\x00"], AlertDescription.unexpected_message),  # a NewSessionTicket from a client
    ([b"\x18\x00\x10\x00"], AlertDescription.unexpected_message),  # 4 KiB: over the post-handshake bound
    ([b""], AlertDescription.unexpected_message),  # §5.4
])
def test_bad_post_handshake_messages(records: list[bytes], expected: AlertDescription) -> None:
    peer = PeerRecords()
    for content in records[:-1]:
        peer.record(HS, content)
    assert raises_alert(peer, HS, records[-1]) is expected


def test_data_inside_a_split_handshake_message() -> None:
    peer = PeerRecords()
    assert peer.record(HS, KEY_UPDATE_REQUESTED[:3]) is None
    assert raises_alert(peer, DATA, b"x") is AlertDescription.unexpected_message


@pytest.mark.parametrize("inner_type", [ContentType.CHANGE_CIPHER_SPEC, 99])
def test_other_record_types(inner_type: int) -> None:
    assert raises_alert(PeerRecords(), inner_type, b"\x01") is AlertDescription.unexpected_message


def test_key_updates_without_data_are_bounded_and_data_resets() -> None:
    peer = PeerRecords()
    for _ in range(MAX_KEY_UPDATES_WITHOUT_DATA):
        peer.record(HS, KEY_UPDATE_NOT_REQUESTED)
    peer.data_seen()  # kTLS: the pump spliced data
    for _ in range(MAX_KEY_UPDATES_WITHOUT_DATA):
        peer.record(HS, KEY_UPDATE_NOT_REQUESTED)
    peer.record(DATA, b"x")  # userspace: a record with content
    for _ in range(MAX_KEY_UPDATES_WITHOUT_DATA):
        peer.record(HS, KEY_UPDATE_NOT_REQUESTED)
    assert raises_alert(peer, HS, KEY_UPDATE_NOT_REQUESTED) is AlertDescription.unexpected_message


def test_empty_records_are_bounded() -> None:
    peer = PeerRecords()
    for _ in range(MAX_CONSECUTIVE_EMPTY_RECORDS):
        assert peer.record(DATA, b"") is None
    peer.record(DATA, b"x")
    for _ in range(MAX_CONSECUTIVE_EMPTY_RECORDS):
        peer.record(DATA, b"")
    assert raises_alert(peer, DATA, b"") is AlertDescription.unexpected_message
