"""Events the engine gives the caller (frozen, slotted, keyword-only; no tlslite types)."""

from __future__ import annotations

from dataclasses import dataclass

from .constants import AlertDescription, CipherSuite, Group, SignatureScheme


class _Sentinel(type):
    def __repr__(cls) -> str:
        return cls.__name__


class NEED_DATA(metaclass=_Sentinel):  # noqa: N801 - a sentinel, like h11's
    """`next_event()` has nothing to give until more bytes arrive."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHelloReceived(Event):
    """The (final) ClientHello was accepted; the server flight is in `data_to_send()`."""

    server_name: str | None
    alpn_offered: tuple[str, ...]
    hello_retry: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeComplete(Event):
    """The client Finished verified (RFC 8446 §4.4.4); call `handoff()` next."""

    cipher_suite: CipherSuite
    group: Group | None  # None: a psk_ke resumption (no (EC)DHE)
    signature_scheme: SignatureScheme | None  # None when resumed (no CertificateVerify)
    server_name: str | None
    alpn_protocol: str | None
    hello_retry: bool
    resumed: bool = False  # a session ticket's PSK was accepted (RFC 8446 §4.2.11)
    tickets_sent: int = 0  # NewSessionTickets in data_to_send() (§4.6.1)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplicationData(Event):
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyUpdateReceived(Event):
    """The peer updated its sending keys (RFC 8446 §4.6.3); ours follow if it asked."""

    update_requested: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertReceived(Event):
    """A non-fatal alert other than close_notify (in TLS 1.3 only user_canceled)."""

    description: AlertDescription | int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed(Event):
    """The peer sent close_notify (RFC 8446 §6.1): it will send no more; we still may."""
