"""The PID file: ``serve --pid-file PATH`` (or a configuration file's ``pid_file``).

Theory of operation
-------------------
The file holds the serving process's PID and a newline (mode 0644). It follows the process,
not the program image:

- **Start** (`claim`): a file already at the path is read without following a symlink (a
  symlink, or anything but a regular file, is refused). If it names a live process whose
  command line mentions ironsocket, another server runs: refused. If it names a dead process
  (or a live one that is not ironsocket: the PID was reused), it is stale and replaced, with a
  log line. The file is written atomically: a temporary file created ``O_EXCL|O_NOFOLLOW`` in
  the same directory, then renamed over the path (a rename replaces a symlink planted
  meanwhile instead of following it).
- **Exec upgrade and rollback**: the PID does not change, so the new program finds the file
  naming its own PID and leaves it as it is (`PidFile.kept`): it never rewrites it (after
  ``--user`` it may not be allowed to) and never removes it if its start-up fails (the rollback
  execs the previous program, which keeps serving under the same PID).
- **Reload to another path**: the hand-over document names the file the previous program held
  (``pid_file``). A new program whose configuration names another path claims that one, and
  once its restore is confirmed `release`s the old one (only if it still names this process).
  If its start-up fails it removes the file it wrote; a program exec'd by a rollback keeps the
  document's path (``cli._pid_file_path``).
- **Clean stop** (`release`): the file is removed if it still names this process. With
  ``--workers N`` only the supervisor has one (the workers' command lines lose ``--pid-file``, and
  they ignore a configuration file's ``pid_file``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ironsocket")


class PidFileError(Exception):
    """A PID file that cannot be used; the message is one line for the operator."""


@dataclass(frozen=True, kw_only=True)
class PidFile:
    path: Path
    pid: int
    kept: bool  # it already named this process (an exec upgrade or rollback): not written by us


def _read(path: Path) -> int | None | str:
    """The PID the file names, None if there is no file, or its text if it is not a PID."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PidFileError(f"pid file {path} is a symlink: refused (give the path of a regular file)") from None
        raise PidFileError(f"pid file {path}: cannot read it: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PidFileError(f"pid file {path} is not a regular file: refused")
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() and int(text) > 0 else text


def _is_ironsocket(pid: int) -> bool:
    """Whether ``pid`` is a live process whose command line mentions ironsocket."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists (another user's)
    try:
        return b"ironsocket" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # gone meanwhile


def _write(path: Path, pid: int) -> None:
    tmp = path.with_name(f".{path.name}.{pid}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise PidFileError(f"pid file {path}: cannot create it in {path.parent}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o644)  # whatever the umask
        os.write(fd, f"{pid}\n".encode())
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PidFileError(f"pid file {path}: cannot write it: {exc.strerror}") from None


def claim(path: Path) -> PidFile:
    """Write this process's PID to ``path`` (or keep it there); PidFileError if refused."""
    pid = os.getpid()
    found = _read(path)
    if found == pid:
        return PidFile(path=path, pid=pid, kept=True)
    if isinstance(found, int):
        if _is_ironsocket(found):
            raise PidFileError(f"pid file {path} names pid {found}, a running ironsocket: another server is "
                               "running (stop it first, or give another --pid-file)")
        log.info("pid file %s named pid %d, which is not a running ironsocket: stale, replaced", path, found)
    elif found is not None:
        log.info("pid file %s held %r, not a pid: replaced", path, found[:20])
    _write(path, pid)
    return PidFile(path=path, pid=pid, kept=False)


def release(pid_file: PidFile) -> None:
    """Remove the file if it still names this process (a clean stop). Never raises."""
    try:
        if _read(pid_file.path) != pid_file.pid:
            return
        os.unlink(pid_file.path)
    except (OSError, PidFileError) as exc:
        log.warning("pid file %s not removed: %s", pid_file.path, getattr(exc, "strerror", None) or exc)
