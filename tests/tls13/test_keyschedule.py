"""RFC 8446 §7 key schedule against the RFC 8448 §3 trace (values in fixtures/rfc8448)."""

from __future__ import annotations

import hashlib

from ironsocket.tls13.constants import CipherSuite
from ironsocket.tls13.keyschedule import (
    KeySchedule,
    derive_traffic_keys,
    hkdf_expand_label,
    next_traffic_secret,
)
from tests.helpers import rfc8448

T = rfc8448("simple_1rtt")
SUITE = CipherSuite.TLS_AES_128_GCM_SHA256


def test_secret_ladder_matches_rfc8448_simple_1rtt() -> None:
    ks = KeySchedule(SUITE)
    assert ks.extract(None) == T["early_secret"]
    ks.update_hash(T["client_hello"])
    ks.update_hash(T["server_hello"])
    assert ks.transcript_hash() == T["transcript_hash_ch_sh"]
    assert ks.extract(T["shared_secret"]) == T["handshake_secret"]
    assert ks.derive_secret(b"c hs traffic") == T["client_handshake_traffic_secret"]
    assert ks.derive_secret(b"s hs traffic") == T["server_handshake_traffic_secret"]
    for msg in ("encrypted_extensions", "certificate", "certificate_verify", "server_finished"):
        ks.update_hash(T[msg])
    assert ks.transcript_hash() == T["transcript_hash_ch_sf"]
    assert ks.extract(None) == T["master_secret"]
    assert ks.derive_secret(b"c ap traffic") == T["client_application_traffic_secret_0"]
    assert ks.derive_secret(b"s ap traffic") == T["server_application_traffic_secret_0"]
    assert ks.derive_secret(b"exp master") == T["exporter_master_secret"]
    ks.update_hash(T["client_finished"])
    assert ks.derive_secret(b"res master") == T["resumption_master_secret"]


def test_finished_verify_data_matches_trace() -> None:
    ks = KeySchedule(SUITE)
    ks.extract(None)
    for msg in ("client_hello", "server_hello", "encrypted_extensions", "certificate", "certificate_verify"):
        ks.update_hash(T[msg])
    assert ks.finished_verify_data(T["server_handshake_traffic_secret"]) == T["server_finished"][4:]
    ks.update_hash(T["server_finished"])
    assert ks.finished_verify_data(T["client_handshake_traffic_secret"]) == T["client_finished"][4:]


def test_traffic_keys_match_trace() -> None:
    for direction, secret in (
        ("server_handshake", "server_handshake_traffic_secret"),
        ("client_handshake", "client_handshake_traffic_secret"),
        ("server_application", "server_application_traffic_secret_0"),
        ("client_application", "client_application_traffic_secret_0"),
    ):
        key, iv = derive_traffic_keys(SUITE, T[secret])
        assert key == T[f"{direction}_key"], direction
        assert iv == T[f"{direction}_iv"], direction


def test_resumption_psk_matches_trace() -> None:
    # §4.6.1: exercises hkdf_expand_label with a non-empty context.
    psk = hkdf_expand_label("sha256", T["resumption_master_secret"], b"resumption", T["ticket_nonce"], 32)
    assert psk == T["resumption_psk"]


def test_message_hash_restart_matches_hrr_trace() -> None:
    h = rfc8448("hrr")
    ks = KeySchedule(SUITE)
    ks.update_hash(h["client_hello_1"])
    ks.restart_with_message_hash()
    expected = hashlib.sha256(h["message_hash"]).digest()
    assert ks.transcript_hash() == expected


def test_next_traffic_secret_is_expand_label_traffic_upd() -> None:
    secret = T["client_application_traffic_secret_0"]
    assert next_traffic_secret(SUITE, secret) == hkdf_expand_label("sha256", secret, b"traffic upd", b"", 32)
    assert next_traffic_secret(SUITE, secret) != secret
