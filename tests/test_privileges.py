"""``serve --user NAME`` (ironsocket/privileges.py, issue 13.9) with the real `ironsocket serve`,
run as root (as the tests are): the process ends up as the user and still serves TLS, across an
exec upgrade too; files the user could not read again at an upgrade are refused at start."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import CERTS, ROOT, assert_refused, serve_outcome
from tests.test_cli import one_line_error, run
from tests.test_lifecycle import CertServer
from tests.test_upgrade import TIMEOUT, echo_backend, echo_once, wait_until  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory nobody can enter (pytest's tmp_path is under a 0700 directory of root's)."""
    path = Path(tempfile.mkdtemp(prefix="is-user-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def nobody_certs(where: Path) -> tuple[Path, Path]:
    cert, key = where / "site.pem", where / "site.key"
    shutil.copy(CERTS / "ecdsa-p256.pem", cert)
    shutil.copy(CERTS / "ecdsa-p256.key", key)
    key.chmod(0o600)
    os.chown(key, NOBODY.pw_uid, NOBODY.pw_gid)  # the user's own key
    return cert, key


def nobody_can_run_python() -> bool:
    return subprocess.run(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
                           "test", "-x", sys.executable], timeout=TIMEOUT).returncode == 0


def status_ids(pid: int, field: str) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError(f"no {field} line")




def test_user_nobody_serves_tls_as_nobody_across_an_upgrade(public_dir: Path, echo_backend) -> None:
    cert, key = nobody_certs(public_dir)
    server = CertServer(public_dir, echo_backend[1], cert, key, "--user", "nobody")
    try:
        pid = server.proc.pid
        server.wait_for(rf"running as user nobody \(uid {NOBODY.pw_uid}, gid {NOBODY.pw_gid}\)")
        assert status_ids(pid, "Uid") == [NOBODY.pw_uid] * 4
        assert status_ids(pid, "Gid") == [NOBODY.pw_gid] * 4
        assert status_ids(pid, "Groups") == []
        assert echo_once(server.port, b"hello as nobody") == b"hello as nobody"
        result = server.upgrade()  # by root, through the control socket; the new program runs as nobody
        if nobody_can_run_python():
            assert result.returncode == 0, result.stdout + result.stderr + server.text()[-3000:]
        else:  # this machine's interpreter is under /root (0700): said at start, refused safely
            server.wait_for(rf"WARNING ironsocket: --user nobody: {re.escape(sys.executable)} is not executable by "
                            "nobody .*upgrades and reloads will be refused")
            assert result.returncode == 2 and "Permission denied" in result.stderr, result.stderr
        assert server.proc.pid == pid and status_ids(pid, "Uid") == [NOBODY.pw_uid] * 4
        assert echo_once(server.port, b"after the upgrade") == b"after the upgrade"
        server.proc.terminate()
        assert server.proc.wait(TIMEOUT) == 0
    finally:
        server.close()
    assert "Traceback" not in server.text()


def test_a_key_only_root_can_read_is_refused_at_start() -> None:
    # The fixture key is root's, mode 0600: an upgrade as nobody could not read it again.
    started, output = serve_outcome("--user", "nobody")
    assert_refused(started, output, "--user nobody", str(CERTS / "ecdsa-p256.key"), "not readable by nobody")


def test_unknown_user_is_refused() -> None:
    started, output = serve_outcome("--user", "no-such-user-here")
    assert_refused(started, output, "--user no-such-user-here: no such user")


def test_user_as_non_root_is_refused(public_dir: Path) -> None:
    cert, key = nobody_certs(public_dir)
    result = run("serve", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--cert", str(cert),
                 "--key", str(key), "--user", "root", env={"IRONSOCKET_RUN_DIR": str(public_dir)},
                 prefix=("setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups"))
    assert result.returncode == 2, result.stderr
    assert "--user root: only root can switch user" in one_line_error(result)


def test_a_ticket_key_file_the_user_may_not_use_is_refused_at_start(public_dir: Path, echo_backend) -> None:
    cert, key = nobody_certs(public_dir)
    keys = public_dir / "tickets.keys"
    keys.write_text(os.urandom(32).hex() + "\n")
    keys.chmod(0o600)  # root's: secretfile's rules refuse it to nobody, so every upgrade would fail
    result = run("serve", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--cert", str(cert), "--key",
                 str(key), "--user", "nobody", "--ticket-key-file", str(keys),
                 env={"IRONSOCKET_RUN_DIR": str(public_dir)})
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert f"--user nobody: as nobody, ticket key file {keys}: Permission denied" in line
    assert "chown it to nobody" in line
    os.chown(keys, NOBODY.pw_uid, NOBODY.pw_gid)
    server = CertServer(public_dir, echo_backend[1], cert, key, "--user", "nobody", "--ticket-key-file", str(keys))
    try:
        assert echo_once(server.port, b"with shared ticket keys") == b"with shared ticket keys"
    finally:
        server.close()


def test_with_workers_each_worker_drops_to_the_user(public_dir: Path, echo_backend) -> None:
    from ironsocket import control
    from tests.test_workers import free_port, wait_until, worker_sockets

    cert, key = nobody_certs(public_dir)
    log = public_dir / "serve.log"
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ironsocket", "serve", "--workers", "2", "--listen",
                                 f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{echo_backend[1]}", "--cert", str(cert),
                                 "--key", str(key), "--user", "nobody"], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT,
                                env=os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_RUN_DIR": str(public_dir)})
    try:
        wait_until(lambda: log.read_text().count("running as user nobody") == 2, what="two workers as nobody")
        pids = {control.request(p, {"command": "ping"})["pid"] for p in worker_sockets(public_dir)}
        assert len(pids) == 2 and all(status_ids(pid, "Uid") == [NOBODY.pw_uid] * 4 for pid in pids)
        assert status_ids(proc.pid, "Uid") == [0] * 4  # the supervisor: no listener (a control socket), stays root
        assert echo_once(port, b"through a worker") == b"through a worker"
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "Traceback" not in log.read_text()


def test_keylog_made_by_root_is_the_users(public_dir: Path, echo_backend) -> None:
    """--keylog with --user: the file root creates is the user's (the pre-flight refused it,
    owned by root, and an upgrade running as the user could not have opened it again)."""
    cert, key = nobody_certs(public_dir)
    keylog = public_dir / "keys.log"
    server = CertServer(public_dir, echo_backend[1], cert, key, "--user", "nobody", "--keylog", str(keylog))
    try:
        server.wait_for(r"running as user nobody")
        st = keylog.stat()
        assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid) and st.st_mode & 0o777 == 0o600
        assert echo_once(server.port, b"logged") == b"logged"
        wait_until(lambda: "CLIENT_TRAFFIC_SECRET_0" in keylog.read_text(), what="the keylog line")
    finally:
        server.close()


def test_workers_as_the_user_still_die_with_their_supervisor(public_dir: Path, echo_backend) -> None:
    """The kernel clears PR_SET_PDEATHSIG when the credentials change: a worker sets it again
    after dropping to the user (ironsocket/lifeline.py), so a SIGKILLed supervisor still takes
    its workers with it."""
    from tests.test_workers import (free_port, kill_leftovers, kill_supervisor_expect_workers_gone, wait_until,
                                    worker_pids)

    cert, key = nobody_certs(public_dir)
    log = public_dir / "serve.log"
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ironsocket", "serve", "--workers", "2", "--listen",
                                 f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{echo_backend[1]}", "--cert", str(cert),
                                 "--key", str(key), "--user", "nobody", "--drain-timeout", "1"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_RUN_DIR": str(public_dir)})
    pids: set[int] = set()
    try:
        wait_until(lambda: log.read_text().count("running as user nobody") == 2, what="two workers as nobody")
        pids = set(worker_pids(log.read_text()).values())
        assert len(pids) == 2 and all(status_ids(pid, "Uid") == [NOBODY.pw_uid] * 4 for pid in pids)
        kill_supervisor_expect_workers_gone(proc, pids, port)
    finally:
        kill_leftovers(proc, pids)
    assert "Traceback" not in log.read_text()
