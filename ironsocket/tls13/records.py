"""The TLS 1.3 record layer (RFC 8446 §5): framing, TLSInnerPlaintext, AEAD protection.

`RecordProtection` is one direction's AEAD state: key, IV and the sequence number of the next
record. The per-record nonce is the IV XOR the 64-bit sequence number, left-padded to the IV
length (§5.3); the additional data is the 5-byte record header (§5.2). No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .alerts import AlertBadRecordMac, AlertDecodeError, AlertInternalError, AlertRecordOverflow, AlertUnexpectedMessage
from .constants import CipherSuite, ContentType
from .handoff import TrafficKeys
from .keyschedule import SUITES, derive_traffic_keys

HEADER_SIZE = 5
MAX_PLAINTEXT = 1 << 14  # §5.1: TLSPlaintext.length MUST NOT exceed 2^14
MAX_INNER_PLAINTEXT = MAX_PLAINTEXT + 1  # content + the inner ContentType byte
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256  # §5.2: TLSCiphertext.length MUST NOT exceed 2^14 + 256
LEGACY_RECORD_VERSION = b"\x03\x03"
# §5.3: a sequence number MUST NOT wrap. We stop well before 2^64 and also honour the AEAD
# usage limit of §5.5 (2^24.5 full-size records for AES-GCM): past it the connection must be
# rekeyed (KeyUpdate) or closed.
AES_GCM_RECORD_LIMIT = int(2**24.5)
SEQUENCE_LIMIT = (1 << 64) - 1


class SequenceExhausted(AlertInternalError):
    """The next record would exceed the key's usage limit (RFC 8446 §5.3, §5.5).

    Raised before any nonce is formed, so a nonce is never reused. It is an `Alert`
    (internal_error), so the engine's and the Session's error boundaries turn it into a fatal
    alert like any other; the Session rekeys long before its write side gets here.
    """


def record_limit(cipher_suite: CipherSuite) -> int:
    if cipher_suite is CipherSuite.TLS_CHACHA20_POLY1305_SHA256:
        return SEQUENCE_LIMIT
    return AES_GCM_RECORD_LIMIT


def record_header(content_type: int, length: int) -> bytes:
    return bytes((content_type, 3, 3, length >> 8, length & 0xFF))


# Per record, an Enum call or even an Enum attribute (ContentType.X: ~0.3 µs each, an IntEnum
# comparison twice that) costs as much as sealing 64 bytes: the hot paths use these.
_CONTENT_TYPES = {int(t): t for t in ContentType}
_TYPE_BYTES = {int(t): bytes((t,)) for t in ContentType}
_APPLICATION_DATA = int(ContentType.APPLICATION_DATA)
_PLAINTEXT_TYPES = frozenset(int(t) for t in (ContentType.HANDSHAKE, ContentType.ALERT, ContentType.CHANGE_CIPHER_SPEC))


@dataclass
class RecordProtection:
    """One direction's AEAD state (RFC 8446 §5.2–5.3)."""

    cipher_suite: CipherSuite
    traffic_secret: bytes
    key: bytes
    iv: bytes
    rec_seq: int = 0

    def __post_init__(self) -> None:
        aead = AESGCM if self.cipher_suite is not CipherSuite.TLS_CHACHA20_POLY1305_SHA256 else ChaCha20Poly1305
        self._aead = aead(self.key)
        self._iv_int = int.from_bytes(self.iv, "big")
        self._limit = record_limit(self.cipher_suite)
        self._tag_len = SUITES[self.cipher_suite].tag_len

    def __repr__(self) -> str:
        return f"RecordProtection({self.cipher_suite.name}, rec_seq={self.rec_seq})"

    @classmethod
    def from_secret(cls, cipher_suite: CipherSuite, traffic_secret: bytes, rec_seq: int = 0) -> RecordProtection:
        key, iv = derive_traffic_keys(cipher_suite, traffic_secret)
        return cls(cipher_suite, traffic_secret, key, iv, rec_seq)

    @classmethod
    def from_keys(cls, cipher_suite: CipherSuite, keys: TrafficKeys) -> RecordProtection:
        return cls(cipher_suite, keys.traffic_secret, keys.key, keys.iv, keys.rec_seq)

    def traffic_keys(self) -> TrafficKeys:
        return TrafficKeys(traffic_secret=self.traffic_secret, key=self.key, iv=self.iv, rec_seq=self.rec_seq)

    def records_left(self) -> int:
        """How many more records this key may protect (§5.5 usage limit, §5.3 no wrap)."""
        return self._limit - self.rec_seq

    def _nonce(self) -> bytes:
        if self.rec_seq >= self._limit:
            raise SequenceExhausted(f"{self.rec_seq} records protected with one key")
        return (self._iv_int ^ self.rec_seq).to_bytes(12, "big")

    def seal(self, content_type: int, data: bytes | memoryview, padding: int = 0) -> bytes:
        """Protect one record: TLSInnerPlaintext = content || type || zeros (§5.2).

        Once per record of every userspace connection: the nonce is built inline (as `_nonce` does)."""
        inner_len = len(data) + 1 + padding
        if inner_len > MAX_INNER_PLAINTEXT:
            # §5.4: padding does not change the limit; TLSInnerPlaintext <= 2^14 + 1 octets.
            raise ValueError("TLSInnerPlaintext (content, type and padding) over 2^14 + 1 bytes")
        length = inner_len + self._tag_len
        header = bytes((_APPLICATION_DATA, 3, 3, length >> 8, length & 0xFF))
        type_byte = _TYPE_BYTES.get(content_type) or bytes((content_type,))
        inner = b"".join((data, type_byte, bytes(padding)) if padding else (data, type_byte))
        seq = self.rec_seq
        if seq >= self._limit:
            raise SequenceExhausted(f"{seq} records protected with one key")
        sealed = self._aead.encrypt((self._iv_int ^ seq).to_bytes(12, "big"), inner, header)
        self.rec_seq = seq + 1
        return header + sealed

    def open(self, header: bytes, body: bytes | memoryview) -> tuple[ContentType, bytes]:
        """Deprotect one record; return the inner content type and content (§5.2, §5.4)."""
        seq = self.rec_seq
        if seq >= self._limit:
            raise SequenceExhausted(f"{seq} records protected with one key")
        try:
            inner = self._aead.decrypt((self._iv_int ^ seq).to_bytes(12, "big"), body, header)
        except InvalidTag as exc:
            raise AlertBadRecordMac("record failed to decrypt") from exc
        self.rec_seq = seq + 1
        end = len(inner.rstrip(b"\x00")) if inner and inner[-1] == 0 else len(inner)
        if end == 0:
            raise AlertUnexpectedMessage("TLSInnerPlaintext has no non-zero content type")
        if end - 1 > MAX_PLAINTEXT:
            raise AlertRecordOverflow("TLSInnerPlaintext content exceeds 2^14 bytes")
        content_type = _CONTENT_TYPES.get(inner[end - 1])
        if content_type is None:
            raise AlertUnexpectedMessage(f"unknown inner content type {inner[end - 1]}")
        return content_type, inner[: end - 1]


def split_record(buffer: bytearray | bytes, offset: int = 0) -> tuple[int, bytes, int] | None:
    """Frame one record at ``offset``: return (content type, header, total length) or None.

    Checks the outer length against §5.1/§5.2 limits before the body is even buffered, so a peer
    cannot make us buffer more than one maximal record.
    """
    if len(buffer) - offset < HEADER_SIZE:
        return None
    content_type = buffer[offset]
    length = (buffer[offset + 3] << 8) | buffer[offset + 4]
    if content_type == _APPLICATION_DATA:
        if length > MAX_CIPHERTEXT:
            raise AlertRecordOverflow(f"ciphertext record of {length} bytes")
    elif content_type in _PLAINTEXT_TYPES:
        if length > MAX_PLAINTEXT:
            raise AlertRecordOverflow(f"plaintext record of {length} bytes")
        if length == 0:
            # §5.1: zero-length fragments of Handshake/Alert/CCS MUST NOT be sent.
            raise AlertUnexpectedMessage("zero-length record")
    else:
        raise AlertUnexpectedMessage(f"unknown record content type {content_type}")
    if buffer[offset + 1] != 3:
        raise AlertDecodeError("record version is not 3.x")
    return content_type, bytes(buffer[offset : offset + HEADER_SIZE]), HEADER_SIZE + length
