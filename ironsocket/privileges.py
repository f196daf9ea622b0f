"""``serve --user NAME [--group NAME]``: give up root once the sockets are bound.

Theory of operation
-------------------
As root, `serve` binds the listeners, the admin endpoint and the control socket and reads the
certificates and keys, then `drop` switches the whole process (every thread: glibc's setuid
applies to all of them) to the user: ``setgroups([])``, ``setgid``, ``setuid``. Root can still
use the control socket (``ironsocket upgrade``: root passes the socket's permission check).

From then on every exec upgrade and reload runs as that user: the new program re-reads the
certificate and key files (and the ``--config`` file) with the user's rights. So `preflight`,
at the first start, checks that the user can read each of them — with a forked probe that
drops to the user and opens them (permission bits alone miss ACLs and the directories'
search rights) — and refuses to start otherwise, rather than fail the first reload.

A program that already runs as the user (exec'd by an upgrade, or the upgrade's check child:
same command line, ``--user`` included) has nothing to drop: `preflight` says so and `drop` is
not called.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class PrivilegeError(Exception):
    """``--user``/``--group`` cannot be honoured; the message is one line for the operator."""


@dataclass(frozen=True, kw_only=True)
class Target:
    user: str
    uid: int
    gid: int


def resolve(user: str, group: str | None = None) -> Target:
    """The uid and gid of ``user`` (its primary group unless ``group``); PrivilegeError if unknown."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"--user {user}: no such user") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"--group {group}: no such group") from None
    return Target(user=user, uid=entry.pw_uid, gid=gid)


def already(target: Target) -> bool:
    """Whether this process already runs as ``target`` (an upgraded program, the check child)."""
    return os.geteuid() == target.uid and os.getuid() == target.uid


def _become(target: Target) -> None:
    os.setgroups([])
    os.setgid(target.gid)
    os.setuid(target.uid)


def preflight(target: Target, files: Sequence[Path], program: str,
              secrets: Sequence[tuple[Path, str, bool]] = ()) -> list[str]:
    """PrivilegeError unless we are root (or already ``target``) and ``target`` can read every
    one of ``files`` (what an exec upgrade, running as ``target``, reads again) and use every
    one of ``secrets`` ((path, what, read): checked by `secretfile`'s rules as ``target``: its
    own, 0600; read: it is read at start, else opened for writing). Returns warnings:
    ``program`` (what an upgrade execs) not executable by ``target`` — upgrades and reloads
    would then be refused (safely: the running program keeps serving)."""
    from .secretfile import SecretFileError, check_secret, read_secret

    if already(target):
        return []
    if os.geteuid() != 0:
        raise PrivilegeError(f"--user {target.user}: only root can switch user (running as uid {os.geteuid()})")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the probe: drop, try each file, report what fails (one line each)
        code = 0
        try:
            os.close(read)
            _become(target)
            for index, path in enumerate(files):
                try:
                    with open(path, "rb") as handle:
                        handle.read(1)
                except OSError as exc:
                    os.write(write, f"read {index} {exc.strerror}\n".encode())
                    break
            for secret, what, read_it in secrets:
                try:
                    read_secret(secret, what) if read_it else check_secret(secret, what)
                except SecretFileError as exc:
                    os.write(write, f"secret {exc}".replace("\n", " ").encode() + b"\n")
                    break
            if not os.access(program, os.X_OK):
                os.write(write, b"exec\n")
        except BaseException:  # noqa: BLE001 - never return into the parent's code
            code = 2
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read().decode(errors="replace").splitlines()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise PrivilegeError(f"--user {target.user}: could not switch to uid {target.uid} gid {target.gid}")
    warnings: list[str] = []
    for line in report:
        kind, _, rest = line.partition(" ")
        if kind == "read":
            which, _, why = rest.partition(" ")
            raise PrivilegeError(f"--user {target.user}: {files[int(which)]} is not readable by {target.user} "
                                 f"({why}); upgrades and reloads re-read it as that user: chown or chgrp it "
                                 "(keys: mode 0600/0640)")
        if kind == "secret":
            raise PrivilegeError(f"--user {target.user}: as {target.user}, {rest} (upgrades and reloads open it "
                                 f"as that user: chown it to {target.user})")
        if kind == "exec":
            warnings.append(f"--user {target.user}: {program} is not executable by {target.user} (it or a directory "
                            "above it): upgrades and reloads will be refused (the running program keeps serving); "
                            "install ironsocket where the user can run it")
    return warnings


def drop(target: Target) -> None:
    """Switch this process to ``target`` for good (after binding and loading)."""
    _become(target)
    if os.geteuid() != target.uid or os.getegid() != target.gid:
        raise PrivilegeError(f"--user {target.user}: the switch did not take")
