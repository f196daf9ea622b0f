"""Session tickets and resumption (RFC 8446 §4.6.1, §4.2.11) at the sans-IO level.

The client is CPython's ssl (OpenSSL) over MemoryBIOs (`tests.helpers.MemoryClient`): it
stores our NewSessionTickets in its `SSLSession` and offers them back with a binder it computes
itself. RFC 8448 §4's resumed ClientHello checks our binder and PSK derivation byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from ironsocket import ticketkeys
from ironsocket.tls13 import messages
from ironsocket.tls13 import tickets as tickets_mod
from ironsocket.tls13.alerts import RemoteProtocolError
from ironsocket.tls13.constants import AlertDescription, CipherSuite, ContentType, ExtensionType, Group, HandshakeType
from ironsocket.tls13.events import HandshakeComplete
from ironsocket.tls13.keyschedule import psk_binder, resumption_psk
from ironsocket.tls13.records import HEADER_SIZE, RecordProtection, split_record
from ironsocket.tls13.server import TLSServer
from ironsocket.tls13.tickets import TicketConfig, TicketKeyring, TicketState
from tests.helpers import MemoryClient, client_context, config, drain, handshake, rfc8448

T0 = 1_800_000_000.0  # the injected clock's start (any Unix time)
CTX = client_context()  # CPython resumes a session only with the context that made it


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def ticket_config(ring: TicketKeyring | None = None, clock: Clock | None = None, **kw) -> TicketConfig:
    return TicketConfig(keyring=ring or TicketKeyring(), clock=clock or Clock(), **kw)


class Conn:
    """One client connection to a fresh TLSServer; the client's ticket processing included."""

    def __init__(self, server_config, ctx: ssl.SSLContext | None = None, session: ssl.SSLSession | None = None,
                 server_hostname: str | None = "localhost") -> None:
        self.ctx = ctx or CTX
        self.client = MemoryClient(self.ctx, server_hostname)
        if session is not None:
            self.client.obj = self.ctx.wrap_bio(self.client.incoming, self.client.outgoing,
                                                server_hostname=server_hostname, session=session)
        self.engine = TLSServer(server_config)
        self.events = handshake(self.engine, self.client)
        try:  # let the client read the NewSessionTickets (post-handshake messages)
            self.client.obj.read()
        except ssl.SSLWantReadError:
            pass

    @property
    def done(self) -> HandshakeComplete:
        (done,) = [e for e in self.events if isinstance(e, HandshakeComplete)]
        return done

    @property
    def session(self) -> ssl.SSLSession:
        session = self.client.obj.session
        assert session is not None and session.has_ticket
        return session

    @property
    def reused(self) -> bool:
        return self.client.obj.session_reused


def resumed_hello(server_config, session: ssl.SSLSession) -> bytes:
    """The record carrying the ClientHello a CPython client sends to resume ``session``."""
    ctx = CTX
    client = MemoryClient(ctx)
    client.obj = ctx.wrap_bio(client.incoming, client.outgoing, server_hostname="localhost", session=session)
    client.step()
    record = client.outgoing.read()
    assert record[0] == ContentType.HANDSHAKE and record[HEADER_SIZE] == HandshakeType.CLIENT_HELLO
    return record


# -- RFC 8448 §4: the PSK part of the resumed handshake ----------------------------------------
def test_rfc8448_resumed_client_hello_binder_and_psk() -> None:
    first, resumed = rfc8448("simple_1rtt"), rfc8448("resumed_0rtt")
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    psk = resumption_psk(suite, first["resumption_master_secret"], first["ticket_nonce"])
    assert psk == first["resumption_psk"]
    raw = resumed["client_hello"]
    hello = messages.parse_client_hello(raw[4:])
    assert hello.extension_types[-1] == ExtensionType.PRE_SHARED_KEY
    offered = messages.parse_pre_shared_key(dict(hello.extensions)[ExtensionType.PRE_SHARED_KEY])
    (identity,) = offered.identities
    nst = first["new_session_ticket"]
    ticket_len = int.from_bytes(nst[4 + 4 + 4 + 1 + 2 : 4 + 4 + 4 + 1 + 2 + 2], "big")
    assert identity.identity == nst[4 + 4 + 4 + 1 + 2 + 2 :][:ticket_len]  # §3's ticket, offered back
    assert identity.obfuscated_ticket_age == int.from_bytes(resumed["obfuscated_ticket_age"], "big")
    assert offered.binders_size == 2 + 1 + 32
    truncated = raw[: len(raw) - offered.binders_size]
    assert offered.binders == (resumed["binder"],)
    assert psk_binder(suite, psk, hashlib.sha256(truncated).digest()) == resumed["binder"]
    # One bit of the truncated hello or of the PSK changes the binder.
    assert psk_binder(suite, psk, hashlib.sha256(truncated[:-1] + b"\x01").digest()) != resumed["binder"]
    assert psk_binder(suite, bytes(32), hashlib.sha256(truncated).digest()) != resumed["binder"]


def test_new_session_ticket_message_layout() -> None:
    msg = messages.new_session_ticket(lifetime=7200, age_add=0x01020304, nonce=b"\x00", ticket=b"T" * 70)
    assert msg[0] == HandshakeType.NEW_SESSION_TICKET and int.from_bytes(msg[1:4], "big") == len(msg) - 4
    assert msg[4:8] == (7200).to_bytes(4, "big") and msg[8:12] == b"\x01\x02\x03\x04"
    assert msg[12:14] == b"\x01\x00" and msg[14:16] == (70).to_bytes(2, "big") and msg[16:86] == b"T" * 70
    assert msg[86:] == b"\x00\x00"  # no extensions: no early_data, 0-RTT never offered


# -- sealing -----------------------------------------------------------------------------------
def _state(**kw) -> TicketState:
    values = dict(cipher_suite=CipherSuite.TLS_AES_128_GCM_SHA256, issued=T0, lifetime=7200, ticket_age_add=5,
                  psk=os.urandom(32), server_name="localhost", alpn_protocol="h2")
    return TicketState(**(values | kw))  # type: ignore[arg-type]


def test_seal_unseal_round_trip_and_every_tampered_byte_is_refused() -> None:
    ring = TicketKeyring()
    state = _state()
    ticket = tickets_mod.seal(ring.sealing_key(T0), state)
    assert tickets_mod.unseal(ring, ticket, T0 + 1) == state
    for i in range(len(ticket)):
        bad = bytearray(ticket)
        bad[i] ^= 0x01
        assert tickets_mod.unseal(ring, bytes(bad), T0 + 1) is None, i
    assert tickets_mod.unseal(ring, ticket[:-1], T0 + 1) is None
    assert tickets_mod.unseal(ring, ticket + b"\x00", T0 + 1) is None
    assert tickets_mod.unseal(ring, b"", T0 + 1) is None


def test_each_ticket_has_its_own_nonce() -> None:
    ring = TicketKeyring()
    key = ring.sealing_key(T0)
    state = _state()
    nonces = {tickets_mod.seal(key, state)[16:28] for _ in range(1000)}
    assert len(nonces) == 1000


def test_lifetime_and_rotation_windows() -> None:
    ring = TicketKeyring(rotation=3600, lifetime=7200)
    first = ring.sealing_key(T0)
    ticket = tickets_mod.seal(first, _state(issued=T0 + 3599))
    assert ring.sealing_key(T0 + 3599) is first
    second = ring.sealing_key(T0 + 3600)
    assert second.key_id != first.key_id and second.secret != first.secret
    # The previous key still opens its tickets for their whole lifetime...
    assert tickets_mod.unseal(ring, ticket, T0 + 3599 + 7199) is not None
    # ...and not after: the ticket expired, and the key retired.
    assert tickets_mod.unseal(ring, ticket, T0 + 3599 + 7200) is None
    assert ring.find(first.key_id, T0 + 3600 + 7200) is None
    assert tickets_mod.unseal(ring, tickets_mod.seal(first, _state(issued=T0 + 6)), T0 + 5) is not None  # 1 s skew
    assert tickets_mod.unseal(ring, tickets_mod.seal(first, _state(issued=T0 + 10)), T0 + 8) is None  # future


def test_export_load_carries_the_keys() -> None:
    before = TicketKeyring()
    ticket = tickets_mod.seal(before.sealing_key(T0), _state())
    after = TicketKeyring()
    assert tickets_mod.unseal(after, ticket, T0) is None
    after.load(before.export())
    assert tickets_mod.unseal(after, ticket, T0) is not None
    assert after.sealing_key(T0).key_id == before.sealing_key(T0).key_id  # and keeps sealing with it
    after.load([tickets_mod.TicketKey(b"\x01" * 3, b"\x02" * 32, T0)])  # wrong size: ignored (a full handshake)
    assert tickets_mod.unseal(after, ticket, T0) is None


# -- real client, engine ------------------------------------------------------------------------
def _nst_records(conn_config, ctx: ssl.SSLContext | None = None) -> tuple[list[bytes], HandshakeComplete]:
    """Run a full handshake and decrypt what the server sent after the client Finished."""
    keylog: list[str] = []
    cfg = conn_config.__class__(**{**conn_config.__dict__, "keylog": keylog.append})
    ctx = ctx or client_context()
    client = MemoryClient(ctx)
    engine = TLSServer(cfg)
    after_finished = b""
    events = []
    for _ in range(6):
        client.step()
        engine.receive_data(client.outgoing.read())
        events += drain(engine)
        out = engine.data_to_send()
        if any(isinstance(e, HandshakeComplete) for e in events) and not after_finished:
            after_finished = out
        client.incoming.write(out)
        if after_finished:
            break
    (done,) = [e for e in events if isinstance(e, HandshakeComplete)]
    secret = next(line.split()[2] for line in keylog if line.startswith("SERVER_TRAFFIC_SECRET_0"))
    protection = RecordProtection.from_secret(done.cipher_suite, bytes.fromhex(secret))
    messages_out = []
    offset = 0
    while offset < len(after_finished):
        framed = split_record(after_finished, offset)
        assert framed is not None
        _, header, total = framed
        ctype, content = protection.open(header, after_finished[offset + HEADER_SIZE : offset + total])
        assert ctype is ContentType.HANDSHAKE
        messages_out.append(content)
        offset += total
    assert engine.handoff().write.rec_seq == len(messages_out)  # kTLS TX continues after them
    return messages_out, done


def test_full_handshake_sends_the_configured_tickets_without_early_data() -> None:
    nsts, done = _nst_records(config(tickets=ticket_config(count=3)))
    assert done.tickets_sent == 3 and len(nsts) == 3 and not done.resumed
    nonces, age_adds, tickets = set(), set(), set()
    for msg in nsts:
        assert msg[0] == HandshakeType.NEW_SESSION_TICKET
        body = msg[4:]
        assert int.from_bytes(body[0:4], "big") == tickets_mod.DEFAULT_LIFETIME
        age_adds.add(body[4:8])
        nonce_len = body[8]
        nonces.add(body[9 : 9 + nonce_len])
        rest = body[9 + nonce_len :]
        ticket_len = int.from_bytes(rest[:2], "big")
        tickets.add(rest[2 : 2 + ticket_len])
        assert rest[2 + ticket_len :] == b"\x00\x00"  # no extensions at all: no early_data
    assert len(nonces) == len(age_adds) == len(tickets) == 3


def test_no_tickets_without_config_or_with_count_zero() -> None:
    nsts, done = _nst_records(config())
    assert nsts == [] and done.tickets_sent == 0
    nsts, done = _nst_records(config(tickets=ticket_config(count=0)))
    assert nsts == [] and done.tickets_sent == 0


def test_cpython_resumes_with_psk_dhe_ke_and_no_certificate() -> None:
    cfg = config(tickets=ticket_config())
    first = Conn(cfg)
    assert not first.reused and first.done.signature_scheme is not None
    second = Conn(cfg, session=first.session)
    assert second.reused
    assert second.done.resumed and second.done.signature_scheme is None  # no CertificateVerify
    assert second.done.group is Group.X25519  # psk_dhe_ke: a fresh (EC)DHE
    assert second.done.tickets_sent == 2  # new tickets after a resumption too
    third = Conn(cfg, session=second.session)  # a ticket from a resumed session resumes too
    assert third.reused and third.done.resumed


def test_resumption_after_a_hello_retry_request() -> None:
    ring = TicketKeyring()
    first = Conn(config(tickets=ticket_config(ring)))
    # This server wants P-384: the client's x25519 share gets a HelloRetryRequest, and the
    # binders of its second ClientHello cover the HRR (§4.2.11.2).
    retry = config(tickets=ticket_config(ring), groups=(Group.SECP384R1, Group.X25519), retry_for_preferred_group=True)
    second = Conn(retry, session=first.session)
    assert second.done.hello_retry and second.done.resumed and second.reused
    assert second.done.group is Group.SECP384R1


def test_tampered_ticket_gets_a_full_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    real_seal = tickets_mod.seal

    def tampering_seal(*args, **kw) -> bytes:
        ticket = bytearray(real_seal(*args, **kw))
        ticket[40] ^= 0x80  # inside the ciphertext
        return bytes(ticket)

    cfg = config(tickets=ticket_config())
    monkeypatch.setattr(tickets_mod, "seal", tampering_seal)
    first = Conn(cfg)
    monkeypatch.setattr(tickets_mod, "seal", real_seal)
    second = Conn(cfg, session=first.session)  # the client's binder is right; our ticket is not
    assert not second.reused and not second.done.resumed and second.done.signature_scheme is not None
    third = Conn(cfg, session=second.session)  # and the full handshake's fresh tickets resume
    assert third.reused


def test_expired_ticket_gets_a_full_handshake() -> None:
    clock = Clock()
    cfg = config(tickets=ticket_config(TicketKeyring(lifetime=600), clock))
    first = Conn(cfg)
    clock.now += 599
    assert Conn(cfg, session=first.session).reused
    clock.now += 1
    late = Conn(cfg, session=first.session)
    assert not late.reused and not late.done.resumed


def test_ticket_under_another_key_gets_a_full_handshake() -> None:
    first = Conn(config(tickets=ticket_config()))
    elsewhere = Conn(config(tickets=ticket_config()), session=first.session)  # its own random key
    assert not elsewhere.reused and not elsewhere.done.resumed


def test_ticket_of_another_server_name_or_hash_gets_a_full_handshake() -> None:
    ring = TicketKeyring()
    cfg = config(tickets=ticket_config(ring))
    first = Conn(cfg)
    # A SHA-384 suite only: §4.6.1 forbids resuming a SHA-256 session with it.
    sha384 = config(tickets=ticket_config(ring), cipher_suites=(CipherSuite.TLS_AES_256_GCM_SHA384,))
    other = Conn(sha384, session=first.session)
    assert other.done.cipher_suite is CipherSuite.TLS_AES_256_GCM_SHA384 and not other.done.resumed
    # Same hash, other suite: allowed.
    chacha = config(tickets=ticket_config(ring), cipher_suites=(CipherSuite.TLS_CHACHA20_POLY1305_SHA256,))
    assert Conn(chacha, session=first.session).done.resumed
    # The server side of the SNI rule: a ticket for "localhost" is not resumed for another name
    # (the client offers it: OpenSSL does not check the name for a session it is given).
    engine = TLSServer(cfg)
    hello = resumed_hello(cfg, first.session)
    engine.receive_data(hello)
    drain(engine)
    assert engine._psk is not None  # the ticket is good for "localhost"
    ctx = client_context(check_hostname=False)
    ctx.verify_mode = ssl.CERT_NONE
    mine = Conn(cfg, ctx=ctx)
    assert Conn(cfg, ctx=ctx, session=mine.session).done.resumed
    named = Conn(cfg, ctx=ctx, session=mine.session, server_hostname="other.example")
    assert not named.done.resumed and named.done.server_name == "other.example"


def _flip(record: bytes, index: int) -> bytes:
    out = bytearray(record)
    out[index] ^= 0x01
    return bytes(out)


def _expect_alert(cfg, record: bytes) -> RemoteProtocolError:
    engine = TLSServer(cfg)
    engine.receive_data(record)
    with pytest.raises(RemoteProtocolError) as info:
        drain(engine)
    assert engine.data_to_send().endswith(bytes([2, info.value.alert]))  # the alert went out
    return info.value


def test_bad_binder_of_an_accepted_ticket_is_decrypt_error() -> None:
    cfg = config(tickets=ticket_config())
    first = Conn(cfg)
    hello = resumed_hello(cfg, first.session)
    error = _expect_alert(cfg, _flip(hello, len(hello) - 1))  # the binder's last byte
    assert error.alert is AlertDescription.decrypt_error


def test_replayed_binder_with_another_client_hello_is_decrypt_error() -> None:
    """A binder copied from one ClientHello into another (here: another random) does not verify."""
    cfg = config(tickets=ticket_config())
    first = Conn(cfg)
    hello = resumed_hello(cfg, first.session)
    assert drain(_engine_fed(cfg, hello))  # untouched, it is accepted
    error = _expect_alert(cfg, _flip(hello, HEADER_SIZE + 4 + 2 + 5))  # a byte of the random
    assert error.alert is AlertDescription.decrypt_error


def _engine_fed(cfg, record: bytes) -> TLSServer:
    engine = TLSServer(cfg)
    engine.receive_data(record)
    return engine


def test_binder_of_a_ticket_we_cannot_use_is_not_checked() -> None:
    """§4.2.11: only the selected PSK's binder is validated; an unusable ticket → full handshake."""
    first = Conn(config(tickets=ticket_config()))
    other = config(tickets=ticket_config())  # another key: the ticket is not ours
    hello = resumed_hello(other, first.session)
    engine = _engine_fed(other, _flip(hello, len(hello) - 1))
    assert drain(engine) and engine._psk is None  # the server flight of a full handshake


def test_psk_without_psk_dhe_ke_is_ignored() -> None:
    """§4.2.9: never a mode the client did not offer, nor one we do not allow. A client
    offering only psk_ke gets a full handshake from the default (psk_dhe_ke only)."""
    cfg = config(tickets=ticket_config())
    first = Conn(cfg)
    hello = resumed_hello(cfg, first.session)
    marker = bytes([0x00, 0x2D, 0x00, 0x02, 0x01, 0x01])  # psk_key_exchange_modes = [psk_dhe_ke]
    assert hello.count(marker) == 1
    psk_ke_only = hello.replace(marker, bytes([0x00, 0x2D, 0x00, 0x02, 0x01, 0x00]))
    engine = _engine_fed(cfg, psk_ke_only)
    assert drain(engine) and engine._psk is None


# -- key files (ironsocket.ticketkeys) ----------------------------------------------------------
def _key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_key_file_shared_by_two_servers(tmp_path: Path) -> None:
    key = os.urandom(32).hex()
    path = _key_file(tmp_path / "tickets.key", f"# ticket keys\n{key}\n")
    server_a = config(tickets=ticket_config(ticketkeys.keyring(path)))
    server_b = config(tickets=ticket_config(ticketkeys.keyring(path)))
    first = Conn(server_a)
    assert Conn(server_b, session=first.session).reused
    # Rotation: a new first key; the old one, second, still opens the tickets made with it.
    rotated = config(tickets=ticket_config(ticketkeys.keyring(
        _key_file(tmp_path / "rotated.key", f"{os.urandom(32).hex()}\n{key}\n"))))
    assert Conn(rotated, session=first.session).reused
    dropped = config(tickets=ticket_config(ticketkeys.keyring(
        _key_file(tmp_path / "dropped.key", f"{os.urandom(32).hex()}\n"))))
    assert not Conn(dropped, session=first.session).reused


@pytest.mark.parametrize("make, message", [
    (lambda p: _key_file(p, os.urandom(32).hex(), 0o644), "chmod 600"),
    (lambda p: _key_file(p, os.urandom(16).hex()), "64 hex digits"),
    (lambda p: _key_file(p, "not hex at all\n"), "not hex digits"),
    (lambda p: _key_file(p, "# nothing\n"), "no key in it"),
    (lambda p: _key_file(p, "00" * 32), "not a random key"),
])
def test_bad_key_files_are_refused_with_one_line(tmp_path: Path, make: Callable[[Path], Path], message: str) -> None:
    path = make(tmp_path / "tickets.key")
    with pytest.raises(ticketkeys.TicketKeyFileError) as info:
        ticketkeys.keyring(path)
    assert message in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)


def test_key_file_symlink_is_refused(tmp_path: Path) -> None:
    real = _key_file(tmp_path / "real.key", os.urandom(32).hex())
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(ticketkeys.TicketKeyFileError, match="symbolic link"):
        ticketkeys.keyring(link)


def test_mutated_resumption_hellos_give_events_or_an_alert() -> None:
    """h11's rule on the PSK path: any mutation of a resuming ClientHello (identity, ages,
    binders, lengths) gives a server flight or RemoteProtocolError with the alert sent, never
    another exception. Seeded, so a failure reproduces."""
    import random

    rng = random.Random(0x1417)
    cfg = config(tickets=ticket_config())
    hello = resumed_hello(cfg, Conn(cfg).session)
    psk_start = hello.rfind(bytes([0x00, ExtensionType.PRE_SHARED_KEY]))
    assert psk_start > 0
    outcomes = {"flight": 0, "waiting": 0, "alert": 0}  # waiting: a length now asks for more bytes
    for _ in range(400):
        mutated = bytearray(hello)
        for _ in range(rng.choice((1, 1, 2, 4))):
            # mostly inside pre_shared_key (the new parser), sometimes anywhere
            index = rng.randrange(psk_start if rng.random() < 0.8 else HEADER_SIZE, len(mutated))
            mutated[index] = rng.randrange(256)
        engine = _engine_fed(cfg, bytes(mutated))
        try:
            outcomes["flight" if drain(engine) else "waiting"] += 1
        except RemoteProtocolError as exc:
            assert exc.alert is not None and engine.data_to_send().endswith(bytes([2, exc.alert]))
            outcomes["alert"] += 1
    assert outcomes["flight"] and outcomes["alert"]


def test_derived_rings_share_keys_and_rotate_together() -> None:
    """--workers: every worker derives the same key per period from one secret."""
    secret = os.urandom(32)
    a, b = TicketKeyring.derived(secret, rotation=3600, lifetime=7200), TicketKeyring.derived(secret, rotation=3600, lifetime=7200)
    other = TicketKeyring.derived(os.urandom(32), rotation=3600, lifetime=7200)
    now = 3600 * 500_000 + 10.0
    ticket = tickets_mod.seal(a.sealing_key(now), _state(issued=now))
    assert tickets_mod.unseal(b, ticket, now) is not None
    assert tickets_mod.unseal(other, ticket, now) is None
    assert b.sealing_key(now + 3600).key_id != a.sealing_key(now).key_id  # the next period
    assert tickets_mod.unseal(b, ticket, now + 7199) is not None  # previous period, within lifetime
    assert tickets_mod.unseal(b, ticket, now + 7200) is None
    assert a.export() == [] and not a.is_fixed and a.is_derived
    # Through the engine: a ticket from "worker a" resumes at "worker b".
    first = Conn(config(tickets=ticket_config(TicketKeyring.derived(secret))))
    assert Conn(config(tickets=ticket_config(TicketKeyring.derived(secret))), session=first.session).reused
    assert not Conn(config(tickets=ticket_config(TicketKeyring.derived(os.urandom(32)))), session=first.session).reused


def test_keyring_from_the_workers_environment() -> None:
    secret = ticketkeys.new_shared_secret()
    env = {ticketkeys.SHARED_SECRET_ENV: secret}
    assert ticketkeys.keyring(None, environ=env).is_derived
    assert not ticketkeys.keyring(None, environ={}).is_derived
    with pytest.raises(ticketkeys.TicketKeyFileError, match="not a hex secret"):
        ticketkeys.keyring(None, environ={ticketkeys.SHARED_SECRET_ENV: "zz"})


def test_resumption_chains_end_seven_days_after_the_certificate_signature() -> None:
    """§4.6.1 RECOMMENDED: a limit on the total lifetime of keying material that tickets
    issued on resumed connections would otherwise extend forever (MAX_AUTH_AGE)."""
    clock = Clock()
    cfg = config(tickets=ticket_config(TicketKeyring(lifetime=tickets_mod.DEFAULT_LIFETIME), clock))
    conn = Conn(cfg)
    step = tickets_mod.DEFAULT_LIFETIME - 60
    while clock.now + step < T0 + tickets_mod.MAX_AUTH_AGE:
        clock.now += step
        conn = Conn(cfg, session=conn.session)
        assert conn.reused
    # The last resumption's tickets end with the chain, not a full lifetime later.
    assert 0 < conn.done.tickets_sent
    clock.now = T0 + tickets_mod.MAX_AUTH_AGE
    last = Conn(cfg, session=conn.session)
    assert not last.reused and last.done.signature_scheme is not None  # a new certificate signature
    assert tickets_mod.lifetime_for(T0 + 10, T0, 7200) == 7200
    assert tickets_mod.lifetime_for(T0 + tickets_mod.MAX_AUTH_AGE - 100, T0, 7200) == 100
    assert tickets_mod.lifetime_for(T0 + tickets_mod.MAX_AUTH_AGE, T0, 7200) == 0


def test_key_file_fifo_or_directory_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)  # no writer: an open without O_NONBLOCK would hang start-up
    with pytest.raises(ticketkeys.TicketKeyFileError, match="not a regular file"):
        ticketkeys.keyring(fifo)
    with pytest.raises(ticketkeys.TicketKeyFileError):
        ticketkeys.keyring(tmp_path)


NO_DHE_KEX = 0x400  # OpenSSL's SSL_OP_ALLOW_NO_DHE_KEX: the client offers psk_ke too


def test_psk_ke_only_if_configured() -> None:
    from ironsocket.tls13.tickets import PskKeyExchangeMode as Mode

    ctx = client_context()
    ctx.options |= NO_DHE_KEX
    psk_ke = config(tickets=ticket_config(psk_modes=frozenset({Mode.PSK_KE})))
    first = Conn(psk_ke, ctx=ctx)
    resumed = Conn(psk_ke, ctx=ctx, session=first.session)
    assert resumed.reused and resumed.done.group is None  # no (EC)DHE at all
    assert resumed.engine.handoff().group is None
    # Both allowed: psk_dhe_ke is preferred when the client offers both.
    both = config(tickets=ticket_config(psk_modes=frozenset({Mode.PSK_KE, Mode.PSK_DHE_KE})))
    first = Conn(both, ctx=ctx)
    assert Conn(both, ctx=ctx, session=first.session).done.group is Group.X25519
    # The default refuses psk_ke: a client that offers both gets psk_dhe_ke.
    default = config(tickets=ticket_config())
    first = Conn(default, ctx=ctx)
    again = Conn(default, ctx=ctx, session=first.session)
    assert again.reused and again.done.group is Group.X25519
    # A client that offers only psk_dhe_ke, at a psk_ke-only server: no ticket it could not use.
    first = Conn(psk_ke)
    assert first.done.tickets_sent == 0 and not first.client.obj.session.has_ticket


def test_no_tickets_for_a_client_without_a_compatible_psk_mode() -> None:
    """§4.2.9 SHOULD NOT: no tickets the client could not use (no psk_key_exchange_modes, or
    only psk_ke at a server that allows only psk_dhe_ke)."""
    from tests.tls13.test_server import Client, connect

    _, _, events = connect(config(tickets=ticket_config()), Client())  # sends no psk_key_exchange_modes
    (done,) = [e for e in events if isinstance(e, HandshakeComplete)]
    assert done.tickets_sent == 0
    assert Conn(config(tickets=ticket_config())).done.tickets_sent == 2  # CPython offers psk_dhe_ke


def _with_pre_shared_key(record: bytes, new_ext_data: bytes) -> bytes:
    """The ClientHello record with its (last) pre_shared_key extension's data replaced."""
    msg = record[HEADER_SIZE:]
    hello = messages.parse_client_hello(msg[4:])
    old = dict(hello.extensions)[ExtensionType.PRE_SHARED_KEY]
    assert msg.endswith(old)
    head = msg[4 : len(msg) - len(old) - 4]  # the body up to the pre_shared_key header
    ext_len_at = len(head) - 2 - sum(4 + len(d) for t, d in hello.extensions[:-1])
    exts_len = int.from_bytes(head[ext_len_at : ext_len_at + 2], "big") - len(old) + len(new_ext_data)
    body = (head[:ext_len_at] + exts_len.to_bytes(2, "big") + head[ext_len_at + 2 :]
            + ExtensionType.PRE_SHARED_KEY.to_bytes(2, "big") + len(new_ext_data).to_bytes(2, "big") + new_ext_data)
    msg = bytes([HandshakeType.CLIENT_HELLO]) + len(body).to_bytes(3, "big") + body
    return bytes([ContentType.HANDSHAKE, 3, 1]) + len(msg).to_bytes(2, "big") + msg


def test_identities_and_binders_in_unequal_number_is_illegal_parameter() -> None:
    cfg = config(tickets=ticket_config())
    hello = resumed_hello(cfg, Conn(cfg).session)
    old = dict(messages.parse_client_hello(hello[HEADER_SIZE + 4 :]).extensions)[ExtensionType.PRE_SHARED_KEY]
    offered = messages.parse_pre_shared_key(old)
    assert drain(_engine_fed(cfg, _with_pre_shared_key(hello, old)))  # rebuilt unchanged: still fine
    identity = offered.identities[0]
    one = len(identity.identity).to_bytes(2, "big") + identity.identity + identity.obfuscated_ticket_age.to_bytes(4, "big")
    two_identities = len(one * 2).to_bytes(2, "big") + one * 2 + old[2 + len(one) :]
    error = _expect_alert(cfg, _with_pre_shared_key(hello, two_identities))
    assert error.alert is AlertDescription.illegal_parameter
