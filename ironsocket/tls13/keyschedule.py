"""The TLS 1.3 key schedule (RFC 8446 §7.1) and traffic key calculation (§7.3).

Function names follow the RFC: ``hkdf_extract``, ``hkdf_expand_label``, ``derive_secret``.
`KeySchedule` holds the running transcript hash and the current secret of the ladder
early → handshake → master; each rung is one call to `extract`.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from .constants import CipherSuite

try:  # CPython's C HMAC, without hmac.HMAC's Python wrapper (~70% of a short HMAC's cost)
    from _hashlib import hmac_new as _hmac_new
except ImportError:  # another implementation: the public API, same result
    _hmac_new = hmac.new


@dataclass(frozen=True, slots=True)
class SuiteParams:
    """What a cipher suite fixes: the HKDF hash and the AEAD key length (RFC 8446 §B.4)."""

    hash_name: str
    hash_len: int
    key_len: int
    iv_len: int = 12
    tag_len: int = 16


SUITES: dict[CipherSuite, SuiteParams] = {
    CipherSuite.TLS_AES_128_GCM_SHA256: SuiteParams("sha256", 32, 16),
    CipherSuite.TLS_AES_256_GCM_SHA384: SuiteParams("sha384", 48, 32),
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256: SuiteParams("sha256", 32, 32),
}


def _hmac(key: bytes, msg: bytes, hash_name: str) -> bytes:
    """HMAC(key, msg) with OpenSSL, keeping the GIL. Not `hmac.digest`: CPython's one-shot
    releases the GIL around every call, and a handshake makes ~30 of a microsecond each; with
    other threads waiting for the GIL (relay loops) each release became a futex hand-off and a
    wait to get it back (docs/benchmarks.md, 2026-12-04). An HMAC object (``_hmac_new``) hashes
    messages this short without releasing it."""
    return _hmac_new(key, msg, hash_name).digest()


def hkdf_extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869 §2.2)."""
    return _hmac(salt, ikm, hash_name)


def hkdf_expand(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand (RFC 5869 §2.3)."""
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = _hmac(prk, block + info + bytes([counter]), hash_name)
        out += block
        counter += 1
    return out[:length]


def hkdf_label(label: bytes, context: bytes, length: int) -> bytes:
    """The HkdfLabel structure (RFC 8446 §7.1), with the ``"tls13 "`` prefix."""
    full_label = b"tls13 " + label
    return (
        length.to_bytes(2, "big")
        + bytes([len(full_label)])
        + full_label
        + bytes([len(context)])
        + context
    )


def hkdf_expand_label(
    hash_name: str, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """HKDF-Expand-Label(Secret, Label, Context, Length) (RFC 8446 §7.1)."""
    return hkdf_expand(hash_name, secret, hkdf_label(label, context, length), length)


def derive_secret(hash_name: str, secret: bytes, label: bytes, transcript_hash: bytes) -> bytes:
    """Derive-Secret(Secret, Label, Messages) with the transcript already hashed (§7.1)."""
    return hkdf_expand_label(
        hash_name, secret, label, transcript_hash, len(transcript_hash)
    )


def derive_traffic_keys(cipher_suite: CipherSuite, traffic_secret: bytes) -> tuple[bytes, bytes]:
    """[sender]_write_key and [sender]_write_iv from a traffic secret (RFC 8446 §7.3)."""
    params = SUITES[cipher_suite]
    key = hkdf_expand_label(params.hash_name, traffic_secret, b"key", b"", params.key_len)
    iv = hkdf_expand_label(params.hash_name, traffic_secret, b"iv", b"", params.iv_len)
    return key, iv


def next_traffic_secret(cipher_suite: CipherSuite, traffic_secret: bytes) -> bytes:
    """application_traffic_secret_N+1 (RFC 8446 §7.2, KeyUpdate)."""
    params = SUITES[cipher_suite]
    return hkdf_expand_label(
        params.hash_name, traffic_secret, b"traffic upd", b"", params.hash_len
    )


def finished_key(cipher_suite: CipherSuite, base_key: bytes) -> bytes:
    """finished_key = HKDF-Expand-Label(BaseKey, "finished", "", Hash.length) (§4.4.4)."""
    params = SUITES[cipher_suite]
    return hkdf_expand_label(params.hash_name, base_key, b"finished", b"", params.hash_len)


# -- resumption (§4.2.11.2, §4.6.1) -------------------------------------------------------------
def early_secret(cipher_suite: CipherSuite, psk: bytes | None) -> bytes:
    """Early Secret = HKDF-Extract(0, PSK) (§7.1); without a PSK, PSK = zeros."""
    params = SUITES[cipher_suite]
    return hkdf_extract(params.hash_name, b"\x00", psk if psk is not None else bytes(params.hash_len))


def psk_binder(cipher_suite: CipherSuite, psk: bytes, truncated_hello_hash: bytes) -> bytes:
    """The binder of a resumption PSK (§4.2.11.2): an HMAC, as in Finished, under the key
    derived from binder_key = Derive-Secret(Early Secret, "res binder", ""), over
    Transcript-Hash(Truncate(ClientHello)) (with a HelloRetryRequest: the transcript up to it, too)."""
    params = SUITES[cipher_suite]
    empty = hashlib.new(params.hash_name).digest()
    binder_key = derive_secret(params.hash_name, early_secret(cipher_suite, psk), b"res binder", empty)
    return _hmac(finished_key(cipher_suite, binder_key), truncated_hello_hash, params.hash_name)


def resumption_psk(cipher_suite: CipherSuite, resumption_master_secret: bytes, ticket_nonce: bytes) -> bytes:
    """The PSK a ticket stands for: HKDF-Expand-Label(resumption_master_secret, "resumption",
    ticket_nonce, Hash.length) (§4.6.1)."""
    params = SUITES[cipher_suite]
    return hkdf_expand_label(params.hash_name, resumption_master_secret, b"resumption", ticket_nonce, params.hash_len)


class KeySchedule:
    """The secret ladder of RFC 8446 §7.1 plus the running transcript hash.

    ``extract(ikm)`` climbs one rung: the first call gives the Early Secret (ikm = the PSK when
    resuming, §4.2.11; no PSK: zeros),
    the second the Handshake Secret (ikm = the (EC)DHE shared secret), the third the Master
    Secret (ikm = zeros). Between rungs the "derived" secret is used as salt.
    """

    def __init__(self, cipher_suite: CipherSuite) -> None:
        self.cipher_suite = cipher_suite
        self.params = SUITES[cipher_suite]
        self.hash_name = self.params.hash_name
        self.transcript = hashlib.new(self.hash_name)
        self.secret: bytes | None = None
        self.generation = 0

    # -- transcript (§4.4.1) -------------------------------------------------------------------
    def update_hash(self, data: bytes) -> None:
        self.transcript.update(data)

    def transcript_hash(self) -> bytes:
        return self.transcript.copy().digest()

    def restart_with_message_hash(self) -> None:
        """Replace ClientHello1 by message_hash (§4.4.1) after a HelloRetryRequest."""
        digest = self.transcript.digest()
        self.transcript = hashlib.new(self.hash_name)
        self.transcript.update(bytes([254, 0, 0, len(digest)]) + digest)

    # -- the ladder (§7.1) ---------------------------------------------------------------------
    def extract(self, ikm: bytes | None = None) -> bytes:
        zeros = bytes(self.params.hash_len)
        if self.secret is None:
            salt = b"\x00"
        else:
            salt = derive_secret(
                self.hash_name, self.secret, b"derived", hashlib.new(self.hash_name).digest()
            )
        self.secret = hkdf_extract(self.hash_name, salt, ikm if ikm is not None else zeros)
        self.generation += 1
        return self.secret

    def derive_secret(self, label: bytes) -> bytes:
        assert self.secret is not None, "extract() first"
        return derive_secret(self.hash_name, self.secret, label, self.transcript_hash())

    # -- Finished (§4.4.4) ---------------------------------------------------------------------
    def finished_verify_data(self, base_key: bytes) -> bytes:
        return _hmac(finished_key(self.cipher_suite, base_key), self.transcript_hash(), self.hash_name)

    # -- CertificateVerify (§4.4.3) ------------------------------------------------------------
    def certificate_verify_data(self, context_string: bytes) -> bytes:
        return b" " * 64 + context_string + b"\x00" + self.transcript_hash()


SERVER_CERTIFICATE_VERIFY_CONTEXT = b"TLS 1.3, server CertificateVerify"
CLIENT_CERTIFICATE_VERIFY_CONTEXT = b"TLS 1.3, client CertificateVerify"
