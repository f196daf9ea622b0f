"""Where the control socket goes: `--control-socket PATH` removes only a stale socket. Real
directories, sockets and `ironsocket serve` processes."""

from __future__ import annotations

import socket
import stat
from pathlib import Path


from tests.helpers import assert_refused, serve_outcome
from tests.test_inspect import run_dir  # noqa: F401 - fixture: a short private IRONSOCKET_RUN_DIR


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
