"""A sans-IO TLS 1.3 server handshake (RFC 8446 §4), modelled on h11's Connection.

Theory of operation
-------------------
`TLSServer` never touches a socket or a clock. The caller feeds it every byte read from the
client with `receive_data(data)` (``b""`` means EOF), pulls events with `next_event()` until it
returns `NEED_DATA`, and writes whatever `data_to_send()` returns. Events are
`ClientHelloReceived` (the server flight is ready) and `HandshakeComplete` (the client Finished
verified). Then `handoff()` gives the exact state to continue with: the userspace record layer
(`session.Session`) or the kernel (`ironsocket.ktls`).

Records are processed one at a time and only as far as the caller asks, so bytes after the
client's Finished stay undecrypted in the engine unless `handoff()` is told to drain complete
records. A caller that wants to give RX to the kernel reads exactly `bytes_wanted()` bytes at a
time while the handshake runs and so never over-reads (DESIGN.md, "Danger").

Errors: internal code raises `alerts.Alert` subclasses. `next_event()` is the one boundary: it
queues the alert record (encrypted when the client can read our handshake keys), moves to ERROR
and raises `RemoteProtocolError` carrying ``.alert``. A fatal alert from the client raises
`RemoteProtocolError` with ``.received``.

The transcript (§4.4.1) is fed only from raw bytes, exactly once per message: incoming messages
as received, outgoing ones as serialised, through `_add_to_transcript`.

Resumption (§4.2.11, `tickets.py`): with ``config.tickets`` set, a ClientHello's pre_shared_key
is looked at before the hello enters the transcript. Of its identities (at most
MAX_PSK_IDENTITIES_TRIED), the first that unseals under one of our ticket keys, is within its
lifetime, has our negotiated suite's hash and the same SNI, is selected, and only that one's
binder is checked (§4.2.11: "SHOULD NOT attempt to validate multiple binders"); a binder that
does not verify is decrypt_error. An identity we cannot use is ignored: a full handshake.
The resumed flight is ServerHello (with pre_shared_key) + EncryptedExtensions + Finished: no
Certificate or CertificateVerify; the mode is always psk_dhe_ke (a fresh (EC)DHE too). 0-RTT
is never accepted: early_data is never in EncryptedExtensions, and tickets never allow it.
After the client Finished, ``config.tickets.count`` NewSessionTickets are sealed under the
server application key (each advances the write rec_seq that `handoff()` reports, so the kTLS
TX install continues after them).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec, x25519

from . import messages
from .alerts import (
    Alert,
    AlertBadRecordMac,
    AlertDecodeError,
    AlertDecryptError,
    AlertHandshakeFailure,
    AlertIllegalParameter,
    AlertInternalError,
    AlertMissingExtension,
    AlertNoApplicationProtocol,
    AlertProtocolVersion,
    AlertUnexpectedMessage,
    LocalProtocolError,
    RemoteProtocolError,
)
from .constants import (
    AlertDescription,
    AlertLevel,
    CipherSuite,
    ContentType,
    ExtensionType,
    Group,
    HandshakeType,
    SignatureScheme,
    TLS13_VERSION,
)
from .credentials import CertificateStore, Credential, sign
from .events import NEED_DATA, ClientHelloReceived, Event, HandshakeComplete
from .handoff import Handoff
from .keyschedule import SERVER_CERTIFICATE_VERIFY_CONTEXT, SUITES, KeySchedule, psk_binder, resumption_psk
from . import tickets as tickets_mod
from .tickets import PskKeyExchangeMode, TicketConfig, TicketKeyExhausted, TicketState
from .limits import (  # bounds on what a client may make the engine do, with their reasons
    MAX_CHANGE_CIPHER_SPEC_RECORDS,
    MAX_PSK_IDENTITIES_TRIED,
    MAX_CLIENT_HELLO_SIZE,
    MAX_EARLY_DATA_SKIP,
    MAX_HANDSHAKE_MESSAGE_SIZE,
)
from .records import HEADER_SIZE, MAX_PLAINTEXT, RecordProtection, record_header, split_record
from .state import ENDS_KEY_EPOCH, TRANSITIONS, State

# RFC 8449: our receive limit, sent when the client offers record_size_limit (incl. the type).
OUR_RECORD_SIZE_LIMIT = MAX_PLAINTEXT + 1

DEFAULT_CIPHER_SUITES = (
    CipherSuite.TLS_AES_128_GCM_SHA256,
    CipherSuite.TLS_AES_256_GCM_SHA384,
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256,
)
DEFAULT_GROUPS = (Group.X25519, Group.SECP256R1, Group.SECP384R1)

KeylogCallback = Callable[[str], None]

# §4.2's table: of the extensions we recognise (constants.ExtensionType), only oid_filters
# (CertificateRequest only) may never appear in a ClientHello.
NOT_IN_CLIENT_HELLO = frozenset({ExtensionType.OID_FILTERS})


class KeyExchange:
    """An ephemeral (EC)DHE key for one group (RFC 8446 §4.2.8, §7.4)."""

    def __init__(self, group: Group, private_key: object | None = None) -> None:
        self.group = group
        if group is Group.X25519:
            self._key = private_key or x25519.X25519PrivateKey.generate()
        else:
            curve = ec.SECP256R1() if group is Group.SECP256R1 else ec.SECP384R1()
            self._key = private_key or ec.generate_private_key(curve)

    def public_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization as s

        if isinstance(self._key, x25519.X25519PrivateKey):
            return self._key.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
        assert isinstance(self._key, ec.EllipticCurvePrivateKey)
        return self._key.public_key().public_bytes(s.Encoding.X962, s.PublicFormat.UncompressedPoint)

    def exchange(self, peer: bytes) -> bytes:
        """The shared secret; an invalid peer share is illegal_parameter (§4.2.8.1, §4.2.8.2)."""
        try:
            if isinstance(self._key, x25519.X25519PrivateKey):
                if len(peer) != 32:
                    raise ValueError("X25519 share must be 32 bytes")
                return self._key.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
            assert isinstance(self._key, ec.EllipticCurvePrivateKey)
            if not peer or peer[0] != 4:
                raise ValueError("ECDHE share must be an uncompressed point")
            public = ec.EllipticCurvePublicKey.from_encoded_point(self._key.curve, peer)
            return self._key.exchange(ec.ECDH(), public)
        except ValueError as exc:
            raise AlertIllegalParameter(f"invalid {self.group.name} key share: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """What a server offers. Hooks (`random_bytes`, `key_exchange`, `retry_cookie`) exist so
    tests can replay fixed traces (RFC 8448); production leaves them alone."""

    certificates: CertificateStore
    cipher_suites: tuple[CipherSuite, ...] = DEFAULT_CIPHER_SUITES
    groups: tuple[Group, ...] = DEFAULT_GROUPS
    alpn_protocols: tuple[str, ...] = ()
    # supported_groups sent in EncryptedExtensions (§4.2.7); None = our `groups`.
    advertised_groups: tuple[int, ...] | None = None
    random_bytes: Callable[[int], bytes] = os.urandom
    key_exchange: Callable[[Group], KeyExchange] = KeyExchange
    retry_cookie: Callable[[], bytes] | None = None
    # False: use a share the client sent for any of our groups (our order among those), which
    # saves a round trip. True: always our most preferred group the client supports, asking for
    # it by HelloRetryRequest if needed (RFC 8448 §5's server behaves like this).
    retry_for_preferred_group: bool = False
    # CertificateVerify signer (RSA-PSS is randomised: a replay test injects the trace's bytes).
    signer: Callable[[Credential, SignatureScheme, bytes], bytes] = lambda cred, scheme, data: sign(
        cred.private_key, scheme, data
    )
    # Session tickets and resumption (tickets.TicketConfig); None: neither.
    tickets: TicketConfig | None = None
    # Fixed NewSessionTicket messages to send after the client Finished instead of our own
    # tickets (a replay test injects RFC 8448's); empty: `tickets` decides.
    new_session_tickets: Callable[[], tuple[bytes, ...]] = tuple
    keylog: KeylogCallback | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.cipher_suites:
            raise ValueError("at least one cipher suite is required")
        if not self.groups:
            raise ValueError("at least one group is required")


@dataclass(slots=True)
class _Negotiated:
    cipher_suite: CipherSuite
    group: Group | None = None
    credential: Credential | None = None
    scheme: SignatureScheme | None = None
    server_name: str | None = None
    alpn_protocol: str | None = None
    record_size_limit: int | None = None


@dataclass(frozen=True, slots=True)
class _Psk:
    """The resumption PSK selected from the ClientHello (its binder verified)."""

    index: int  # selected_identity (§4.2.11)
    secret: bytes = field(repr=False)
    mode: PskKeyExchangeMode
    authenticated: float  # when the certificate signature of this session chain was made


class TLSServer:
    """One server-side TLS 1.3 handshake. See the module docstring for the contract."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state = State.START
        self._receive_buffer = bytearray()
        self._eof = False
        self._send_buffer = bytearray()
        self._handshake_buffer = bytearray()
        self._events: list[Event] = []
        self._read_protection: RecordProtection | None = None
        self._write_protection: RecordProtection | None = None
        self._key_schedule: KeySchedule | None = None
        self._negotiated: _Negotiated | None = None
        self._first_hello: messages.ClientHello | None = None
        self._psk: _Psk | None = None
        self._client_psk_modes: tuple[int, ...] = ()  # the final ClientHello's (§4.2.9)
        self._retry_group: Group | None = None
        self._retry_cookie: bytes | None = None
        self._client_random = b""
        self._client_handshake_secret = b""
        self._client_application_secret = b""
        self._server_application_secret = b""
        self._early_data_skip = 0
        self._change_cipher_specs = 0
        self.error: RemoteProtocolError | None = None

    # -- public API ------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer. ``b""`` means the peer closed (EOF)."""
        if self._eof and data:
            raise LocalProtocolError("data after EOF")
        if not data:
            self._eof = True
        self._receive_buffer += data

    def bytes_wanted(self) -> int:
        """How many bytes to read to complete the next record, and not one more."""
        buffered = len(self._receive_buffer)
        if buffered < HEADER_SIZE:
            return HEADER_SIZE - buffered
        length = (self._receive_buffer[3] << 8) | self._receive_buffer[4]
        return max(HEADER_SIZE + length - buffered, 0) or HEADER_SIZE

    def data_to_send(self) -> bytes:
        out = bytes(self._send_buffer)
        self._send_buffer.clear()
        return out

    def next_event(self) -> Event | type[NEED_DATA]:
        """Process buffered records until an event is ready.

        Returns an event or `NEED_DATA`. Raises `RemoteProtocolError` when the client broke the
        protocol (the alert to send is already in `data_to_send()`) or sent a fatal alert.
        """
        if self.state is State.ERROR:
            raise LocalProtocolError("the handshake already failed") from self.error
        try:
            while not self._events:
                if self.state in (State.CONNECTED, State.CLOSED):
                    return NEED_DATA
                if not self._process_one_record():
                    if self._eof:
                        raise _PeerClosed("connection closed by the client during the handshake")
                    return NEED_DATA
            return self._events.pop(0)
        except Alert as exc:
            self._send_alert(exc.description)
            self.state = State.ERROR
            self.error = RemoteProtocolError(str(exc), alert=exc.description)
            raise self.error from exc
        except _PeerClosed as exc:
            self.state = State.ERROR
            self.error = RemoteProtocolError(str(exc), received=exc.received)
            raise self.error from None

    def handoff(self, *, drain: bool = False) -> Handoff:
        """The exact state after the handshake (see `handoff.Handoff`).

        With ``drain=True``, complete application-data records already buffered are decrypted
        into ``plaintext`` (advancing ``read.rec_seq``); otherwise they stay in ``unprocessed``.
        """
        if self.state is not State.CONNECTED:
            raise LocalProtocolError(f"no handoff in state {self.state.name}")
        negotiated, read, write = self._negotiated, self._read_protection, self._write_protection
        assert negotiated and read and write
        plaintext = bytearray()
        offset = 0
        if drain:
            # Decrypt with a copy: handoff() must not change the engine (calling it twice gives
            # the same Handoff, and handoff() after handoff(drain=True) stays consistent).
            read = RecordProtection.from_keys(negotiated.cipher_suite, read.traffic_keys())
        while drain:
            try:
                framed = split_record(self._receive_buffer, offset)
                if framed is None or offset + framed[2] > len(self._receive_buffer):
                    break
                _, header, total = framed
                body = bytes(self._receive_buffer[offset + HEADER_SIZE : offset + total])
                content_type, content = read.open(header, body)
            except Alert:
                # A bad record is left in `unprocessed` for the record layer that carries on:
                # it will send the alert (Alert must not escape the public API).
                break
            if content_type is not ContentType.APPLICATION_DATA:
                # close_notify, KeyUpdate...: leave it (and all after it) to the record layer.
                read.rec_seq -= 1
                break
            plaintext += content
            offset += total
        return Handoff(
            cipher_suite=negotiated.cipher_suite,
            group=negotiated.group,
            read=read.traffic_keys(),
            write=write.traffic_keys(),
            server_name=negotiated.server_name,
            alpn_protocol=negotiated.alpn_protocol,
            plaintext=bytes(plaintext),
            unprocessed=bytes(self._receive_buffer[offset:]),
            record_size_limit=negotiated.record_size_limit,
        )

    @property
    def client_random(self) -> bytes:
        return self._client_random

    # -- records (§5) ----------------------------------------------------------------------------
    def _process_one_record(self) -> bool:
        framed = split_record(self._receive_buffer)
        if framed is None:
            return False
        content_type, header, total = framed
        if len(self._receive_buffer) < total:
            return False
        body = bytes(self._receive_buffer[HEADER_SIZE:total])
        del self._receive_buffer[:total]

        if content_type == ContentType.CHANGE_CIPHER_SPEC:
            # §5: one 0x01 byte, dropped, between the first ClientHello and the client Finished.
            if body != b"\x01" or self.state is State.START or self._handshake_buffer:
                raise AlertUnexpectedMessage("unexpected change_cipher_spec")
            self._change_cipher_specs += 1
            if self._change_cipher_specs > MAX_CHANGE_CIPHER_SPEC_RECORDS:
                raise AlertUnexpectedMessage(
                    f"more than {MAX_CHANGE_CIPHER_SPEC_RECORDS} change_cipher_spec record(s) (Appendix D.4)"
                )
            return True
        if content_type == ContentType.ALERT:
            self._check_not_interleaved("alert")
            self._handle_alert(body)
            return True
        if content_type == ContentType.APPLICATION_DATA:
            if self._read_protection is None:
                if self.state is State.START_AFTER_RETRY and self._skip_early_data(total):
                    # §4.2.10: after a HelloRetryRequest the server "ignores early data by
                    # skipping all records with an external content type of application_data".
                    return True
                raise AlertUnexpectedMessage("application_data record before the handshake keys")
            try:
                inner_type, content = self._read_protection.open(header, body)
            except AlertBadRecordMac:
                # §4.2.10 skips records that fail *deprotection* only: a record that decrypts
                # but is malformed (e.g. an all-zero TLSInnerPlaintext, §5.4) is an error.
                if self._skip_early_data(total):  # a failed open does not count a record
                    return True
                raise
            self._early_data_skip = 0  # the first record that decrypts ends the skipping
            if not content and inner_type in (ContentType.HANDSHAKE, ContentType.ALERT):
                # §5.4: zero-length Handshake/Alert content MUST be unexpected_message.
                raise AlertUnexpectedMessage(f"{inner_type.name} record with no content (§5.4)")
            if inner_type == ContentType.HANDSHAKE:
                self._receive_handshake(content)
            elif inner_type == ContentType.ALERT:
                self._check_not_interleaved("alert")
                self._handle_alert(content)
            else:
                raise AlertUnexpectedMessage(f"{inner_type.name} record during the handshake")
            return True
        # content_type == HANDSHAKE, in plaintext
        if self._read_protection is not None:
            raise AlertUnexpectedMessage("plaintext handshake record after ServerHello")
        self._receive_handshake(body)
        return True

    def _skip_early_data(self, record_size: int) -> bool:
        """Charge one rejected 0-RTT record (header included) to the skip budget (§4.2.10)."""
        if self._early_data_skip < record_size:
            return False
        self._early_data_skip -= record_size
        return True

    def _check_not_interleaved(self, what: str) -> None:
        if self._handshake_buffer:
            raise AlertUnexpectedMessage(f"{what} interleaved with a fragmented handshake message")

    def _handle_alert(self, body: bytes) -> None:
        if len(body) != 2:
            raise AlertDecodeError("alert record must be two bytes")
        level, code = body
        try:
            description: AlertDescription | int = AlertDescription(code)
        except ValueError:
            description = code
        if description == AlertDescription.user_canceled:
            return  # §6.1: followed by close_notify; nothing to do yet
        name = description.name if isinstance(description, AlertDescription) else str(code)
        raise _PeerClosed(f"client sent alert {name} (level {level})", received=description)

    def _send_alert(self, description: AlertDescription) -> None:
        body = bytes((AlertLevel.FATAL, description))
        if self._write_protection is not None and self.state is not State.START:
            # After ServerHello the client expects our alerts under the handshake keys.
            try:
                self._send_buffer += self._write_protection.seal(ContentType.ALERT, body)
                return
            except Exception:  # noqa: BLE001 - best effort; fall back to plaintext
                pass
        self._send_buffer += record_header(ContentType.ALERT, 2) + body

    def _send_plaintext(self, content_type: ContentType, data: bytes) -> None:
        for i in range(0, len(data), MAX_PLAINTEXT):
            chunk = data[i : i + MAX_PLAINTEXT]
            self._send_buffer += record_header(content_type, len(chunk)) + chunk

    def _send_encrypted(self, content_type: ContentType, data: bytes) -> None:
        assert self._write_protection is not None and self._negotiated is not None
        limit = MAX_PLAINTEXT
        if self._negotiated.record_size_limit is not None:
            limit = min(limit, self._negotiated.record_size_limit - 1)
        for i in range(0, len(data), limit):
            self._send_buffer += self._write_protection.seal(content_type, data[i : i + limit])

    # -- handshake messages (§4) -----------------------------------------------------------------
    def _receive_handshake(self, fragment: bytes) -> None:
        self._handshake_buffer += fragment
        while len(self._handshake_buffer) >= 4:
            length = int.from_bytes(self._handshake_buffer[1:4], "big")
            is_hello = self._handshake_buffer[0] == HandshakeType.CLIENT_HELLO
            if length > (MAX_CLIENT_HELLO_SIZE if is_hello else MAX_HANDSHAKE_MESSAGE_SIZE):
                raise AlertIllegalParameter(f"handshake message of {length} bytes is too large")
            if len(self._handshake_buffer) < 4 + length:
                return
            raw = bytes(self._handshake_buffer[: 4 + length])
            del self._handshake_buffer[: 4 + length]
            try:
                msg_type = HandshakeType(raw[0])
            except ValueError:
                raise AlertUnexpectedMessage(f"unknown handshake message type {raw[0]}") from None
            if msg_type in ENDS_KEY_EPOCH and self._handshake_buffer:
                raise AlertUnexpectedMessage(f"data after {msg_type.name} in the same record (§5.1)")
            self._dispatch(msg_type, raw)
            if self.state is State.CONNECTED:
                return

    def _dispatch(self, msg_type: HandshakeType, raw: bytes) -> None:
        try:
            handler_name, allowed = TRANSITIONS[self.state][msg_type]
        except KeyError:
            raise AlertUnexpectedMessage(
                f"can't handle {msg_type.name} in state {self.state.name}"
            ) from None
        new_state: State = getattr(self, handler_name)(raw)
        if new_state not in allowed:  # pragma: no cover - a bug in a handler, not the peer
            raise AlertInternalError(f"{handler_name} moved to {new_state.name}")
        self.state = new_state

    def _add_to_transcript(self, raw: bytes) -> None:
        assert self._key_schedule is not None
        self._key_schedule.update_hash(raw)

    def _keylog(self, label: str, secret: bytes) -> None:
        if self.config.keylog is not None:
            self.config.keylog(f"{label} {self._client_random.hex()} {secret.hex()}")

    # -- ClientHello (§4.1.2) --------------------------------------------------------------------
    def _handle_client_hello(self, raw: bytes) -> State:
        hello = messages.parse_client_hello(raw[4:])
        self._check_client_hello(hello)
        negotiated = self._negotiate(hello)
        self._negotiated = negotiated
        self._client_random = hello.random
        self._key_schedule = KeySchedule(negotiated.cipher_suite)
        self._psk = self._select_psk(hello, raw)  # before the hello enters the transcript
        self._client_psk_modes = hello.psk_key_exchange_modes or ()
        self._add_to_transcript(raw)
        psk_ke = self._psk is not None and self._psk.mode is PskKeyExchangeMode.PSK_KE
        share = None if psk_ke else self._select_key_share(hello)  # §4.2.9 psk_ke: no (EC)DHE
        if share is None and not psk_ke:
            return self._send_hello_retry_request(hello)
        if hello.has(ExtensionType.EARLY_DATA):
            self._early_data_skip = MAX_EARLY_DATA_SKIP
        return self._send_server_flight(hello, share)

    def _handle_second_client_hello(self, raw: bytes) -> State:
        hello = messages.parse_client_hello(raw[4:])
        first = self._first_hello
        assert first is not None and self._retry_group is not None and self._negotiated
        self._check_client_hello(hello)
        self._check_second_hello_matches(first, hello)
        self._early_data_skip = 0  # it carries no early_data (checked above): stop skipping
        # Re-run negotiation on the new hello: the suite must stay the one the HRR named (§4.1.4).
        negotiated = self._negotiate(hello)
        if negotiated.cipher_suite is not self._negotiated.cipher_suite:
            raise AlertIllegalParameter("second ClientHello changed the negotiated cipher suite")
        self._negotiated = negotiated
        # §4.1.4/§4.2.11.2: the binders of the second hello cover the HelloRetryRequest too.
        self._psk = self._select_psk(hello, raw)
        self._client_psk_modes = hello.psk_key_exchange_modes or ()
        if self._psk is not None and self._psk.mode is PskKeyExchangeMode.PSK_KE:
            self._psk = None  # after an HRR the (EC)DHE is under way: a full handshake
        self._add_to_transcript(raw)
        shares = hello.key_shares or ()
        if len(shares) != 1 or shares[0].group != self._retry_group:
            raise AlertIllegalParameter(
                "second ClientHello must carry exactly one key share, for the group the "
                "HelloRetryRequest selected (§4.1.4)"
            )
        return self._send_server_flight(hello, shares[0])

    def _check_client_hello(self, hello: messages.ClientHello) -> None:
        """The RFC's MUSTs for a ClientHello that its parser (messages.py) does not enforce."""
        if len(set(hello.extension_types)) != len(hello.extension_types):
            raise AlertIllegalParameter("duplicate extension in ClientHello (§4.2)")
        for ext in NOT_IN_CLIENT_HELLO:
            if hello.has(ext):
                # §4.2: a recognised extension "not specified for the message in which it
                # appears" MUST be illegal_parameter.
                raise AlertIllegalParameter(f"{ext.name} is not a ClientHello extension (§4.2)")
        versions = hello.supported_versions
        if versions is None or TLS13_VERSION not in versions:
            raise AlertProtocolVersion("client does not offer TLS 1.3 (supported_versions, §4.2.1)")
        if hello.legacy_version != 0x0303:
            # §4.1.2 legacy_version MUST be 0x0303 with supported_versions; lenient servers
            # ignore it, but anything below 1.2 with a 1.3 offer is nonsense.
            if hello.legacy_version < 0x0301:
                raise AlertProtocolVersion("legacy_version below TLS 1.0")
        if hello.legacy_compression_methods != (0,):
            raise AlertIllegalParameter("legacy_compression_methods must be exactly [null] (§4.1.2)")
        if hello.has(ExtensionType.PRE_SHARED_KEY):
            if hello.extension_types[-1] != ExtensionType.PRE_SHARED_KEY:
                raise AlertIllegalParameter("pre_shared_key must be the last extension (§4.2.11)")
            if not hello.has(ExtensionType.PSK_KEY_EXCHANGE_MODES):
                raise AlertMissingExtension("pre_shared_key without psk_key_exchange_modes (§4.2.9)")
        # Without a PSK the client must authenticate us by certificate and do (EC)DHE (§9.2).
        if hello.signature_algorithms is None:
            raise AlertMissingExtension("no signature_algorithms (§9.2)")
        if hello.supported_groups is None:
            raise AlertMissingExtension("no supported_groups (§9.2)")
        if hello.key_shares is None:
            raise AlertMissingExtension("no key_share (§9.2)")
        seen: set[int] = set()
        for share in hello.key_shares:
            if share.group in seen:
                raise AlertIllegalParameter("two key shares for one group (§4.2.8)")
            if share.group not in hello.supported_groups:
                raise AlertIllegalParameter("key share for a group not in supported_groups (§4.2.8)")
            seen.add(share.group)
        if hello.server_names is not None:
            if len(hello.server_names) != 1:
                raise AlertIllegalParameter("server_name must hold exactly one host name (RFC 6066 §3)")
            name = hello.server_names[0]
            if not name or not name.isascii() or name.endswith(b".") or b"\x00" in name:
                raise AlertDecodeError("server_name is not an ASCII host name (RFC 6066 §3)")
        if hello.record_size_limit is not None and hello.record_size_limit < 64:
            raise AlertIllegalParameter("record_size_limit below 64 (RFC 8449 §4)")

    def _check_second_hello_matches(self, first: messages.ClientHello, second: messages.ClientHello) -> None:
        """§4.1.2: after HRR the client sends the same ClientHello except where the RFC allows."""
        same = (
            first.legacy_version == second.legacy_version
            and first.random == second.random
            and first.legacy_session_id == second.legacy_session_id
            and first.cipher_suites == second.cipher_suites
            and first.legacy_compression_methods == second.legacy_compression_methods
        )
        if not same:
            raise AlertIllegalParameter("second ClientHello differs from the first in its fixed fields")
        if second.has(ExtensionType.EARLY_DATA):
            raise AlertIllegalParameter("early_data after HelloRetryRequest (§4.2.10)")
        may_change = {
            ExtensionType.KEY_SHARE,
            ExtensionType.EARLY_DATA,
            ExtensionType.COOKIE,
            ExtensionType.PRE_SHARED_KEY,
            ExtensionType.PADDING,
        }
        before = {t: d for t, d in first.extensions if t not in may_change}
        after = {t: d for t, d in second.extensions if t not in may_change}
        if before != after:
            changed = sorted(set(before.items()) ^ set(after.items()))
            names = {ExtensionType(t).name if t in ExtensionType._value2member_map_ else str(t) for t, _ in changed}
            raise AlertIllegalParameter(f"second ClientHello changed extensions {sorted(names)} (§4.1.2)")
        if self._retry_cookie is not None and second.cookie != self._retry_cookie:
            raise AlertIllegalParameter("second ClientHello does not echo the cookie (§4.2.2)")
        if self._retry_cookie is None and second.cookie is not None:
            raise AlertUnsupportedExtensionCookie("cookie that the HelloRetryRequest did not send")

    def _negotiate(self, hello: messages.ClientHello) -> _Negotiated:
        suite = next((s for s in self.config.cipher_suites if s in hello.cipher_suites), None)
        if suite is None:
            raise AlertHandshakeFailure("no cipher suite in common")
        server_name = hello.server_names[0].decode("ascii").lower() if hello.server_names else None
        chosen = self.config.certificates.select(server_name, hello.signature_algorithms or ())
        if chosen is None:
            raise AlertHandshakeFailure("no certificate for the client's signature_algorithms")
        alpn = None
        if hello.alpn_protocols is not None and self.config.alpn_protocols:
            offered = set(hello.alpn_protocols)
            alpn = next((p for p in self.config.alpn_protocols if p.encode() in offered), None)
            if alpn is None:
                raise AlertNoApplicationProtocol("no ALPN protocol in common (RFC 7301 §3.2)")
        return _Negotiated(
            cipher_suite=suite,
            credential=chosen[0],
            scheme=chosen[1],
            server_name=server_name,
            alpn_protocol=alpn,
            record_size_limit=hello.record_size_limit,
        )

    def _select_psk(self, hello: messages.ClientHello, raw: bytes) -> _Psk | None:
        """The ticket PSK to resume with (binder verified), or None for a full handshake."""
        config = self.config.tickets
        if config is None or not hello.has(ExtensionType.PRE_SHARED_KEY):
            return None
        assert self._negotiated is not None and self._key_schedule is not None
        offered = messages.parse_pre_shared_key(dict(hello.extensions)[ExtensionType.PRE_SHARED_KEY])
        if len(offered.identities) != len(offered.binders):
            raise AlertIllegalParameter("pre_shared_key: as many binders as identities are required (§4.2.11)")
        modes = hello.psk_key_exchange_modes or ()
        # §4.2.9: only a mode the client listed and we allow; psk_dhe_ke first.
        mode = next((m for m in (PskKeyExchangeMode.PSK_DHE_KE, PskKeyExchangeMode.PSK_KE)
                     if m in modes and m in config.psk_modes), None)
        if mode is None:
            return None
        suite = self._negotiated.cipher_suite
        now = config.clock()
        for index, offer in enumerate(offered.identities[:MAX_PSK_IDENTITIES_TRIED]):
            state = tickets_mod.unseal(config.keyring, offer.identity, now)
            if state is None or not self._may_resume(state):
                continue
            # The one PSK we select: its binder, and nothing else, is checked before we use it.
            truncated = self._key_schedule.transcript.copy()
            truncated.update(raw[: len(raw) - offered.binders_size])
            expected = psk_binder(suite, state.psk, truncated.digest())
            if not hmac.compare_digest(offered.binders[index], expected):
                raise AlertDecryptError("the binder of the selected PSK does not verify (§4.2.11)")
            return _Psk(index, state.psk, mode, state.authenticated)
        return None

    def _may_resume(self, state: TicketState) -> bool:
        """§4.6.1: only with a suite of the same KDF hash; §4.2.11 and RFC 6066 §3: only for the
        server name the session was established for."""
        negotiated = self._negotiated
        assert negotiated is not None
        same_hash = SUITES[state.cipher_suite].hash_name == SUITES[negotiated.cipher_suite].hash_name
        return same_hash and state.server_name == negotiated.server_name

    def _select_key_share(self, hello: messages.ClientHello) -> messages.KeyShareEntry | None:
        """The client's share for our most preferred group it sent one for, or None (→ HRR)."""
        shares = {s.group: s for s in hello.key_shares or ()}
        groups = self.config.groups
        if self.config.retry_for_preferred_group:
            groups = tuple(g for g in groups if g in (hello.supported_groups or ()))[:1]
        for group in groups:
            if group in shares:
                return shares[group]
        return None

    def _send_hello_retry_request(self, hello: messages.ClientHello) -> State:
        """§4.1.4: ask for a share of a group both support; restart the transcript (§4.4.1)."""
        offered = hello.supported_groups or ()
        group = next((g for g in self.config.groups if g in offered), None)
        if group is None:
            raise AlertHandshakeFailure("no (EC)DHE group in common")
        assert self._key_schedule is not None and self._negotiated is not None
        self._retry_group = group
        self._first_hello = hello
        self._retry_cookie = self.config.retry_cookie() if self.config.retry_cookie else None
        self._key_schedule.restart_with_message_hash()
        hrr = messages.hello_retry_request(
            legacy_session_id=hello.legacy_session_id,
            cipher_suite=self._negotiated.cipher_suite,
            group=group,
            cookie=self._retry_cookie,
        )
        self._add_to_transcript(hrr)
        self._send_plaintext(ContentType.HANDSHAKE, hrr)
        if hello.has(ExtensionType.EARLY_DATA):
            self._early_data_skip = MAX_EARLY_DATA_SKIP  # §4.2.10, until the second ClientHello
        if hello.legacy_session_id:  # middlebox compatibility (§D.4)
            self._send_plaintext(ContentType.CHANGE_CIPHER_SPEC, b"\x01")
        return State.START_AFTER_RETRY

    # -- the server flight (§4.1.3, §4.3, §4.4) --------------------------------------------------
    def _send_server_flight(self, hello: messages.ClientHello, share: messages.KeyShareEntry | None) -> State:
        """``share`` None: psk_ke resumption (no (EC)DHE, no key_share in the ServerHello)."""
        negotiated, schedule, psk = self._negotiated, self._key_schedule, self._psk
        assert negotiated and schedule and negotiated.credential and negotiated.scheme
        assert share is not None or (psk is not None and psk.mode is PskKeyExchangeMode.PSK_KE)
        shared_secret: bytes | None = None
        exchange: KeyExchange | None = None
        if share is not None:
            negotiated.group = Group(share.group)
            exchange = self.config.key_exchange(negotiated.group)
            shared_secret = exchange.exchange(share.key_exchange)
        suite = negotiated.cipher_suite

        server_hello = messages.server_hello(
            random=self.config.random_bytes(32),
            legacy_session_id=hello.legacy_session_id,
            cipher_suite=suite,
            group=negotiated.group,
            key_exchange=exchange.public_bytes() if exchange is not None else None,
            selected_identity=psk.index if psk is not None else None,
        )
        self._add_to_transcript(server_hello)
        self._send_plaintext(ContentType.HANDSHAKE, server_hello)
        if hello.legacy_session_id and self._first_hello is None:  # compat mode: CCS once
            self._send_plaintext(ContentType.CHANGE_CIPHER_SPEC, b"\x01")

        schedule.extract(psk.secret if psk is not None else None)  # Early Secret
        schedule.extract(shared_secret)  # Handshake Secret (psk_ke: zeros, §7.1)
        client_hs = schedule.derive_secret(b"c hs traffic")
        server_hs = schedule.derive_secret(b"s hs traffic")
        self._keylog("CLIENT_HANDSHAKE_TRAFFIC_SECRET", client_hs)
        self._keylog("SERVER_HANDSHAKE_TRAFFIC_SECRET", server_hs)
        self._client_handshake_secret = client_hs
        self._read_protection = RecordProtection.from_secret(suite, client_hs)
        self._write_protection = RecordProtection.from_secret(suite, server_hs)

        flight = bytearray()

        def add(message: bytes) -> None:
            self._add_to_transcript(message)
            flight.extend(message)

        advertised = self.config.advertised_groups
        add(
            messages.encrypted_extensions(
                supported_groups=tuple(self.config.groups) if advertised is None else advertised,
                record_size_limit=OUR_RECORD_SIZE_LIMIT if hello.record_size_limit is not None else None,
                server_name_ack=negotiated.server_name is not None,
                alpn_protocol=negotiated.alpn_protocol.encode() if negotiated.alpn_protocol else None,
            )
        )
        if psk is None:  # resumed: the PSK authenticates us (§2.2)
            add(messages.certificate(negotiated.credential.chain))
            signature = self.config.signer(
                negotiated.credential,
                negotiated.scheme,
                schedule.certificate_verify_data(SERVER_CERTIFICATE_VERIFY_CONTEXT),
            )
            add(messages.certificate_verify(scheme=negotiated.scheme, signature=signature))
        add(messages.finished(schedule.finished_verify_data(server_hs)))
        self._send_encrypted(ContentType.HANDSHAKE, bytes(flight))

        # Application secrets use the transcript up to the server Finished (§7.1).
        schedule.extract(None)  # Master Secret
        self._client_application_secret = schedule.derive_secret(b"c ap traffic")
        self._server_application_secret = schedule.derive_secret(b"s ap traffic")
        self._keylog("CLIENT_TRAFFIC_SECRET_0", self._client_application_secret)
        self._keylog("SERVER_TRAFFIC_SECRET_0", self._server_application_secret)
        self._write_protection = RecordProtection.from_secret(suite, self._server_application_secret)
        self._events.append(
            ClientHelloReceived(
                server_name=negotiated.server_name,
                alpn_offered=tuple(p.decode("latin-1") for p in hello.alpn_protocols or ()),
                hello_retry=self._first_hello is not None,
            )
        )
        return State.WAIT_FINISHED

    # -- client Finished (§4.4.4) ----------------------------------------------------------------
    def _handle_finished(self, raw: bytes) -> State:
        schedule, negotiated = self._key_schedule, self._negotiated
        assert schedule and negotiated and negotiated.scheme
        expected = schedule.finished_verify_data(self._client_handshake_secret)
        if len(raw) - 4 != len(expected):
            raise AlertDecodeError("Finished of the wrong length")
        if not hmac.compare_digest(raw[4:], expected):
            raise AlertDecryptError("client Finished does not verify")
        self._add_to_transcript(raw)
        # Only now is the client→server application key committed (aioquic's rule).
        self._read_protection = RecordProtection.from_secret(
            negotiated.cipher_suite, self._client_application_secret
        )
        tickets = self.config.new_session_tickets() or self._new_session_tickets()
        for ticket in tickets:
            # Sealed under the server application key: each one advances the write rec_seq.
            self._send_encrypted(ContentType.HANDSHAKE, ticket)
        self._events.append(
            HandshakeComplete(
                cipher_suite=negotiated.cipher_suite,
                group=negotiated.group,
                signature_scheme=negotiated.scheme if self._psk is None else None,
                server_name=negotiated.server_name,
                alpn_protocol=negotiated.alpn_protocol,
                hello_retry=self._first_hello is not None,
                resumed=self._psk is not None,
                tickets_sent=len(tickets),
            )
        )
        return State.CONNECTED

    def _new_session_tickets(self) -> tuple[bytes, ...]:
        """Our NewSessionTickets (§4.6.1), from resumption_master_secret (transcript through the
        client Finished, §7.1)."""
        config, schedule, negotiated = self.config.tickets, self._key_schedule, self._negotiated
        if config is None or config.count == 0:
            return ()
        if not config.psk_modes.intersection(self._client_psk_modes):
            # §4.2.9: "Servers SHOULD NOT send NewSessionTicket with tickets that are not
            # compatible with the advertised modes" (none advertised: no resumption at all).
            return ()
        assert schedule is not None and negotiated is not None
        resumption_master_secret = schedule.derive_secret(b"res master")
        now = config.clock()
        authenticated = self._psk.authenticated if self._psk is not None else now
        lifetime = tickets_mod.lifetime_for(now, authenticated, config.keyring.lifetime)
        if lifetime == 0:
            return ()
        out = []
        for n in range(config.count):
            nonce = n.to_bytes(1, "big")  # ticket_nonce: unique per ticket of this connection
            state = TicketState(
                cipher_suite=negotiated.cipher_suite,
                issued=now,
                lifetime=lifetime,
                ticket_age_add=int.from_bytes(config.random_bytes(4), "big"),
                psk=resumption_psk(negotiated.cipher_suite, resumption_master_secret, nonce),
                server_name=negotiated.server_name,
                alpn_protocol=negotiated.alpn_protocol,
                authenticated=authenticated,
            )
            try:
                key = config.keyring.sealing_key(now)
            except TicketKeyExhausted:
                break
            ticket = tickets_mod.seal(key, state, config.random_bytes)
            out.append(messages.new_session_ticket(
                lifetime=lifetime, age_add=state.ticket_age_add, nonce=nonce, ticket=ticket))
        return tuple(out)


class _PeerClosed(Exception):
    def __init__(self, message: str, received: AlertDescription | int | None = None) -> None:
        super().__init__(message)
        self.received = received


class AlertUnsupportedExtensionCookie(AlertIllegalParameter):
    """A cookie in the second ClientHello that our HelloRetryRequest never sent (§4.2.2)."""

    description = AlertDescription.unsupported_extension
