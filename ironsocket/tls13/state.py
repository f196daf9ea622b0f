"""The server's handshake states and the table of legal transitions (RFC 8446 Appendix A.2).

Rule 1: every fact about which handshake message may arrive in which state lives here, in
`TRANSITIONS`; the engine (`server.py`) does one lookup and a missing key is an
unexpected_message alert naming the state.
Rule 2: this file knows nothing of records, keys or sockets.

Appendix A.2's RECVD_CH and NEGOTIATED are passed through inside one call (the engine answers a
ClientHello at once), and there is no client authentication, so WAIT_FLIGHT2/WAIT_CERT/WAIT_CV
collapse into WAIT_FINISHED. After a HelloRetryRequest the RFC returns to START; we name that
START_AFTER_RETRY so the table can say that only then may a second ClientHello come.
"""

from __future__ import annotations

from enum import Enum

from .constants import HandshakeType


class State(Enum):
    START = "START"
    START_AFTER_RETRY = "START_AFTER_RETRY"
    WAIT_FINISHED = "WAIT_FINISHED"
    CONNECTED = "CONNECTED"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


# state -> handshake message type -> (handler method name, states the handler may move to)
TRANSITIONS: dict[State, dict[HandshakeType, tuple[str, frozenset[State]]]] = {
    State.START: {
        HandshakeType.CLIENT_HELLO: (
            "_handle_client_hello",
            frozenset({State.START_AFTER_RETRY, State.WAIT_FINISHED}),
        ),
    },
    State.START_AFTER_RETRY: {
        HandshakeType.CLIENT_HELLO: ("_handle_second_client_hello", frozenset({State.WAIT_FINISHED})),
    },
    State.WAIT_FINISHED: {
        HandshakeType.FINISHED: ("_handle_finished", frozenset({State.CONNECTED})),
    },
    State.CONNECTED: {},
    State.CLOSED: {},
    State.ERROR: {},
}

# Where each handshake message must end on a record boundary (§5.1: "Handshake messages MUST
# NOT span key changes"): after a ClientHello (the next one is a reply to our HRR, or encrypted),
# and after Finished.
ENDS_KEY_EPOCH = frozenset({HandshakeType.CLIENT_HELLO, HandshakeType.FINISHED})
