"""Where the control socket goes: `--control-socket PATH` removes only a stale socket, and the
run directory (`IRONSOCKET_RUN_DIR`, ...) is chmod'ed only if we created it. Real directories,
sockets and `ironsocket serve` processes; "another user" is uid 65534 (nobody) via os.chown."""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path

import pytest

from ironsocket import control
from ironsocket.control import ControlError
from tests.helpers import assert_refused, serve_outcome
from tests.test_inspect import run_dir  # noqa: F401 - fixture: a short private IRONSOCKET_RUN_DIR

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


# -- --control-socket PATH: what may be removed ------------------------------------------------------
def test_control_socket_path_that_is_not_a_socket_is_kept(run_dir: Path) -> None:
    precious = run_dir / "ctl.sock"
    precious.write_text("not a socket\n")
    assert_refused(*serve_outcome(control_socket=precious), f"control socket path {precious} is a regular file",
                   "refusing to remove it")
    assert precious.read_text() == "not a socket\n"
    target = run_dir / "target"
    target.write_text("keep\n")
    link = run_dir / "link.sock"
    link.symlink_to(target)
    assert_refused(*serve_outcome(control_socket=link), f"{link} is a symbolic link")
    assert link.is_symlink() and target.read_text() == "keep\n"


def test_control_socket_another_program_listens_on_is_kept(run_dir: Path) -> None:
    path = run_dir / "other.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listens, never answers a ping
    other.bind(str(path))
    other.listen(4)
    try:
        assert_refused(*serve_outcome(control_socket=path), f"{path} is a socket another program listens on")
        assert stat.S_ISSOCK(path.lstat().st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:  # still the other program's socket
            c.connect(str(path))
    finally:
        other.close()
    # now nobody listens: a stale socket, which is removed and replaced
    started, output = serve_outcome(control_socket=path)
    assert started, output
    assert f"control socket {path}" in output


# -- the run directory -----------------------------------------------------------------------------------
def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_run_dir_we_create_is_0700_an_existing_safe_one_is_left_alone(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IRONSOCKET_RUN_DIR", str(tmp_path / "new"))
    assert control.control_dir() == tmp_path / "new" and mode(tmp_path / "new") == 0o700
    mine = tmp_path / "mine"
    mine.mkdir()
    mine.chmod(0o755)
    monkeypatch.setenv("IRONSOCKET_RUN_DIR", str(mine))
    assert control.control_dir() == mine and mode(mine) == 0o755  # not chmod'ed


def test_sticky_run_dir_gets_a_private_subdirectory(monkeypatch, run_dir: Path, start_proxy) -> None:
    """IRONSOCKET_RUN_DIR=/tmp-like (1777): /tmp itself is never chmod'ed (a copy of it here)."""
    shared = run_dir / "t"  # short: the socket path must fit in 107 bytes
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv("IRONSOCKET_RUN_DIR", str(shared))
    private = shared / f"ironsocket-{os.getuid()}"
    assert control.control_dir() == private
    assert mode(shared) == 0o1777 and mode(private) == 0o700
    assert control.control_dir(create=False) == private
    proxy = start_proxy()
    m = re.search(r"ironsocket: control socket (\S+) ", proxy.output)
    assert m and Path(m.group(1)) == private / f"ironsocket-{proxy.pid}.sock", proxy.output
    assert mode(shared) == 0o1777


def test_unsafe_run_dirs_are_refused(monkeypatch, tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # world-writable, not sticky: anyone could replace our socket
    monkeypatch.setenv("IRONSOCKET_RUN_DIR", str(open_dir))
    with pytest.raises(ControlError, match=f"control directory {open_dir} is writable by group/others"):
        control.control_dir()
    assert mode(open_dir) == 0o777
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setenv("IRONSOCKET_RUN_DIR", str(link))
    with pytest.raises(ControlError, match=f"control directory {link} is a symbolic link"):
        control.control_dir()


@needs_root
def test_run_dir_of_another_user_is_refused(monkeypatch, tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    monkeypatch.setenv("IRONSOCKET_RUN_DIR", str(theirs))
    with pytest.raises(ControlError, match=f"control directory {theirs} is owned by uid {NOBODY}"):
        control.control_dir()
    # in a sticky directory, a private subdirectory somebody else made first is refused too
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    planted = shared / f"ironsocket-{os.getuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    monkeypatch.setenv("IRONSOCKET_RUN_DIR", str(shared))
    with pytest.raises(ControlError, match=f"control directory {planted} is owned by uid {NOBODY}"):
        control.control_dir()
