"""ironsocket.bridge: a fork of the old program relays while the new one loads.

The message layer (fds with their descriptions) in-process; the bridge itself with the real
server (`python -m ironsocket serve`), real TLS clients and real exec (tests/test_upgrade.py's
`Server` and `Streamer`). Host only: the record layer does not matter to the bridge, and the
kTLS suite's upgrade tests (tests/test_upgrade.py, in the VM) go through it as well.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from ironsocket import bridge, upgrade
from ironsocket.server import ProxyConfig, ProxyServer
from ironsocket.tls13.server import ServerConfig

from .helpers import store

from .test_upgrade import TIMEOUT, Server, Streamer, echo_once, finish, flowing_streamer, wait_until

# -- the messages -----------------------------------------------------------------------------------
def test_frames_carry_fds_close_on_exec() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        big = {"connections": [{"n": i, "pad": "x" * 1000} for i in range(500)]}  # > one socket buffer
        import threading

        sender = threading.Thread(target=bridge.send_frame, args=(a, big, [r, w]))
        sender.start()
        message, fds = bridge.recv_frame(b)
        sender.join(TIMEOUT)
        assert message == big and len(fds) == 2
        # Received fds are close-on-exec like every fd of ours (an upgrade names the ones it
        # passes on): without it the next exec leaked a copy of every connection.
        assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds)
        os.write(fds[1], b"through the copy")
        assert os.read(r, 100) == b"through the copy"
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_a_closed_peer_is_an_error_not_a_hang() -> None:
    a, b = socket.socketpair()
    b.settimeout(TIMEOUT)
    a.sendall(b"\0\0")  # half a header, then EOF
    a.close()
    with pytest.raises(bridge.BridgeError, match="closed"):
        bridge.recv_frame(b)
    b.close()


def test_a_batch_names_the_receivers_fds_and_a_malformed_one_closes_them() -> None:
    """A batch (what the bridge sends, `handover.ConnectionEntry` + its listener) arrives naming
    the receiver's fds; a malformed one is one error, and the fds that came with it are closed
    (nothing leaks). The entries' own rules: tests/test_handover.py."""
    import threading

    from tests.test_handover import ktls_conn

    ours, theirs = socket.socketpair()
    client = bridge.BridgeClient(theirs.detach(), os.getpid())
    carried = [socket.socketpair() for _ in range(2)]
    r, w = os.pipe()
    sent_fds = [carried[0][0].fileno(), carried[1][0].fileno(), r, w]
    try:
        def answer(item: dict) -> None:
            bridge.recv_frame(ours)  # the "take" request
            bridge.send_frame(ours, {"connections": [item], "left": 0, "paused_at": 1.5}, sent_fds)

        good = {**ktls_conn(3, (7, 8, 9, 10)).to_dict(), "listener": 1}
        t = threading.Thread(target=answer, args=(good,))
        t.start()
        [(listener, entry)], paused_at = client.take()
        t.join(TIMEOUT)
        assert (listener, entry.id, paused_at) == (1, 3, 1.5)
        assert entry.fds != [7, 8, 9, 10] and len(entry.fds) == 4
        assert os.fstat(entry.c2b.pipe[0]).st_ino == os.fstat(r).st_ino  # our copy of the sender's pipe
        for fd in entry.fds:
            os.close(fd)
        for bad, message in (({**good, "suite": "TLS_NOPE"}, "is not a TLS 1.3 cipher suite"),
                             ({k: v for k, v in good.items() if k != "listener"}, "no listener index")):
            t = threading.Thread(target=answer, args=(bad,))
            t.start()
            before = len(os.listdir("/proc/self/fd"))
            with pytest.raises(bridge.BridgeError, match=f"malformed batch: .*{message}"):
                client.take()
            t.join(TIMEOUT)
            assert len(os.listdir("/proc/self/fd")) == before  # the 4 received fds were closed
    finally:
        ours.close()
        client.sock.close()
        for a, b in carried:
            a.close()
            b.close()
        os.close(r)
        os.close(w)


# -- with the real server ----------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path, echo_backend) -> Server:
    srv = Server(tmp_path, echo_backend[1])
    yield srv
    srv.close()
    print("--- server log (tail) ---\n" + "\n".join(srv.text().splitlines()[-60:]))
    assert "Traceback" not in srv.text()


def slow_program(tmp_path: Path, *, delay: float, then: str = "") -> Path:
    """A new program that passes the pre-flight check, and once exec'd sleeps ``delay`` seconds
    before it starts (``then``: shell run instead of starting, after the sleep)."""
    prog = tmp_path / "slow-ironsocket"
    run = then or f'exec {sys.executable} -m ironsocket "$@"'
    prog.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do [ "$a" = --upgrade-check ] && exec {sys.executable} -m ironsocket "$@"; done\n'
        f"sleep {delay}\n{run}\n"
    )
    prog.chmod(0o755)
    return prog


def bridge_pid(server: Server, count: int = 1) -> int:
    return int(server.wait_for(r"relayed by the bridge \(pid (\d+)\)", count=count).group(1))


def test_bytes_move_while_the_new_program_loads(server: Server, tmp_path: Path) -> None:
    """The new program sleeps before it even starts Python: the connections keep streaming
    through the bridge meanwhile (before the bridge, they all waited for the new program)."""
    streamers = [flowing_streamer(server, i) for i in range(4)]
    prog = slow_program(tmp_path, delay=3)
    import threading

    result: list = []
    upgrading = threading.Thread(target=lambda: result.append(server.upgrade("--exec", str(prog))))
    upgrading.start()
    pid = bridge_pid(server)
    assert os.path.exists(f"/proc/{pid}")
    progress = [s.verified for s in streamers]
    wait_until(lambda: all(s.verified > p for s, p in zip(streamers, progress)), what="streams moving in the bridge")
    assert "upgrade: restored" not in server.text()  # the new program has not taken them yet
    upgrading.join(TIMEOUT + 20)
    assert result and result[0].returncode == 0, result[0].stderr if result else "no result"
    assert "restored 4 connections" in result[0].stdout
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="the bridge reaped once drained")
    progress = [s.verified for s in streamers]
    wait_until(lambda: all(s.verified > p for s, p in zip(streamers, progress)), what="streams moving in the new program")
    for s in streamers:
        finish(s)


def test_connections_outlive_a_new_program_that_dies_before_taking_them(server: Server, tmp_path: Path) -> None:
    """The new program passes its check and then exits at once (it never asks the bridge): the
    server's PID is gone, but the bridge keeps every connection moving until it ends."""
    streamer = flowing_streamer(server, 21)
    prog = slow_program(tmp_path, delay=0, then="exit 3")
    server.upgrade("--exec", str(prog))  # the requester sees the connection closed: no answer
    pid = bridge_pid(server)
    try:
        server.proc.wait(TIMEOUT)
        assert server.proc.returncode == 3
        before = streamer.verified
        wait_until(lambda: streamer.verified > before, what="stream moving in the orphaned bridge")
        server.wait_for(r"the new program is gone .*1 connections continue here until they end")
        finish(streamer)  # a clean end: every byte back, close_notify both ways
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), what="the bridge exits when its connections have")
    finally:
        if os.path.exists(f"/proc/{pid}") and not _zombie(pid):
            os.kill(pid, signal.SIGKILL)  # ours: forked by the server this test started


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def test_pause_is_per_batch_not_per_connection(server: Server) -> None:
    """The reported pause is the longest a connection waited for its own hand-over (or the
    fork); the log says how many were carried. A printed number, not a timed assertion."""
    streamers = [flowing_streamer(server, 40 + i) for i in range(8)]
    result = server.upgrade()
    assert result.returncode == 0, result.stderr
    m = re.search(r"restored (\d+) connections .*pause ([\d.]+) ms", result.stdout)
    assert m and int(m.group(1)) == 8, result.stdout
    print(f"\npause with 8 connections: {m.group(2)} ms")
    # The new program says where the longest batch's wait went, and that no garbage collection
    # ran during the hand-over (one inside a batch was most of its wait: ironsocket/heap.py).
    line = server.wait_for(r"8 connections taken from the bridge .* (\d+) garbage collections meanwhile; "
                           r"longest wait for a batch [\d.]+ ms \(release [\d.]+ ms, describe [\d.]+ ms, "
                           r"transit [\d.]+ ms, rebuild [\d.]+ ms\)")
    assert line.group(1) == "0", line.group(0)
    assert echo_once(server.port, b"after") == b"after"
    time.sleep(0.1)
    for s in streamers:
        finish(s)


def test_an_exec_that_fails_after_the_fork_takes_the_connections_back(echo_backend, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """execve failing after its target passed the check cannot be made to happen from outside
    (the target's identity is checked just before), so here, in-process, os.execve is replaced
    by one that fails — the only mock. The server's own relays are stale copies by then: it must
    take the connections back from the bridge, and every byte must still arrive once, in order."""
    target = tmp_path / "target"
    target.write_text(f"#!/bin/sh\necho 'upgrade-check: ok, reads state {upgrade.STATE_FORMAT} v{upgrade.STATE_VERSION}'\n")
    target.chmod(0o755)
    server = ProxyServer(ProxyConfig(listen=("127.0.0.1", 0), backend=echo_backend,
                                     tls=ServerConfig(certificates=store("ecdsa-p256"))))
    server.start()
    streamers: list[Streamer] = []
    try:
        streamers = [Streamer(server.address[1], 60 + i) for i in range(3)]
        for s in streamers:
            s.start()
            assert s.connected.wait(TIMEOUT)
        wait_until(lambda: all(s.verified > 0 for s in streamers), what="streams flowing")
        fds_before = len(os.listdir("/proc/self/fd"))

        def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
            raise OSError(8, "Exec format error (simulated)")

        caplog.set_level(logging.INFO, logger="ironsocket.upgrade")
        monkeypatch.setattr(os, "execve", execve)
        with pytest.raises(upgrade.UpgradeError, match="exec failed"):
            upgrade.perform([server], [str(target)])
        monkeypatch.undo()
        assert len(server.live_connections()) == 3  # the same three, taken back (no exec: none 'carried')
        progress = [s.verified for s in streamers]
        wait_until(lambda: all(s.verified > p for s, p in zip(streamers, progress)), what="streams flowing again")
        for s in streamers:
            finish(s)
        # the bridge exited and was reaped; no copy of a connection is left behind
        pid = int(re.search(r"bridge \(pid (\d+)\)", caplog.text).group(1))
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before, what="fds back (no stale copy kept)")
    finally:
        for s in streamers:
            s.stop.set()
        server.stop()
