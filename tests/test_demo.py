"""The built-in demo backend (ironsocket/demo.py, issue 13.6): its connections are carried across
an exec upgrade and a rollback like the proxy's own. Real `ironsocket serve` in demo mode (no
--cert, no --backend), a real CPython ssl client on one kept-alive connection, real execs."""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT
from tests.test_upgrade import TIMEOUT, failing_program


def upgrade(control: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ironsocket", "upgrade", "--socket", str(control), "--timeout",
                           str(TIMEOUT), *args], capture_output=True, text=True, timeout=TIMEOUT + 10,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})


class KeptAlive:
    """One TLS connection to the demo, HTTP/1.1 requests one after another on it."""

    def __init__(self, port: int) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.tls = ctx.wrap_socket(raw, server_hostname="localhost")
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.tls.sendall(data)

    def response(self) -> tuple[bytes, bytes]:
        """(head, body) of the next response (its Content-Length read exactly)."""
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        found = re.search(rb"\r\nContent-Length: (\d+)", head)
        assert found, head
        length = int(found.group(1))
        while len(self.buffer) < length:
            self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return head, body

    def _more(self) -> None:
        chunk = self.tls.recv(65536)
        assert chunk, f"the connection was closed (had {self.buffer!r})"
        self.buffer += chunk

    def close(self) -> None:
        self.tls.close()


REQUEST = b"GET /page HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n"


def test_a_kept_alive_demo_connection_survives_upgrades_and_rollbacks(tmp_path: Path, start_proxy) -> None:
    """The demo backend's side of a connection used to live in a thread of the old program:
    an upgrade said "1 connections carried" and then cut it. Now its loop's state goes into the
    hand-over document. A request split across each exec (half before, half after: the first
    half is in the demo's buffer or the kernel's when the program changes) is answered exactly
    as before, on the same connection: after an upgrade, and after new programs that fail
    before and after they move bytes (rolled back)."""
    control = tmp_path / "ctl.sock"
    proxy = start_proxy("--control-socket", str(control), certs=(), backend=None)
    client = KeptAlive(proxy.port)
    try:
        client.send(REQUEST)
        head, first = client.response()
        assert head.startswith(b"HTTP/1.1 200 OK") and b"connection id: 1\n" in first, (head, first)
        step_file = tmp_path / "fail-at"
        prog = failing_program(tmp_path, step_file)
        split = len(REQUEST) // 2
        for step in ("upgrade", "proxy", "relay", "upgrade"):
            client.send(REQUEST[:split])
            if step == "upgrade":
                result = upgrade(control)
                assert result.returncode == 0, result.stdout + result.stderr + proxy.output[-3000:]
            else:  # the new program fails after this start-up step: the previous one comes back
                step_file.write_text(step)
                result = upgrade(control, "--exec", str(prog))
                assert result.returncode != 0 and "rolled back" in result.stderr, result.stdout + result.stderr
            # (`ironsocket upgrade` answers once the restore is done, here or in the rolled-back program)
            client.send(REQUEST[split:])
            head, body = client.response()
            assert head.startswith(b"HTTP/1.1 200 OK"), (step, head)
            assert body == first, f"after {step}: {body!r}"
            client.send(REQUEST + REQUEST)  # pipelined, after the exec
            assert client.response()[1] == first and client.response()[1] == first
        client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\nConnection: close\r\n\r\n")
        assert client.response()[1] == first
        assert client.tls.recv(10) == b""  # closed as asked
    finally:
        client.close()
    assert "built-in demo backend carried with 1 connections" in proxy.output
    assert "Traceback" not in proxy.output
