"""Files that hold secrets: the key log (``--keylog``), the upgrade state dump
(``--upgrade-state-dump``) and the check on private key files (``--key``, ``key = ...``).

Policy for a file we *write* secrets to (`open_secret`, `check_secret`):

- The last path component is never followed: a symbolic link is refused (``O_NOFOLLOW``), so a
  link planted in a shared directory cannot send the secrets elsewhere. Links in the directories
  above it are the administrator's choice and are followed.
- A file that does not exist is created with ``O_CREAT | O_EXCL`` and mode 0600 (whatever the
  umask), so we never adopt a file somebody else created between a check and the open.
- An existing file is used only if it is a regular file, owned by our effective uid and has no
  group/other permission bits. Otherwise it is refused; its mode is never "fixed" with chmod:
  somebody who opened it while it was readable keeps reading through that descriptor after a
  chmod, and a file owned by another user stays theirs (they can chmod it back). The error says
  what to do (remove the file or ``chmod 600`` it).
- ``serve --user NAME`` (as root): a file owned by that user is accepted too (`trust_owner`):
  the server becomes that user, and its upgrades must open the same files as it.
- Every check is made on the opened descriptor (``fstat``), not only on the name; an existing
  file is truncated (``truncate=True``) only after the checks, never by ``O_TRUNC`` at open.
- Every problem is a `SecretFileError` with a one-line message naming the file.

Private key files we *read* (`key_file_warning`): like ssh's "UNPROTECTED PRIVATE KEY FILE", a
key file with any group/other permission bits (mode & 0o077) gets a warning naming the file; it
is still loaded (refusing would break deployments that share a key through a group).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO

SECRET_MODE = 0o600


class SecretFileError(Exception):
    """A secrets file we refuse to write to (or cannot open); the message is one line."""


_trusted_owners: set[int] = set()  # besides our euid (`trust_owner`)


def trust_owner(uid: int) -> None:
    """Also accept files owned by ``uid``: the user ``serve --user`` becomes (its upgrades run as it)."""
    _trusted_owners.add(uid)


def _problem(st: os.stat_result) -> str | None:
    """Why an existing file must not receive secrets, or None if it may."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link; refusing to follow it"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid() and st.st_uid not in _trusted_owners:
        return f"is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); remove it or pick another path"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"has mode {mode:04o}: group/others may read it; chmod 600 it or remove it"
    return None


def check_secret(path: str | Path, what: str = "secrets file") -> None:
    """Start-up check for a path that `open_secret` will open later: if it exists it must pass
    the policy; if not, its directory must exist. Raises SecretFileError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = Path(path).parent
        if not parent.is_dir():
            raise SecretFileError(f"{what} {path}: directory {parent} does not exist") from None
        return
    except OSError as exc:
        raise SecretFileError(f"{what} {path}: {exc.strerror}") from None
    if (why := _problem(st)) is not None:
        raise SecretFileError(f"{what} {path} {why}")


def open_secret(path: str | Path, *, append: bool = False, truncate: bool = False,
                what: str = "secrets file", buffering: int = -1) -> IO[str]:
    """Open ``path`` for writing secrets under the policy above; a text file object.
    ``append``: add to an existing file (the key log); ``truncate``: replace its content."""
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | (os.O_APPEND if append else 0)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, SECRET_MODE)
        created = True
    except FileExistsError:
        created = False
        try:
            # O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of blocking start-up.
            fd = os.open(path, flags | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SecretFileError(f"{what} {path} is a symbolic link; refusing to follow it") from None
            if exc.errno in (errno.ENXIO, errno.EISDIR):
                raise SecretFileError(f"{what} {path} is not a regular file") from None
            raise SecretFileError(f"{what} {path}: {exc.strerror}") from None
    except OSError as exc:
        raise SecretFileError(f"{what} {path}: {exc.strerror}") from None
    try:
        if created:
            os.fchmod(fd, SECRET_MODE)  # exact mode, whatever the umask
        else:
            if (why := _problem(os.fstat(fd))) is not None:
                raise SecretFileError(f"{what} {path} {why}")
            os.set_blocking(fd, True)
            if truncate:
                os.ftruncate(fd, 0)
        return os.fdopen(fd, "a" if append else "w", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def key_file_warning(path: str | Path) -> str | None:
    """The warning for a private key file that group/others may read, or None."""
    try:
        st = os.stat(path)  # the file the key is read from (a symlink's target)
    except OSError:
        return None  # not readable: the loader reports that
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode) or not mode & 0o077:
        return None
    return (f"UNPROTECTED PRIVATE KEY FILE {path}: permissions {mode:04o} are too open "
            f"(group/others can read the key); chmod 600 {path}")


def read_secret(path: str | Path, what: str = "secrets file", max_size: int = 64 * 1024) -> bytes:
    """Read a file of secrets (``--ticket-key-file``) under the write policy's checks: the last
    component is not followed if it is a symbolic link, and the opened file must be a regular
    file of ours with no group/other permission bits (refused, not warned: it holds keys that
    decrypt every session's ticket). Raises SecretFileError with a one-line message."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SecretFileError(f"{what} {path} is a symbolic link; refusing to follow it") from None
        raise SecretFileError(f"{what} {path}: {exc.strerror}") from None
    try:
        if (why := _problem(os.fstat(fd))) is not None:
            raise SecretFileError(f"{what} {path} {why}")
        chunks = []
        size = 0
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > max_size:
                raise SecretFileError(f"{what} {path} is larger than {max_size} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
