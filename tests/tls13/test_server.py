"""TLSServer in memory: against CPython's ssl (MemoryBIO) and against hand-built client bytes.

`Client` below is a deliberately small TLS 1.3 client written from RFC 8446 (it reuses only the
key schedule, which test_keyschedule/test_rfc8448_replay pin to RFC 8448): it builds ClientHellos
extension by extension so tests can break exactly one thing, and seals its own Finished.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from ironsocket.tls13.alerts import LocalProtocolError, RemoteProtocolError
from ironsocket.tls13.constants import (
    AlertDescription as AD,
    CipherSuite,
    ContentType,
    ExtensionType as Ext,
    Group,
    HandshakeType,
    SignatureScheme,
)
from ironsocket.tls13.events import (
    NEED_DATA,
    ApplicationData,
    ClientHelloReceived,
    ConnectionClosed,
    HandshakeComplete,
    KeyUpdateReceived,
)
from ironsocket.tls13.keyschedule import KeySchedule, finished_key, next_traffic_secret
from ironsocket.tls13.messages import HELLO_RETRY_REQUEST_RANDOM, key_update
from ironsocket.tls13.records import RecordProtection
from ironsocket.tls13.server import KeyExchange, TLSServer
from ironsocket.tls13.session import Session
from tests.helpers import MemoryClient, client_context, config, drain, handshake, store

SUITES = tuple(CipherSuite)
GROUPS = (Group.X25519, Group.SECP256R1, Group.SECP384R1)
FFDHE2048 = 0x0100


# -- wire helpers ---------------------------------------------------------------------------------
def u8(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def u16(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def ints16(values) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join(int(v).to_bytes(2, "big") for v in values)


def record(content_type: int, body: bytes) -> bytes:
    return bytes([content_type, 3, 3]) + u16(body)


def hs_message(msg_type: int, body: bytes) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def alert_record(description: AD) -> bytes:
    return record(ContentType.ALERT, bytes([2, description]))


def split_records(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while data:
        length = int.from_bytes(data[3:5], "big")
        out.append((data[:5], data[5 : 5 + length]))
        data = data[5 + length :]
    return out


def _public(key) -> bytes:  # type: ignore[no-untyped-def]
    if isinstance(key, x25519.X25519PrivateKey):
        return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _exchange(key, peer: bytes) -> bytes:  # type: ignore[no-untyped-def]
    if isinstance(key, x25519.X25519PrivateKey):
        return key.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
    return key.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(key.curve, peer))


def _new_key(group: int):  # type: ignore[no-untyped-def]
    if group == Group.X25519:
        return x25519.X25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1() if group == Group.SECP256R1 else ec.SECP384R1())


class Client:
    """A minimal TLS 1.3 client (RFC 8446 §4) for driving the engine with exact bytes."""

    def __init__(
        self,
        *,
        suites=SUITES,  # type: ignore[no-untyped-def]
        groups=(Group.X25519,),
        share_groups=None,
        sigalgs=tuple(SignatureScheme),
        versions=(0x0304,),
        server_name: bytes | None = None,
        alpn: tuple[bytes, ...] | None = None,
        random: bytes = bytes(range(32)),
        session_id: bytes = b"",
        keys: dict | None = None,  # type: ignore[type-arg]
    ) -> None:
        self.suites, self.groups, self.sigalgs, self.versions = suites, groups, sigalgs, versions
        self.share_groups = groups[:1] if share_groups is None else share_groups
        self.server_name, self.alpn, self.random, self.session_id = server_name, alpn, random, session_id
        self.keys = dict(keys or {})
        self.pending: list[bytes] = []  # handshake messages before the suite is known
        self.schedule: KeySchedule | None = None
        self.suite: CipherSuite | None = None
        self.hrr_group: int | None = None
        self.read: RecordProtection | None = None
        self.write: RecordProtection | None = None
        self.app_read: RecordProtection | None = None
        self.app_write: RecordProtection | None = None
        self.finished: bytes | None = None
        self.received: list[bytes] = []
        self.alerts: list[bytes] = []
        self.server_hello: bytes | None = None

    def share(self, group: int) -> bytes:
        if group not in self.keys:
            self.keys[group] = _new_key(group)
        return _public(self.keys[group])

    def extensions(self, share_groups=None) -> list[tuple[int, bytes]]:  # type: ignore[no-untyped-def]
        shares = self.share_groups if share_groups is None else share_groups
        exts: list[tuple[int, bytes]] = []
        if self.server_name is not None:
            exts.append((Ext.SERVER_NAME, u16(b"\x00" + u16(self.server_name))))
        exts.append((Ext.SUPPORTED_GROUPS, u16(ints16(self.groups))))
        exts.append((Ext.SIGNATURE_ALGORITHMS, u16(ints16(self.sigalgs))))
        if self.alpn is not None:
            exts.append((Ext.APPLICATION_LAYER_PROTOCOL_NEGOTIATION, u16(b"".join(u8(p) for p in self.alpn))))
        exts.append((Ext.SUPPORTED_VERSIONS, u8(ints16(self.versions))))
        exts.append((Ext.KEY_SHARE, u16(b"".join(int(g).to_bytes(2, "big") + u16(self.share(g)) for g in shares))))
        return exts

    def hello(
        self, exts=None, *, suites=None, random=None, compression=b"\x00", share_groups=None, version=b"\x03\x03"
    ) -> bytes:  # type: ignore[no-untyped-def]
        """A ClientHello handshake message; it becomes part of the transcript."""
        exts = self.extensions(share_groups) if exts is None else exts
        body = (
            version
            + (self.random if random is None else random)
            + u8(self.session_id)
            + u16(ints16(self.suites if suites is None else suites))
            + u8(compression)
            + u16(b"".join(int(t).to_bytes(2, "big") + u16(d) for t, d in exts))
        )
        msg = hs_message(HandshakeType.CLIENT_HELLO, body)
        self._transcript(msg)
        return msg

    def hello_record(self, **kw) -> bytes:  # type: ignore[no-untyped-def]
        return record(ContentType.HANDSHAKE, self.hello(**kw))

    def second_hello_record(self, **kw) -> bytes:  # type: ignore[no-untyped-def]
        assert self.hrr_group is not None
        kw.setdefault("share_groups", (self.hrr_group,))
        return self.hello_record(**kw)

    def _transcript(self, msg: bytes) -> None:
        if self.schedule is None:
            self.pending.append(msg)
        else:
            self.schedule.update_hash(msg)

    # -- the server's flight ---------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        buffer = b""
        for header, body in split_records(data):
            if header[0] == ContentType.CHANGE_CIPHER_SPEC:
                continue
            if header[0] == ContentType.ALERT:
                self.alerts.append(body)
                continue
            if header[0] == ContentType.APPLICATION_DATA:
                assert self.read is not None
                inner, body = self.read.open(header, body)
                if inner == ContentType.ALERT:
                    self.alerts.append(body)
                    continue
            buffer += body
            while len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[1:4], "big"):
                n = 4 + int.from_bytes(buffer[1:4], "big")
                msg, buffer = buffer[:n], buffer[n:]
                self._handle(msg)

    def _handle(self, msg: bytes) -> None:
        self.received.append(msg)
        if msg[0] == HandshakeType.SERVER_HELLO:
            random = msg[6:38]
            sid_len = msg[38]
            pos = 39 + sid_len
            suite = CipherSuite(int.from_bytes(msg[pos : pos + 2], "big"))
            pos += 3 + 2
            exts = {}
            while pos < len(msg):
                t, n = int.from_bytes(msg[pos : pos + 2], "big"), int.from_bytes(msg[pos + 2 : pos + 4], "big")
                exts[t] = msg[pos + 4 : pos + 4 + n]
                pos += 4 + n
            self.suite = suite
            if random == HELLO_RETRY_REQUEST_RANDOM:
                self.hrr_group = int.from_bytes(exts[Ext.KEY_SHARE], "big")
                digest = hashlib.new(KeySchedule(suite).hash_name, b"".join(self.pending)).digest()
                self.pending = [bytes([254, 0, 0, len(digest)]) + digest, msg]
                return
            self.server_hello = msg
            group = int.from_bytes(exts[Ext.KEY_SHARE][:2], "big")
            shared = _exchange(self.keys[group], exts[Ext.KEY_SHARE][4:])
            self.schedule = KeySchedule(suite)
            for m in self.pending + [msg]:
                self.schedule.update_hash(m)
            self.schedule.extract(None)
            self.schedule.extract(shared)
            self.client_hs = self.schedule.derive_secret(b"c hs traffic")
            self.read = RecordProtection.from_secret(suite, self.schedule.derive_secret(b"s hs traffic"))
            self.write = RecordProtection.from_secret(suite, self.client_hs)
            return
        assert self.schedule is not None and self.suite is not None
        self.schedule.update_hash(msg)
        if msg[0] == HandshakeType.FINISHED:
            self.schedule.extract(None)
            self.app_write = RecordProtection.from_secret(self.suite, self.schedule.derive_secret(b"c ap traffic"))
            self.app_read = RecordProtection.from_secret(self.suite, self.schedule.derive_secret(b"s ap traffic"))
            self.read = self.app_read
            verify = hmac.new(
                finished_key(self.suite, self.client_hs), self.schedule.transcript_hash(), self.schedule.hash_name
            ).digest()
            self.finished = hs_message(HandshakeType.FINISHED, verify)

    def finished_record(self, *, corrupt: bool = False) -> bytes:
        assert self.finished is not None and self.write is not None
        msg = self.finished
        if corrupt:
            msg = msg[:-1] + bytes([msg[-1] ^ 1])
        return self.write.seal(ContentType.HANDSHAKE, msg)


def connect(cfg=None, client: Client | None = None):  # type: ignore[no-untyped-def]
    """Run a full handshake with `Client`; return (engine, client, events)."""
    engine = TLSServer(cfg or config())
    client = client or Client()
    engine.receive_data(client.hello_record())
    events = drain(engine)
    client.receive(engine.data_to_send())
    if client.hrr_group is not None and client.finished is None:
        engine.receive_data(client.second_hello_record())
        events += drain(engine)
        client.receive(engine.data_to_send())
    engine.receive_data(client.finished_record())
    events += drain(engine)
    return engine, client, events


def server_flight(client: Client, cfg=None) -> TLSServer:  # type: ignore[no-untyped-def]
    """An engine that answered `client`'s ClientHello (state WAIT_FINISHED)."""
    engine = TLSServer(cfg or config())
    engine.receive_data(client.hello_record())
    assert [type(e) for e in drain(engine)] == [ClientHelloReceived]
    client.receive(engine.data_to_send())
    return engine


def assert_alert(engine: TLSServer, description: AD, *, read: RecordProtection | None = None) -> RemoteProtocolError:
    """The engine raises RemoteProtocolError(alert=description), queues exactly that alert record
    (plaintext, or under ``read`` when the client holds our keys) and stays in ERROR."""
    with pytest.raises(RemoteProtocolError) as info:
        drain(engine)
    assert info.value.alert is description
    assert info.value.received is None
    out = engine.data_to_send()
    if read is None:
        assert out == alert_record(description)
    else:
        ((header, body),) = split_records(out)
        assert read.open(header, body) == (ContentType.ALERT, bytes([2, description]))
    with pytest.raises(LocalProtocolError):
        engine.next_event()
    return info.value


def feed_alert(data: bytes, description: AD, cfg=None) -> RemoteProtocolError:  # type: ignore[no-untyped-def]
    engine = TLSServer(cfg or config())
    engine.receive_data(data)
    return assert_alert(engine, description)


def hello_with(exts_edit=None, **kw) -> bytes:  # type: ignore[no-untyped-def]
    """A ClientHello record from a default `Client` whose extension list went through exts_edit."""
    client = Client()
    exts = client.extensions()
    if exts_edit is not None:
        exts = exts_edit(exts)
    return client.hello_record(exts=exts, **kw)


def without(ext_type: int):  # type: ignore[no-untyped-def]
    return lambda exts: [(t, d) for t, d in exts if t != ext_type]


# == against CPython's ssl ========================================================================
@pytest.mark.parametrize(
    ("name", "scheme"),
    [
        ("ecdsa-p256", SignatureScheme.ECDSA_SECP256R1_SHA256),
        ("ecdsa-p384", SignatureScheme.ECDSA_SECP384R1_SHA384),
        ("rsa2048", SignatureScheme.RSA_PSS_RSAE_SHA256),
        ("ed25519", SignatureScheme.ED25519),
    ],
)
def test_ssl_client_handshake_per_certificate_type(name: str, scheme: SignatureScheme) -> None:
    engine = TLSServer(config(certificates=store(name)))
    client = MemoryClient(client_context())
    events = handshake(engine, client)
    assert events == [
        ClientHelloReceived(server_name="localhost", alpn_offered=(), hello_retry=False),
        HandshakeComplete(
            cipher_suite=CipherSuite.TLS_AES_128_GCM_SHA256,
            group=Group.X25519,
            signature_scheme=scheme,
            server_name="localhost",
            alpn_protocol=None,
            hello_retry=False,
        ),
    ]
    assert client.obj.version() == "TLSv1.3"
    assert client.obj.cipher()[0] == "TLS_AES_128_GCM_SHA256"


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("group", GROUPS)
def test_ssl_client_handshake_per_suite_and_group(suite: CipherSuite, group: Group) -> None:
    # OpenSSL's default key share is x25519: the other groups go through HelloRetryRequest.
    engine = TLSServer(config(cipher_suites=(suite,), groups=(group,)))
    client = MemoryClient(client_context())
    events = handshake(engine, client)
    assert events[-1] == HandshakeComplete(
        cipher_suite=suite,
        group=group,
        signature_scheme=SignatureScheme.ECDSA_SECP256R1_SHA256,
        server_name="localhost",
        alpn_protocol=None,
        hello_retry=group is not Group.X25519,
    )
    assert client.obj.cipher()[0] == suite.name


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("group", GROUPS)
def test_crafted_client_handshake_per_suite_and_group(suite: CipherSuite, group: Group) -> None:
    engine, client, events = connect(config(), Client(suites=(suite,), groups=(group,)))
    assert events == [
        ClientHelloReceived(server_name=None, alpn_offered=(), hello_retry=False),
        HandshakeComplete(
            cipher_suite=suite,
            group=group,
            signature_scheme=SignatureScheme.ECDSA_SECP256R1_SHA256,
            server_name=None,
            alpn_protocol=None,
            hello_retry=False,
        ),
    ]
    assert engine.handoff().read.key == client.app_write.key  # type: ignore[union-attr]
    assert engine.handoff().write.key == client.app_read.key  # type: ignore[union-attr]


@pytest.mark.parametrize("suite", SUITES)
def test_handoff_keys_carry_application_data_both_ways(suite: CipherSuite) -> None:
    engine = TLSServer(config(cipher_suites=(suite,)))
    client = MemoryClient(client_context())
    handshake(engine, client)
    session = Session(engine.handoff())
    client.obj.write(b"ping")
    session.receive_data(client.outgoing.read())
    assert session.next_event() == ApplicationData(data=b"ping")
    assert session.next_event() is NEED_DATA
    session.send_data(b"pong")
    client.incoming.write(session.data_to_send())
    assert client.obj.read() == b"pong"


def test_handoff_state_after_handshake() -> None:
    engine = TLSServer(config(cipher_suites=(CipherSuite.TLS_AES_256_GCM_SHA384,)))
    handshake(engine, MemoryClient(client_context()))
    h = engine.handoff()
    assert (h.cipher_suite, h.group, h.server_name, h.alpn_protocol) == (
        CipherSuite.TLS_AES_256_GCM_SHA384, Group.X25519, "localhost", None,
    )
    assert (h.read.rec_seq, h.write.rec_seq) == (0, 0)
    assert (len(h.read.key), len(h.read.iv), len(h.read.traffic_secret)) == (32, 12, 48)
    assert (h.plaintext, h.unprocessed) == (b"", b"")


def test_server_cipher_suite_preference_wins() -> None:
    cfg = config(cipher_suites=(CipherSuite.TLS_CHACHA20_POLY1305_SHA256, CipherSuite.TLS_AES_128_GCM_SHA256))
    _, _, events = connect(cfg, Client(suites=(0x1301, 0x1302, 0x1303)))
    assert events[-1].cipher_suite is CipherSuite.TLS_CHACHA20_POLY1305_SHA256  # type: ignore[union-attr]


def test_server_cipher_suite_preference_wins_over_openssl() -> None:
    # OpenSSL offers AES-256 first.
    engine = TLSServer(config(cipher_suites=(CipherSuite.TLS_AES_128_GCM_SHA256, CipherSuite.TLS_AES_256_GCM_SHA384)))
    client = MemoryClient(client_context())
    assert handshake(engine, client)[-1].cipher_suite is CipherSuite.TLS_AES_128_GCM_SHA256  # type: ignore[union-attr]


def test_server_group_preference_among_client_shares() -> None:
    cfg = config(groups=(Group.SECP256R1, Group.X25519))
    client = Client(groups=(Group.X25519, Group.SECP256R1), share_groups=(Group.X25519, Group.SECP256R1))
    assert connect(cfg, client)[2][-1].group is Group.SECP256R1  # type: ignore[union-attr]


def test_alpn_server_preference() -> None:
    engine = TLSServer(config(alpn_protocols=("h2", "http/1.1")))
    ctx = client_context()
    ctx.set_alpn_protocols(["http/1.1", "h2"])
    client = MemoryClient(ctx)
    events = handshake(engine, client)
    assert events[0] == ClientHelloReceived(server_name="localhost", alpn_offered=("http/1.1", "h2"), hello_retry=False)
    assert events[-1].alpn_protocol == "h2"  # type: ignore[union-attr]
    assert engine.handoff().alpn_protocol == "h2"
    assert client.obj.selected_alpn_protocol() == "h2"


def test_alpn_not_offered_by_client_selects_nothing() -> None:
    _, _, events = connect(config(alpn_protocols=("h2",)))
    assert events[-1].alpn_protocol is None  # type: ignore[union-attr]


def test_alpn_mismatch_is_no_application_protocol() -> None:
    feed_alert(Client(alpn=(b"http/1.1",)).hello_record(), AD.no_application_protocol, config(alpn_protocols=("h2",)))


def test_alpn_mismatch_with_openssl_client() -> None:
    engine = TLSServer(config(alpn_protocols=("h2",)))
    ctx = client_context()
    ctx.set_alpn_protocols(["http/1.1"])
    client = MemoryClient(ctx)
    client.step()
    engine.receive_data(client.outgoing.read())
    assert_alert(engine, AD.no_application_protocol)


def _peer_names(client: MemoryClient) -> list[str]:
    return [v for k, v in client.obj.getpeercert()["subjectAltName"] if k == "DNS"]


@pytest.mark.parametrize("name", ["alpha.test", "beta.test"])
def test_sni_selects_matching_certificate(name: str) -> None:
    engine = TLSServer(config(certificates=store("alpha.test", "beta.test")))
    client = MemoryClient(client_context(), server_hostname=name)
    events = handshake(engine, client)
    assert events[-1].server_name == name  # type: ignore[union-attr]
    assert _peer_names(client) == [name]


def test_no_sni_selects_first_certificate() -> None:
    engine = TLSServer(config(certificates=store("beta.test", "alpha.test")))
    client = MemoryClient(client_context(check_hostname=False), server_hostname=None)
    events = handshake(engine, client)
    assert events[-1].server_name is None  # type: ignore[union-attr]
    assert _peer_names(client) == ["beta.test"]


# == HelloRetryRequest (§4.1.4) ===================================================================
def _hrr_client(**kw) -> Client:  # type: ignore[no-untyped-def]
    return Client(groups=(Group.SECP384R1, Group.X25519), share_groups=(Group.SECP384R1,), **kw)


def _after_hrr(client: Client) -> TLSServer:
    engine = TLSServer(config(groups=(Group.X25519,)))
    engine.receive_data(client.hello_record())
    assert drain(engine) == []
    out = engine.data_to_send()
    assert out[0] == ContentType.HANDSHAKE and out[5] == HandshakeType.SERVER_HELLO
    assert out[11:43] == HELLO_RETRY_REQUEST_RANDOM
    client.receive(out)
    assert client.hrr_group == Group.X25519
    return engine


def test_hello_retry_request_then_completes() -> None:
    client = _hrr_client()
    engine = _after_hrr(client)
    engine.receive_data(client.second_hello_record())
    assert drain(engine) == [ClientHelloReceived(server_name=None, alpn_offered=(), hello_retry=True)]
    client.receive(engine.data_to_send())
    engine.receive_data(client.finished_record())
    (done,) = drain(engine)
    assert isinstance(done, HandshakeComplete) and done.hello_retry and done.group is Group.X25519


def test_hello_retry_request_with_compat_session_id_sends_one_ccs() -> None:
    client = _hrr_client(session_id=b"\x07" * 32)
    engine = TLSServer(config(groups=(Group.X25519,)))
    engine.receive_data(client.hello_record())
    drain(engine)
    out = engine.data_to_send()
    assert out.endswith(record(ContentType.CHANGE_CIPHER_SPEC, b"\x01"))
    client.receive(out)
    engine.receive_data(record(ContentType.CHANGE_CIPHER_SPEC, b"\x01") + client.second_hello_record())
    assert [type(e) for e in drain(engine)] == [ClientHelloReceived]
    types = [header[0] for header, _ in split_records(engine.data_to_send())]
    assert types == [ContentType.HANDSHAKE, ContentType.APPLICATION_DATA]  # no second CCS


@pytest.mark.parametrize(
    "change",
    [
        {"suites": (0x1302, 0x1301)},
        {"random": b"\xee" * 32},
        {"compression": b"\x00\x00"},
    ],
    ids=["cipher_suites", "random", "compression"],
)
def test_second_client_hello_changing_fixed_field_is_illegal_parameter(change: dict) -> None:  # type: ignore[type-arg]
    client = _hrr_client(suites=(0x1301, 0x1302))
    engine = _after_hrr(client)
    engine.receive_data(client.second_hello_record(**change))
    assert_alert(engine, AD.illegal_parameter)


def test_second_client_hello_adding_extension_is_illegal_parameter() -> None:
    client = _hrr_client()
    engine = _after_hrr(client)
    client.alpn = (b"h2",)
    engine.receive_data(client.second_hello_record())
    assert_alert(engine, AD.illegal_parameter)


@pytest.mark.parametrize("shares", [(Group.SECP384R1,), (Group.X25519, Group.SECP384R1), ()])
def test_second_client_hello_with_wrong_shares_is_illegal_parameter(shares: tuple) -> None:  # type: ignore[type-arg]
    client = _hrr_client()
    engine = _after_hrr(client)
    engine.receive_data(client.second_hello_record(share_groups=shares))
    assert_alert(engine, AD.illegal_parameter)


def test_third_client_hello_is_unexpected_message() -> None:
    client = _hrr_client()
    engine = _after_hrr(client)
    engine.receive_data(client.second_hello_record())
    drain(engine)
    client.receive(engine.data_to_send())
    engine.receive_data(Client().hello_record())  # plaintext, after ServerHello
    assert_alert(engine, AD.unexpected_message, read=client.app_read)


def test_encrypted_client_hello_in_wait_finished_is_unexpected_message() -> None:
    client = Client()
    engine = server_flight(client)
    engine.receive_data(client.write.seal(ContentType.HANDSHAKE, Client().hello()))  # type: ignore[union-attr]
    assert_alert(engine, AD.unexpected_message, read=client.app_read)


# == alerts from the ClientHello ==================================================================
def test_tls12_openssl_client_is_protocol_version() -> None:
    ctx = client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client = MemoryClient(ctx)
    client.step()
    engine = TLSServer(config())
    engine.receive_data(client.outgoing.read())
    assert_alert(engine, AD.protocol_version)


def test_no_supported_versions_is_protocol_version() -> None:
    feed_alert(hello_with(without(Ext.SUPPORTED_VERSIONS)), AD.protocol_version)


def test_supported_versions_without_tls13_is_protocol_version() -> None:
    feed_alert(Client(versions=(0x0303,)).hello_record(), AD.protocol_version)


def test_no_common_cipher_suite_is_handshake_failure() -> None:
    feed_alert(Client(suites=(0x1304, 0xC02F)).hello_record(), AD.handshake_failure)


def test_no_common_group_is_handshake_failure() -> None:
    feed_alert(Client(groups=(FFDHE2048,), share_groups=()).hello_record(), AD.handshake_failure)


def test_no_common_signature_scheme_is_handshake_failure() -> None:
    feed_alert(Client(sigalgs=(0x0201,)).hello_record(), AD.handshake_failure)


@pytest.mark.parametrize("ext", [Ext.SIGNATURE_ALGORITHMS, Ext.KEY_SHARE, Ext.SUPPORTED_GROUPS])
def test_missing_extension(ext: Ext) -> None:
    feed_alert(hello_with(without(ext)), AD.missing_extension)


def test_duplicate_extension_is_illegal_parameter() -> None:
    feed_alert(hello_with(lambda e: e + [e[0]]), AD.illegal_parameter)


PSK = (
    Ext.PRE_SHARED_KEY,
    u16(u16(b"ticket") + b"\x00\x00\x00\x00") + u16(u8(bytes(32))),
)
PSK_MODES = (Ext.PSK_KEY_EXCHANGE_MODES, u8(b"\x01"))


def test_pre_shared_key_not_last_is_illegal_parameter() -> None:
    feed_alert(hello_with(lambda e: [PSK_MODES, PSK] + e), AD.illegal_parameter)


def test_pre_shared_key_without_modes_is_missing_extension() -> None:
    feed_alert(hello_with(lambda e: e + [PSK]), AD.missing_extension)


def test_pre_shared_key_last_is_ignored_full_handshake() -> None:
    engine = TLSServer(config())
    engine.receive_data(hello_with(lambda e: [PSK_MODES] + e + [PSK]))
    assert [type(e) for e in drain(engine)] == [ClientHelloReceived]


@pytest.mark.parametrize("methods", [b"\x00\x01", b"\x01", b""])
def test_compression_methods_not_null_is_illegal_parameter(methods: bytes) -> None:
    feed_alert(hello_with(compression=methods), AD.illegal_parameter)


def test_key_share_for_group_not_in_supported_groups_is_illegal_parameter() -> None:
    feed_alert(Client(groups=(Group.X25519,), share_groups=(Group.SECP256R1,)).hello_record(), AD.illegal_parameter)


def test_invalid_x25519_share_is_illegal_parameter() -> None:
    client = Client()
    exts = [(t, d if t != Ext.KEY_SHARE else u16(ints16([Group.X25519]) + u16(bytes(31)))) for t, d in client.extensions()]
    feed_alert(client.hello_record(exts=exts), AD.illegal_parameter)


def test_truncated_client_hello_is_decode_error() -> None:
    body = Client().hello()[4:]
    feed_alert(record(ContentType.HANDSHAKE, hs_message(HandshakeType.CLIENT_HELLO, body[:40])), AD.decode_error)


def test_garbled_extensions_length_is_decode_error() -> None:
    msg = bytearray(Client().hello())
    ext_len_at = 4 + 2 + 32 + 1 + 2 + 6 + 2  # version, random, sid, suites (3), compression
    assert msg[ext_len_at - 2 : ext_len_at] == b"\x01\x00"
    msg[ext_len_at] ^= 0x40
    feed_alert(record(ContentType.HANDSHAKE, bytes(msg)), AD.decode_error)


@pytest.mark.parametrize("ext", [Ext.KEY_SHARE, Ext.SUPPORTED_GROUPS, Ext.SIGNATURE_ALGORITHMS, Ext.SUPPORTED_VERSIONS])
def test_empty_extension_body_is_decode_error(ext: Ext) -> None:
    # An empty key_share body made tlslite's re-encoding raise TypeError out of the engine.
    feed_alert(hello_with(lambda e: [(t, b"" if t == ext else d) for t, d in e]), AD.decode_error)


def test_record_over_2_14_is_record_overflow() -> None:
    feed_alert(bytes([22, 3, 3, 0x40, 0x01]) + bytes(10), AD.record_overflow)


def test_unknown_content_type_is_unexpected_message() -> None:
    feed_alert(record(99, b"\x01"), AD.unexpected_message)


def test_application_data_before_keys_is_unexpected_message() -> None:
    feed_alert(record(ContentType.APPLICATION_DATA, bytes(20)), AD.unexpected_message)


def test_ccs_before_client_hello_is_unexpected_message() -> None:
    feed_alert(record(ContentType.CHANGE_CIPHER_SPEC, b"\x01") + Client().hello_record(), AD.unexpected_message)


@pytest.mark.parametrize("body", [b"\x02", b"\x01\x01", b"\x00"])
def test_ccs_with_bad_body_is_unexpected_message(body: bytes) -> None:
    client = Client()
    engine = server_flight(client)
    engine.receive_data(record(ContentType.CHANGE_CIPHER_SPEC, body))
    assert_alert(engine, AD.unexpected_message, read=client.app_read)


def test_ccs_in_wait_finished_is_ignored() -> None:
    client = Client()
    engine = server_flight(client)
    engine.receive_data(record(ContentType.CHANGE_CIPHER_SPEC, b"\x01") + client.finished_record())
    assert [type(e) for e in drain(engine)] == [HandshakeComplete]


@pytest.mark.parametrize(
    "interloper",
    [record(ContentType.CHANGE_CIPHER_SPEC, b"\x01"), record(ContentType.ALERT, b"\x01\x5a")],
    ids=["ccs", "alert"],
)
def test_record_interleaved_with_fragmented_handshake_is_unexpected_message(interloper: bytes) -> None:
    msg = Client().hello()
    data = record(ContentType.HANDSHAKE, msg[:50]) + interloper + record(ContentType.HANDSHAKE, msg[50:])
    feed_alert(data, AD.unexpected_message)


def test_fragmented_client_hello_is_accepted() -> None:
    msg = Client().hello()
    engine = TLSServer(config())
    engine.receive_data(b"".join(record(ContentType.HANDSHAKE, msg[i : i + 7]) for i in range(0, len(msg), 7)))
    assert [type(e) for e in drain(engine)] == [ClientHelloReceived]


def test_handshake_bytes_after_client_hello_in_same_record_is_unexpected_message() -> None:
    feed_alert(record(ContentType.HANDSHAKE, Client().hello() + b"\x14\x00\x00"), AD.unexpected_message)


def test_handshake_message_over_64k_declared_is_illegal_parameter() -> None:
    # A ClientHello may be up to limits.MAX_CLIENT_HELLO_SIZE (test_conformance); any other
    # handshake message over 64 KiB is refused at its header.
    feed_alert(record(ContentType.HANDSHAKE, b"\x14\x01\x00\x01" + bytes(100)), AD.illegal_parameter)


def test_unknown_handshake_type_is_unexpected_message() -> None:
    feed_alert(record(ContentType.HANDSHAKE, hs_message(99, b"")), AD.unexpected_message)


# == alerts from the client's second flight =======================================================
def test_bad_finished_is_decrypt_error() -> None:
    client = Client()
    engine = server_flight(client)
    engine.receive_data(client.finished_record(corrupt=True))
    assert_alert(engine, AD.decrypt_error, read=client.app_read)


def test_finished_of_wrong_length_is_decode_error() -> None:
    client = Client()
    engine = server_flight(client)
    short = hs_message(HandshakeType.FINISHED, client.finished[4:-1])  # type: ignore[index]
    engine.receive_data(client.write.seal(ContentType.HANDSHAKE, short))  # type: ignore[union-attr]
    assert_alert(engine, AD.decode_error, read=client.app_read)


def test_corrupted_encrypted_record_is_bad_record_mac() -> None:
    client = Client()
    engine = server_flight(client)
    sealed = bytearray(client.finished_record())
    sealed[8] ^= 0x80
    engine.receive_data(bytes(sealed))
    assert_alert(engine, AD.bad_record_mac, read=client.app_read)


def test_application_data_before_client_finished_is_unexpected_message() -> None:
    client = Client()
    engine = server_flight(client)
    engine.receive_data(client.write.seal(ContentType.APPLICATION_DATA, b"early"))  # type: ignore[union-attr]
    assert_alert(engine, AD.unexpected_message, read=client.app_read)


def test_finished_followed_by_handshake_bytes_is_unexpected_message() -> None:
    client = Client()
    engine = server_flight(client)
    engine.receive_data(client.write.seal(ContentType.HANDSHAKE, client.finished + b"\x18\x00"))  # type: ignore[union-attr,operator]
    assert_alert(engine, AD.unexpected_message, read=client.app_read)


# == alerts and EOF from the client ===============================================================
def test_client_fatal_alert_is_received() -> None:
    engine = TLSServer(config())
    engine.receive_data(bytes.fromhex("15030300020228"))
    with pytest.raises(RemoteProtocolError) as info:
        drain(engine)
    assert (info.value.received, info.value.alert) == (AD.handshake_failure, None)
    assert engine.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        engine.next_event()


def test_client_encrypted_alert_is_received() -> None:
    client = Client()
    engine = server_flight(client)
    engine.receive_data(client.write.seal(ContentType.ALERT, bytes([2, AD.bad_certificate])))  # type: ignore[union-attr]
    with pytest.raises(RemoteProtocolError) as info:
        drain(engine)
    assert info.value.received is AD.bad_certificate


def test_eof_mid_handshake() -> None:
    client = Client()
    engine = server_flight(client)
    engine.receive_data(client.finished_record()[:10])
    engine.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        drain(engine)
    assert (info.value.alert, info.value.received) == (None, None)
    with pytest.raises(LocalProtocolError):
        engine.receive_data(b"more")


def test_eof_before_anything() -> None:
    engine = TLSServer(config())
    engine.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        engine.next_event()


# == feeding granularity ==========================================================================
FIXED_SERVER_KEY = bytes(range(1, 33))
FIXED_CLIENT_KEY = bytes(range(101, 133))


def fixed_config(**kw):  # type: ignore[no-untyped-def]
    """Deterministic server flight: fixed random, fixed x25519 key, Ed25519 (deterministic) cert."""
    return config(
        certificates=store("ed25519"),
        random_bytes=lambda n: b"\x5a" * n,
        key_exchange=lambda g: KeyExchange(g, x25519.X25519PrivateKey.from_private_bytes(FIXED_SERVER_KEY)),
        **kw,
    )


def fixed_client(**kw) -> Client:  # type: ignore[no-untyped-def]
    return Client(keys={Group.X25519: x25519.X25519PrivateKey.from_private_bytes(FIXED_CLIENT_KEY)}, **kw)


def _run(chunks: list[bytes]) -> tuple[list, bytes]:  # type: ignore[type-arg]
    engine = TLSServer(fixed_config())
    events, out = [], b""
    for chunk in chunks:
        engine.receive_data(chunk)
        events += drain(engine)
        out += engine.data_to_send()
    return events, out


def test_byte_at_a_time_gives_same_events_as_whole() -> None:
    client = fixed_client(session_id=b"\x01" * 32)
    hello = client.hello_record()
    engine = TLSServer(fixed_config())
    engine.receive_data(hello)
    drain(engine)
    client.receive(engine.data_to_send())
    flight = hello + record(ContentType.CHANGE_CIPHER_SPEC, b"\x01") + client.finished_record()
    whole = _run([flight])
    assert [type(e) for e in whole[0]] == [ClientHelloReceived, HandshakeComplete]
    assert _run([flight[i : i + 1] for i in range(len(flight))]) == whole


def test_bytes_wanted_never_over_reads_past_finished() -> None:
    engine = TLSServer(config())
    client = MemoryClient(client_context())
    client.step()
    hello = client.outgoing.read()
    assert engine.bytes_wanted() == 5
    engine.receive_data(hello[:5])
    assert engine.bytes_wanted() == len(hello) - 5
    engine.receive_data(hello[5:])
    drain(engine)
    client.incoming.write(engine.data_to_send())
    assert client.step()
    client.obj.write(b"first app data")
    pending = client.outgoing.read()
    events = []
    while not events:
        n = engine.bytes_wanted()
        engine.receive_data(pending[:n])
        pending = pending[n:]
        events = drain(engine)
    assert [type(e) for e in events] == [HandshakeComplete]
    h = engine.handoff()
    assert h.unprocessed == b"" and h.plaintext == b""
    session = Session(h)
    session.receive_data(pending)
    assert session.next_event() == ApplicationData(data=b"first app data")


def test_handoff_drain_decrypts_complete_records_and_keeps_partial() -> None:
    client = Client()
    engine = server_flight(client)
    first = client.app_write.seal(ContentType.APPLICATION_DATA, b"one")  # type: ignore[union-attr]
    second = client.app_write.seal(ContentType.APPLICATION_DATA, b"two")  # type: ignore[union-attr]
    third = client.app_write.seal(ContentType.APPLICATION_DATA, b"three")  # type: ignore[union-attr]
    engine.receive_data(client.finished_record() + first + second + third[:7])
    assert [type(e) for e in drain(engine)] == [HandshakeComplete]
    assert engine.handoff().unprocessed == first + second + third[:7]
    h = engine.handoff(drain=True)
    assert (h.plaintext, h.unprocessed, h.read.rec_seq) == (b"onetwo", third[:7], 2)
    session = Session(h)
    session.receive_data(third[7:])
    assert session.next_event() == ApplicationData(data=b"onetwo")
    assert session.next_event() == ApplicationData(data=b"three")


def test_handoff_drain_stops_at_close_notify_and_session_sees_it() -> None:
    client = Client()
    engine = server_flight(client)
    data = client.app_write.seal(ContentType.APPLICATION_DATA, b"last words")  # type: ignore[union-attr]
    close = client.app_write.seal(ContentType.ALERT, b"\x01\x00")  # type: ignore[union-attr]
    engine.receive_data(client.finished_record() + data + close)
    drain(engine)
    h = engine.handoff(drain=True)
    assert (h.plaintext, h.unprocessed, h.read.rec_seq) == (b"last words", close, 1)
    session = Session(h)
    assert session.next_event() == ApplicationData(data=b"last words")
    assert session.next_event() == ConnectionClosed()


def test_handoff_is_repeatable() -> None:
    client = Client()
    engine = server_flight(client)
    app = client.app_write.seal(ContentType.APPLICATION_DATA, b"one")  # type: ignore[union-attr]
    engine.receive_data(client.finished_record() + app)
    drain(engine)
    assert engine.handoff(drain=True) == engine.handoff(drain=True)
    assert engine.handoff().read.rec_seq == 0 and engine.handoff().unprocessed == app


def test_handoff_before_complete_is_local_error() -> None:
    engine = server_flight(Client())
    with pytest.raises(LocalProtocolError):
        engine.handoff()


# == Session ======================================================================================
def session_pair(suite: CipherSuite = CipherSuite.TLS_AES_128_GCM_SHA256) -> tuple[Session, Client]:
    engine, client, _ = connect(config(cipher_suites=(suite,)))
    return Session(engine.handoff()), client


def open_one(protection: RecordProtection, data: bytes) -> tuple[int, bytes]:
    ((header, body),) = split_records(data)
    return protection.open(header, body)


@pytest.mark.parametrize("suite", SUITES)
def test_session_key_update_requested_switches_both_directions(suite: CipherSuite) -> None:
    session, client = session_pair(suite)
    assert client.app_write and client.app_read
    session.receive_data(client.app_write.seal(ContentType.HANDSHAKE, key_update(True)))
    assert session.next_event() == KeyUpdateReceived(update_requested=True)
    # Our KeyUpdate(update_not_requested) goes out under the old write key (§4.6.3)...
    assert open_one(client.app_read, session.data_to_send()) == (ContentType.HANDSHAKE, key_update(False))
    # ...and everything after it under the next one, both ways.
    new_write = RecordProtection.from_secret(suite, next_traffic_secret(suite, client.app_write.traffic_secret))
    new_read = RecordProtection.from_secret(suite, next_traffic_secret(suite, client.app_read.traffic_secret))
    session.receive_data(new_write.seal(ContentType.APPLICATION_DATA, b"after"))
    assert session.next_event() == ApplicationData(data=b"after")
    session.send_data(b"pong")
    assert open_one(new_read, session.data_to_send()) == (ContentType.APPLICATION_DATA, b"pong")


def test_session_key_update_not_requested_keeps_write_key() -> None:
    session, client = session_pair()
    assert client.app_write and client.app_read
    session.receive_data(client.app_write.seal(ContentType.HANDSHAKE, key_update(False)))
    assert session.next_event() == KeyUpdateReceived(update_requested=False)
    assert session.data_to_send() == b""
    session.send_data(b"same key")
    assert open_one(client.app_read, session.data_to_send()) == (ContentType.APPLICATION_DATA, b"same key")


def test_session_record_under_old_key_after_key_update_is_bad_record_mac() -> None:
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.HANDSHAKE, key_update(False)))
    session.next_event()
    session.receive_data(client.app_write.seal(ContentType.APPLICATION_DATA, b"stale"))
    with pytest.raises(RemoteProtocolError) as info:
        session.next_event()
    assert info.value.alert is AD.bad_record_mac


def test_session_close_notify() -> None:
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.ALERT, bytes([1, AD.close_notify])))
    assert session.next_event() == ConnectionClosed()
    assert session.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        session.receive_data(b"\x17\x03\x03")


def test_session_plaintext_record_is_unexpected_message() -> None:
    session, client = session_pair()
    assert client.app_read
    session.receive_data(record(ContentType.HANDSHAKE, key_update(False)))
    with pytest.raises(RemoteProtocolError) as info:
        session.next_event()
    assert info.value.alert is AD.unexpected_message
    assert open_one(client.app_read, session.data_to_send()) == (ContentType.ALERT, bytes([2, AD.unexpected_message]))
    with pytest.raises(LocalProtocolError):
        session.next_event()


def test_session_all_zero_inner_plaintext_is_unexpected_message() -> None:
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(0, b"", padding=10))
    with pytest.raises(RemoteProtocolError) as info:
        session.next_event()
    assert info.value.alert is AD.unexpected_message


def test_session_padding_is_removed() -> None:
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.APPLICATION_DATA, b"pad\x00me", padding=300))
    assert session.next_event() == ApplicationData(data=b"pad\x00me")


def test_session_client_fatal_alert_is_received() -> None:
    session, client = session_pair()
    assert client.app_write
    session.receive_data(client.app_write.seal(ContentType.ALERT, bytes([2, AD.internal_error])))
    with pytest.raises(RemoteProtocolError) as info:
        session.next_event()
    assert (info.value.received, info.value.alert) == (AD.internal_error, None)


def test_handoff_drain_stops_at_a_bad_record() -> None:
    client = Client()
    engine = server_flight(client)
    good = client.app_write.seal(ContentType.APPLICATION_DATA, b"good")  # type: ignore[union-attr]
    bad = bytearray(client.app_write.seal(ContentType.APPLICATION_DATA, b"bad"))  # type: ignore[union-attr]
    bad[-1] ^= 1
    engine.receive_data(client.finished_record() + good + bytes(bad))
    drain(engine)
    h = engine.handoff(drain=True)
    assert (h.plaintext, h.unprocessed, h.read.rec_seq) == (b"good", bytes(bad), 1)
    session = Session(h)
    assert session.next_event() == ApplicationData(data=b"good")
    with pytest.raises(RemoteProtocolError) as info:
        session.next_event()
    assert info.value.alert is AD.bad_record_mac


def test_rejected_early_data_records_are_skipped() -> None:
    # §4.2.10: a server that rejects 0-RTT skips records it cannot deprotect.
    client = Client()
    exts = client.extensions() + [(Ext.EARLY_DATA, b"")]
    engine = TLSServer(config())
    engine.receive_data(client.hello_record(exts=exts))
    drain(engine)
    client.receive(engine.data_to_send())
    early = record(ContentType.APPLICATION_DATA, bytes(100))
    engine.receive_data(early + early + client.finished_record())
    assert [type(e) for e in drain(engine)] == [HandshakeComplete]


def test_undecryptable_record_without_early_data_is_bad_record_mac() -> None:
    client = Client()
    engine = server_flight(client)
    engine.receive_data(record(ContentType.APPLICATION_DATA, bytes(100)))
    assert_alert(engine, AD.bad_record_mac, read=client.app_read)
