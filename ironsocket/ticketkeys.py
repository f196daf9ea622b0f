"""Where a listener's session ticket keys come from (`tls13.tickets.TicketKeyring`).

Three sources:

- By default, keys made in memory by the ring itself (random, one new key every hour, each
  accepted for an hour plus the ticket lifetime). They never touch the disk; an exec upgrade
  carries them in the state document (`server.ProxyServer.snapshot`/`adopt`), so a ticket
  issued before an upgrade resumes after it.
- ``--ticket-key-file FILE`` (``ticket_key_file`` in a listener table): keys shared by several
  machines behind one address. The file holds one key per line, 64 hex digits (32 random
  bytes, e.g. ``openssl rand -hex 32``); blank lines and ``#`` comments are ignored. The first
  key seals new tickets, the others are only accepted (rotation: put a new key first, keep the
  old one second for a ticket lifetime, reload). The file must be a regular file of ours with
  mode 0600 or stricter, and a symbolic link is refused (`secretfile.read_secret`).
- ``--workers N``: the supervisor makes one random secret and gives it to its workers in the
  environment (`SHARED_SECRET_ENV`, readable only by the same user, never on disk); each
  worker derives the same hourly keys from it (`TicketKeyring.derived`), so a ticket from one
  worker resumes at any other, and after a worker's upgrade (the exec keeps the environment).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .secretfile import SecretFileError, read_secret
from .tls13.tickets import DEFAULT_LIFETIME, KEY_SIZE, TicketKeyring

MAX_KEYS = 16
SHARED_SECRET_ENV = "IRONSOCKET_TICKET_SECRET"  # set by the --workers supervisor (workers.py)


def new_shared_secret() -> str:
    """A secret for `SHARED_SECRET_ENV` (hex)."""
    return os.urandom(32).hex()


class TicketKeyFileError(Exception):
    """The key file cannot be used; the message is one line and names the file."""


def parse_key_file(text: str, path: str | Path) -> list[bytes]:
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            raise TicketKeyFileError(f"ticket key file {path}:{number}: not hex digits") from None
        if len(key) != KEY_SIZE:
            raise TicketKeyFileError(
                f"ticket key file {path}:{number}: a key is {2 * KEY_SIZE} hex digits ({KEY_SIZE} bytes), "
                f"not {len(line)}")
        if len(set(key)) < 8:
            raise TicketKeyFileError(f"ticket key file {path}:{number}: that is not a random key")
        keys.append(key)
    if not keys:
        raise TicketKeyFileError(f"ticket key file {path}: no key in it (one line of 64 hex digits: openssl rand -hex 32)")
    if len(keys) > MAX_KEYS:
        raise TicketKeyFileError(f"ticket key file {path}: more than {MAX_KEYS} keys")
    return keys


def keyring_from_file(path: str | Path, lifetime: int = DEFAULT_LIFETIME) -> TicketKeyring:
    try:
        raw = read_secret(path, what="ticket key file")
    except SecretFileError as exc:
        raise TicketKeyFileError(str(exc)) from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise TicketKeyFileError(f"ticket key file {path}: not a text file of hex keys") from None
    return TicketKeyring.fixed(parse_key_file(text, path), lifetime=lifetime)


def keyring(key_file: str | Path | None, lifetime: int = DEFAULT_LIFETIME,
            environ: Mapping[str, str] = os.environ) -> TicketKeyring:
    """The ring for one listener: from ``key_file``, else from the workers' shared secret,
    else a rotating one in memory."""
    if key_file is not None:
        return keyring_from_file(key_file, lifetime)
    shared = environ.get(SHARED_SECRET_ENV)
    if shared:
        try:
            return TicketKeyring.derived(bytes.fromhex(shared), lifetime=lifetime)
        except ValueError:
            raise TicketKeyFileError(f"${SHARED_SECRET_ENV} is not a hex secret of at least 32 bytes") from None
    return TicketKeyring(lifetime=lifetime)
