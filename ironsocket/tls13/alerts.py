"""Fatal alerts as exceptions (RFC 8446 §6.2).

Code inside the engine raises the subclass named after the alert it must send; the engine's one
error boundary (`TLSServer.receive_data`) turns it into an alert record and the ERROR state.
"""

from __future__ import annotations

from .constants import AlertDescription


class Alert(Exception):
    """A fatal TLS alert. ``description`` is what goes on the wire."""

    description: AlertDescription = AlertDescription.internal_error

    def __str__(self) -> str:
        detail = super().__str__()
        return f"{self.description.name}: {detail}" if detail else self.description.name


class AlertUnexpectedMessage(Alert):
    description = AlertDescription.unexpected_message


class AlertBadRecordMac(Alert):
    description = AlertDescription.bad_record_mac


class AlertRecordOverflow(Alert):
    description = AlertDescription.record_overflow


class AlertHandshakeFailure(Alert):
    description = AlertDescription.handshake_failure


class AlertIllegalParameter(Alert):
    description = AlertDescription.illegal_parameter


class AlertDecodeError(Alert):
    description = AlertDescription.decode_error


class AlertDecryptError(Alert):
    description = AlertDescription.decrypt_error


class AlertProtocolVersion(Alert):
    description = AlertDescription.protocol_version


class AlertInternalError(Alert):
    description = AlertDescription.internal_error


class AlertMissingExtension(Alert):
    description = AlertDescription.missing_extension


class AlertUnsupportedExtension(Alert):
    description = AlertDescription.unsupported_extension


class AlertUnrecognizedName(Alert):
    description = AlertDescription.unrecognized_name


class AlertNoApplicationProtocol(Alert):
    description = AlertDescription.no_application_protocol


class AlertInsufficientSecurity(Alert):
    description = AlertDescription.insufficient_security


class ProtocolError(Exception):
    """Base of the engine's public errors."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (or sent a fatal alert).

    ``alert`` is the description the engine queued for the peer, or ``None`` when the peer
    itself sent the fatal alert (``received`` then holds its description).
    """

    def __init__(
        self,
        message: str,
        *,
        alert: AlertDescription | None = None,
        received: AlertDescription | int | None = None,
    ) -> None:
        super().__init__(message)
        self.alert = alert
        self.received = received


class LocalProtocolError(ProtocolError):
    """The caller misused the engine's API (e.g. sending application data before CONNECTED)."""


class RecordLimitReached(ProtocolError):
    """The write key cannot protect another record and could not be updated (RFC 8446 §5.5).

    `Session` sends its own KeyUpdate well before the limit, so this only happens when it was
    built from a `Handoff` already (nearly) at the limit. The last record the key may protect
    is kept for the fatal internal_error alert, which is already in `data_to_send()` (unless
    not even that record was left); the write side is closed. No nonce is ever reused.
    """
