"""state.TRANSITIONS is the whole truth about which handshake message may arrive when."""

from __future__ import annotations

import pytest

from ironsocket.tls13.alerts import AlertUnexpectedMessage, RemoteProtocolError
from ironsocket.tls13.constants import AlertDescription, ContentType, Group, HandshakeType
from ironsocket.tls13.server import TLSServer
from ironsocket.tls13.state import ENDS_KEY_EPOCH, TRANSITIONS, State
from tests.helpers import config, drain
from tests.tls13.test_server import Client, connect, hs_message, record

# States the engine reads handshake records in, and how to get there.
FED_STATES = (State.START, State.START_AFTER_RETRY, State.WAIT_FINISHED)
UNEXPECTED = [
    (state, msg_type)
    for state in State
    for msg_type in HandshakeType
    if msg_type not in TRANSITIONS[state]
]


def engine_in(state: State) -> tuple[TLSServer, Client]:
    client = Client(groups=(Group.SECP384R1, Group.X25519), share_groups=(Group.SECP384R1,))
    if state is State.CONNECTED:
        engine, client, _ = connect(config(), client)
        return engine, client
    engine = TLSServer(config(groups=(Group.X25519,)))
    if state is not State.START:
        engine.receive_data(client.hello_record())
        drain(engine)
        client.receive(engine.data_to_send())
    if state is State.WAIT_FINISHED:
        engine.receive_data(client.second_hello_record())
        drain(engine)
        client.receive(engine.data_to_send())
    assert engine.state is state
    return engine, client


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize(
    ("state", "msg_type", "handler", "allowed"),
    [(s, t, h, a) for s, row in TRANSITIONS.items() for t, (h, a) in row.items()],
)
def test_every_handler_exists(state: State, msg_type: HandshakeType, handler: str, allowed: frozenset) -> None:  # type: ignore[type-arg]
    assert callable(getattr(TLSServer, handler))
    assert allowed and all(isinstance(s, State) for s in allowed)
    assert State.ERROR not in allowed


def test_messages_that_end_a_key_epoch_are_handled_somewhere() -> None:
    handled = {t for row in TRANSITIONS.values() for t in row}
    assert ENDS_KEY_EPOCH <= handled


@pytest.mark.parametrize(
    ("state", "msg_type"),
    [(s, t) for s, t in UNEXPECTED if s in FED_STATES],
    ids=lambda v: v.name,
)
def test_message_not_in_table_is_unexpected_message(state: State, msg_type: HandshakeType) -> None:
    engine, client = engine_in(state)
    message = hs_message(msg_type, b"\x00" * 4)
    if state is State.WAIT_FINISHED:
        assert client.write is not None
        engine.receive_data(client.write.seal(ContentType.HANDSHAKE, message))
    else:
        engine.receive_data(record(ContentType.HANDSHAKE, message))
    with pytest.raises(RemoteProtocolError) as info:
        drain(engine)
    assert info.value.alert is AlertDescription.unexpected_message
    assert isinstance(info.value.__cause__, AlertUnexpectedMessage)
    assert state.name in str(info.value) and msg_type.name in str(info.value)
    assert engine.state is State.ERROR


@pytest.mark.parametrize(
    ("state", "msg_type"),
    [(s, t) for s, t in UNEXPECTED if s not in FED_STATES],
    ids=lambda v: v.name,
)
def test_dispatch_outside_the_handshake_is_unexpected_message(state: State, msg_type: HandshakeType) -> None:
    # The engine stops reading records once CONNECTED; dispatch is still table-driven.
    engine, _ = engine_in(State.CONNECTED)
    engine.state = state
    with pytest.raises(AlertUnexpectedMessage, match=f"{msg_type.name} in state {state.name}"):
        engine._dispatch(msg_type, hs_message(msg_type, b""))  # noqa: SLF001
    assert engine.state is state


def test_connected_engine_reads_no_more_records() -> None:
    engine, client = engine_in(State.CONNECTED)
    engine.receive_data(record(ContentType.HANDSHAKE, hs_message(HandshakeType.CLIENT_HELLO, b"")))
    assert drain(engine) == []
    assert engine.handoff().unprocessed.startswith(b"\x16\x03\x03")
