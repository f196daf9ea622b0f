"""Stateless session tickets (RFC 8446 §4.6.1): what a ticket holds, how it is sealed, the keys.

Theory of operation
-------------------
A ticket is the server's own state for one resumable session, encrypted so that only a server
holding the ticket key can read it, and handed to the client in a NewSessionTicket. The server
keeps nothing per ticket ("stateless"); on resumption the client sends the ticket back as a
pre_shared_key identity (§4.2.11), the server unseals it and recovers the PSK.

Wire format of a ticket (the ``ticket`` field of NewSessionTicket, opaque to the client)::

    key_id[16] || nonce[12] || AEAD-Seal(key, nonce, body, aad = FORMAT || key_id)

with AES-256-GCM (`cryptography`) and a fresh random 96-bit nonce per ticket. A nonce is never
reused in practice: each ticket key seals at most `MAX_SEALS_PER_KEY` tickets before the ring
makes a new key (far below the 2^32 random nonces NIST SP 800-38D §8.3 allows one GCM key), and
keys rotate every `DEFAULT_ROTATION` seconds anyway. The body (`TicketState`), version 1::

    uint8  format = 1
    uint16 cipher_suite
    uint64 issued_ms         (Unix time in ms, from the injected clock)
    uint64 authenticated_ms  (when the certificate signature of the session's first, full
                              handshake was made; resumptions carry it on, see MAX_AUTH_AGE)
    uint32 lifetime          (seconds; ≤ 7 days, §4.6.1)
    uint32 ticket_age_add
    opaque psk<1..255>       (HKDF-Expand-Label(resumption_master_secret, "resumption", nonce))
    opaque server_name<0..255>
    opaque alpn<0..255>

There is no early_data: ironsocket never accepts 0-RTT, so tickets never carry the
early_data extension (§4.2.10) and clients never send early data with them.

Keys (`TicketKeyring`): the newest key seals; every key still inside its acceptance window
unseals. A key seals for ``rotation`` seconds and is accepted for ``rotation + lifetime``
seconds after it was made, so a ticket sealed at the last moment under a key is still
readable for its whole lifetime. A key ring loaded from a file (`TicketKeyring.fixed`) never
rotates: the operator rotates the file. A random ring is exported into the upgrade state
document (`export`/`load`), so tickets issued before an exec upgrade resume after it. A ring
derived from a shared secret (`TicketKeyring.derived`, for the processes of ``--workers``)
computes the key of each rotation period from the secret (HKDF), so every process holding it
seals and opens with the same keys and rotates at the same moments, without talking.

Nothing here touches a socket; time and randomness are injected (`now`, `random_bytes`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .constants import CipherSuite

FORMAT = 1
KEY_ID_SIZE = 16
NONCE_SIZE = 12
KEY_SIZE = 32  # AES-256-GCM
TAG_SIZE = 16
DEFAULT_LIFETIME = 2 * 3600  # seconds (OpenSSL's default is 7200 too)
MAX_LIFETIME = 7 * 24 * 3600  # §4.6.1: "Servers MUST NOT use any value greater than 604800 seconds"
DEFAULT_ROTATION = 3600  # a new sealing key every hour
MAX_SEALS_PER_KEY = 1 << 28  # then a new key, whatever the clock says (random-nonce GCM bound)
# §4.6.1: "It is RECOMMENDED that implementations place limits on the total lifetime of such
# keying material" (tickets issued on resumed connections could extend it forever): no ticket
# is valid past this long after the CertificateVerify that started the chain.
MAX_AUTH_AGE = MAX_LIFETIME
_HEADER = struct.Struct("!BHQQII")


class PskKeyExchangeMode(IntEnum):
    """RFC 8446 §4.2.9."""

    PSK_KE = 0
    PSK_DHE_KE = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class TicketState:
    """What a ticket carries (see the module docstring for the byte layout)."""

    cipher_suite: CipherSuite
    issued: float  # Unix time, seconds
    lifetime: int
    ticket_age_add: int
    psk: bytes
    server_name: str | None
    alpn_protocol: str | None
    authenticated: float = 0.0  # Unix time of the session's certificate signature (0: = issued)

    def __post_init__(self) -> None:
        if not self.authenticated:
            object.__setattr__(self, "authenticated", self.issued)

    def __repr__(self) -> str:  # never print the PSK by accident
        return f"TicketState(cipher_suite={self.cipher_suite.name}, lifetime={self.lifetime})"

    def encode(self) -> bytes:
        name = (self.server_name or "").encode("ascii")
        alpn = (self.alpn_protocol or "").encode("latin-1")
        if not 1 <= len(self.psk) <= 255 or len(name) > 255 or len(alpn) > 255:
            raise ValueError("ticket field too long")
        return (
            _HEADER.pack(FORMAT, self.cipher_suite, int(self.issued * 1000), int(self.authenticated * 1000),
                         self.lifetime, self.ticket_age_add)
            + bytes([len(self.psk)]) + self.psk
            + bytes([len(name)]) + name
            + bytes([len(alpn)]) + alpn
        )

    @classmethod
    def decode(cls, body: bytes) -> TicketState | None:
        """The state in ``body``, or None if it is not a well-formed version-1 body."""
        try:
            fmt, suite, issued_ms, auth_ms, lifetime, age_add = _HEADER.unpack_from(body)
            offset = _HEADER.size
            fields = []
            for _ in range(3):
                length = body[offset]
                value = body[offset + 1 : offset + 1 + length]
                if len(value) != length:
                    return None
                fields.append(bytes(value))
                offset += 1 + length
            if fmt != FORMAT or offset != len(body) or not fields[0]:
                return None
            return cls(
                cipher_suite=CipherSuite(suite),
                issued=issued_ms / 1000,
                authenticated=auth_ms / 1000,
                lifetime=lifetime,
                ticket_age_add=age_add,
                psk=fields[0],
                server_name=fields[1].decode("ascii") or None,
                alpn_protocol=fields[2].decode("latin-1") or None,
            )
        except (struct.error, IndexError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class TicketKey:
    """One ticket key: ``key_id`` names it in each ticket, ``secret`` is the AES-256-GCM key."""

    key_id: bytes
    secret: bytes
    created: float  # Unix time, seconds
    # Made once per key, not per ticket; it goes when the key is retired (no cache keeps it).
    aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "aead", AESGCM(self.secret))

    def __repr__(self) -> str:
        return f"TicketKey(key_id={self.key_id.hex()}, created={self.created:.0f})"


def key_id_for(secret: bytes) -> bytes:
    """The id of a key read from a file: the same on every machine that shares the file."""
    return hashlib.sha256(b"ironsocket ticket key id\x00" + secret).digest()[:KEY_ID_SIZE]


class TicketKeyring:
    """The ticket keys of one listener; safe to use from several handshake threads at once."""

    def __init__(
        self,
        *,
        rotation: float | None = DEFAULT_ROTATION,
        lifetime: int = DEFAULT_LIFETIME,
        random_bytes: Callable[[int], bytes] = os.urandom,
        keys: Iterable[TicketKey] = (),
    ) -> None:
        if not 1 <= lifetime <= MAX_LIFETIME:
            raise ValueError(f"ticket lifetime must be 1..{MAX_LIFETIME} seconds (RFC 8446 §4.6.1)")
        self.rotation = rotation  # None: fixed keys (from a file), the first one seals
        self.lifetime = lifetime
        self._random_bytes = random_bytes
        self._lock = threading.Lock()
        self._keys: list[TicketKey] = list(keys)  # newest first
        self._seals = 0  # by the newest key
        self._master: bytes | None = None  # derived(): the shared secret
        self._derived: dict[int, TicketKey] = {}  # derived(): period number → key
        if rotation is None and not self._keys:
            raise ValueError("a fixed ticket key ring needs at least one key")

    @classmethod
    def fixed(cls, secrets: list[bytes], *, lifetime: int = DEFAULT_LIFETIME) -> TicketKeyring:
        """Keys from a key file: the first seals and unseals, the others only unseal."""
        for secret in secrets:
            if len(secret) != KEY_SIZE:
                raise ValueError(f"a ticket key is {KEY_SIZE} bytes, not {len(secret)}")
        return cls(rotation=None, lifetime=lifetime,
                   keys=[TicketKey(key_id_for(s), s, 0.0) for s in secrets])

    @classmethod
    def derived(cls, master: bytes, *, rotation: float = DEFAULT_ROTATION,
                lifetime: int = DEFAULT_LIFETIME) -> TicketKeyring:
        """Keys computed from ``master`` per rotation period: the same in every process that
        holds ``master`` (``--workers``), rotating at the same moments."""
        if len(master) < KEY_SIZE:
            raise ValueError(f"a ticket key secret is at least {KEY_SIZE} bytes")
        ring = cls(rotation=rotation, lifetime=lifetime)
        ring._master = hashlib.sha256(b"ironsocket ticket key secret\x00" + master).digest()
        return ring

    @property
    def is_fixed(self) -> bool:
        return self.rotation is None

    @property
    def is_derived(self) -> bool:
        return self._master is not None

    def _period_key(self, period: int) -> TicketKey:
        """derived(): the key of one rotation period (called with the lock held)."""
        assert self._master is not None and self.rotation is not None
        key = self._derived.get(period)
        if key is None:
            info = period.to_bytes(8, "big", signed=True)
            blocks = hmac.digest(self._master, b"key\x00" + info, "sha512")
            key = TicketKey(blocks[:KEY_ID_SIZE], blocks[KEY_ID_SIZE : KEY_ID_SIZE + KEY_SIZE],
                            period * self.rotation)
            oldest = period - int((self.rotation + self.lifetime) // self.rotation) - 2
            self._derived = {p: k for p, k in self._derived.items() if p >= oldest} | {period: key}
        return key

    def _accepted_until(self, key: TicketKey) -> float:
        assert self.rotation is not None
        return key.created + self.rotation + self.lifetime

    def sealing_key(self, now: float) -> TicketKey:
        """The key to seal a new ticket with (making a new one when the current one is due)."""
        with self._lock:
            if self._master is not None:
                assert self.rotation is not None
                return self._period_key(int(now // self.rotation))
            if self.rotation is not None:
                newest = self._keys[0] if self._keys else None
                if newest is None or now >= newest.created + self.rotation or now < newest.created \
                        or self._seals >= MAX_SEALS_PER_KEY:
                    secret = self._random_bytes(KEY_SIZE)
                    self._keys.insert(0, TicketKey(self._random_bytes(KEY_ID_SIZE), secret, now))
                    self._seals = 0
                rotation = self.rotation
                self._keys = [k for k in self._keys if now < k.created + rotation + self.lifetime]
            elif self._seals >= MAX_SEALS_PER_KEY:
                raise TicketKeyExhausted("the ticket key file's first key sealed its limit of tickets: rotate the file")
            self._seals += 1
            return self._keys[0]

    def find(self, key_id: bytes, now: float) -> TicketKey | None:
        with self._lock:
            if self._master is not None:
                assert self.rotation is not None
                current = int(now // self.rotation)
                for period in range(current, current - int((self.rotation + self.lifetime) // self.rotation) - 2, -1):
                    key = self._period_key(period)
                    if key.key_id == key_id:
                        return key if key.created <= now < self._accepted_until(key) else None
                return None
            for key in self._keys:
                if key.key_id == key_id:
                    if self.rotation is not None and not key.created <= now < self._accepted_until(key):
                        return None
                    return key
        return None

    # -- the upgrade state document ---------------------------------------------------------------
    def export(self) -> list[TicketKey]:
        """The keys, for the upgrade state document (`handover.ListenerEntry.ticket_keys`: sealed
        memfd, never written to disk). A derived ring exports nothing: the next program derives
        the same keys."""
        if self._master is not None:
            return []
        with self._lock:
            return list(self._keys)

    def load(self, exported: Iterable[TicketKey]) -> None:
        """Take the keys a previous program exported (a rotating ring only: a fixed ring keeps
        the file's keys). Keys of the wrong size are ignored: the worst case is a full handshake."""
        if self.is_fixed or self.is_derived:
            return
        keys = [key for key in exported if len(key.key_id) == KEY_ID_SIZE and len(key.secret) == KEY_SIZE]
        keys.sort(key=lambda k: k.created, reverse=True)
        with self._lock:
            self._keys = keys
            self._seals = 0


@dataclass(frozen=True, kw_only=True)
class TicketConfig:
    """A server's ticket policy (`server.ServerConfig.tickets`; None there: no tickets, no resumption).

    ``count`` NewSessionTickets after each full or resumed handshake (0: resume tickets issued
    elsewhere, e.g. before a restart with a key file, but issue none). ``psk_modes``: the key
    exchange modes a resumption may use (§4.2.9). The default, psk_dhe_ke, makes a fresh
    (EC)DHE on every resumption, so forward secrecy does not depend on the ticket key; psk_ke
    (no (EC)DHE: cheaper, but whoever gets a ticket key can decrypt the resumed sessions made
    with it) only if configured, and psk_dhe_ke is preferred when the client offers both."""

    keyring: TicketKeyring
    count: int = 2
    psk_modes: frozenset[PskKeyExchangeMode] = frozenset({PskKeyExchangeMode.PSK_DHE_KE})
    clock: Callable[[], float] = time.time
    random_bytes: Callable[[int], bytes] = os.urandom

    def __post_init__(self) -> None:
        if not 0 <= self.count <= 16:
            raise ValueError("tickets per handshake must be 0..16")
        if not self.psk_modes:
            raise ValueError("at least one PSK key exchange mode is required")


class TicketKeyExhausted(Exception):
    """A fixed key sealed MAX_SEALS_PER_KEY tickets (the server then stops sending tickets)."""


def seal(key: TicketKey, state: TicketState, random_bytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """The ticket for ``state`` under ``key``, with a fresh random nonce."""
    nonce = random_bytes(NONCE_SIZE)
    sealed = key.aead.encrypt(nonce, state.encode(), bytes([FORMAT]) + key.key_id)
    return key.key_id + nonce + sealed


def unseal(keyring: TicketKeyring, ticket: bytes, now: float) -> TicketState | None:
    """The state inside ``ticket``, or None: unknown or retired key, failed authentication
    (tampered), malformed body, or outside its lifetime (expired, or issued in the future)."""
    if len(ticket) < KEY_ID_SIZE + NONCE_SIZE + TAG_SIZE:
        return None
    key = keyring.find(ticket[:KEY_ID_SIZE], now)
    if key is None:
        return None
    nonce = ticket[KEY_ID_SIZE : KEY_ID_SIZE + NONCE_SIZE]
    try:
        body = key.aead.decrypt(nonce, ticket[KEY_ID_SIZE + NONCE_SIZE :], bytes([FORMAT]) + key.key_id)
    except InvalidTag:
        return None
    state = TicketState.decode(body)
    if state is None or not state.authenticated <= state.issued <= now + 1:
        return None
    if now >= state.issued + min(state.lifetime, MAX_LIFETIME) or now >= state.authenticated + MAX_AUTH_AGE:
        return None
    return state


def lifetime_for(now: float, authenticated: float, lifetime: int) -> int:
    """The lifetime of a new ticket for a session authenticated at ``authenticated``: at most
    ``lifetime``, and never past MAX_AUTH_AGE after the authentication (0: issue none)."""
    return max(0, min(lifetime, int(authenticated + MAX_AUTH_AGE - now)))
