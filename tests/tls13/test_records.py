"""The record layer (RFC 8446 §5): TLSInnerPlaintext, nonces, sequence numbers, framing limits."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ironsocket.tls13.alerts import AlertBadRecordMac, AlertDecodeError, AlertRecordOverflow, AlertUnexpectedMessage
from ironsocket.tls13.constants import CipherSuite, ContentType
from ironsocket.tls13.records import (
    AES_GCM_RECORD_LIMIT,
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    SEQUENCE_LIMIT,
    RecordProtection,
    SequenceExhausted,
    record_header,
    record_limit,
    split_record,
)

SUITES = tuple(CipherSuite)
SECRET = {CipherSuite.TLS_AES_256_GCM_SHA384: bytes(range(48))}


def pair(suite: CipherSuite, rec_seq: int = 0) -> tuple[RecordProtection, RecordProtection]:
    secret = SECRET.get(suite, bytes(range(32)))
    return RecordProtection.from_secret(suite, secret, rec_seq), RecordProtection.from_secret(suite, secret, rec_seq)


def open_record(rp: RecordProtection, data: bytes) -> tuple[int, bytes]:
    return rp.open(data[:5], data[5:])


@pytest.mark.parametrize("suite", SUITES)
def test_seal_open_round_trip(suite: CipherSuite) -> None:
    sender, receiver = pair(suite)
    for content_type, data in [(ContentType.APPLICATION_DATA, b"hello"), (ContentType.HANDSHAKE, b"\x18\x00\x00\x01\x00")]:
        assert open_record(receiver, sender.seal(content_type, data)) == (content_type, data)
    assert (sender.rec_seq, receiver.rec_seq) == (2, 2)


@pytest.mark.parametrize("suite", SUITES)
def test_sealed_record_header_and_length(suite: CipherSuite) -> None:
    sender, _ = pair(suite)
    sealed = sender.seal(ContentType.APPLICATION_DATA, b"abc", padding=4)
    assert sealed[:5] == bytes([23, 3, 3, 0, 3 + 1 + 4 + 16])
    assert len(sealed) == 5 + 24


@pytest.mark.parametrize(
    ("suite", "seq"),
    [(s, n) for s in SUITES for n in (0, 1, 7, 0x00ABCDEF)]
    + [(CipherSuite.TLS_CHACHA20_POLY1305_SHA256, 0x0102030405060708)],
)
def test_nonce_is_iv_xor_sequence_number(suite: CipherSuite, seq: int) -> None:
    sender, _ = pair(suite, seq)
    sealed = sender.seal(ContentType.APPLICATION_DATA, b"data", padding=2)
    nonce = bytes(a ^ b for a, b in zip(sender.iv, seq.to_bytes(12, "big")))
    aead = ChaCha20Poly1305 if suite is CipherSuite.TLS_CHACHA20_POLY1305_SHA256 else AESGCM
    assert aead(sender.key).decrypt(nonce, sealed[5:], sealed[:5]) == b"data\x17\x00\x00"
    assert sender.rec_seq == seq + 1


def test_key_and_iv_lengths() -> None:
    assert [(len(pair(s)[0].key), len(pair(s)[0].iv)) for s in SUITES] == [(16, 12), (32, 12), (32, 12)]


def test_sequence_numbers_must_match() -> None:
    sender, receiver = pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    sender.seal(ContentType.APPLICATION_DATA, b"skipped")
    with pytest.raises(AlertBadRecordMac):
        open_record(receiver, sender.seal(ContentType.APPLICATION_DATA, b"second"))
    assert receiver.rec_seq == 0  # a failed open does not advance


def test_tampered_header_is_bad_record_mac() -> None:
    sender, receiver = pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    sealed = bytearray(sender.seal(ContentType.APPLICATION_DATA, b"x"))
    sealed[2] = 1  # the header is the additional data (§5.2)
    with pytest.raises(AlertBadRecordMac):
        open_record(receiver, bytes(sealed))


def test_padding_is_stripped_and_zero_content_kept() -> None:
    sender, receiver = pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    assert open_record(receiver, sender.seal(ContentType.APPLICATION_DATA, b"a\x00\x00", padding=100)) == (
        ContentType.APPLICATION_DATA,
        b"a\x00\x00",
    )
    assert open_record(receiver, sender.seal(ContentType.APPLICATION_DATA, b"")) == (ContentType.APPLICATION_DATA, b"")


def test_all_zero_inner_plaintext_is_unexpected_message() -> None:
    sender, receiver = pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    with pytest.raises(AlertUnexpectedMessage):
        open_record(receiver, sender.seal(0, b"", padding=5))


def test_unknown_inner_content_type_is_unexpected_message() -> None:
    sender, receiver = pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    with pytest.raises(AlertUnexpectedMessage):
        open_record(receiver, sender.seal(99, b"x"))


def _seal_raw(rp: RecordProtection, inner: bytes) -> bytes:
    """Seal an arbitrary TLSInnerPlaintext by hand (seal() refuses oversize ones)."""
    header = record_header(ContentType.APPLICATION_DATA, len(inner) + 16)
    nonce = bytes(a ^ b for a, b in zip(rp.iv, rp.rec_seq.to_bytes(12, "big")))
    return header + AESGCM(rp.key).encrypt(nonce, inner, header)


def test_inner_content_over_2_14_is_record_overflow() -> None:
    _, receiver = pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    with pytest.raises(AlertRecordOverflow):
        open_record(receiver, _seal_raw(receiver, bytes(MAX_PLAINTEXT + 1) + b"\x17"))


def test_inner_plaintext_at_2_14_plus_1_opens() -> None:
    sender, receiver = pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    sealed = sender.seal(ContentType.APPLICATION_DATA, b"\x01" * MAX_PLAINTEXT)
    assert len(sealed) - 5 == MAX_PLAINTEXT + 1 + 16 <= MAX_CIPHERTEXT
    assert open_record(receiver, sealed) == (ContentType.APPLICATION_DATA, b"\x01" * MAX_PLAINTEXT)


def test_seal_refuses_inner_plaintext_over_2_14_plus_1_even_with_padding() -> None:
    # §5.4: "The presence of padding does not change the overall record size limitations:
    # the full encoded TLSInnerPlaintext MUST NOT exceed 2^14 + 1 octets."
    sender, _ = pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    sender.seal(ContentType.APPLICATION_DATA, b"x" * (MAX_PLAINTEXT - 10), padding=10)
    with pytest.raises(ValueError):
        sender.seal(ContentType.APPLICATION_DATA, b"x" * MAX_PLAINTEXT, padding=1)
    with pytest.raises(ValueError):
        sender.seal(ContentType.APPLICATION_DATA, b"x" * (MAX_PLAINTEXT + 1))
    assert sender.rec_seq == 1


def test_record_limits() -> None:
    assert record_limit(CipherSuite.TLS_AES_128_GCM_SHA256) == AES_GCM_RECORD_LIMIT == int(2**24.5)
    assert record_limit(CipherSuite.TLS_AES_256_GCM_SHA384) == AES_GCM_RECORD_LIMIT
    assert record_limit(CipherSuite.TLS_CHACHA20_POLY1305_SHA256) == SEQUENCE_LIMIT == 2**64 - 1


@pytest.mark.parametrize("suite", SUITES)
def test_sequence_exhausted_at_the_limit(suite: CipherSuite) -> None:
    limit = record_limit(suite)
    sender, receiver = pair(suite, limit - 1)
    last = sender.seal(ContentType.APPLICATION_DATA, b"last")
    assert open_record(receiver, last) == (ContentType.APPLICATION_DATA, b"last")
    assert sender.rec_seq == receiver.rec_seq == limit
    with pytest.raises(SequenceExhausted):
        sender.seal(ContentType.APPLICATION_DATA, b"one too many")
    with pytest.raises(SequenceExhausted):
        open_record(receiver, last)
    assert sender.rec_seq == limit


def test_traffic_keys_round_trip() -> None:
    sender, _ = pair(CipherSuite.TLS_AES_256_GCM_SHA384, 5)
    copy = RecordProtection.from_keys(CipherSuite.TLS_AES_256_GCM_SHA384, sender.traffic_keys())
    assert copy.traffic_keys() == sender.traffic_keys() and copy.rec_seq == 5
    assert "key=" in repr(sender.traffic_keys()) and sender.key.hex() not in repr(sender.traffic_keys())


# -- split_record (§5.1, §5.2) --------------------------------------------------------------------
def test_split_record_needs_a_header() -> None:
    assert split_record(b"\x17\x03\x03\x00") is None
    assert split_record(b"xx\x17\x03\x03\x00\x10", 2) == (23, b"\x17\x03\x03\x00\x10", 21)


def test_split_record_reports_total_before_body_arrives() -> None:
    assert split_record(record_header(ContentType.HANDSHAKE, 300)) == (22, b"\x16\x03\x03\x01\x2c", 305)


def test_oversize_ciphertext_header_is_record_overflow() -> None:
    assert split_record(record_header(ContentType.APPLICATION_DATA, MAX_CIPHERTEXT)) is not None
    with pytest.raises(AlertRecordOverflow):
        split_record(record_header(ContentType.APPLICATION_DATA, MAX_CIPHERTEXT + 1))


@pytest.mark.parametrize("content_type", [ContentType.HANDSHAKE, ContentType.ALERT, ContentType.CHANGE_CIPHER_SPEC])
def test_oversize_plaintext_header_is_record_overflow(content_type: ContentType) -> None:
    assert split_record(record_header(content_type, MAX_PLAINTEXT)) is not None
    with pytest.raises(AlertRecordOverflow):
        split_record(record_header(content_type, MAX_PLAINTEXT + 1))


@pytest.mark.parametrize("content_type", [ContentType.HANDSHAKE, ContentType.ALERT, ContentType.CHANGE_CIPHER_SPEC])
def test_zero_length_plaintext_record_is_unexpected_message(content_type: ContentType) -> None:
    with pytest.raises(AlertUnexpectedMessage):
        split_record(record_header(content_type, 0))


def test_zero_length_application_data_record_frames() -> None:
    # It frames; opening it fails on the missing tag (bad_record_mac), not here.
    assert split_record(record_header(ContentType.APPLICATION_DATA, 0)) == (23, b"\x17\x03\x03\x00\x00", 5)


@pytest.mark.parametrize("content_type", [0, 24, 255])
def test_unknown_outer_content_type_is_unexpected_message(content_type: int) -> None:
    with pytest.raises(AlertUnexpectedMessage):
        split_record(bytes([content_type, 3, 3, 0, 1]))


def test_record_version_not_3_x_is_decode_error() -> None:
    with pytest.raises(AlertDecodeError):
        split_record(b"\x16\x02\x00\x00\x01")
