"""Tests for ironsocket.ktls.

Pure tests run anywhere. Tests marked ``ktls`` need a kernel with kTLS: they run in the VM
(``tools/vm/ktls-vm run -- .venv/bin/python -m pytest -m ktls tests/test_ktls.py``). They skip
when the kernel has no kTLS, unless IRONSOCKET_REQUIRE_KTLS is set (the VM harness sets it):
then they fail, so CI cannot silently skip them.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ironsocket import ktls
from ironsocket.tls13.constants import CipherSuite, ContentType, Group
from ironsocket.tls13.handoff import Handoff, TrafficKeys

SUITES = list(CipherSuite)
KEY_LEN = {
    CipherSuite.TLS_AES_128_GCM_SHA256: 16,
    CipherSuite.TLS_AES_256_GCM_SHA384: 32,
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256: 32,
}
CIPHER_TYPE = {
    CipherSuite.TLS_AES_128_GCM_SHA256: 51,
    CipherSuite.TLS_AES_256_GCM_SHA384: 52,
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256: 54,
}


def make_keys(suite: CipherSuite, rec_seq: int = 0, tag: int = 0) -> TrafficKeys:
    n = KEY_LEN[suite]
    return TrafficKeys(
        traffic_secret=bytes(32),
        key=bytes((i * 7 + tag) & 0xFF for i in range(n)),
        iv=bytes((0xA0 + i + tag) & 0xFF for i in range(12)),
        rec_seq=rec_seq,
    )


# ---------------------------------------------------------------- pure (host) tests
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
@pytest.mark.parametrize("rec_seq", [0, 5, 0x0102030405060708, (1 << 64) - 1])
def test_crypto_info_exact_layout(suite: CipherSuite, rec_seq: int) -> None:
    keys = make_keys(suite, rec_seq)
    info = ktls.build_crypto_info(suite, keys)
    head = struct.pack("=HH", 0x0304, CIPHER_TYPE[suite])
    seq = rec_seq.to_bytes(8, "big")
    if suite is CipherSuite.TLS_CHACHA20_POLY1305_SHA256:
        expected = head + keys.iv + keys.key + seq  # iv[12], key[32], rec_seq[8]
    else:
        expected = head + keys.iv[4:] + keys.key + keys.iv[:4] + seq  # iv[8], key, salt[4], rec_seq
    assert info == expected
    assert len(info) == {16: 40, 32: 56}[KEY_LEN[suite]] == ktls.crypto_info_size(suite)
    assert ktls.parse_crypto_info(info) == (suite, keys.key, keys.iv, rec_seq)


def test_crypto_info_rejects_bad_input() -> None:
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    good = make_keys(suite)
    with pytest.raises(ValueError, match="key must be 16"):
        ktls.build_crypto_info(suite, make_keys(CipherSuite.TLS_AES_256_GCM_SHA384))
    with pytest.raises(ValueError, match="rec_seq"):
        ktls.build_crypto_info(suite, TrafficKeys(traffic_secret=b"", key=good.key, iv=good.iv, rec_seq=1 << 64))
    with pytest.raises(ValueError, match="iv must be 12"):
        ktls.build_crypto_info(suite, TrafficKeys(traffic_secret=b"", key=good.key, iv=good.iv[:8], rec_seq=0))
    info = ktls.build_crypto_info(suite, good)
    with pytest.raises(ValueError, match="must be 40 bytes"):
        ktls.parse_crypto_info(info + b"\0")
    with pytest.raises(ValueError, match="unknown kTLS cipher_type"):
        ktls.parse_crypto_info(struct.pack("=HH", 0x0304, 99) + info[4:])
    with pytest.raises(ValueError, match="not TLS 1.3"):
        ktls.parse_crypto_info(struct.pack("=HH", 0x0303, 51) + info[4:])


def test_constants() -> None:
    assert (ktls.SOL_TLS, ktls.TCP_ULP, ktls.TLS_TX, ktls.TLS_RX) == (282, 31, 1, 2)
    assert (ktls.TLS_TX_ZEROCOPY_RO, ktls.TLS_RX_EXPECT_NO_PAD) == (3, 4)
    assert (ktls.TLS_SET_RECORD_TYPE, ktls.TLS_GET_RECORD_TYPE, ktls.TLS_1_3_VERSION) == (1, 2, 0x0304)


def test_probe_never_raises_and_describes() -> None:
    p = ktls.probe()
    text = p.describe()
    assert p.kernel_release in text and "\n" in text
    if p.available:
        assert p.reason == "" and p.suites
    else:
        assert p.reason and "NOT available" in text


def test_probe_on_kernel_without_ktls() -> None:
    if os.path.exists("/proc/net/tls_stat") or ktls.probe().available:
        pytest.skip("this kernel has kTLS")
    p = ktls.probe()
    assert not p.available
    assert p.reason == "kernel has no 'tls' module (CONFIG_TLS off or module not loaded)"
    assert not p.suites and not p.rekey_rx


def test_parse_tls_stat() -> None:
    text = "TlsCurrTxSw                     \t1\nTlsDecryptError                 \t7\ngarbage line here\n"
    assert ktls.parse_tls_stat(text) == {"TlsCurrTxSw": 1, "TlsDecryptError": 7}
    assert ktls.tls_stat(ktls.Path("/nonexistent/tls_stat")) == {}


def test_install_refuses_unprocessed_bytes() -> None:
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    handoff = Handoff(
        cipher_suite=suite, group=Group.X25519, read=make_keys(suite), write=make_keys(suite), unprocessed=b"\x17\x03"
    )
    a, b = socket.socketpair()
    with a, b, pytest.raises(ktls.KtlsError, match="2 bytes of ciphertext"):
        ktls.install(a, handoff)


def test_no_secrets_in_repr() -> None:
    keys = make_keys(CipherSuite.TLS_AES_256_GCM_SHA384)
    st = ktls.KtlsState(
        cipher_suite=CipherSuite.TLS_AES_256_GCM_SHA384,
        tx=ktls.DirectionState(rec_seq=3, key=keys.key, iv=keys.iv),
        rx=None,
    )
    assert "rec_seq=3" in repr(st)
    assert keys.key.hex() not in repr(st) and repr(keys.key) not in repr(st) and repr(keys.iv) not in repr(st)


def test_errors_carry_errno() -> None:
    e = ktls.KtlsDecryptError("x", errno.EBADMSG)
    assert e.errno == errno.EBADMSG and "EBADMSG" in str(e)
    assert isinstance(e, ktls.KtlsRecordError) and isinstance(e, ktls.KtlsError)


# ---------------------------------------------------------------- kTLS (VM) tests
@pytest.fixture(scope="module")
def kernel() -> ktls.KtlsProbe:
    p = ktls.probe()
    if not p.available:
        if os.environ.get("IRONSOCKET_REQUIRE_KTLS"):
            pytest.fail(f"IRONSOCKET_REQUIRE_KTLS is set but kTLS is unavailable: {p.reason}")
        pytest.skip(f"no kTLS: {p.reason}")
    return p


@pytest.fixture
def pair(kernel: ktls.KtlsProbe) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = ktls._tcp_pair()
    for s in (a, b):
        s.settimeout(20)
    with a, b:
        yield a, b


def _aead(suite: CipherSuite, key: bytes) -> AESGCM | ChaCha20Poly1305:
    return ChaCha20Poly1305(key) if suite is CipherSuite.TLS_CHACHA20_POLY1305_SHA256 else AESGCM(key)


def _nonce(iv: bytes, seq: int) -> bytes:
    """RFC 8446 §5.3: the 64-bit seq, left-padded to the IV length, XOR the IV."""
    return bytes(x ^ y for x, y in zip(iv, seq.to_bytes(len(iv), "big")))


def seal(suite: CipherSuite, keys: TrafficKeys, seq: int, ctype: int, data: bytes, pad: int = 0) -> bytes:
    """RFC 8446 §5.2: TLSCiphertext with TLSInnerPlaintext = data || type || zeros."""
    inner = data + bytes([ctype]) + bytes(pad)
    header = bytes([23, 3, 3]) + (len(inner) + 16).to_bytes(2, "big")
    return header + _aead(suite, keys.key).encrypt(_nonce(keys.iv, seq), inner, header)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "EOF"
        buf += chunk
    return buf


def read_record(sock: socket.socket, suite: CipherSuite, keys: TrafficKeys, seq: int) -> tuple[int, bytes]:
    """Read one raw record and open it in userspace; returns (content type, data)."""
    header = recv_exact(sock, 5)
    assert header[:3] == b"\x17\x03\x03", header.hex()
    body = recv_exact(sock, int.from_bytes(header[3:5], "big"))
    inner = _aead(suite, keys.key).decrypt(_nonce(keys.iv, seq), body, header).rstrip(b"\0")
    return inner[-1], inner[:-1]


def recv_n(sock: socket.socket, n: int) -> bytes:
    """Receive n bytes of application data from a kTLS RX socket."""
    buf = b""
    while len(buf) < n:
        ctype, data = ktls.recv_record(sock, n - len(buf))
        assert ctype == ContentType.APPLICATION_DATA and data
        buf += data
    return buf


@pytest.mark.ktls
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_tx_records_open_in_userspace(suite: CipherSuite, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    keys = make_keys(suite, rec_seq=5)
    before = ktls.tls_stat()
    ktls.install_tx(a, suite, keys)
    after = ktls.tls_stat()
    assert after["TlsCurrTxSw"] == before["TlsCurrTxSw"] + 1
    assert after["TlsTxSw"] == before["TlsTxSw"] + 1
    assert ktls.session_mode(a) == "sw" and ktls.session_mode(b) is None

    a.sendall(b"hello")  # one send without MSG_MORE = one record
    a.sendall(b"world!")
    ktls.send_record(a, ContentType.ALERT, b"\x01\x00")
    assert read_record(b, suite, keys, 5) == (23, b"hello")
    assert read_record(b, suite, keys, 6) == (23, b"world!")
    assert read_record(b, suite, keys, 7) == (21, b"\x01\x00")

    st = ktls.read_back(a)
    assert st.cipher_suite is suite and st.rx is None
    assert st.tx is not None and (st.tx.key, st.tx.iv, st.tx.rec_seq) == (keys.key, keys.iv, 8)


@pytest.mark.ktls
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_rx_kernel_opens_userspace_records(suite: CipherSuite, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    keys = make_keys(suite, rec_seq=9, tag=3)
    before = ktls.tls_stat()
    ktls.install_rx(b, suite, keys)
    assert ktls.tls_stat()["TlsCurrRxSw"] == before["TlsCurrRxSw"] + 1
    a.sendall(seal(suite, keys, 9, 23, b"first ") + seal(suite, keys, 10, 23, b"second", pad=7))
    assert recv_n(b, 12) == b"first second"
    st = ktls.read_back(b)
    assert st.tx is None and st.rx is not None
    assert (st.cipher_suite, st.rx.key, st.rx.iv, st.rx.rec_seq) == (suite, keys.key, keys.iv, 11)


@pytest.mark.ktls
def test_install_handoff_and_control_record(kernel: ktls.KtlsProbe, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    suite = CipherSuite.TLS_AES_256_GCM_SHA384
    s2c, c2s = make_keys(suite, rec_seq=2, tag=1), make_keys(suite, rec_seq=4, tag=2)
    ktls.install(a, Handoff(cipher_suite=suite, group=Group.X25519, read=c2s, write=s2c))
    ktls.install(b, Handoff(cipher_suite=suite, group=Group.X25519, read=s2c, write=c2s))
    assert ktls.set_rx_expect_no_pad(b) is kernel.rx_expect_no_pad
    assert ktls.set_zerocopy_ro(a) is kernel.tx_zerocopy_ro

    a.sendall(b"data")
    ktls.send_record(a, ContentType.ALERT, b"\x01\x00")  # close_notify
    b.sendall(b"reply")
    assert ktls.recv_record(a, 100) == (23, b"reply")
    assert ktls.recv_record(b, 100) == (23, b"data")  # stops at the record-type boundary
    with pytest.raises(OSError) as exc:  # plain recv cannot deliver a control record
        b.recv(100)
    assert exc.value.errno == errno.EIO
    assert ktls.recv_record(b, 100) == (21, b"\x01\x00")  # ... and EIO did not consume it
    sa, sb = ktls.read_back(a), ktls.read_back(b)
    assert (sa.tx_rec_seq, sa.rx_rec_seq, sb.tx_rec_seq, sb.rx_rec_seq) == (4, 5, 5, 4)


@pytest.mark.ktls
def test_bad_record_is_ebadmsg(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    keys = make_keys(suite)
    ktls.install_rx(b, suite, keys)
    before = ktls.tls_stat()["TlsDecryptError"]
    a.sendall(seal(suite, make_keys(suite, tag=9), 0, 23, b"forged"))
    with pytest.raises(ktls.KtlsDecryptError) as exc:
        ktls.recv_record(b, 100)
    assert exc.value.errno == errno.EBADMSG
    assert ktls.tls_stat()["TlsDecryptError"] == before + 1


@pytest.mark.ktls
def test_rekey_matches_probe(kernel: ktls.KtlsProbe, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    suite = CipherSuite.TLS_CHACHA20_POLY1305_SHA256
    ktls.install_tx(a, suite, make_keys(suite))
    ktls.install_rx(b, suite, make_keys(suite))
    new = make_keys(suite, tag=5)
    for update, sock, supported in ((ktls.update_tx, a, kernel.rekey_tx), (ktls.update_rx, b, kernel.rekey_rx)):
        if supported:
            update(sock, suite, new)
        else:
            with pytest.raises(ktls.KtlsRekeyUnsupported, match="kernel cannot rekey") as exc:
                update(sock, suite, new)
            assert exc.value.errno is not None
    # a refused rekey leaves the old keys working
    if not kernel.rekey_tx and not kernel.rekey_rx:
        a.sendall(b"still fine")
        assert recv_n(b, 10) == b"still fine"
