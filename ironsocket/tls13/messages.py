"""The handshake messages' bytes (RFC 8446 §4), and the one adapter to tlslite-ng.

On the handshake path everything is read and written here directly (issue 14.4: tlslite-ng's
generic codecs were ~40% of the engine's time per handshake): `parse_client_hello` reads the
§4.1.2 struct and the extensions the engine uses; the server's messages are built from their
§4 structs (RFC 8448's traces check them byte for byte). tlslite-ng stays as the reference
ClientHello parser (`parse_client_hello_tlslite`), which tests/tls13/test_fuzz.py holds the
direct one to. Parsed values leave as frozen dataclasses with plain ``bytes``/``int``; any
malformed field is `AlertDecodeError`. Validation across fields (duplicate extensions,
pre_shared_key last, ...) is done by the engine on these dataclasses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .alerts import AlertDecodeError, AlertIllegalParameter
from .constants import ExtensionType, HandshakeType, TLS13_VERSION

HELLO_RETRY_REQUEST_RANDOM = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)  # RFC 8446 §4.1.3, SHA-256("HelloRetryRequest")


@dataclass(frozen=True, slots=True)
class KeyShareEntry:
    group: int
    key_exchange: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHello:
    """A parsed ClientHello (RFC 8446 §4.1.2). ``extensions`` keeps wire order and raw bytes."""

    legacy_version: int
    random: bytes
    legacy_session_id: bytes
    cipher_suites: tuple[int, ...]
    legacy_compression_methods: tuple[int, ...]
    extensions: tuple[tuple[int, bytes], ...]
    server_names: tuple[bytes, ...] | None = None
    alpn_protocols: tuple[bytes, ...] | None = None
    supported_versions: tuple[int, ...] | None = None
    supported_groups: tuple[int, ...] | None = None
    key_shares: tuple[KeyShareEntry, ...] | None = None
    signature_algorithms: tuple[int, ...] | None = None
    psk_key_exchange_modes: tuple[int, ...] | None = None
    cookie: bytes | None = None
    record_size_limit: int | None = None
    extension_types: tuple[int, ...] = field(default=())

    def has(self, ext: ExtensionType) -> bool:
        return int(ext) in self.extension_types


def _pair_to_int(value: object) -> int:
    if isinstance(value, tuple):
        return (value[0] << 8) | value[1]
    assert isinstance(value, int)
    return value


class _Reader:
    """Cursor over a ClientHello body for `parse_client_hello` (RFC 8446 §3 vectors)."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def uint(self, size: int) -> int:
        if self.pos + size > self.end:
            raise AlertDecodeError("malformed ClientHello: truncated")
        value = int.from_bytes(self.data[self.pos : self.pos + size], "big")
        self.pos += size
        return value

    def raw(self, size: int) -> bytes:
        if self.pos + size > self.end:
            raise AlertDecodeError("malformed ClientHello: truncated")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def vector(self, length_size: int) -> bytes:
        return self.raw(self.uint(length_size))

    def sub(self, length_size: int) -> _Reader:
        """A reader over the next length-prefixed vector (and skip it here)."""
        length = self.uint(length_size)
        if self.pos + length > self.end:
            raise AlertDecodeError("malformed ClientHello: truncated")
        reader = _Reader(self.data, self.pos, self.pos + length)
        self.pos += length
        return reader

    def done(self, what: str) -> None:
        if self.pos != self.end:
            raise AlertDecodeError(f"malformed ClientHello extension: bytes after {what}")


def _u16_list(data: bytes, what: str, length_size: int = 2) -> tuple[int, ...]:
    r = _Reader(data)
    body = r.vector(length_size)
    r.done(what)
    if len(body) % 2:
        raise AlertDecodeError(f"malformed ClientHello extension: odd {what} length")
    return tuple(int.from_bytes(body[i : i + 2], "big") for i in range(0, len(body), 2))


def _server_names(data: bytes) -> tuple[bytes, ...]:
    if not data:
        return ()  # tlslite's reading too: the engine then says it is not exactly one name
    r = _Reader(data)
    names = r.sub(2)
    r.done("server_name")
    out = []
    while names.left():
        if names.uint(1) != 0:
            raise AlertIllegalParameter("server_name of unknown name type")
        out.append(names.vector(2))
    return tuple(out)


def _alpn(data: bytes) -> tuple[bytes, ...]:
    r = _Reader(data)
    names = r.sub(2)
    r.done("ALPN")
    out = []
    while names.left():
        out.append(names.vector(1))
    return tuple(out)


def _key_shares(data: bytes) -> tuple[KeyShareEntry, ...]:
    r = _Reader(data)
    shares = r.sub(2)
    r.done("key_share")
    out = []
    while shares.left():
        group = shares.uint(2)
        key_exchange = shares.vector(2)
        if not key_exchange:
            raise AlertDecodeError("malformed ClientHello extension: empty key_exchange")
        out.append(KeyShareEntry(group, key_exchange))
    return tuple(out)


def _u8_list(data: bytes, what: str) -> tuple[int, ...]:
    r = _Reader(data)
    body = r.vector(1)
    r.done(what)
    return tuple(body)


def _cookie(data: bytes) -> bytes:
    r = _Reader(data)
    cookie = r.vector(2)
    r.done("cookie")
    return cookie


def _record_size_limit(data: bytes) -> int:
    if len(data) != 2:
        raise AlertDecodeError("malformed ClientHello extension: record_size_limit is 2 bytes")
    return int.from_bytes(data, "big")


# The extensions the engine reads, and how (every other one is kept raw, unparsed).
_EXTENSION_PARSERS: dict[int, tuple[str, object]] = {
    ExtensionType.SERVER_NAME: ("server_names", _server_names),
    ExtensionType.APPLICATION_LAYER_PROTOCOL_NEGOTIATION: ("alpn_protocols", _alpn),
    ExtensionType.SUPPORTED_VERSIONS: ("supported_versions", lambda d: _u16_list(d, "supported_versions", 1)),
    ExtensionType.SUPPORTED_GROUPS: ("supported_groups", lambda d: _u16_list(d, "supported_groups")),
    ExtensionType.KEY_SHARE: ("key_shares", _key_shares),
    ExtensionType.SIGNATURE_ALGORITHMS: ("signature_algorithms", lambda d: _u16_list(d, "signature_algorithms")),
    ExtensionType.PSK_KEY_EXCHANGE_MODES: ("psk_key_exchange_modes", lambda d: _u8_list(d, "psk_key_exchange_modes")),
    ExtensionType.COOKIE: ("cookie", _cookie),
    ExtensionType.RECORD_SIZE_LIMIT: ("record_size_limit", _record_size_limit),
}


def parse_client_hello(body: bytes) -> ClientHello:
    """Parse a ClientHello handshake body (the bytes after the 4-byte handshake header).

    A direct reader of the §4.1.2 struct (profiled: tlslite-ng's generic parser was 40% of the
    engine's time per full handshake). It decodes the extensions the engine reads; every
    extension stays available raw in ``extensions``. Gives the same `ClientHello` as
    `parse_client_hello_tlslite` on every input both accept (test_fuzz checks it); any
    malformed field is decode_error.
    """
    r = _Reader(bytes(body))
    legacy_version = r.uint(2)
    random = r.raw(32)
    session_id = r.vector(1)
    if len(session_id) > 32:
        raise AlertDecodeError("malformed ClientHello: legacy_session_id longer than 32 bytes")
    suites_raw = r.vector(2)
    if len(suites_raw) % 2 or not suites_raw:
        raise AlertDecodeError("malformed ClientHello: cipher_suites")
    compression = r.vector(1)  # anything but exactly [null] is the engine's illegal_parameter
    raw_exts: list[tuple[int, bytes]] = []
    if r.left():
        exts = r.sub(2)
        r.done("the extensions")
        while exts.left():
            ext_type = exts.uint(2)
            raw_exts.append((ext_type, exts.vector(2)))
    values: dict[str, object] = {}
    for ext_type, data in raw_exts:
        parser = _EXTENSION_PARSERS.get(ext_type)
        if parser is not None and parser[0] not in values:  # a duplicate: the engine refuses it
            name, parse = parser
            values[name] = parse(data)  # type: ignore[operator]
    for name in ("alpn_protocols", "supported_versions", "supported_groups",
                 "signature_algorithms", "psk_key_exchange_modes"):
        if name in values and not values[name]:
            raise AlertDecodeError(f"empty {name} list")
    alpn = values.get("alpn_protocols")
    if isinstance(alpn, tuple) and any(len(p) == 0 for p in alpn):
        raise AlertDecodeError("empty ALPN protocol name (RFC 7301 §3.1)")
    names = values.get("server_names")
    if isinstance(names, tuple) and any(len(n) == 0 for n in names):
        raise AlertDecodeError("malformed ClientHello extension: empty host name")
    return ClientHello(
        legacy_version=legacy_version,
        random=random,
        legacy_session_id=session_id,
        cipher_suites=tuple(int.from_bytes(suites_raw[i : i + 2], "big") for i in range(0, len(suites_raw), 2)),
        legacy_compression_methods=tuple(compression),
        extensions=tuple(raw_exts),
        extension_types=tuple(t for t, _ in raw_exts),
        **values,  # type: ignore[arg-type]
    )


def parse_client_hello_tlslite(body: bytes) -> ClientHello:
    """The ClientHello through tlslite-ng's parser: the reference `parse_client_hello` is
    checked against (tests/tls13/test_fuzz.py); not on the handshake path, so tlslite-ng is
    imported only here."""
    from tlslite import extensions as tx
    from tlslite import messages as tm
    from tlslite.utils.codec import Parser

    # tlslite's parser reads the 3-byte length itself: give it the length back.
    raw = len(body).to_bytes(3, "big") + body
    try:
        msg = tm.ClientHello().parse(Parser(bytearray(raw)))
    except AssertionError as exc:  # tlslite asserts inside TLSExtension.parse
        raise AlertDecodeError("malformed ClientHello") from exc
    except Exception as exc:  # DecodeError (a SyntaxError), ValueError, IndexError...
        raise AlertDecodeError(f"malformed ClientHello: {exc}") from exc
    if msg.extensions is None:
        # No extensions at all: a pre-TLS-1.3 client (no supported_versions).
        exts: list[object] = []
    else:
        exts = list(msg.extensions)
    try:
        # tlslite re-encodes extData from what it parsed; for some malformed extensions (an
        # empty key_share body leaves client_shares None) that raises TypeError.
        raw_exts = tuple((e.extType, bytes(e.extData)) for e in exts)  # type: ignore[attr-defined]
    except Exception as exc:
        raise AlertDecodeError(f"malformed ClientHello extension: {exc}") from exc
    types = tuple(t for t, _ in raw_exts)
    values: dict[str, object] = {}
    try:
        for ext in exts:
            kind = ext.extType  # type: ignore[attr-defined]
            if kind == ExtensionType.SERVER_NAME and isinstance(ext, tx.SNIExtension):
                names = ext.serverNames or []
                if any(n.name_type != 0 for n in names):
                    raise AlertIllegalParameter("server_name of unknown name type")
                values["server_names"] = tuple(bytes(n.name) for n in names)
            elif kind == ExtensionType.APPLICATION_LAYER_PROTOCOL_NEGOTIATION and isinstance(
                ext, tx.ALPNExtension
            ):
                values["alpn_protocols"] = tuple(bytes(p) for p in ext.protocol_names or [])
            elif kind == ExtensionType.SUPPORTED_VERSIONS and isinstance(
                ext, tx.SupportedVersionsExtension
            ):
                values["supported_versions"] = tuple(_pair_to_int(v) for v in ext.versions)
            elif kind == ExtensionType.SUPPORTED_GROUPS and isinstance(
                ext, tx.SupportedGroupsExtension
            ):
                values["supported_groups"] = tuple(int(g) for g in ext.groups)
            elif kind == ExtensionType.KEY_SHARE and isinstance(ext, tx.ClientKeyShareExtension):
                values["key_shares"] = tuple(
                    KeyShareEntry(int(s.group), bytes(s.key_exchange))
                    for s in ext.client_shares or []
                )
            elif kind == ExtensionType.SIGNATURE_ALGORITHMS and isinstance(
                ext, tx.SignatureAlgorithmsExtension
            ):
                values["signature_algorithms"] = tuple(_pair_to_int(s) for s in ext.sigalgs)
            elif kind == ExtensionType.PSK_KEY_EXCHANGE_MODES and isinstance(
                ext, tx.PskKeyExchangeModesExtension
            ):
                values["psk_key_exchange_modes"] = tuple(int(m) for m in ext.modes)
            elif kind == ExtensionType.COOKIE and isinstance(ext, tx.CookieExtension):
                values["cookie"] = bytes(ext.cookie)
            elif kind == ExtensionType.RECORD_SIZE_LIMIT and isinstance(
                ext, tx.RecordSizeLimitExtension
            ):
                values["record_size_limit"] = int(ext.record_size_limit)
    except (AlertIllegalParameter, AlertDecodeError):
        raise
    except Exception as exc:
        raise AlertDecodeError(f"malformed ClientHello extension: {exc}") from exc
    for name in ("alpn_protocols", "supported_versions", "supported_groups",
                 "signature_algorithms", "psk_key_exchange_modes"):
        if name in values and not values[name]:
            raise AlertDecodeError(f"empty {name} list")
    alpn = values.get("alpn_protocols")
    if isinstance(alpn, tuple) and any(len(p) == 0 for p in alpn):
        raise AlertDecodeError("empty ALPN protocol name (RFC 7301 §3.1)")
    return ClientHello(
        legacy_version=_pair_to_int(msg.client_version),
        random=bytes(msg.random),
        legacy_session_id=bytes(msg.session_id),
        cipher_suites=tuple(int(c) for c in msg.cipher_suites),
        legacy_compression_methods=tuple(int(c) for c in msg.compression_methods),
        extensions=raw_exts,
        extension_types=types,
        **values,  # type: ignore[arg-type]
    )


@dataclass(frozen=True, slots=True)
class PskIdentity:
    identity: bytes
    obfuscated_ticket_age: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OfferedPsks:
    """The ClientHello's pre_shared_key extension (§4.2.11). ``binders_size`` is the length of
    the encoded binders list (its 2-byte length included): what Truncate(ClientHello) removes
    from the end of the ClientHello (§4.2.11.2; pre_shared_key is the last extension)."""

    identities: tuple[PskIdentity, ...]
    binders: tuple[bytes, ...]
    binders_size: int


def _vector(data: bytes, offset: int, length_size: int) -> tuple[bytes, int]:
    if offset + length_size > len(data):
        raise AlertDecodeError("truncated pre_shared_key")
    length = int.from_bytes(data[offset : offset + length_size], "big")
    end = offset + length_size + length
    if end > len(data):
        raise AlertDecodeError("truncated pre_shared_key")
    return data[offset + length_size : end], end


def parse_pre_shared_key(data: bytes) -> OfferedPsks:
    """The OfferedPsks structure (§4.2.11) from the extension's raw bytes."""
    identities_raw, offset = _vector(data, 0, 2)
    binders_raw, end = _vector(data, offset, 2)
    if end != len(data):
        raise AlertDecodeError("bytes after the pre_shared_key binders")
    identities = []
    i = 0
    while i < len(identities_raw):
        identity, i = _vector(identities_raw, i, 2)
        if not identity or i + 4 > len(identities_raw):
            raise AlertDecodeError("malformed pre_shared_key identity")
        identities.append(PskIdentity(identity, int.from_bytes(identities_raw[i : i + 4], "big")))
        i += 4
    binders = []
    i = 0
    while i < len(binders_raw):
        binder, i = _vector(binders_raw, i, 1)
        if len(binder) < 32:
            raise AlertDecodeError("pre_shared_key binder shorter than 32 bytes")
        binders.append(binder)
    if not identities or not binders:
        raise AlertDecodeError("pre_shared_key with no identity or no binder")
    return OfferedPsks(identities=tuple(identities), binders=tuple(binders), binders_size=len(data) - offset)


# -- server messages ------------------------------------------------------------------------------


def _vec(data: bytes, length_size: int) -> bytes:
    """A TLS vector: the length in ``length_size`` bytes, then the bytes (RFC 8446 §3.4)."""
    if len(data) >= 1 << (8 * length_size):
        raise ValueError("vector too long")
    return len(data).to_bytes(length_size, "big") + data


def _ext(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + _vec(data, 2)


def _handshake(msg_type: HandshakeType, body: bytes) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


_SUPPORTED_VERSIONS_13 = _ext(ExtensionType.SUPPORTED_VERSIONS, TLS13_VERSION.to_bytes(2, "big"))


def _server_hello(random: bytes, legacy_session_id: bytes, cipher_suite: int, extensions: bytes) -> bytes:
    body = (b"\x03\x03" + random + _vec(legacy_session_id, 1) + cipher_suite.to_bytes(2, "big")
            + b"\x00" + _vec(extensions, 2))
    return _handshake(HandshakeType.SERVER_HELLO, body)


def server_hello(
    *, random: bytes, legacy_session_id: bytes, cipher_suite: int, group: int | None,
    key_exchange: bytes | None, selected_identity: int | None = None,
) -> bytes:
    """ServerHello (§4.1.3): key_share (none with psk_ke), pre_shared_key (when resuming,
    §4.2.11), supported_versions, in RFC 8448's order."""
    exts = b""
    if group is not None and key_exchange is not None:
        exts += _ext(ExtensionType.KEY_SHARE, group.to_bytes(2, "big") + _vec(key_exchange, 2))
    if selected_identity is not None:
        exts += _ext(ExtensionType.PRE_SHARED_KEY, selected_identity.to_bytes(2, "big"))
    return _server_hello(random, legacy_session_id, cipher_suite, exts + _SUPPORTED_VERSIONS_13)


def hello_retry_request(
    *, legacy_session_id: bytes, cipher_suite: int, group: int, cookie: bytes | None
) -> bytes:
    """HelloRetryRequest (§4.1.4): a ServerHello with the special random."""
    exts = _ext(ExtensionType.KEY_SHARE, group.to_bytes(2, "big"))
    if cookie is not None:
        exts += _ext(ExtensionType.COOKIE, _vec(cookie, 2))
    return _server_hello(HELLO_RETRY_REQUEST_RANDOM, legacy_session_id, cipher_suite, exts + _SUPPORTED_VERSIONS_13)


def encrypted_extensions(
    *,
    supported_groups: tuple[int, ...] | None,
    record_size_limit: int | None,
    server_name_ack: bool,
    alpn_protocol: bytes | None,
) -> bytes:
    """EncryptedExtensions (§4.3.1), in the order RFC 8448's server uses."""
    exts = b""
    if supported_groups:
        exts += _ext(ExtensionType.SUPPORTED_GROUPS, _vec(b"".join(g.to_bytes(2, "big") for g in supported_groups), 2))
    if record_size_limit is not None:
        exts += _ext(ExtensionType.RECORD_SIZE_LIMIT, record_size_limit.to_bytes(2, "big"))
    if server_name_ack:
        exts += _ext(ExtensionType.SERVER_NAME, b"")
    if alpn_protocol is not None:
        exts += _ext(ExtensionType.APPLICATION_LAYER_PROTOCOL_NEGOTIATION, _vec(_vec(alpn_protocol, 1), 2))
    return _handshake(HandshakeType.ENCRYPTED_EXTENSIONS, _vec(exts, 2))


@functools.lru_cache(maxsize=64)
def certificate(chain: tuple[bytes, ...]) -> bytes:
    """Certificate (§4.4.2) with an empty request context and no per-entry extensions. The same
    bytes for every handshake with a credential: cached per chain (a reload makes new chains)."""
    entries = b"".join(_vec(der, 3) + _vec(b"", 2) for der in chain)
    return _handshake(HandshakeType.CERTIFICATE, _vec(b"", 1) + _vec(entries, 3))


def certificate_verify(*, scheme: int, signature: bytes) -> bytes:
    """CertificateVerify (§4.4.3)."""
    return _handshake(HandshakeType.CERTIFICATE_VERIFY, scheme.to_bytes(2, "big") + _vec(signature, 2))


def finished(verify_data: bytes) -> bytes:
    """Finished (§4.4.4)."""
    return _handshake(HandshakeType.FINISHED, verify_data)


def new_session_ticket(*, lifetime: int, age_add: int, nonce: bytes, ticket: bytes) -> bytes:
    """NewSessionTicket (§4.6.1), without extensions (no early_data: 0-RTT is never offered)."""
    if not 1 <= len(ticket) < 1 << 16 or len(nonce) > 255:
        raise ValueError("ticket or nonce of an impossible size")
    body = (
        lifetime.to_bytes(4, "big") + age_add.to_bytes(4, "big")
        + bytes([len(nonce)]) + nonce
        + len(ticket).to_bytes(2, "big") + ticket
        + b"\x00\x00"
    )
    return bytes([HandshakeType.NEW_SESSION_TICKET]) + len(body).to_bytes(3, "big") + body


def key_update(update_requested: bool) -> bytes:
    """KeyUpdate (§4.6.3)."""
    return bytes([HandshakeType.KEY_UPDATE, 0, 0, 1, 1 if update_requested else 0])
