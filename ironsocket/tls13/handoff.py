"""The value object the TLS 1.3 engine hands to whoever carries the connection on.

Once the handshake is complete (RFC 8446 §4.4.4), the caller either keeps using the userspace
record layer (`records.py`) or gives the socket to the kernel (`ironsocket.ktls`). Both need the
same exact facts: suite, per-direction traffic secret, key, IV and the sequence number of the
*next* record (RFC 8446 §5.3), plus every byte the engine received past the client's Finished.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import CipherSuite, Group


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficKeys:
    """One direction of record protection (RFC 8446 §7.3).

    ``rec_seq`` is the sequence number the next record in this direction will use; it counts
    every record already protected with ``traffic_secret``.
    """

    traffic_secret: bytes
    key: bytes
    iv: bytes
    rec_seq: int

    def __repr__(self) -> str:  # never print key material by accident
        return f"TrafficKeys(rec_seq={self.rec_seq}, key=<{len(self.key)} bytes>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Handoff:
    """Everything needed to continue a connection after the handshake.

    ``read`` protects client→server records, ``write`` server→client records.
    ``plaintext`` is application data the engine already decrypted past the client Finished
    (deliver it first); ``unprocessed`` is raw bytes received but not yet decrypted (a partial
    record). A kTLS RX install is only exact when ``unprocessed`` is empty; ``read.rec_seq``
    already accounts for the records that produced ``plaintext``.
    """

    cipher_suite: CipherSuite
    group: Group | None  # None: a psk_ke resumption (no (EC)DHE)
    read: TrafficKeys
    write: TrafficKeys
    server_name: str | None = None
    alpn_protocol: str | None = None
    plaintext: bytes = b""
    unprocessed: bytes = b""
    # The client's RFC 8449 record_size_limit (None: not sent, i.e. 2^14 + 1). A kTLS TX socket
    # always fills records up to 2^14, so it is only usable when this is None or >= 2^14 + 1.
    record_size_limit: int | None = None
