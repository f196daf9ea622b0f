"""What an exec upgrade refuses, cuts or survives, whatever the record layer (issue 12.2–12.4).

Host only (not marked ``ktls``): these are decisions of the upgrade itself — a new program that
cannot bind, a client that never finishes its handshake, a target replaced after its check —
and each costs minutes of emulation in the VM. The record-layer side of an upgrade (kTLS state
carried, verified, rolled back) is tests/test_upgrade.py, which runs in both.
"""

from __future__ import annotations

import re
import shlex
import socket
import sys
import time
from pathlib import Path

from tests.test_upgrade import (  # noqa: F401 - echo_backend and server are fixtures
    TIMEOUT,
    Server,
    admin_get,
    checked_then_different,
    echo_backend,
    echo_once,
    finish,
    flowing_streamer,
    server,
    wait_until,
)


def test_new_program_whose_admin_port_is_taken_rolls_back(tmp_path: Path, echo_backend) -> None:
    """Issue 12.2: a configuration-type failure after exec (the new program's --admin port is
    taken) used to stop the runtime, closing the inherited listener and connections, and the
    previous program then died on them. Now the previous program comes back with everything."""
    taken = socket.create_server(("127.0.0.1", 0))
    server = Server(tmp_path, echo_backend[1], "--admin", "127.0.0.1:0")
    try:
        other_admin = checked_then_different(tmp_path, "other-admin-ironsocket", f"--admin 127.0.0.1:{taken.getsockname()[1]}")
        streamer = flowing_streamer(server, 31)
        result = server.upgrade("--exec", str(other_admin))
        assert result.returncode != 0, result.stdout
        assert "rolled back" in result.stderr and "Address already in use" in result.stderr, result.stderr
        server.wait_for(r"upgrade: restored (\d+) connections")
        before = streamer.verified
        wait_until(lambda: streamer.verified > before, what="stream flowing after the rollback")
        assert admin_get(server) == 200
        assert echo_once(server.port, b"still here") == b"still here"
        finish(streamer)
        assert "is not open" not in server.text()
    finally:
        server.close()
        taken.close()


def test_a_handshake_that_never_finishes_cannot_block_an_upgrade(server: Server) -> None:
    """Issue 12.3: a client that sends one byte and waits used to veto every upgrade (quiesce
    waited 3 s for handshakes, then gave up). Now it is cut, and the upgrade happens."""
    streamer = flowing_streamer(server, 41)
    stalls = []
    for _ in range(2):
        loris = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        loris.sendall(b"\x16")  # the first byte of a ClientHello record, and nothing more
        stalls.append(loris)
    wait_until(lambda: server.text().count("handshake") >= 0 and len(stalls) == 2, what="clients in")
    time.sleep(0.3)  # both accepted: handshakes in flight
    result = server.upgrade()
    assert result.returncode == 0, result.stderr
    assert "upgraded" in result.stdout
    for loris in stalls:
        loris.settimeout(TIMEOUT)
        assert loris.recv(100) == b""  # cut, not held
        loris.close()
    assert len(re.findall(r"handshake cut: not finished when the upgrade began", server.text())) == 2
    before = streamer.verified
    wait_until(lambda: streamer.verified > before, what="stream flowing after the upgrade")
    finish(streamer)


def test_target_replaced_after_its_check_is_not_run(server: Server, tmp_path: Path) -> None:
    """Issue 12.4: a target that passes --upgrade-check and is then replaced (here by a program
    that cannot restore anything) must not be exec'd: the old program keeps serving."""
    target = tmp_path / "replaced-ironsocket"
    broken = "#!/bin/sh\necho 'a different program' >&2\nexit 3\n"
    target.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do [ "$a" = --upgrade-check ] && {{ {sys.executable} -m ironsocket "$@"; rc=$?; '
        f"printf '%s' {shlex.quote(broken)} > \"$0.new\"; chmod +x \"$0.new\"; mv \"$0.new\" \"$0\"; exit $rc; }}; done\n"
        f'exec {sys.executable} -m ironsocket "$@"\n'
    )
    target.chmod(0o755)
    streamer = flowing_streamer(server, 51)
    result = server.upgrade("--exec", str(target))
    assert result.returncode != 0, result.stdout
    assert "changed after its start-up check" in result.stderr, result.stderr
    assert target.read_text() == broken  # it was replaced indeed
    assert admin_get(server) == 200  # paused for the exec that did not happen, answering again
    before = streamer.verified
    wait_until(lambda: streamer.verified > before, what="stream still flowing")
    assert echo_once(server.port, b"still serving") == b"still serving"
    finish(streamer)

