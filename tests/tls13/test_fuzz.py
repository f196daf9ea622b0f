"""h11-style robustness: any input gives events or RemoteProtocolError, nothing else.

A seeded mutation fuzzer (deterministic, a few seconds) over a real ClientHello record and over
the client's second flight, each input fed whole and one byte at a time. When the engine raises,
the alert it names is the last record in `data_to_send()`.
"""

from __future__ import annotations

import random

import pytest

from ironsocket.tls13 import messages
from ironsocket.tls13.alerts import AlertDecodeError, AlertIllegalParameter, LocalProtocolError, RemoteProtocolError
from ironsocket.tls13.constants import ContentType, ExtensionType
from ironsocket.tls13.events import NEED_DATA, ClientHelloReceived, HandshakeComplete
from ironsocket.tls13.records import RecordProtection
from ironsocket.tls13.server import TLSServer
from tests.tls13.test_server import Client, fixed_client, fixed_config, record, split_records, u16

SEED = 0x7153_1303
ITERATIONS = 1500  # per corpus; each input is run twice (whole, byte by byte)


def _client() -> Client:
    return fixed_client(server_name=b"localhost", alpn=(b"h2", b"http/1.1"), session_id=bytes(range(32)))


def _config():  # type: ignore[no-untyped-def]
    return fixed_config(alpn_protocols=("h2",))


HELLO = _client().hello_record()


def _events(engine: TLSServer) -> list:  # type: ignore[type-arg]
    events = []
    while (event := engine.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def _second_flight() -> tuple[bytes, RecordProtection]:
    client = _client()
    engine = TLSServer(_config())
    engine.receive_data(client.hello_record())
    assert [type(e) for e in _events(engine)] == [ClientHelloReceived]
    client.receive(engine.data_to_send())
    assert client.app_write and client.app_read
    flight = (
        record(ContentType.CHANGE_CIPHER_SPEC, b"\x01")
        + client.finished_record()
        + client.app_write.seal(ContentType.APPLICATION_DATA, b"GET / HTTP/1.1\r\n\r\n")
    )
    return flight, client.app_read


FLIGHT, SERVER_APP_KEY = _second_flight()


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(6)
        if not buf:
            buf = bytearray(rng.randbytes(rng.randrange(1, 8)))
        pos = rng.randrange(len(buf))
        if op == 0:  # flip bits in one byte
            buf[pos] ^= rng.randrange(1, 256)
        elif op == 1:  # truncate
            del buf[pos:]
        elif op == 2:  # insert
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 6))
        elif op == 3:  # delete a few bytes
            del buf[pos : pos + rng.randrange(1, 6)]
        elif op == 4:  # a 16-bit length field edit (record, vector or extension lengths)
            value = rng.choice((0, 1, 0xFFFF, 0x4000, 0x4001, int.from_bytes(buf[pos : pos + 2], "big") + rng.choice((-1, 1))))
            buf[pos : pos + 2] = (value & 0xFFFF).to_bytes(2, "big")
        else:  # a 24-bit handshake length edit
            value = rng.choice((0, 1, 0x10000, 0x10001, 0xFFFFFF, int.from_bytes(buf[pos : pos + 3], "big") + rng.choice((-1, 1))))
            buf[pos : pos + 3] = (value & 0xFFFFFF).to_bytes(3, "big")
    return bytes(buf) or b"\x16"  # b"" would mean EOF


def run(prefix: bytes, data: bytes, *, bytewise: bool) -> tuple[list[type], object, bytes]:
    """Feed ``data`` after a valid ``prefix``; return (event types, alert or received, output)."""
    engine = TLSServer(_config())
    if prefix:
        engine.receive_data(prefix)
        _events(engine)
        engine.data_to_send()
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    events: list[type] = []
    out = b""
    try:
        for chunk in chunks:
            engine.receive_data(chunk)
            while (event := engine.next_event()) is not NEED_DATA:
                events.append(type(event))
            out += engine.data_to_send()
    except RemoteProtocolError as exc:
        out += engine.data_to_send()
        assert exc.alert is not None or exc.received is not None
        with pytest.raises(LocalProtocolError):
            engine.next_event()
        return events, exc.alert if exc.alert is not None else ("received", exc.received), out
    if HandshakeComplete in events:
        try:
            engine.handoff(drain=True)
        except LocalProtocolError:
            pass  # a control record right after Finished: documented
    return events, None, out


def check_alert_is_last(alert: object, out: bytes, key: RecordProtection | None) -> None:
    if not isinstance(alert, int):
        return  # the client sent the alert; we send none
    if out.endswith(bytes([21, 3, 3, 0, 2, 2, alert])):
        return
    header, body = split_records(out)[-1]
    assert header == b"\x17\x03\x03\x00\x13", out[-24:].hex()
    if key is not None:
        fresh = RecordProtection.from_secret(key.cipher_suite, key.traffic_secret)
        assert fresh.open(header, body) == (ContentType.ALERT, bytes([2, alert]))


@pytest.mark.parametrize(
    ("corpus", "prefix", "data", "key"),
    [("client_hello", b"", HELLO, None), ("second_flight", HELLO, FLIGHT, SERVER_APP_KEY)],
)
def test_mutations_give_events_or_remote_protocol_error(corpus: str, prefix: bytes, data: bytes, key) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(f"{SEED}-{corpus}")
    outcomes: dict[object, int] = {}
    for _ in range(ITERATIONS):
        mutated = mutate(rng, data)
        whole = run(prefix, mutated, bytewise=False)
        check_alert_is_last(whole[1], whole[2], key)
        assert run(prefix, mutated, bytewise=True)[:2] == whole[:2], mutated.hex()
        outcomes[whole[1]] = outcomes.get(whole[1], 0) + 1
    # The fuzzer reaches both success and several distinct alerts.
    assert None in outcomes and len(outcomes) >= 4, outcomes


def test_unmutated_inputs_complete() -> None:
    events, error, _ = run(HELLO, FLIGHT, bytewise=True)
    assert (events, error) == ([HandshakeComplete], None)
    events, error, _ = run(b"", HELLO, bytewise=False)
    assert (events, error) == ([ClientHelloReceived], None)


# -- messages.parse_client_hello --------------------------------------------------------------
BODY = HELLO[9:]  # record header (5) + handshake header (4)
EXTENSION_TYPES = [
    ExtensionType.SERVER_NAME,
    ExtensionType.SUPPORTED_GROUPS,
    ExtensionType.SIGNATURE_ALGORITHMS,
    ExtensionType.APPLICATION_LAYER_PROTOCOL_NEGOTIATION,
    ExtensionType.RECORD_SIZE_LIMIT,
    ExtensionType.PRE_SHARED_KEY,
    ExtensionType.EARLY_DATA,
    ExtensionType.SUPPORTED_VERSIONS,
    ExtensionType.COOKIE,
    ExtensionType.PSK_KEY_EXCHANGE_MODES,
    ExtensionType.KEY_SHARE,
    ExtensionType.SIGNATURE_ALGORITHMS_CERT,
    ExtensionType.PADDING,
    ExtensionType.STATUS_REQUEST,
    ExtensionType.POST_HANDSHAKE_AUTH,
]
GARBAGE = [b"", b"\x00", b"\x00\x01", b"\xff\xff", b"\x00\x03\x00\x00", b"\x00\x02\x00", b"\x01\x00\x00\x00\x00", b"\xff" * 9]


def _hello_body_with(ext_type: int, ext_data: bytes) -> bytes:
    client = _client()
    exts = [(t, d) for t, d in client.extensions() if t != ext_type] + [(ext_type, ext_data)]
    return client.hello(exts=exts)[4:]


def _parse_only_alerts(body: bytes) -> None:
    try:
        messages.parse_client_hello(body)
    except (AlertDecodeError, AlertIllegalParameter):
        pass


@pytest.mark.parametrize("ext_type", EXTENSION_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("garbage", GARBAGE, ids=lambda g: g.hex() or "empty")
def test_parse_client_hello_garbage_extension_is_decode_or_illegal(ext_type: ExtensionType, garbage: bytes) -> None:
    _parse_only_alerts(_hello_body_with(ext_type, garbage))


def test_parse_client_hello_maps_every_failure_to_an_alert() -> None:
    rng = random.Random(SEED)
    for _ in range(3000):
        _parse_only_alerts(mutate(rng, BODY))
    for n in range(len(BODY)):
        _parse_only_alerts(BODY[:n])


def test_parse_client_hello_known_errors() -> None:
    with pytest.raises(AlertDecodeError):
        messages.parse_client_hello(b"")
    with pytest.raises(AlertDecodeError):
        messages.parse_client_hello(_hello_body_with(ExtensionType.SUPPORTED_GROUPS, u16(b"")))
    with pytest.raises(AlertDecodeError):
        messages.parse_client_hello(_hello_body_with(ExtensionType.APPLICATION_LAYER_PROTOCOL_NEGOTIATION, u16(b"\x00")))
    with pytest.raises(AlertIllegalParameter):
        messages.parse_client_hello(_hello_body_with(ExtensionType.SERVER_NAME, u16(b"\x01" + u16(b"x"))))


def _outcome(parse, body: bytes):  # type: ignore[no-untyped-def]
    try:
        return parse(body)
    except (AlertDecodeError, AlertIllegalParameter) as exc:
        return type(exc)


def test_parse_client_hello_agrees_with_tlslite() -> None:
    """The direct parser (the handshake path) against tlslite-ng's (the reference): on every
    input tlslite accepts, the same ClientHello, or a refusal the RFC asks for and tlslite
    misses (a legacy_session_id over 32 bytes). The direct parser may accept what tlslite
    refuses only in extensions the engine never reads (their bytes stay raw)."""
    rng = random.Random(SEED + 1)
    corpus = [BODY, *(mutate(rng, BODY) for _ in range(3000)), *(BODY[:n] for n in range(len(BODY)))]
    corpus += [_hello_body_with(t, g) for t in EXTENSION_TYPES for g in GARBAGE]
    both, lenient = 0, 0
    for body in corpus:
        ours, reference = _outcome(messages.parse_client_hello, body), _outcome(messages.parse_client_hello_tlslite, body)
        if isinstance(reference, messages.ClientHello):
            if isinstance(ours, messages.ClientHello):
                assert ours == reference, body.hex()
                both += 1
            else:
                assert ours is AlertDecodeError and len(reference.legacy_session_id) > 32, body.hex()
        elif isinstance(ours, messages.ClientHello):
            lenient += 1
            if len(set(ours.extension_types)) != len(ours.extension_types):
                continue  # a duplicate extension: the engine refuses the hello (illegal_parameter)
            # tlslite refused an extension the engine does not read: without those, it agrees.
            kept = tuple((t, d) for t, d in ours.extensions if t in messages._EXTENSION_PARSERS)
            again = messages.parse_client_hello_tlslite(_encode(ours, kept))
            assert again == messages.parse_client_hello(_encode(ours, kept)), body.hex()
        else:
            assert ours is reference or {ours, reference} <= {AlertDecodeError, AlertIllegalParameter}
    assert both > 100 and lenient > 0


def _encode(hello: messages.ClientHello, exts: tuple[tuple[int, bytes], ...]) -> bytes:
    ext_bytes = b"".join(t.to_bytes(2, "big") + u16(d) for t, d in exts)
    return (hello.legacy_version.to_bytes(2, "big") + hello.random + bytes([len(hello.legacy_session_id)])
            + hello.legacy_session_id + u16(b"".join(c.to_bytes(2, "big") for c in hello.cipher_suites))
            + bytes([len(hello.legacy_compression_methods)]) + bytes(hello.legacy_compression_methods) + u16(ext_bytes))
