"""Replay RFC 8448 §3 (Simple 1-RTT) and §5 (HelloRetryRequest) through the engine.

The engine is fed the trace's server random, ephemeral key, certificate/key, cookie and (for
§3) NewSessionTicket. Every server record must come out byte for byte. RSA-PSS signatures are
randomised, so the trace's CertificateVerify signature is injected (to keep the transcript
identical) and, separately, the signature our own signer makes over the same content is verified.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, x25519
from cryptography import x509

from ironsocket.tls13.constants import CipherSuite, Group, SignatureScheme
from ironsocket.tls13.credentials import CertificateStore, credential_from_objects, sign
from ironsocket.tls13.events import ApplicationData, ClientHelloReceived, ConnectionClosed, HandshakeComplete
from ironsocket.tls13.keyschedule import SERVER_CERTIFICATE_VERIFY_CONTEXT, KeySchedule
from ironsocket.tls13.server import KeyExchange, ServerConfig, TLSServer
from ironsocket.tls13.session import Session
from tests.helpers import drain, rfc8448


def _store(trace: dict[str, bytes]) -> CertificateStore:
    key = serialization.load_pem_private_key(trace["server_rsa_private_key_pem"], password=None)
    cert = x509.load_der_x509_certificate(trace["server_certificate_der"])
    return CertificateStore((credential_from_objects([cert], key, "rfc8448", min_rsa_bits=1024),))  # type: ignore[arg-type]


class _Recorder:
    """Records what the engine asked to sign, returns the trace's signature."""

    def __init__(self, signature: bytes) -> None:
        self.signature = signature
        self.signed: list[tuple[SignatureScheme, bytes]] = []

    def __call__(self, cred, scheme, data):  # type: ignore[no-untyped-def]
        self.signed.append((scheme, data))
        return self.signature


def _check_our_signature_verifies(cred_store: CertificateStore, recorder: _Recorder) -> None:
    (scheme, data), = recorder.signed
    assert scheme is SignatureScheme.RSA_PSS_RSAE_SHA256
    cred = cred_store.credentials[0]
    ours = sign(cred.private_key, scheme, data)
    public = x509.load_der_x509_certificate(cred.chain[0]).public_key()
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    public.verify(ours, data, pss, hashes.SHA256())  # type: ignore[union-attr]
    public.verify(recorder.signature, data, pss, hashes.SHA256())  # type: ignore[union-attr]
    assert data.startswith(b" " * 64 + SERVER_CERTIFICATE_VERIFY_CONTEXT + b"\x00")


def test_simple_1rtt_handshake_replay() -> None:
    t = rfc8448("simple_1rtt")
    keylog: list[str] = []
    cred_store = _store(t)
    signature = t["certificate_verify"][8:]  # 4-byte header, 2-byte scheme, 2-byte length
    recorder = _Recorder(signature)
    config = ServerConfig(
        certificates=cred_store,
        cipher_suites=(CipherSuite.TLS_AES_128_GCM_SHA256,),
        groups=(Group.X25519, Group.SECP256R1, Group.SECP384R1),
        advertised_groups=(0x001D, 0x0017, 0x0018, 0x0019, 0x0100, 0x0101, 0x0102, 0x0103, 0x0104),
        random_bytes=lambda n: t["server_random"],
        key_exchange=lambda group: KeyExchange(group, x25519.X25519PrivateKey.from_private_bytes(t["server_x25519_private"])),
        signer=recorder,
        new_session_tickets=lambda: (t["new_session_ticket"],),
        keylog=keylog.append,
    )
    engine = TLSServer(config)
    engine.receive_data(t["client_hello_record"])
    (event,) = drain(engine)
    assert isinstance(event, ClientHelloReceived) and event.server_name == "server"
    flight = engine.data_to_send()
    assert flight == t["server_hello_record"] + t["server_handshake_record"]
    _check_our_signature_verifies(cred_store, recorder)
    assert keylog == [
        f"CLIENT_HANDSHAKE_TRAFFIC_SECRET {t['client_random'].hex()} {t['client_handshake_traffic_secret'].hex()}",
        f"SERVER_HANDSHAKE_TRAFFIC_SECRET {t['client_random'].hex()} {t['server_handshake_traffic_secret'].hex()}",
        f"CLIENT_TRAFFIC_SECRET_0 {t['client_random'].hex()} {t['client_application_traffic_secret_0'].hex()}",
        f"SERVER_TRAFFIC_SECRET_0 {t['client_random'].hex()} {t['server_application_traffic_secret_0'].hex()}",
    ]

    # The client Finished and its first application data arrive together: the engine stops
    # at Finished and leaves the application record for whoever carries the connection on.
    engine.receive_data(t["client_finished_record"] + t["client_application_data_record"])
    (done,) = drain(engine)
    assert isinstance(done, HandshakeComplete)
    assert done.cipher_suite is CipherSuite.TLS_AES_128_GCM_SHA256 and done.group is Group.X25519
    assert engine.data_to_send() == t["new_session_ticket_record"]

    handoff = engine.handoff()
    assert handoff.read.traffic_secret == t["client_application_traffic_secret_0"]
    assert handoff.write.traffic_secret == t["server_application_traffic_secret_0"]
    assert (handoff.read.key, handoff.read.iv) == (t["client_application_key"], t["client_application_iv"])
    assert (handoff.write.key, handoff.write.iv) == (t["server_application_key"], t["server_application_iv"])
    assert handoff.read.rec_seq == 0
    assert handoff.write.rec_seq == 1  # the NewSessionTicket used server record 0
    assert handoff.unprocessed == t["client_application_data_record"]
    assert handoff.record_size_limit == 0x4001

    drained = engine.handoff(drain=True)
    assert drained.plaintext == t["client_application_data"]
    assert drained.unprocessed == b"" and drained.read.rec_seq == 1

    session = Session(handoff)
    assert session.next_event() == ApplicationData(data=t["client_application_data"])
    session.send_data(t["server_application_data"])
    assert session.data_to_send() == t["server_application_data_record"]
    session.receive_data(t["client_alert_record"])
    assert isinstance(session.next_event(), ConnectionClosed)
    session.send_close_notify()
    assert session.data_to_send() == t["server_alert_record"]


def test_hello_retry_request_replay() -> None:
    t = rfc8448("hrr")
    cred_store = _store(t)
    recorder = _Recorder(t["certificate_verify"][8:])
    server_key = ec.derive_private_key(int.from_bytes(t["server_p256_private"], "big"), ec.SECP256R1())
    config = ServerConfig(
        certificates=cred_store,
        cipher_suites=(CipherSuite.TLS_AES_128_GCM_SHA256,),
        groups=(Group.SECP256R1, Group.SECP384R1, Group.X25519),
        random_bytes=lambda n: t["server_random"],
        key_exchange=lambda group: KeyExchange(group, server_key),
        retry_cookie=lambda: t["cookie"],
        retry_for_preferred_group=True,
        signer=recorder,
    )
    engine = TLSServer(config)
    engine.receive_data(t["client_hello_1_record"])
    assert drain(engine) == []
    assert engine.data_to_send() == t["hello_retry_request_record"]

    engine.receive_data(t["client_hello_2_record"])
    (event,) = drain(engine)
    assert isinstance(event, ClientHelloReceived) and event.hello_retry
    assert engine.data_to_send() == t["server_hello_record"] + t["server_handshake_record"]
    _check_our_signature_verifies(cred_store, recorder)

    engine.receive_data(t["client_finished_record"])
    (done,) = drain(engine)
    assert isinstance(done, HandshakeComplete) and done.group is Group.SECP256R1 and done.hello_retry
    handoff = engine.handoff()
    assert handoff.read.traffic_secret == t["client_application_traffic_secret_0"]
    assert handoff.write.traffic_secret == t["server_application_traffic_secret_0"]
    assert (handoff.read.rec_seq, handoff.write.rec_seq) == (0, 0)

    session = Session(handoff)
    session.receive_data(t["client_alert_record"])
    assert isinstance(session.next_event(), ConnectionClosed)
    session.send_close_notify()
    assert session.data_to_send() == t["server_alert_record"]


def test_key_schedule_secrets_of_hrr_trace() -> None:
    t = rfc8448("hrr")
    ks = KeySchedule(CipherSuite.TLS_AES_128_GCM_SHA256)
    ks.update_hash(t["client_hello_1"])
    ks.restart_with_message_hash()
    for msg in ("hello_retry_request", "client_hello_2", "server_hello"):
        ks.update_hash(t[msg])
    assert ks.transcript_hash() == t["transcript_hash_to_sh"]
    assert ks.extract(None) == t["early_secret"]
    assert ks.extract(t["shared_secret"]) == t["handshake_secret"]
    assert ks.derive_secret(b"c hs traffic") == t["client_handshake_traffic_secret"]
    assert ks.derive_secret(b"s hs traffic") == t["server_handshake_traffic_secret"]
