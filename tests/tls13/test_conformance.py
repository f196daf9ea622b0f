"""RFC 8446 conformance: one test per MUST / MUST NOT the server used to break (issue 12).

Each test is named after the section whose sentence it checks (``test_s<section>_...``) and
quotes that sentence; docs/conformance.md maps the RFC's server-side MUSTs of §4–§6 to these
tests and to the older ones in test_server.py, test_records.py and test_state.py.

The engine and the Session are driven in memory with the hand-built `Client` of test_server.py
(exact bytes, so each test breaks exactly one rule). No mocks unless a test says so.
"""

from __future__ import annotations

import dataclasses

import pytest

from ironsocket.tls13 import records, session as session_mod

from ironsocket.tls13.alerts import LocalProtocolError, RecordLimitReached, RemoteProtocolError
from ironsocket.tls13.constants import (
    AlertDescription as AD,
    ContentType,
    ExtensionType as Ext,
    Group,
    HandshakeType,
    SignatureScheme,
)
from ironsocket.tls13.keyschedule import next_traffic_secret
from ironsocket.tls13.limits import (
    MAX_CHANGE_CIPHER_SPEC_RECORDS,
    MAX_CLIENT_HELLO_SIZE,
    MAX_CONSECUTIVE_EMPTY_RECORDS,
    MAX_EARLY_DATA_SKIP,
    MAX_KEY_UPDATES_WITHOUT_DATA,
)
from ironsocket.tls13.records import AES_GCM_RECORD_LIMIT, RecordProtection
from ironsocket.tls13.events import NEED_DATA, ApplicationData, ClientHelloReceived, HandshakeComplete, KeyUpdateReceived
from ironsocket.tls13.messages import key_update
from ironsocket.tls13.server import TLSServer
from ironsocket.tls13.session import Session
from tests.helpers import config, drain
from tests.tls13.test_server import (
    Client,
    hello_with,
    ints16,
    u16,
    _after_hrr,
    _hrr_client,
    assert_alert,
    hs_message,
    open_one,
    record,
    connect,
    server_flight,
    session_pair,
    split_records,
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


# == §4.1.2 ClientHello size ======================================================================
def _fragmented(hello: bytes) -> bytes:
    return b"".join(record(ContentType.HANDSHAKE, hello[i : i + 2**14]) for i in range(0, len(hello), 2**14))


# Client's extensions block is 63 + 2n bytes with n signature schemes (supported_groups 8,
# signature_algorithms 6 + 2n, supported_versions 7, one x25519 key share 42).
FULL_EXTENSIONS_BLOCK_SIGALGS = (0xFFFF - 63) // 2  # 32,736: a block of 2^16 - 1 bytes


@pytest.mark.parametrize("count", [30_000, FULL_EXTENSIONS_BLOCK_SIGALGS])
def test_s4_2_3_client_hello_with_a_huge_signature_algorithms_list_is_tolerated(count: int) -> None:
    # §4.2.3 SignatureSchemeList is supported_signature_algorithms<2..2^16-2>, inside the
    # §4.1.2 extensions<8..2^16-1> block: a list of ~32,700 entries is legal (tlsfuzzer's
    # "tolerance" case). The one we support is last: the handshake must succeed. The largest
    # case makes the ClientHello body 65,582 bytes, past the old 64 KiB message cap.
    unknown = tuple(s for s in range(0x0A01, 0x0A01 + count + 10) if s not in set(SignatureScheme))[: count - 1]
    client = Client(sigalgs=unknown + (SignatureScheme.ECDSA_SECP256R1_SHA256,))
    assert sum(4 + len(d) for _, d in client.extensions()) == 63 + 2 * count
    hello = client.hello()
    engine = TLSServer(config())
    engine.receive_data(_fragmented(hello))
    assert [type(e) for e in drain(engine)] == [ClientHelloReceived]
    client.receive(engine.data_to_send())
    engine.receive_data(client.finished_record())
    (done,) = drain(engine)
    assert isinstance(done, HandshakeComplete) and done.signature_scheme is SignatureScheme.ECDSA_SECP256R1_SHA256


def test_s4_1_2_client_hello_longer_than_the_struct_allows_is_illegal_parameter() -> None:
    # The §4.1.2 struct bounds a ClientHello body at MAX_CLIENT_HELLO_SIZE bytes (limits.py);
    # a declared length past that is refused as soon as the 4-byte header is in.
    assert MAX_CLIENT_HELLO_SIZE == 131396
    header = bytes([HandshakeType.CLIENT_HELLO]) + (MAX_CLIENT_HELLO_SIZE + 1).to_bytes(3, "big")
    engine = TLSServer(config())
    engine.receive_data(record(ContentType.HANDSHAKE, header + bytes(100)))
    assert_alert(engine, AD.illegal_parameter)


# == §5 / Appendix D.4 change_cipher_spec =========================================================
def test_s5_change_cipher_spec_flood_before_finished_is_unexpected_message() -> None:
    # §5: a change_cipher_spec 0x01 between the first ClientHello and the peer's Finished
    # "MUST simply [be dropped]" - the one a middlebox-compatible client sends (Appendix D.4).
    # Issue 12: 200,000 of them were all dropped for free; past MAX_CHANGE_CIPHER_SPEC_RECORDS
    # (limits.py) the engine stops with unexpected_message.
    client = Client()
    engine = server_flight(client)
    ccs = record(ContentType.CHANGE_CIPHER_SPEC, b"\x01")
    engine.receive_data(ccs * 200_000 + client.finished_record())
    assert_alert(engine, AD.unexpected_message, read=client.app_read)


def test_s5_change_cipher_spec_allowed_count_is_still_dropped() -> None:
    client = Client()
    engine = server_flight(client)
    ccs = record(ContentType.CHANGE_CIPHER_SPEC, b"\x01")
    engine.receive_data(ccs * MAX_CHANGE_CIPHER_SPEC_RECORDS + client.finished_record())
    assert [type(e) for e in drain(engine)] == [HandshakeComplete]


def test_s5_change_cipher_spec_before_the_second_client_hello_is_dropped() -> None:
    # Appendix D.4: after a HelloRetryRequest the client's one CCS may come before its second
    # ClientHello "or before its encrypted handshake flight" - not both, and it is one record.
    client = _hrr_client(session_id=b"\x07" * 32)
    engine = _after_hrr(client)
    ccs = record(ContentType.CHANGE_CIPHER_SPEC, b"\x01")
    engine.receive_data(ccs + client.second_hello_record())
    assert [type(e) for e in drain(engine)] == [ClientHelloReceived]
    client.receive(engine.data_to_send())
    engine.receive_data(client.finished_record())
    assert [type(e) for e in drain(engine)] == [HandshakeComplete]


# == §4.2.10 0-RTT after HelloRetryRequest ========================================================
def _early_hrr_client() -> tuple[Client, TLSServer]:
    client = _hrr_client()
    client_exts = client.extensions() + [(Ext.EARLY_DATA, b"")]
    engine = TLSServer(config(groups=(Group.X25519,)))
    engine.receive_data(client.hello_record(exts=client_exts))
    assert drain(engine) == []
    client.receive(engine.data_to_send())
    assert client.hrr_group is not None
    return client, engine


def test_s4_2_10_early_data_after_hello_retry_request_is_skipped() -> None:
    # §4.2.10: a server that answers with a HelloRetryRequest "then ignores early data by
    # skipping all records with an external content type of "application_data" (indicating
    # that they are encrypted), up to the configured max_early_data_size."
    client, engine = _early_hrr_client()
    early = record(ContentType.APPLICATION_DATA, bytes(300))
    engine.receive_data(early + early + early)
    assert drain(engine) == []
    engine.receive_data(client.second_hello_record())
    assert [type(e) for e in drain(engine)] == [ClientHelloReceived]
    client.receive(engine.data_to_send())
    engine.receive_data(client.finished_record())
    (done,) = drain(engine)
    assert isinstance(done, HandshakeComplete) and done.hello_retry


def test_s4_2_10_early_data_after_hello_retry_request_beyond_the_budget_is_unexpected_message() -> None:
    # "... up to the configured max_early_data_size": one byte past MAX_EARLY_DATA_SKIP
    # (header included) is no longer skipped.
    client, engine = _early_hrr_client()
    chunk = record(ContentType.APPLICATION_DATA, bytes(2**14))
    n = MAX_EARLY_DATA_SKIP // len(chunk) + 1
    engine.receive_data(chunk * n)
    assert_alert(engine, AD.unexpected_message)


def test_s4_2_10_skipping_stops_at_the_second_client_hello() -> None:
    # The second ClientHello carries no early_data (§4.2.10 "A client MUST NOT include the
    # early_data extension in its followup ClientHello"), so an undecryptable record after it
    # is bad_record_mac, not skipped 0-RTT data.
    client, engine = _early_hrr_client()
    engine.receive_data(client.second_hello_record())
    drain(engine)
    client.receive(engine.data_to_send())
    engine.receive_data(record(ContentType.APPLICATION_DATA, bytes(100)))
    assert_alert(engine, AD.bad_record_mac, read=client.app_read)


def test_s4_2_10_early_data_without_the_extension_after_hrr_is_unexpected_message() -> None:
    # No early_data offered: application_data before the second ClientHello is not 0-RTT.
    client = _hrr_client()
    engine = _after_hrr(client)
    engine.receive_data(record(ContentType.APPLICATION_DATA, bytes(100)))
    assert_alert(engine, AD.unexpected_message)


def test_s4_2_10_empty_records_do_not_skip_for_free() -> None:
    # Each skipped record costs its 5-byte header too: zero-length application_data records
    # used to be skipped without touching the budget, i.e. without end.
    client = Client()
    engine = TLSServer(config())
    engine.receive_data(client.hello_record(exts=client.extensions() + [(Ext.EARLY_DATA, b"")]))
    drain(engine)
    client.receive(engine.data_to_send())
    empty = record(ContentType.APPLICATION_DATA, b"")
    engine.receive_data(empty * (MAX_EARLY_DATA_SKIP // 5 + 1))
    assert_alert(engine, AD.bad_record_mac, read=client.app_read)


# == caps after the handshake (issue 12 item 9; limits.py) ========================================
def test_s5_1_empty_application_data_flood_is_unexpected_message() -> None:
    # §5.1: "Zero-length fragments of Application Data MAY be sent", but 100,000 in a row carry
    # nothing: past MAX_CONSECUTIVE_EMPTY_RECORDS the Session stops with unexpected_message.
    session, client = session_pair()
    assert client.app_write
    session.receive_data(b"".join(client.app_write.seal(ContentType.APPLICATION_DATA, b"") for _ in range(100_000)))
    assert_session_alert(session, client, AD.unexpected_message)


def test_s5_1_empty_application_data_records_up_to_the_cap_are_fine() -> None:
    # Up to the cap in a row (with or without padding), then data, then again up to the cap.
    session, client = session_pair()
    assert client.app_write
    w = client.app_write
    burst = b"".join(w.seal(ContentType.APPLICATION_DATA, b"", padding=i % 3) for i in range(MAX_CONSECUTIVE_EMPTY_RECORDS))
    session.receive_data(burst + w.seal(ContentType.APPLICATION_DATA, b"x"))
    assert session.next_event() == ApplicationData(data=b"x")
    session.receive_data(b"".join(w.seal(ContentType.APPLICATION_DATA, b"") for _ in range(MAX_CONSECUTIVE_EMPTY_RECORDS)))
    assert session.next_event() is NEED_DATA


def _key_update_burst(client: Client, count: int, *, requested: bool) -> bytes:
    """``count`` KeyUpdates from the client, each under the key the previous one announced."""
    assert client.app_write and client.suite
    out = []
    write = client.app_write
    for _ in range(count):
        out.append(write.seal(ContentType.HANDSHAKE, key_update(requested)))
        write = RecordProtection.from_secret(client.suite, next_traffic_secret(client.suite, write.traffic_secret))
    client.app_write = write
    return b"".join(out)


def test_s4_6_3_key_update_burst_is_unexpected_message() -> None:
    # Issue 12: 20,000 KeyUpdate(update_requested) in a burst were each answered (an HKDF, a
    # new key and a record out per record in). Past MAX_KEY_UPDATES_WITHOUT_DATA without
    # application data in between, the Session stops with unexpected_message.
    session, client = session_pair()
    assert client.app_read
    session.receive_data(_key_update_burst(client, 20_000, requested=True))
    answers = 0
    with pytest.raises(RemoteProtocolError) as info:
        while session.next_event() is not NEED_DATA:
            answers += 1
    assert info.value.alert is AD.unexpected_message
    assert answers == MAX_KEY_UPDATES_WITHOUT_DATA
    # Out: one KeyUpdate(update_not_requested) per accepted request, then the alert, each under
    # the key the previous KeyUpdate announced.
    read = client.app_read
    out = split_records(session.data_to_send())
    assert len(out) == answers + 1
    for header, body in out[:-1]:
        assert read.open(header, body) == (ContentType.HANDSHAKE, key_update(False))
        read = RecordProtection.from_secret(read.cipher_suite, next_traffic_secret(read.cipher_suite, read.traffic_secret))
    assert read.open(*out[-1]) == (ContentType.ALERT, bytes([2, AD.unexpected_message]))


def test_s4_6_3_key_updates_between_application_data_are_not_capped() -> None:
    # Data resets the count: a client that rekeys after every record is within the rules.
    session, client = session_pair()
    for i in range(3 * MAX_KEY_UPDATES_WITHOUT_DATA):
        session.receive_data(_key_update_burst(client, 1, requested=False))
        assert client.app_write
        session.receive_data(client.app_write.seal(ContentType.APPLICATION_DATA, b"%d" % i))
        assert session.next_event() == KeyUpdateReceived(update_requested=False)
        assert session.next_event() == ApplicationData(data=b"%d" % i)


# == §5.5 AES-GCM usage limit on the write side ===================================================
def test_s5_5_session_updates_its_write_key_before_the_aes_gcm_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # §5.5: "For AES-GCM, up to 2^24.5 full-size records (about 24 million) may be encrypted on
    # a given connection" and "Implementations SHOULD do a key update as described in
    # Section 4.6.3 prior to reaching these limits". Mocked: 2^24.5 records cannot be sealed in
    # a test, so records.AES_GCM_RECORD_LIMIT and session.WRITE_KEY_UPDATE_MARGIN are made
    # small with monkeypatch; the code that counts and rekeys is the real one.
    monkeypatch.setattr(records, "AES_GCM_RECORD_LIMIT", 40)
    monkeypatch.setattr(session_mod, "WRITE_KEY_UPDATE_MARGIN", 5)
    session, client = session_pair()
    assert client.app_read and client.suite
    read, updates, per_key = client.app_read, 0, 0
    for i in range(200):
        session.send_data(b"%d" % i)
        for header, body in split_records(session.data_to_send()):
            content_type, content = read.open(header, body)
            per_key += 1
            if content_type == ContentType.HANDSHAKE:
                assert content == key_update(False)  # update_not_requested: only our key changes
                assert read.rec_seq - 1 == 40 - 5  # sealed with sequence number 35: 5 were left
                read = RecordProtection.from_secret(client.suite, next_traffic_secret(client.suite, read.traffic_secret))
                updates, per_key = updates + 1, 0
            else:
                assert (content_type, content) == (ContentType.APPLICATION_DATA, b"%d" % i)
    assert updates == 200 // 35  # each key: 35 data records, then the KeyUpdate
    assert session.snapshot().write.rec_seq == per_key


def test_s5_5_write_key_at_the_limit_ends_with_an_alert_not_a_reused_nonce() -> None:
    # §5.3: "If a TLS implementation would need to wrap a sequence number, it MUST either rekey
    # (Section 4.6.3) or terminate the connection." A Session built (e.g. after an upgrade)
    # with one record left cannot even rekey: that record carries the internal_error alert and
    # send_data raises RecordLimitReached; nothing is sealed with a nonce twice.
    engine, client, _ = connect()
    handoff = engine.handoff()
    last = AES_GCM_RECORD_LIMIT - 1
    session = Session(dataclasses.replace(handoff, write=dataclasses.replace(handoff.write, rec_seq=last)))
    with pytest.raises(RecordLimitReached):
        session.send_data(b"one too many")
    receiver = RecordProtection.from_keys(handoff.cipher_suite, dataclasses.replace(handoff.write, rec_seq=last))
    assert open_one(receiver, session.data_to_send()) == (ContentType.ALERT, bytes([2, AD.internal_error]))
    with pytest.raises(LocalProtocolError):
        session.send_data(b"more")
    session.send_close_notify()  # the relay's way out must not raise either
    assert session.data_to_send() == b""


def test_s5_5_write_key_past_the_limit_closes_without_sealing() -> None:
    engine, client, _ = connect()
    handoff = engine.handoff()
    session = Session(dataclasses.replace(handoff, write=dataclasses.replace(handoff.write, rec_seq=AES_GCM_RECORD_LIMIT)))
    with pytest.raises(RecordLimitReached):
        session.send_data(b"x")
    assert session.data_to_send() == b""  # no record left even for the alert
    session.send_alert(AD.internal_error)  # does not raise
    assert session.data_to_send() == b""


def test_s5_5_read_key_at_the_limit_is_a_clean_alert() -> None:
    # The read side keeps the AES-GCM limit; a client that never rekeys past it used to make
    # records.py raise a bare Exception out of next_event (the relay logged a crash). Now it
    # is the Session's one error boundary: a queued internal_error alert and RemoteProtocolError.
    engine, client, _ = connect()
    handoff = engine.handoff()
    session = Session(dataclasses.replace(handoff, read=dataclasses.replace(handoff.read, rec_seq=AES_GCM_RECORD_LIMIT)))
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.APPLICATION_DATA, b"x"))
    assert_session_alert(session, client, AD.internal_error)


# == §4.1.2 / §4.2 / §4.2.1 what a server must ignore or refuse in a ClientHello ===================
GREASE = 0x0A0A  # RFC 8701 values stand for "unknown to the server"


def test_s4_1_2_unknown_cipher_suites_extensions_and_versions_are_ignored() -> None:
    # §4.1.2 "the server MUST ignore those cipher suites and process the remaining ones as
    # usual"; "Servers MUST ignore unrecognized extensions"; §4.2.1 servers "MUST ignore any
    # unknown versions that are present in that extension".
    client = Client(suites=(GREASE, 0x00FF, 0x1301), versions=(0x7A7A, 0x0305, 0x0304, 0x0303))
    # 17 is status_request_v2: §4.4.2.1 "TLS 1.3 servers MUST be able to process ClientHello
    # messages that include it" (and "MUST NOT act upon its presence").
    status_request_v2 = (17, u16(b"\x02" + u16(b"\x01" + u16(b"") + u16(b""))))
    exts = [(GREASE, b""), (0x1234, b"\x01\x02\x03"), status_request_v2] + client.extensions() + [(0xFAFA, b"")]
    engine = TLSServer(config())
    engine.receive_data(client.hello_record(exts=exts))
    assert [type(e) for e in drain(engine)] == [ClientHelloReceived]
    client.receive(engine.data_to_send())
    engine.receive_data(client.finished_record())
    assert [type(e) for e in drain(engine)] == [HandshakeComplete]


def test_s4_2_extension_not_specified_for_client_hello_is_illegal_parameter() -> None:
    # §4.2: "If an implementation receives an extension which it recognizes and which is not
    # specified for the message in which it appears, it MUST abort the handshake with an
    # "illegal_parameter" alert." oid_filters (48) is CertificateRequest-only.
    engine = TLSServer(config())
    engine.receive_data(hello_with(lambda e: e + [(Ext.OID_FILTERS, u16(b""))]))
    assert_alert(engine, AD.illegal_parameter)


def _encrypted_extensions(client: Client) -> list[int]:
    (ee,) = [m for m in client.received if m[0] == HandshakeType.ENCRYPTED_EXTENSIONS]
    body, types = ee[6:], []
    while body:
        types.append(int.from_bytes(body[:2], "big"))
        body = body[4 + int.from_bytes(body[2:4], "big") :]
    return types


def test_s4_2_no_extension_response_the_client_did_not_ask_for() -> None:
    # §4.2: "Implementations MUST NOT send extension responses if the remote endpoint did not
    # send the corresponding extension requests". Without SNI/ALPN/record_size_limit in the
    # ClientHello, EncryptedExtensions answers only supported_groups (which the client sent).
    client = Client()
    server_flight(client, config(alpn_protocols=("h2",)))
    assert _encrypted_extensions(client) == [Ext.SUPPORTED_GROUPS]
    asking = Client(server_name=b"localhost", alpn=(b"h2",))
    exts = asking.extensions() + [(Ext.RECORD_SIZE_LIMIT, (2**14 + 1).to_bytes(2, "big"))]
    engine = TLSServer(config(alpn_protocols=("h2",)))
    engine.receive_data(asking.hello_record(exts=exts))
    drain(engine)
    asking.receive(engine.data_to_send())
    assert set(_encrypted_extensions(asking)) == {
        Ext.SUPPORTED_GROUPS, Ext.SERVER_NAME, Ext.APPLICATION_LAYER_PROTOCOL_NEGOTIATION, Ext.RECORD_SIZE_LIMIT,
    }


@pytest.mark.parametrize("group", [Group.SECP256R1, Group.SECP384R1])
def test_s4_2_8_2_point_not_on_the_curve_is_illegal_parameter(group: Group) -> None:
    # §4.2.8.2: "peers MUST validate each other's public value Q by ensuring that the point is
    # a valid point on the elliptic curve"; §6: semantically invalid -> illegal_parameter.
    size = 32 if group is Group.SECP256R1 else 48
    bad_point = b"\x04" + (1).to_bytes(size, "big") + (1).to_bytes(size, "big")
    client = Client(groups=(group,))
    exts = [(t, d if t != Ext.KEY_SHARE else u16(ints16([group]) + u16(bad_point))) for t, d in client.extensions()]
    engine = TLSServer(config())
    engine.receive_data(client.hello_record(exts=exts))
    assert_alert(engine, AD.illegal_parameter)


def test_s4_1_2_client_hello_after_the_handshake_is_unexpected_message() -> None:
    # §4.1.2: "if a server has negotiated TLS 1.3 and receives a ClientHello at any other time,
    # it MUST terminate the connection with an "unexpected_message" alert."
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.HANDSHAKE, Client().hello()))
    assert_session_alert(session, client, AD.unexpected_message)


# == §4.6.3 KeyUpdate ordering ====================================================================
def test_s4_6_3_record_under_the_next_key_before_its_key_update_is_bad_record_mac() -> None:
    # §4.6.3: "both sides MUST enforce that a KeyUpdate with the old key is received before
    # accepting any messages encrypted with the new key."
    session, client = session_pair()
    assert client.app_write and client.suite
    next_write = RecordProtection.from_secret(client.suite, next_traffic_secret(client.suite, client.app_write.traffic_secret))
    session.receive_data(next_write.seal(ContentType.APPLICATION_DATA, b"too early"))
    assert_session_alert(session, client, AD.bad_record_mac)


# == §5 change_cipher_spec outside its window =====================================================
def test_s5_protected_change_cipher_spec_is_unexpected_message() -> None:
    # §5: "An implementation which receives ... a protected change_cipher_spec record MUST abort
    # the handshake with an "unexpected_message" alert." Under the handshake key...
    client = Client()
    engine = server_flight(client)
    assert client.write
    engine.receive_data(client.write.seal(ContentType.CHANGE_CIPHER_SPEC, b"\x01"))
    assert_alert(engine, AD.unexpected_message, read=client.app_read)
    # ...and under the application key.
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.CHANGE_CIPHER_SPEC, b"\x01"))
    assert_session_alert(session, client, AD.unexpected_message)


def test_s5_change_cipher_spec_after_the_client_finished_is_unexpected_message() -> None:
    # §5: a change_cipher_spec "after the peer's Finished message ... MUST be treated as an
    # unexpected record type" -> unexpected_message.
    session, client = session_pair()
    session.receive_data(record(ContentType.CHANGE_CIPHER_SPEC, b"\x01"))
    assert_session_alert(session, client, AD.unexpected_message)


# == §5.1 / §6 alerts =============================================================================
def test_s5_1_two_alerts_in_one_record_is_decode_error() -> None:
    # §5.1: "a record with an Alert type MUST contain exactly one message"; §6: a message that
    # "cannot be parsed according to the syntax" -> decode_error.
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.ALERT, bytes([1, AD.user_canceled, 1, AD.close_notify])))
    assert_session_alert(session, client, AD.decode_error)


@pytest.mark.parametrize("code", [AD.internal_error, AD.unexpected_message, 255], ids=["internal_error", "unexpected_message", "unknown"])
def test_s6_warning_level_and_unknown_alerts_are_errors(code: int) -> None:
    # §6: "All the alerts listed in Section 6.2 MUST be sent with AlertLevel=fatal and MUST be
    # treated as error alerts when received regardless of the AlertLevel in the message.
    # Unknown Alert types MUST be treated as error alerts." Sent here with level 1 (warning).
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.ALERT, bytes([1, code])))
    with pytest.raises(RemoteProtocolError) as info:
        session.next_event()
    assert (info.value.received, info.value.alert) == (code, None)
    with pytest.raises(LocalProtocolError):  # §6: no further data received
        session.next_event()
    engine = TLSServer(config())
    engine.receive_data(Client().hello_record() + record(ContentType.ALERT, bytes([1, code])))
    with pytest.raises(RemoteProtocolError) as info:
        drain(engine)
    assert (info.value.received, info.value.alert) == (code, None)


# == §5.4 padding in the record that carries the client Finished ==================================
@pytest.mark.parametrize("padding", [1, 255, 2**14 - 36])
def test_s5_4_padding_in_the_client_finished_record_is_accepted(padding: int) -> None:
    # §5.4: "Senders MAY pad" any record, including the one with the client Finished (issue 12
    # listed this as broken; on this engine it already worked: a regression test). 2^14 - 36 is
    # the most padding a 36-byte Finished allows (TLSInnerPlaintext <= 2^14 + 1).
    client = Client(suites=(0x1301,))
    engine = server_flight(client)
    assert client.write and client.finished is not None
    assert len(client.finished) == 36
    engine.receive_data(client.write.seal(ContentType.HANDSHAKE, client.finished, padding=padding))
    assert [type(e) for e in drain(engine)] == [HandshakeComplete]


@pytest.mark.parametrize("legacy_version", [b"\x03\x01", b"\x03\x04"])
def test_s4_2_1_legacy_version_is_not_used_for_version_negotiation(legacy_version: bytes) -> None:
    # §4.2.1: with supported_versions present, "servers MUST NOT use the
    # ClientHello.legacy_version value for version negotiation".
    client = Client()
    engine = TLSServer(config())
    engine.receive_data(client.hello_record(version=legacy_version))
    assert [type(e) for e in drain(engine)] == [ClientHelloReceived]
    client.receive(engine.data_to_send())
    engine.receive_data(client.finished_record())
    assert [type(e) for e in drain(engine)] == [HandshakeComplete]


def test_s4_2_8_two_key_shares_for_one_group_is_illegal_parameter() -> None:
    # §4.2.8: "Clients MUST NOT offer multiple KeyShareEntry values for the same group."
    client = Client()
    share = ints16([Group.X25519]) + u16(client.share(Group.X25519))
    exts = [(t, d if t != Ext.KEY_SHARE else u16(share + share)) for t, d in client.extensions()]
    engine = TLSServer(config())
    engine.receive_data(client.hello_record(exts=exts))
    assert_alert(engine, AD.illegal_parameter)


def test_s4_2_10_early_data_in_the_second_client_hello_is_illegal_parameter() -> None:
    # §4.2.10: "A client MUST NOT include the "early_data" extension in its followup ClientHello."
    client, engine = _early_hrr_client()
    exts = client.extensions((client.hrr_group,)) + [(Ext.EARLY_DATA, b"")]
    engine.receive_data(client.hello_record(exts=exts))
    assert_alert(engine, AD.illegal_parameter)


def _cookie_engine(cookie: bytes | None) -> tuple[Client, TLSServer]:
    client = _hrr_client()
    engine = TLSServer(config(groups=(Group.X25519,), retry_cookie=(lambda: cookie) if cookie else None))
    engine.receive_data(client.hello_record())
    drain(engine)
    client.receive(engine.data_to_send())
    return client, engine


def test_s4_2_2_second_client_hello_must_echo_the_cookie() -> None:
    # §4.2.2: "When sending the new ClientHello, the client MUST copy the contents of the
    # extension received in the HelloRetryRequest into a "cookie" extension".
    client, engine = _cookie_engine(b"our-cookie")
    exts = client.extensions((client.hrr_group,)) + [(Ext.COOKIE, u16(b"our-cookie"))]
    engine.receive_data(client.hello_record(exts=exts))
    assert [type(e) for e in drain(engine)] == [ClientHelloReceived]
    client, engine = _cookie_engine(b"our-cookie")
    exts = client.extensions((client.hrr_group,)) + [(Ext.COOKIE, u16(b"not-ours"))]
    engine.receive_data(client.hello_record(exts=exts))
    assert_alert(engine, AD.illegal_parameter)


def test_s4_2_a_cookie_we_never_sent_is_unsupported_extension() -> None:
    # §4.2: a response the remote endpoint did not ask for: "Upon receiving such an extension,
    # an endpoint MUST abort the handshake with an "unsupported_extension" alert." Our HRR sent
    # no cookie, so a cookie in the second ClientHello is that case.
    client, engine = _cookie_engine(None)
    exts = client.extensions((client.hrr_group,)) + [(Ext.COOKIE, u16(b"made-up"))]
    engine.receive_data(client.hello_record(exts=exts))
    assert_alert(engine, AD.unsupported_extension)


def test_s5_1_key_update_not_ending_its_record_is_unexpected_message() -> None:
    # §5.1: KeyUpdate can immediately precede a key change: "Implementations MUST verify that
    # all messages immediately preceding a key change align with a record boundary; if not,
    # then they MUST terminate the connection with an "unexpected_message" alert."
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.HANDSHAKE, key_update(False) + key_update(False)[:2]))
    assert_session_alert(session, client, AD.unexpected_message)
