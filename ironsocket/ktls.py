"""Kernel TLS (kTLS): the only module that knows the kernel's structs and socket options.

Reference: the kernel documentation ``Documentation/networking/tls.rst`` ("Kernel TLS"); section
names are cited in the docstrings below. Facts verified on Debian 6.1 and 6.12 (in the VM) are in the project's DESIGN.md.

Layout:
- pure, host-testable: constants, :func:`build_crypto_info` / :func:`parse_crypto_info` (the
  ``struct tls12_crypto_info_*`` bytes), :func:`parse_tls_stat`;
- thin socket wrappers: :func:`install` / :func:`install_tx` / :func:`install_rx`,
  :func:`update_tx` / :func:`update_rx` (rekey), :func:`read_back`, :func:`tx_rec_seq`,
  :func:`send_record` / :func:`recv_record` (control records through cmsg),
  :func:`set_zerocopy_ro`, :func:`set_rx_expect_no_pad`, :func:`set_tx_max_payload_len`,
  :func:`session_mode`;
- :func:`probe`: what this kernel accepts, found by trying on a loopback TCP pair; never raises.

TLS 1.3 KeyUpdate (tls.rst "TLS 1.3 Key Updates", Linux >= 6.14): TLS_TX / TLS_RX may be set
again with the next traffic keys and rec_seq 0. After the kernel hands a KeyUpdate record to
``recvmsg`` it pauses RX (reads fail with EKEYEXPIRED, poll reports nothing) until TLS_RX is
set again; TX is never paused, so the caller sends its KeyUpdate under the old key, then sets
TLS_TX. The kernel does not check for nonce reuse: rec_seq 0 with a new key is the caller's
promise. Older kernels (6.1, 6.12) refuse the second setsockopt (EBUSY).

Record size (tls.rst "TLS_TX_MAX_PAYLOAD_LEN", Linux >= 6.19): a u16 limit on the plaintext of
every record the kernel seals; for TLS 1.3 the peer's record_size_limit minus one (RFC 8449
counts the inner content type byte). Set after TLS_TX, before anything is sent.

Errors are :class:`KtlsError` (``.errno`` is the kernel's errno when there is one). Key material
never appears in a repr, an exception message or a log line.
"""

from __future__ import annotations

import errno as _errno
import os
import platform
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .tls13.constants import CipherSuite, ContentType, HandshakeType
from .tls13.handoff import Handoff, TrafficKeys

__all__ = [
    "SOL_TLS", "TCP_ULP", "TLS_TX", "TLS_RX", "TLS_TX_ZEROCOPY_RO", "TLS_RX_EXPECT_NO_PAD",
    "TLS_TX_MAX_PAYLOAD_LEN", "TLS_SET_RECORD_TYPE", "TLS_GET_RECORD_TYPE", "TLS_1_3_VERSION",
    "TLS_CIPHER_AES_GCM_128", "TLS_CIPHER_AES_GCM_256", "TLS_CIPHER_CHACHA20_POLY1305",
    "KtlsError", "KtlsUnavailable", "KtlsUnsupported", "KtlsRekeyUnsupported", "KtlsPartlyInstalled",
    "KtlsRecordError", "KtlsDecryptError", "KtlsKeyExpired",
    "KtlsProbe", "KtlsState", "DirectionState",
    "build_crypto_info", "parse_crypto_info", "crypto_info_size",
    "probe", "install", "install_tx", "install_rx", "update_tx", "update_rx", "read_back", "tx_rec_seq",
    "send_record", "recv_record", "set_zerocopy_ro", "set_rx_expect_no_pad", "set_tx_max_payload_len",
    "tx_max_payload_len", "max_payload_for", "MAX_PAYLOAD",
    "tls_stat", "parse_tls_stat", "session_mode",
]  # fmt: skip

# --- constants (include/uapi/linux/tls.h, include/linux/socket.h, include/uapi/linux/tcp.h) ---
SOL_TLS = 282
TCP_ULP = 31
TLS_TX = 1
TLS_RX = 2
TLS_TX_ZEROCOPY_RO = 3
TLS_RX_EXPECT_NO_PAD = 4
TLS_TX_MAX_PAYLOAD_LEN = 5  # Linux 6.19+
TLS_SET_RECORD_TYPE = 1  # cmsg type on sendmsg
TLS_GET_RECORD_TYPE = 2  # cmsg type on recvmsg
TLS_1_3_VERSION = 0x0304
TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_CHACHA20_POLY1305 = 54

MAX_PAYLOAD = 1 << 14  # what the kernel fills records to (TLS_MAX_PAYLOAD_SIZE)
_HEADER = struct.Struct("=HH")  # u16 version, u16 cipher_type, native byte order
_SEQ_LEN = 8


@dataclass(frozen=True, slots=True)
class _Layout:
    """One ``struct tls12_crypto_info_*``: header, iv, key, salt, rec_seq (in that order)."""

    cipher_type: int
    iv_len: int  # the struct's iv field (the explicit part for AES-GCM)
    key_len: int
    salt_len: int  # the implicit IV part; 0 for ChaCha20 (the whole 12-byte IV is in iv)

    @property
    def size(self) -> int:
        return _HEADER.size + self.iv_len + self.key_len + self.salt_len + _SEQ_LEN


_LAYOUTS: dict[CipherSuite, _Layout] = {
    CipherSuite.TLS_AES_128_GCM_SHA256: _Layout(TLS_CIPHER_AES_GCM_128, 8, 16, 4),  # 40 bytes
    CipherSuite.TLS_AES_256_GCM_SHA384: _Layout(TLS_CIPHER_AES_GCM_256, 8, 32, 4),  # 56 bytes
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256: _Layout(TLS_CIPHER_CHACHA20_POLY1305, 12, 32, 0),  # 56
}
_BY_CIPHER_TYPE = {layout.cipher_type: suite for suite, layout in _LAYOUTS.items()}


# --- errors ---
class KtlsError(Exception):
    """A kTLS operation failed; ``errno`` is the kernel's errno when the kernel said no."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        if errno is not None:
            message = f"{message} [{_errno.errorcode.get(errno, errno)}: {os.strerror(errno)}]"
        super().__init__(message)
        self.errno = errno


class KtlsUnavailable(KtlsError):
    """The kernel has no kTLS (no ``tls`` ULP), or this is not Linux."""


class KtlsUnsupported(KtlsError):
    """The kernel has kTLS but refuses this cipher suite / option."""


class KtlsRekeyUnsupported(KtlsError):
    """A second TLS_TX/TLS_RX (TLS 1.3 KeyUpdate) was refused (tls.rst "TLS 1.3 Key Updates")."""


class KtlsPartlyInstalled(KtlsError):
    """TLS_TX is in the kernel but a later step of :func:`install` failed: the socket can no
    longer carry a userspace record layer (the connection must be closed)."""


class KtlsRecordError(KtlsError):
    """Reading or writing a record failed (EIO: a control record read without a cmsg buffer...)."""


class KtlsDecryptError(KtlsRecordError):
    """EBADMSG: a record failed authentication; the connection is unusable (send bad_record_mac)."""


class KtlsKeyExpired(KtlsRecordError):
    """EKEYEXPIRED: RX paused after a KeyUpdate until new keys are set (tls.rst "TLS 1.3 Key Updates")."""


# --- pure: crypto_info bytes ---
def crypto_info_size(cipher_suite: CipherSuite) -> int:
    """Size of the kernel struct for this suite (getsockopt needs exactly this length)."""
    return _layout(cipher_suite).size


def _layout(cipher_suite: CipherSuite | int) -> _Layout:
    try:
        return _LAYOUTS[CipherSuite(cipher_suite)]
    except (ValueError, KeyError):
        raise KtlsUnsupported(f"no kTLS mapping for cipher suite {cipher_suite!r}") from None


def build_crypto_info(cipher_suite: CipherSuite, traffic_keys: TrafficKeys) -> bytes:
    """Serialise ``struct tls12_crypto_info_*`` for TLS 1.3 (tls.rst "Setting the TLS socket options").

    The 12-byte TLS 1.3 IV (RFC 8446 §5.3) splits as salt = iv[:4], iv = iv[4:] for AES-GCM;
    ChaCha20-Poly1305 takes all 12 bytes as iv. ``rec_seq`` is the next record's sequence number,
    8 bytes big-endian.
    """
    lay = _layout(cipher_suite)
    key, iv12, seq = traffic_keys.key, traffic_keys.iv, traffic_keys.rec_seq
    if len(key) != lay.key_len:
        raise ValueError(f"{CipherSuite(cipher_suite).name}: key must be {lay.key_len} bytes, got {len(key)}")
    if len(iv12) != lay.iv_len + lay.salt_len:
        raise ValueError(f"iv must be {lay.iv_len + lay.salt_len} bytes, got {len(iv12)}")
    if not 0 <= seq < 1 << 64:
        raise ValueError(f"rec_seq out of range: {seq}")
    salt, iv = iv12[: lay.salt_len], iv12[lay.salt_len :]
    return b"".join(
        (_HEADER.pack(TLS_1_3_VERSION, lay.cipher_type), iv, key, salt, seq.to_bytes(_SEQ_LEN, "big"))
    )


def parse_crypto_info(data: bytes) -> tuple[CipherSuite, bytes, bytes, int]:
    """Inverse of :func:`build_crypto_info`: ``(cipher_suite, key, iv12, rec_seq)``."""
    if len(data) < _HEADER.size:
        raise ValueError(f"crypto_info too short: {len(data)} bytes")
    version, cipher_type = _HEADER.unpack_from(data)
    if version != TLS_1_3_VERSION:
        raise ValueError(f"not TLS 1.3 crypto_info: version {version:#06x}")
    suite = _BY_CIPHER_TYPE.get(cipher_type)
    if suite is None:
        raise ValueError(f"unknown kTLS cipher_type {cipher_type}")
    lay = _LAYOUTS[suite]
    if len(data) != lay.size:
        raise ValueError(f"{suite.name} crypto_info must be {lay.size} bytes, got {len(data)}")
    off = _HEADER.size
    iv = data[off : off + lay.iv_len]
    off += lay.iv_len
    key = data[off : off + lay.key_len]
    off += lay.key_len
    salt = data[off : off + lay.salt_len]
    off += lay.salt_len
    return suite, bytes(key), bytes(salt + iv), int.from_bytes(data[off : off + _SEQ_LEN], "big")


# --- install / rekey (tls.rst "Creating a TLS connection", "TLS 1.3 Key Updates") ---
def _set_ulp(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
    except OSError as e:
        if e.errno == _errno.EEXIST and _ulp_name(sock) == "tls":
            return  # already a kTLS socket (e.g. installing RX after TX)
        if e.errno == _errno.ENOENT:
            raise KtlsUnavailable(_NO_MODULE, e.errno) from None
        if e.errno == _errno.ENOTCONN:
            raise KtlsError("the TLS ULP needs a connected TCP socket", e.errno) from None
        raise KtlsError("setsockopt(TCP_ULP, 'tls') failed", e.errno) from None


def _ulp_name(sock: socket.socket) -> str | None:
    try:
        return sock.getsockopt(socket.SOL_TCP, TCP_ULP, 16).rstrip(b"\0").decode() or None
    except OSError:
        return None


def _set_conf(sock: socket.socket, optname: int, suite: CipherSuite, keys: TrafficKeys) -> None:
    info = build_crypto_info(suite, keys)
    try:
        sock.setsockopt(SOL_TLS, optname, info)
    except OSError as e:
        where = "TLS_TX" if optname == TLS_TX else "TLS_RX"
        if e.errno in (_errno.EINVAL, _errno.ENOPROTOOPT, _errno.ENOENT):
            raise KtlsUnsupported(f"kernel rejected {where} for {CipherSuite(suite).name}", e.errno) from None
        raise KtlsError(f"setsockopt({where}) failed", e.errno) from None


def install_tx(sock: socket.socket, cipher_suite: CipherSuite, keys: TrafficKeys) -> None:
    """Hand the sending direction to the kernel: TCP_ULP "tls" (if not yet) then TLS_TX."""
    _set_ulp(sock)
    _set_conf(sock, TLS_TX, cipher_suite, keys)


def install_rx(sock: socket.socket, cipher_suite: CipherSuite, keys: TrafficKeys) -> None:
    """Hand the receiving direction to the kernel: TCP_ULP "tls" (if not yet) then TLS_RX.

    Every byte still in the socket's receive queue is parsed as a record protected by ``keys``
    starting at ``keys.rec_seq``: the caller must not have read past the last handshake record.
    """
    _set_ulp(sock)
    _set_conf(sock, TLS_RX, cipher_suite, keys)


def install(sock: socket.socket, handoff: Handoff, *, tx: bool = True, rx: bool = True) -> None:
    """Install kTLS from a completed handshake: ``handoff.write`` → TX, ``handoff.read`` → RX.

    Refuses RX when ``handoff.unprocessed`` holds ciphertext the kernel will never see (it is
    already out of the socket). ``handoff.plaintext`` is the caller's to deliver first.
    """
    if rx and handoff.unprocessed:
        raise KtlsError(
            f"refusing TLS_RX: {len(handoff.unprocessed)} bytes of ciphertext were read past the "
            "handshake and the kernel cannot see them (finish them in userspace first)"
        )
    _layout(handoff.cipher_suite)
    payload = max_payload_for(handoff.record_size_limit)
    if tx:
        install_tx(sock, handoff.cipher_suite, handoff.write)
    try:
        if tx and payload < MAX_PAYLOAD:
            set_tx_max_payload_len(sock, payload)
        if rx:
            install_rx(sock, handoff.cipher_suite, handoff.read)
    except KtlsError as exc:
        if not tx:
            raise
        raise KtlsPartlyInstalled(f"TLS_TX installed, then: {exc}", exc.errno) from None


def max_payload_for(record_size_limit: int | None) -> int:
    """The TLS_TX_MAX_PAYLOAD_LEN a TLS 1.3 peer's RFC 8449 record_size_limit asks for (the limit
    counts the inner content type byte); :data:`MAX_PAYLOAD` when it asks for nothing less."""
    if record_size_limit is None:
        return MAX_PAYLOAD
    return min(MAX_PAYLOAD, record_size_limit - 1)


def set_tx_max_payload_len(sock: socket.socket, payload_len: int) -> None:
    """TLS_TX_MAX_PAYLOAD_LEN (6.19+): no record the kernel seals carries more than
    ``payload_len`` bytes of content. Raises :class:`KtlsUnsupported` when refused (older
    kernels: ENOPROTOOPT; EBUSY once a record is open)."""
    try:
        sock.setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, struct.pack("=H", payload_len))
    except OSError as e:
        raise KtlsUnsupported(f"kernel rejected TLS_TX_MAX_PAYLOAD_LEN {payload_len}", e.errno) from None


def tx_max_payload_len(sock: socket.socket) -> int | None:
    """The kernel's TLS_TX_MAX_PAYLOAD_LEN for this socket, as getsockopt reports it; None where
    the option does not exist."""
    try:
        return int(struct.unpack("=H", sock.getsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, 2))[0])
    except OSError:
        return None


def _update(sock: socket.socket, optname: int, suite: CipherSuite, keys: TrafficKeys) -> None:
    try:
        sock.setsockopt(SOL_TLS, optname, build_crypto_info(suite, keys))
    except OSError as e:
        where = "TX" if optname == TLS_TX else "RX"
        raise KtlsRekeyUnsupported(f"kernel cannot rekey {where} (TLS 1.3 KeyUpdate)", e.errno) from None


def update_tx(sock: socket.socket, cipher_suite: CipherSuite, keys: TrafficKeys) -> None:
    """Rekey TX after sending a KeyUpdate: set TLS_TX again (tls.rst "TLS 1.3 Key Updates").
    Every record sealed before (the KeyUpdate included) used the old key."""
    _update(sock, TLS_TX, cipher_suite, keys)


def update_rx(sock: socket.socket, cipher_suite: CipherSuite, keys: TrafficKeys) -> None:
    """Rekey RX after receiving a KeyUpdate: set TLS_RX again (tls.rst "TLS 1.3 Key Updates").
    The kernel paused RX at the KeyUpdate, so the next record is the first under ``keys``."""
    _update(sock, TLS_RX, cipher_suite, keys)


# --- read-back ---
@dataclass(frozen=True, slots=True)
class DirectionState:
    """One direction as the kernel holds it now; ``rec_seq`` advances per record."""

    rec_seq: int
    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)  # the 12-byte TLS 1.3 IV (salt || iv for AES-GCM)


@dataclass(frozen=True, slots=True)
class KtlsState:
    """What ``getsockopt(SOL_TLS, TLS_TX/TLS_RX)`` reports; ``None`` = direction not installed."""

    cipher_suite: CipherSuite | None
    tx: DirectionState | None
    rx: DirectionState | None

    @property
    def tx_rec_seq(self) -> int | None:
        return self.tx.rec_seq if self.tx else None

    @property
    def rx_rec_seq(self) -> int | None:
        return self.rx.rec_seq if self.rx else None


def _read_direction(sock: socket.socket, optname: int) -> tuple[CipherSuite, DirectionState] | None:
    try:
        head = sock.getsockopt(SOL_TLS, optname, _HEADER.size)
    except OSError as e:
        if e.errno in (_errno.EBUSY, _errno.ENOPROTOOPT):
            return None  # EBUSY: this direction is not configured; ENOPROTOOPT: no TLS ULP
        raise KtlsError("getsockopt(SOL_TLS) failed", e.errno) from None
    _, cipher_type = _HEADER.unpack(head)
    suite = _BY_CIPHER_TYPE.get(cipher_type)
    if suite is None:
        raise KtlsError(f"kernel reports unknown cipher_type {cipher_type}")
    try:  # the kernel insists on exactly sizeof(struct) (else EINVAL)
        data = sock.getsockopt(SOL_TLS, optname, _LAYOUTS[suite].size)
    except OSError as e:
        raise KtlsError("getsockopt(SOL_TLS) failed", e.errno) from None
    _, key, iv, seq = parse_crypto_info(data)
    return suite, DirectionState(rec_seq=seq, key=key, iv=iv)


def tx_rec_seq(sock: socket.socket, cipher_suite: CipherSuite) -> int | None:
    """TX's next record sequence number as the kernel holds it, in one getsockopt (the relay
    asks before each write); None: TX not installed."""
    try:
        data = sock.getsockopt(SOL_TLS, TLS_TX, _layout(cipher_suite).size)
    except OSError as e:
        if e.errno in (_errno.EBUSY, _errno.ENOPROTOOPT):
            return None
        raise KtlsError("getsockopt(SOL_TLS, TLS_TX) failed", e.errno) from None
    return int.from_bytes(data[-_SEQ_LEN:], "big")


def read_back(sock: socket.socket) -> KtlsState:
    """Read the installed state back (tls.rst does not document it; verified on 6.1)."""
    tx = _read_direction(sock, TLS_TX)
    rx = _read_direction(sock, TLS_RX)
    suite = tx[0] if tx else rx[0] if rx else None
    return KtlsState(cipher_suite=suite, tx=tx[1] if tx else None, rx=rx[1] if rx else None)


# --- records (tls.rst "Send TLS control messages", "Receive TLS control messages") ---
def _record_error(what: str, e: OSError) -> KtlsError:
    if e.errno == _errno.EBADMSG:
        return KtlsDecryptError(f"{what}: record failed to decrypt/authenticate", e.errno)
    if e.errno == _errno.EKEYEXPIRED:
        return KtlsKeyExpired(f"{what}: RX paused after KeyUpdate, set new TLS_RX keys", e.errno)
    if e.errno in (_errno.EIO, _errno.EMSGSIZE, _errno.EINVAL):
        return KtlsRecordError(f"{what}: kTLS record error", e.errno)
    return KtlsRecordError(f"{what} failed", e.errno)


_RECORD_ERRNOS = frozenset({_errno.EBADMSG, _errno.EKEYEXPIRED, _errno.EIO, _errno.EMSGSIZE, _errno.EINVAL})


def send_record(sock: socket.socket, content_type: int, body: bytes) -> int:
    """Send ``body`` as records of ``content_type`` (e.g. alert 21) via a TLS_SET_RECORD_TYPE cmsg."""
    try:
        return sock.sendmsg([body], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([content_type]))])
    except OSError as e:
        if e.errno in _RECORD_ERRNOS:
            raise _record_error("sendmsg", e) from None
        raise


def recv_record(sock: socket.socket, bufsize: int) -> tuple[int, bytes]:
    """Receive from a kTLS RX socket: ``(content_type, data)``; ``(23, b"")`` at EOF.

    A non-application-data record is returned alone (with MSG_EOR) and its type comes in a
    TLS_GET_RECORD_TYPE cmsg; application data may carry no cmsg at all (→ type 23).
    Raises :class:`KtlsDecryptError` (EBADMSG), :class:`KtlsKeyExpired` (EKEYEXPIRED),
    :class:`KtlsRecordError` (EIO etc.); other OSErrors (ECONNRESET...) pass through.
    """
    try:
        data, ancdata, flags, _ = sock.recvmsg(bufsize, socket.CMSG_SPACE(1))
    except OSError as e:
        if e.errno in _RECORD_ERRNOS:
            raise _record_error("recvmsg", e) from None
        raise
    if flags & socket.MSG_CTRUNC:
        raise KtlsRecordError("recvmsg: control data truncated")
    content_type = int(ContentType.APPLICATION_DATA)
    for level, ctype, cdata in ancdata:
        if level == SOL_TLS and ctype == TLS_GET_RECORD_TYPE and cdata:
            content_type = cdata[0]
    return content_type, data


# --- options (tls.rst "Optional optimizations") ---
def _set_int(sock: socket.socket, optname: int, value: int) -> bool:
    try:
        sock.setsockopt(SOL_TLS, optname, value)
        return True
    except OSError:
        return False


def set_zerocopy_ro(sock: socket.socket) -> bool:
    """TLS_TX_ZEROCOPY_RO (5.19+): sendfile without copying; the file must not change in flight."""
    return _set_int(sock, TLS_TX_ZEROCOPY_RO, 1)


def set_rx_expect_no_pad(sock: socket.socket) -> bool:
    """TLS_RX_EXPECT_NO_PAD (6.0+, TLS 1.3, after TLS_RX): decrypt into the user buffer assuming
    no record padding; a padded record is retried (TlsDecryptRetry / TlsRxNoPadViolation)."""
    return _set_int(sock, TLS_RX_EXPECT_NO_PAD, 1)


# --- statistics (tls.rst "Statistics") ---
TLS_STAT_PATH = Path("/proc/net/tls_stat")


def parse_tls_stat(text: str) -> dict[str, int]:
    """Parse ``/proc/net/tls_stat`` text: one ``Name value`` per line."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def tls_stat(path: Path = TLS_STAT_PATH) -> dict[str, int]:
    """All counters of ``/proc/net/tls_stat`` (exists once the tls module is loaded); {} if absent."""
    try:
        return parse_tls_stat(path.read_text())
    except OSError:
        return {}


def session_mode(sock: socket.socket) -> Literal["sw", "device", "unknown"] | None:
    """Software or NIC ("device") kTLS for this socket; ``None`` when it has no TLS ULP.

    Simplification (exact per-socket mode needs TLS_INFO over sock_diag): "sw" while no device
    session exists system-wide (TlsCurrTxDevice + TlsCurrRxDevice == 0), "device" while only
    device sessions exist, otherwise "unknown".
    """
    if _ulp_name(sock) != "tls":
        return None
    st = tls_stat()
    device = st.get("TlsCurrTxDevice", 0) + st.get("TlsCurrRxDevice", 0)
    sw = st.get("TlsCurrTxSw", 0) + st.get("TlsCurrRxSw", 0)
    if device == 0:
        return "sw"
    return "device" if sw == 0 else "unknown"


# --- probe ---
_NO_MODULE = "kernel has no 'tls' module (CONFIG_TLS off or module not loaded)"


@dataclass(frozen=True, slots=True)
class KtlsProbe:
    """What this kernel's kTLS accepts, established by trying on loopback TCP sockets."""

    available: bool
    reason: str  # why not available ("" when available)
    kernel_release: str
    suites: frozenset[CipherSuite] = frozenset()
    tx_zerocopy_ro: bool = False
    rx_expect_no_pad: bool = False
    rekey_tx: bool = False
    rekey_rx: bool = False
    rekey_detail: str = ""  # errno names seen when the second TLS_TX / TLS_RX was refused
    tx_max_payload_len: bool = False  # TLS_TX_MAX_PAYLOAD_LEN (a client record_size_limit < 2^14 + 1)
    tls_stat_present: bool = False

    def describe(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"kernel: {self.kernel_release}"]
        if not self.available:
            lines.append(f"kTLS: NOT available: {self.reason}")
            return "\n".join(lines)
        yes = {True: "yes", False: "no"}
        lines += [
            "kTLS: available",
            "suites: " + (", ".join(s.name for s in sorted(self.suites)) or "none"),
            f"TLS_TX_ZEROCOPY_RO: {yes[self.tx_zerocopy_ro]}",
            f"TLS_RX_EXPECT_NO_PAD: {yes[self.rx_expect_no_pad]}",
            f"rekey TX (second TLS_TX): {yes[self.rekey_tx]}",
            f"rekey RX (second TLS_RX): {yes[self.rekey_rx]}",
            f"TLS_TX_MAX_PAYLOAD_LEN: {yes[self.tx_max_payload_len]}",
        ]
        if self.rekey_detail:
            lines.append(f"rekey refused with: {self.rekey_detail}")
        lines.append(f"/proc/net/tls_stat: {'present' if self.tls_stat_present else 'absent'}")
        return "\n".join(lines)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        a = socket.create_connection(lst.getsockname(), timeout=5)
        try:
            b, _ = lst.accept()
        except BaseException:
            a.close()
            raise
    return a, b


def _dummy_keys(suite: CipherSuite) -> TrafficKeys:
    lay = _LAYOUTS[suite]
    return TrafficKeys(traffic_secret=b"", key=bytes(lay.key_len), iv=bytes(12), rec_seq=0)


def _probe_suite(suite: CipherSuite) -> tuple[bool, int | None]:
    a, b = _tcp_pair()
    try:
        a.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
        a.setsockopt(SOL_TLS, TLS_TX, build_crypto_info(suite, _dummy_keys(suite)))
        return True, None
    except OSError as e:
        return False, e.errno
    finally:
        a.close()
        b.close()


def _errname(err: int | None) -> str:
    return _errno.errorcode.get(err, str(err)) if err is not None else "?"


def probe() -> KtlsProbe:
    """Find out what kTLS this kernel offers (never raises; see :meth:`KtlsProbe.describe`)."""
    release = platform.release()
    if not sys.platform.startswith("linux"):
        return KtlsProbe(False, f"not Linux ({sys.platform}): kTLS is a Linux kernel feature", release)
    try:
        return _probe(release)
    except Exception as e:  # noqa: BLE001 - the contract is "never raises"
        return KtlsProbe(False, f"probe failed: {type(e).__name__}: {e}", release)


def _probe(release: str) -> KtlsProbe:
    a, b = _tcp_pair()
    try:
        a.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
    except OSError as e:
        if e.errno == _errno.ENOENT:
            reason = _NO_MODULE
        else:
            reason = f"setsockopt(TCP_ULP, 'tls') failed: {_errname(e.errno)} ({os.strerror(e.errno or 0)})"
        return KtlsProbe(False, reason, release)
    finally:
        a.close()
        b.close()

    suites = []
    errs = []
    for suite in _LAYOUTS:
        ok, err = _probe_suite(suite)
        if ok:
            suites.append(suite)
        else:
            errs.append(f"{suite.name}: {_errname(err)}")
    if not suites:
        return KtlsProbe(False, "kernel refuses every TLS 1.3 suite: " + "; ".join(errs), release)

    suite = suites[0]
    keys = _dummy_keys(suite)
    info = build_crypto_info(suite, keys)
    zc = no_pad = rekey_tx = rekey_rx = max_payload = False
    detail: list[str] = []
    a, b = _tcp_pair()
    try:
        for s in (a, b):
            s.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
        a.setsockopt(SOL_TLS, TLS_TX, info)
        b.setsockopt(SOL_TLS, TLS_RX, info)
        zc = set_zerocopy_ro(a)
        no_pad = set_rx_expect_no_pad(b)
        try:  # the smallest TLS 1.3 value (record_size_limit 64), as a client may ask
            set_tx_max_payload_len(a, 63)
            max_payload = True
        except KtlsError:
            pass
        # A real KeyUpdate: sent under the first keys, read (the kernel then pauses RX), then
        # both directions set again with new keys, and one record through them.
        b.settimeout(5)
        send_record(a, ContentType.HANDSHAKE, bytes((HandshakeType.KEY_UPDATE, 0, 0, 1, 0)))
        recv_record(b, 16)
        lay = _LAYOUTS[suite]
        info2 = build_crypto_info(suite, TrafficKeys(traffic_secret=b"", key=b"\x01" * lay.key_len,
                                                     iv=b"\x02" * 12, rec_seq=0))
        try:
            a.setsockopt(SOL_TLS, TLS_TX, info2)
            rekey_tx = True
        except OSError as e:
            detail.append(f"TLS_TX {_errname(e.errno)}")
        try:
            b.setsockopt(SOL_TLS, TLS_RX, info2)
            rekey_rx = True
        except OSError as e:
            detail.append(f"TLS_RX {_errname(e.errno)}")
        if rekey_tx and rekey_rx:
            a.sendall(b"rekeyed")
            if recv_record(b, 16) != (ContentType.APPLICATION_DATA, b"rekeyed"):
                rekey_tx = rekey_rx = False
                detail.append("a record under the new keys did not arrive intact")
    finally:
        a.close()
        b.close()
    return KtlsProbe(
        available=True,
        reason="",
        kernel_release=release,
        suites=frozenset(suites),
        tx_zerocopy_ro=zc,
        rx_expect_no_pad=no_pad,
        rekey_tx=rekey_tx,
        rekey_rx=rekey_rx,
        rekey_detail=", ".join(detail),
        tx_max_payload_len=max_payload,
        tls_stat_present=TLS_STAT_PATH.exists(),
    )


if __name__ == "__main__":  # python -m ironsocket.ktls
    print(probe().describe())
