#!/usr/bin/env python3
"""Cross-check the RFC 8448 trace fixtures in fixtures/rfc8448/.

Every value recorded in simple_1rtt.json (RFC 8448 section 3) and hrr.json
(RFC 8448 section 5) is recomputed from first principles where possible:

* ephemeral private keys -> public keys, ECDHE shared secrets (x25519 / P-256)
* the whole TLS 1.3 key schedule (HKDF-Extract / HKDF-Expand-Label / Derive-Secret)
  with the transcript (including the HRR message_hash construction)
* Finished verify_data
* every encrypted record is decrypted with the derived keys and compared with the
  recorded plaintext messages, then re-encrypted and compared byte for byte
* the RSA key (PEM) against the certificate, and the CertificateVerify RSA-PSS
  signatures: verified, and re-signed with the recovered salt to reproduce the
  exact bytes
* message/record framing (record header = 5 bytes + handshake message)

Exits non-zero on any mismatch.  Usage: .venv/bin/python tools/check_rfc8448_fixtures.py
"""
from __future__ import annotations

import hashlib
import hmac
import json
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "rfc8448"

HASH_LEN = 32
failures: list[str] = []
passes = 0


def check(name: str, got: bytes | str | bool, want: bytes | str | bool = True) -> None:
    global passes
    if isinstance(got, bytes):
        got = got.hex()
    if isinstance(want, bytes):
        want = want.hex()
    if got == want:
        passes += 1
    else:
        failures.append(f"{name}: got {got!r}, want {want!r}")
        print(f"  MISMATCH {name}\n    got  {got}\n    want {want}")


# --------------------------------------------------------------------------- crypto helpers
def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:length]


def hkdf_expand_label(secret: bytes, label: str, context: bytes, length: int) -> bytes:
    full = b"tls13 " + label.encode()
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    return hkdf_expand(secret, info, length)


def derive_secret(secret: bytes, label: str, transcript: bytes) -> bytes:
    return hkdf_expand_label(secret, label, sha256(transcript), HASH_LEN)


def traffic_keys(secret: bytes) -> tuple[bytes, bytes]:
    return hkdf_expand_label(secret, "key", b"", 16), hkdf_expand_label(secret, "iv", b"", 12)


def nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big")))


def open_record(key: bytes, iv: bytes, seq: int, record: bytes) -> tuple[bytes, int]:
    """Decrypt a TLSCiphertext record; return (content, inner content type)."""
    inner = AESGCM(key).decrypt(nonce(iv, seq), record[5:], record[:5])
    stripped = inner.rstrip(b"\x00")
    return stripped[:-1], stripped[-1]


def seal_record(key: bytes, iv: bytes, seq: int, content: bytes, ctype: int) -> bytes:
    inner = content + bytes([ctype])
    header = b"\x17\x03\x03" + (len(inner) + 16).to_bytes(2, "big")
    return header + AESGCM(key).encrypt(nonce(iv, seq), inner, header)


def check_record(name: str, key: bytes, iv: bytes, seq: int, record: bytes, content: bytes, ctype: int) -> None:
    try:
        got, got_type = open_record(key, iv, seq, record)
    except Exception as exc:  # InvalidTag etc.
        check(f"{name}: decrypts", f"error {exc!r}", "ok")
        return
    check(f"{name}: plaintext", got, content)
    check(f"{name}: inner content type", got_type, ctype)
    check(f"{name}: no padding (length)", len(record) - 5, len(content) + 1 + 16)
    check(f"{name}: re-encrypts byte for byte", seal_record(key, iv, seq, content, ctype), record)


def check_plain_record(name: str, record: bytes, message: bytes, version: bytes) -> None:
    check(f"{name}: header", record[:5], b"\x16" + version + len(message).to_bytes(2, "big"))
    check(f"{name}: body", record[5:], message)


def check_handshake_header(name: str, msg: bytes, hs_type: int) -> None:
    check(f"{name}: handshake type", msg[0], hs_type)
    check(f"{name}: handshake length", int.from_bytes(msg[1:4], "big"), len(msg) - 4)


def x25519_pub(priv: bytes) -> bytes:
    return x25519.X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def p256_priv(priv: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(priv, "big"), ec.SECP256R1())


def p256_pub(priv: bytes) -> bytes:
    return p256_priv(priv).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def extensions(body: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(body):
        t = int.from_bytes(body[i : i + 2], "big")
        ln = int.from_bytes(body[i + 2 : i + 4], "big")
        out.append((t, body[i + 4 : i + 4 + ln]))
        i += 4 + ln
    if i != len(body):
        raise ValueError("bad extension block")
    return out


def server_hello_parts(msg: bytes) -> dict:
    body = msg[4:]
    sid_len = body[34]
    p = 35 + sid_len
    return {
        "version": body[:2],
        "random": body[2:34],
        "session_id": body[35:p],
        "cipher": body[p : p + 2],
        "compression": body[p + 2],
        "extensions": extensions(body[p + 5 : p + 5 + int.from_bytes(body[p + 3 : p + 5], "big")]),
    }


def client_hello_extensions(msg: bytes) -> list[tuple[int, bytes]]:
    body = msg[4:]
    p = 34
    p += 1 + body[p]  # session id
    p += 2 + int.from_bytes(body[p : p + 2], "big")  # cipher suites
    p += 1 + body[p]  # compression
    ln = int.from_bytes(body[p : p + 2], "big")
    check("client hello: extensions fill the message", p + 2 + ln, len(body))
    return extensions(body[p + 2 : p + 2 + ln])


def mgf1(seed: bytes, length: int) -> bytes:
    out, c = b"", 0
    while len(out) < length:
        out += sha256(seed + c.to_bytes(4, "big"))
        c += 1
    return out[:length]


def pss_sign_with_salt(key: rsa.RSAPrivateKey, message: bytes, salt: bytes) -> bytes:
    """EMSA-PSS (SHA-256, MGF1-SHA-256) + RSASP1 with an explicit salt (RFC 8017 9.1.1)."""
    nums = key.private_numbers()
    n = nums.public_numbers.n
    em_bits = n.bit_length() - 1
    em_len = (em_bits + 7) // 8
    m_hash = sha256(message)
    h = sha256(b"\x00" * 8 + m_hash + salt)
    db = b"\x00" * (em_len - len(salt) - HASH_LEN - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, mgf1(h, len(db))))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    em = bytes(masked) + h + b"\xbc"
    sig = pow(int.from_bytes(em, "big"), nums.d, n)
    return sig.to_bytes((n.bit_length() + 7) // 8, "big")


def cv_content(transcript_hash: bytes) -> bytes:
    return b"\x20" * 64 + b"TLS 1.3, server CertificateVerify" + b"\x00" + transcript_hash


# --------------------------------------------------------------------------- common checks
def check_rsa_and_certificate(v: dict, prefix: str) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(v["server_rsa_private_key_pem"].encode(), password=None)
    check(f"{prefix}: PEM is PKCS#8", v["server_rsa_private_key_pem"].startswith("-----BEGIN PRIVATE KEY-----"))
    assert isinstance(key, rsa.RSAPrivateKey)
    nums = key.private_numbers()
    if "server_rsa_modulus" in v:
        n, e = int(v["server_rsa_modulus"], 16), int(v["server_rsa_public_exponent"], 16)
        d, p, q = (int(v[k], 16) for k in ("server_rsa_private_exponent", "server_rsa_prime1", "server_rsa_prime2"))
        check(f"{prefix}: p*q == n", p * q == n)
        check(f"{prefix}: e*d == 1 mod lcm(p-1,q-1)", (e * d) % ((p - 1) * (q - 1) // __import__("math").gcd(p - 1, q - 1)) == 1)
        check(f"{prefix}: PEM numbers match trace", (nums.public_numbers.n, nums.public_numbers.e, nums.d, {nums.p, nums.q} == {p, q}) == (n, e, d, True))
    check(f"{prefix}: CRT dmp1", nums.dmp1, nums.d % (nums.p - 1))
    check(f"{prefix}: CRT dmq1", nums.dmq1, nums.d % (nums.q - 1))
    check(f"{prefix}: CRT iqmp", (nums.iqmp * nums.q) % nums.p, 1)

    cert_msg = bytes.fromhex(v["certificate"])
    check_handshake_header(f"{prefix}: Certificate", cert_msg, 11)
    der = bytes.fromhex(v["server_certificate_der"])
    expected_msg = (
        b"\x0b" + (len(der) + 9).to_bytes(3, "big") + b"\x00" + (len(der) + 5).to_bytes(3, "big")
        + len(der).to_bytes(3, "big") + der + b"\x00\x00"
    )
    check(f"{prefix}: Certificate message == framing of server_certificate_der (empty context, no entry extensions)", expected_msg, cert_msg)
    cert = x509.load_der_x509_certificate(der)
    check(f"{prefix}: certificate public key == PEM key", cert.public_key().public_numbers() == key.public_key().public_numbers())
    try:
        cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        check(f"{prefix}: certificate self-signature verifies", True)
    except Exception as exc:
        check(f"{prefix}: certificate self-signature verifies", repr(exc), "ok")
    return key


def check_certificate_verify(v: dict, prefix: str, key: rsa.RSAPrivateKey, th_before_cv: bytes) -> None:
    cv = bytes.fromhex(v["certificate_verify"])
    check_handshake_header(f"{prefix}: CertificateVerify", cv, 15)
    check(f"{prefix}: CertificateVerify scheme", cv[4:6].hex(), v["certificate_verify_signature_scheme"])
    sig = cv[8:]
    check(f"{prefix}: CertificateVerify sig length", int.from_bytes(cv[6:8], "big"), len(sig))
    content = cv_content(th_before_cv)
    try:
        key.public_key().verify(
            sig, content, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=HASH_LEN), hashes.SHA256()
        )
        check(f"{prefix}: CertificateVerify RSA-PSS signature verifies", True)
    except Exception as exc:
        check(f"{prefix}: CertificateVerify RSA-PSS signature verifies", repr(exc), "ok")
    salt = bytes.fromhex(v["certificate_verify_pss_salt"])
    check(f"{prefix}: re-signing with certificate_verify_pss_salt reproduces the signature", pss_sign_with_salt(key, content, salt), sig)


def check_schedule(v: dict, prefix: str, shared: bytes, th_hello: bytes, th_sf: bytes, th_cf: bytes) -> dict:
    zeros = b"\x00" * HASH_LEN
    early = hkdf_extract(zeros, zeros)
    check(f"{prefix}: early_secret", early, bytes.fromhex(v["early_secret"]))
    derived = derive_secret(early, "derived", b"")
    check(f"{prefix}: derived_for_handshake", derived, bytes.fromhex(v["derived_for_handshake"]))
    hs = hkdf_extract(derived, shared)
    check(f"{prefix}: handshake_secret", hs, bytes.fromhex(v["handshake_secret"]))
    chts = hkdf_expand_label(hs, "c hs traffic", th_hello, 32)
    shts = hkdf_expand_label(hs, "s hs traffic", th_hello, 32)
    check(f"{prefix}: client_handshake_traffic_secret", chts, bytes.fromhex(v["client_handshake_traffic_secret"]))
    check(f"{prefix}: server_handshake_traffic_secret", shts, bytes.fromhex(v["server_handshake_traffic_secret"]))
    dm = derive_secret(hs, "derived", b"")
    check(f"{prefix}: derived_for_master", dm, bytes.fromhex(v["derived_for_master"]))
    ms = hkdf_extract(dm, zeros)
    check(f"{prefix}: master_secret", ms, bytes.fromhex(v["master_secret"]))
    out = {"chts": chts, "shts": shts, "ms": ms}
    for who, sec in (("server", shts), ("client", chts)):
        k, iv = traffic_keys(sec)
        check(f"{prefix}: {who}_handshake_key", k, bytes.fromhex(v[f"{who}_handshake_key"]))
        check(f"{prefix}: {who}_handshake_iv", iv, bytes.fromhex(v[f"{who}_handshake_iv"]))
        fk = hkdf_expand_label(sec, "finished", b"", 32)
        check(f"{prefix}: {who}_finished_key", fk, bytes.fromhex(v[f"{who}_finished_key"]))
        out[f"{who}_hs"] = (k, iv)
        out[f"{who}_fk"] = fk
    cats = hkdf_expand_label(ms, "c ap traffic", th_sf, 32)
    sats = hkdf_expand_label(ms, "s ap traffic", th_sf, 32)
    ems = hkdf_expand_label(ms, "exp master", th_sf, 32)
    rms = hkdf_expand_label(ms, "res master", th_cf, 32)
    check(f"{prefix}: client_application_traffic_secret_0", cats, bytes.fromhex(v["client_application_traffic_secret_0"]))
    check(f"{prefix}: server_application_traffic_secret_0", sats, bytes.fromhex(v["server_application_traffic_secret_0"]))
    check(f"{prefix}: exporter_master_secret", ems, bytes.fromhex(v["exporter_master_secret"]))
    check(f"{prefix}: resumption_master_secret", rms, bytes.fromhex(v["resumption_master_secret"]))
    for who, sec in (("server", sats), ("client", cats)):
        k, iv = traffic_keys(sec)
        check(f"{prefix}: {who}_application_key", k, bytes.fromhex(v[f"{who}_application_key"]))
        check(f"{prefix}: {who}_application_iv", iv, bytes.fromhex(v[f"{who}_application_iv"]))
        out[f"{who}_ap"] = (k, iv)
    out["rms"] = rms
    return out


def finished_msg(fk: bytes, th: bytes) -> bytes:
    return b"\x14\x00\x00\x20" + hmac.new(fk, th, hashlib.sha256).digest()


# --------------------------------------------------------------------------- section 3
def check_simple(v: dict) -> None:
    P = "simple_1rtt"
    b = {k: bytes.fromhex(val) for k, val in v.items() if isinstance(val, str) and k not in ("source", "server_rsa_private_key_pem")}

    check(f"{P}: client x25519 public", x25519_pub(b["client_x25519_private"]), b["client_x25519_public"])
    check(f"{P}: server x25519 public", x25519_pub(b["server_x25519_private"]), b["server_x25519_public"])
    s1 = x25519.X25519PrivateKey.from_private_bytes(b["server_x25519_private"]).exchange(
        x25519.X25519PublicKey.from_public_bytes(b["client_x25519_public"]))
    s2 = x25519.X25519PrivateKey.from_private_bytes(b["client_x25519_private"]).exchange(
        x25519.X25519PublicKey.from_public_bytes(b["server_x25519_public"]))
    check(f"{P}: X25519(server_priv, client_pub) == shared_secret", s1, b["shared_secret"])
    check(f"{P}: X25519(client_priv, server_pub) == shared_secret", s2, b["shared_secret"])

    ch, sh = b["client_hello"], b["server_hello"]
    check_handshake_header(f"{P}: ClientHello", ch, 1)
    check_handshake_header(f"{P}: ServerHello", sh, 2)
    check_plain_record(f"{P}: client_hello_record", b["client_hello_record"], ch, b"\x03\x01")
    check_plain_record(f"{P}: server_hello_record", b["server_hello_record"], sh, b"\x03\x03")
    check(f"{P}: ClientHello random", ch[6:38], b["client_random"])
    ch_ext = dict(client_hello_extensions(ch))
    check(f"{P}: ClientHello key_share carries client public", ch_ext[0x33][-32:], b["client_x25519_public"])
    shp = server_hello_parts(sh)
    check(f"{P}: ServerHello random", shp["random"], b["server_random"])
    check(f"{P}: ServerHello session id empty", shp["session_id"], b"")
    check(f"{P}: ServerHello cipher", shp["cipher"], b"\x13\x01")
    check(f"{P}: ServerHello extension order", [t for t, _ in shp["extensions"]], [0x33, 0x2B])
    check(f"{P}: ServerHello key_share", dict(shp["extensions"])[0x33], b"\x00\x1d\x00\x20" + b["server_x25519_public"])
    check(f"{P}: ServerHello supported_versions", dict(shp["extensions"])[0x2B], b"\x03\x04")

    ee = b["encrypted_extensions"]
    check_handshake_header(f"{P}: EncryptedExtensions", ee, 8)
    ee_ext = extensions(ee[6:])
    check(f"{P}: EE extension order", [t for t, _ in ee_ext], [0x0A, 0x1C, 0x00])
    check(f"{P}: EE supported_groups == client's list", ee_ext[0][1], ch_ext[0x0A])
    check(f"{P}: EE record_size_limit", ee_ext[1][1], b"\x40\x01")
    check(f"{P}: EE server_name empty", ee_ext[2][1], b"")

    key = check_rsa_and_certificate(v, P)
    cert, cv, sfin, cfin = b["certificate"], b["certificate_verify"], b["server_finished"], b["client_finished"]
    check(f"{P}: transcript_hash_ch_sh", sha256(ch + sh), b["transcript_hash_ch_sh"])
    th_cv = sha256(ch + sh + ee + cert)
    check_certificate_verify(v, P, key, th_cv)
    th_sf = sha256(ch + sh + ee + cert + cv + sfin)
    th_cf = sha256(ch + sh + ee + cert + cv + sfin + cfin)
    check(f"{P}: transcript_hash_ch_sf", th_sf, b["transcript_hash_ch_sf"])
    check(f"{P}: transcript_hash_ch_cf", th_cf, b["transcript_hash_ch_cf"])

    ks = check_schedule(v, P, s1, sha256(ch + sh), th_sf, th_cf)
    check(f"{P}: server Finished", finished_msg(ks["server_fk"], sha256(ch + sh + ee + cert + cv)), sfin)
    check(f"{P}: client Finished", finished_msg(ks["client_fk"], th_sf), cfin)

    check_record(f"{P}: server_handshake_record", *ks["server_hs"], 0, b["server_handshake_record"], ee + cert + cv + sfin, 0x16)
    check_record(f"{P}: client_finished_record", *ks["client_hs"], 0, b["client_finished_record"], cfin, 0x16)

    nst = b["new_session_ticket"]
    check_handshake_header(f"{P}: NewSessionTicket", nst, 4)
    check(f"{P}: NST lifetime", int.from_bytes(nst[4:8], "big"), 30)
    check(f"{P}: NST age_add", nst[8:12], b"\xfa\xd6\xaa\xc5")
    check(f"{P}: NST nonce", nst[12:15], b"\x02" + b["ticket_nonce"])
    tlen = int.from_bytes(nst[15:17], "big")
    check(f"{P}: NST extensions (early_data max 1024)", nst[17 + tlen :], b"\x00\x08\x00\x2a\x00\x04\x00\x00\x04\x00")
    check(f"{P}: resumption PSK", hkdf_expand_label(ks["rms"], "resumption", b["ticket_nonce"], 32), b["resumption_psk"])
    check_record(f"{P}: new_session_ticket_record", *ks["server_ap"], 0, b["new_session_ticket_record"], nst, 0x16)
    check_record(f"{P}: client_application_data_record", *ks["client_ap"], 0, b["client_application_data_record"], b["client_application_data"], 0x17)
    check_record(f"{P}: server_application_data_record", *ks["server_ap"], 1, b["server_application_data_record"], b["server_application_data"], 0x17)
    check_record(f"{P}: client_alert_record", *ks["client_ap"], 1, b["client_alert_record"], b["client_alert_plaintext"], 0x15)
    check_record(f"{P}: server_alert_record", *ks["server_ap"], 2, b["server_alert_record"], b["server_alert_plaintext"], 0x15)


# --------------------------------------------------------------------------- section 5
HRR_RANDOM = sha256(b"HelloRetryRequest")


def check_hrr(v: dict) -> None:
    P = "hrr"
    b = {k: bytes.fromhex(val) for k, val in v.items() if isinstance(val, str) and k not in ("source", "server_rsa_private_key_pem")}

    check(f"{P}: client x25519 public (ClientHello1)", x25519_pub(b["client_x25519_private"]), b["client_x25519_public"])
    check(f"{P}: client P-256 public", p256_pub(b["client_p256_private"]), b["client_p256_public"])
    check(f"{P}: server P-256 public", p256_pub(b["server_p256_private"]), b["server_p256_public"])
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b["client_p256_public"])
    shared = p256_priv(b["server_p256_private"]).exchange(ec.ECDH(), peer)
    check(f"{P}: ECDH(server_priv, client_pub) == shared_secret", shared, b["shared_secret"])
    peer2 = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b["server_p256_public"])
    check(f"{P}: ECDH(client_priv, server_pub) == shared_secret", p256_priv(b["client_p256_private"]).exchange(ec.ECDH(), peer2), b["shared_secret"])

    ch1, hrr, ch2, sh = b["client_hello_1"], b["hello_retry_request"], b["client_hello_2"], b["server_hello"]
    for name, m, t in (("ClientHello1", ch1, 1), ("HRR", hrr, 2), ("ClientHello2", ch2, 1), ("ServerHello", sh, 2)):
        check_handshake_header(f"{P}: {name}", m, t)
    check_plain_record(f"{P}: client_hello_1_record", b["client_hello_1_record"], ch1, b"\x03\x01")
    check_plain_record(f"{P}: hello_retry_request_record", b["hello_retry_request_record"], hrr, b"\x03\x03")
    check_plain_record(f"{P}: client_hello_2_record", b["client_hello_2_record"], ch2, b"\x03\x03")
    check_plain_record(f"{P}: server_hello_record", b["server_hello_record"], sh, b"\x03\x03")
    check(f"{P}: ClientHello2 is 512 bytes", len(ch2), 512)
    check(f"{P}: ClientHello randoms", (ch1[6:38], ch2[6:38]), (b["client_random"], b["client_random"]))

    ch1_ext = dict(client_hello_extensions(ch1))
    check(f"{P}: CH1 key_share is x25519 client public", ch1_ext[0x33], b"\x00\x24\x00\x1d\x00\x20" + b["client_x25519_public"])
    ch2_ext = client_hello_extensions(ch2)
    ch2d = dict(ch2_ext)
    check(f"{P}: CH2 key_share is P-256 client public", ch2d[0x33], b"\x00\x45\x00\x17\x00\x41" + b["client_p256_public"])
    check(f"{P}: CH2 echoes cookie", ch2d[0x2C], len(b["cookie"]).to_bytes(2, "big") + b["cookie"])

    hp = server_hello_parts(hrr)
    check(f"{P}: HRR special random", hp["random"], HRR_RANDOM)
    check(f"{P}: HRR session id empty", hp["session_id"], b"")
    check(f"{P}: HRR cipher", hp["cipher"], b"\x13\x01")
    check(f"{P}: HRR extension order", [t for t, _ in hp["extensions"]], [0x33, 0x2C, 0x2B])
    hd = dict(hp["extensions"])
    check(f"{P}: HRR selected_group secp256r1", hd[0x33], b"\x00\x17")
    check(f"{P}: HRR cookie", hd[0x2C], len(b["cookie"]).to_bytes(2, "big") + b["cookie"])
    check(f"{P}: HRR supported_versions", hd[0x2B], b"\x03\x04")

    sp = server_hello_parts(sh)
    check(f"{P}: ServerHello random", sp["random"], b["server_random"])
    check(f"{P}: ServerHello extension order", [t for t, _ in sp["extensions"]], [0x33, 0x2B])
    check(f"{P}: ServerHello key_share", dict(sp["extensions"])[0x33], b"\x00\x17\x00\x41" + b["server_p256_public"])

    ee = b["encrypted_extensions"]
    check_handshake_header(f"{P}: EncryptedExtensions", ee, 8)
    ee_ext = extensions(ee[6:])
    check(f"{P}: EE extension order", [t for t, _ in ee_ext], [0x0A, 0x1C, 0x00])
    check(f"{P}: EE supported_groups", ee_ext[0][1], b"\x00\x06\x00\x17\x00\x18\x00\x1d")
    check(f"{P}: EE record_size_limit", ee_ext[1][1], b"\x40\x01")
    check(f"{P}: EE server_name empty", ee_ext[2][1], b"")

    mh = b"\xfe\x00\x00\x20" + sha256(ch1)
    check(f"{P}: message_hash", mh, b["message_hash"])
    prefix = mh + hrr + ch2 + sh
    check(f"{P}: transcript_hash_to_sh (message_hash construction)", sha256(prefix), b["transcript_hash_to_sh"])

    key = check_rsa_and_certificate(v, P)
    cert, cv, sfin, cfin = b["certificate"], b["certificate_verify"], b["server_finished"], b["client_finished"]
    check_certificate_verify(v, P, key, sha256(prefix + ee + cert))
    th_sf = sha256(prefix + ee + cert + cv + sfin)
    check(f"{P}: transcript_hash_to_sf", th_sf, b["transcript_hash_to_sf"])
    th_cf = sha256(prefix + ee + cert + cv + sfin + cfin)

    ks = check_schedule(v, P, shared, sha256(prefix), th_sf, th_cf)
    check(f"{P}: server Finished", finished_msg(ks["server_fk"], sha256(prefix + ee + cert + cv)), sfin)
    check(f"{P}: client Finished", finished_msg(ks["client_fk"], th_sf), cfin)

    check_record(f"{P}: server_handshake_record", *ks["server_hs"], 0, b["server_handshake_record"], ee + cert + cv + sfin, 0x16)
    check_record(f"{P}: client_finished_record", *ks["client_hs"], 0, b["client_finished_record"], cfin, 0x16)
    check_record(f"{P}: client_alert_record", *ks["client_ap"], 0, b["client_alert_record"], b["client_alert_plaintext"], 0x15)
    check_record(f"{P}: server_alert_record", *ks["server_ap"], 0, b["server_alert_record"], b["server_alert_plaintext"], 0x15)


def main() -> int:
    for name, fn in (("simple_1rtt.json", check_simple), ("hrr.json", check_hrr)):
        path = FIXTURES / name
        data = json.loads(path.read_text())
        for k, val in data.items():
            if isinstance(val, str) and k not in ("source", "server_rsa_private_key_pem"):
                if val != val.lower() or any(c not in "0123456789abcdef" for c in val) or len(val) % 2:
                    failures.append(f"{name}: {k} is not lowercase even-length hex")
        before = passes
        print(f"checking {name} ...")
        try:
            fn(data)
        except Exception as exc:  # a crash is a failure, not a pass
            failures.append(f"{name}: exception {exc!r}")
            print(f"  EXCEPTION {exc!r}")
        print(f"  {passes - before} checks passed")
    if failures:
        print(f"FAILED: {len(failures)} mismatch(es)")
        for f in failures:
            print("  -", f)
        return 1
    print(f"OK: all {passes} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
