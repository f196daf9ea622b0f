"""RFC 8446 conformance: one test per MUST / MUST NOT the server used to break (issue 12).

Each test is named after the section whose sentence it checks (``test_s<section>_...``) and
quotes that sentence; docs/conformance.md maps the RFC's server-side MUSTs of §4–§6 to these
tests and to the older ones in test_server.py, test_records.py and test_state.py.

The engine and the Session are driven in memory with the hand-built `Client` of test_server.py
(exact bytes, so each test breaks exactly one rule). No mocks unless a test says so.
"""

from __future__ import annotations

import pytest

from ironsocket.tls13.alerts import LocalProtocolError, RemoteProtocolError
from ironsocket.tls13.constants import AlertDescription as AD, ContentType, ExtensionType as Ext, HandshakeType
from ironsocket.tls13.events import NEED_DATA, ApplicationData, ClientHelloReceived, HandshakeComplete, KeyUpdateReceived
from ironsocket.tls13.messages import key_update
from ironsocket.tls13.server import TLSServer
from ironsocket.tls13.session import Session
from tests.helpers import config, drain
from tests.tls13.test_server import (
    Client,
    assert_alert,
    hs_message,
    open_one,
    record,
    server_flight,
    session_pair,
)


def assert_session_alert(session: Session, client: Client, description: AD) -> None:
    """`next_event()` raises RemoteProtocolError(alert=description), the fatal alert is queued
    under the server's application key, and the Session refuses to go on."""
    assert client.app_read is not None
    with pytest.raises(RemoteProtocolError) as info:
        while session.next_event() is not NEED_DATA:
            pass
    assert info.value.alert is description
    assert open_one(client.app_read, session.data_to_send()) == (ContentType.ALERT, bytes([2, description]))
    with pytest.raises(LocalProtocolError):
        session.next_event()


# == §4.6.3 KeyUpdate =============================================================================
@pytest.mark.parametrize("request_update", [2, 0x7F, 0xFF])
def test_s4_6_3_key_update_bad_request_update_is_illegal_parameter(request_update: int) -> None:
    # §4.6.3: "If an implementation receives any other value [than 0 or 1], it MUST terminate
    # the connection with an "illegal_parameter" alert."
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.HANDSHAKE, hs_message(HandshakeType.KEY_UPDATE, bytes([request_update]))))
    assert_session_alert(session, client, AD.illegal_parameter)


def test_s4_6_3_key_update_of_wrong_length_is_decode_error() -> None:
    # §6.2 decode_error: "A message could not be decoded because some field was out of the
    # specified range or the length of the message was incorrect."
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.HANDSHAKE, hs_message(HandshakeType.KEY_UPDATE, b"\x00\x00")))
    assert_session_alert(session, client, AD.decode_error)


# == §5.4 zero-length content, all-zero plaintext ===============================================
@pytest.mark.parametrize("padding", [0, 1, 100])
@pytest.mark.parametrize("inner_type", [ContentType.ALERT, ContentType.HANDSHAKE])
def test_s5_4_session_zero_length_alert_or_handshake_is_unexpected_message(inner_type: ContentType, padding: int) -> None:
    # §5.4: "Implementations MUST NOT send Handshake and Alert records that have a zero-length
    # TLSInnerPlaintext.content; if such a message is received, the receiving implementation
    # MUST terminate the connection with an "unexpected_message" alert." (With or without
    # padding: §5.1 "zero-length fragments of Handshake types, even if those fragments contain
    # padding" and §6 "a record with an Alert type MUST contain exactly one message".)
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(inner_type, b"", padding=padding))
    assert_session_alert(session, client, AD.unexpected_message)


@pytest.mark.parametrize("padding", [0, 100])
@pytest.mark.parametrize("inner_type", [ContentType.ALERT, ContentType.HANDSHAKE])
def test_s5_4_handshake_zero_length_alert_or_handshake_is_unexpected_message(inner_type: ContentType, padding: int) -> None:
    # The same §5.4 sentence, under the client handshake traffic key (before Finished).
    client = Client()
    engine = server_flight(client)
    assert client.write
    engine.receive_data(client.write.seal(inner_type, b"", padding=padding))
    assert_alert(engine, AD.unexpected_message, read=client.app_read)


def test_s5_4_thousand_zero_length_encrypted_handshake_fragments_stop_at_the_first() -> None:
    # Issue 12: 1,000 zero-length encrypted handshake fragments before Finished used to be
    # absorbed one by one; §5.4 makes the first one fatal.
    client = Client()
    engine = server_flight(client)
    assert client.write
    engine.receive_data(b"".join(client.write.seal(ContentType.HANDSHAKE, b"") for _ in range(1000)))
    assert_alert(engine, AD.unexpected_message, read=client.app_read)


@pytest.mark.parametrize("padding", [0, 1, 50])
def test_s5_4_all_zero_plaintext_after_the_handshake_is_unexpected_message(padding: int) -> None:
    # §5.4: "If a receiving implementation does not find a non-zero octet in the cleartext, it
    # MUST terminate the connection with an "unexpected_message" alert." (inner type 0)
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.INVALID, b"", padding=padding))
    assert_session_alert(session, client, AD.unexpected_message)


def test_s5_4_all_zero_plaintext_is_not_skipped_as_early_data() -> None:
    # §5.4 again, while §4.2.10 early-data skipping is active: skipping is for records that
    # fail deprotection; one that decrypts to all zeros is an error, not rejected 0-RTT data.
    client = Client()
    engine = TLSServer(config())
    engine.receive_data(client.hello_record(exts=client.extensions() + [(Ext.EARLY_DATA, b"")]))
    drain(engine)
    client.receive(engine.data_to_send())
    assert client.write
    engine.receive_data(client.write.seal(ContentType.INVALID, b"", padding=20))
    assert_alert(engine, AD.unexpected_message, read=client.app_read)
