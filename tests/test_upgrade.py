"""The exec upgrade with real clients, a real backend and the real `ironsocket serve` process.

Marked ``ktls``: on the host the connections are in userspace mode (secrets carried in the
state document), in the VM they are kTLS sockets (the kernel carries the keys; the restore
checks them by read-back). Fewer connections/upgrades in the emulated VM, same assertions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ironsocket import ktls
from ironsocket.relay import PIPE_POOL_KEEP
from tests.helpers import CERTS, ROOT, client_context
from tests import helpers

pytestmark = pytest.mark.ktls

IN_VM = ktls.probe().available
CONNECTIONS = 12 if IN_VM else 50
UPGRADES = 2 if IN_VM else 10  # an upgrade costs ~2 min under emulation (its pre-flight check imports everything)
TIMEOUT = 300.0 if IN_VM else 30.0
# Between two round trips a streamer waits this long. Under emulation the guest has the CPU of a
# slow single core: 12 streamers at the host's pace kept it saturated, an upgrade's pre-flight
# check and start-up then took over 300 s, and the VM's kTLS suite outgrew its time budget.
STREAM_PAUSE = 0.25 if IN_VM else 0.005


def pattern(conn: int, offset: int, size: int) -> bytes:
    """Deterministic bytes for connection ``conn`` at stream ``offset``."""
    out = bytearray()
    block = offset // 32
    skip = offset % 32
    while len(out) < size + skip:
        out += hashlib.sha256(f"{conn}:{block}".encode()).digest()
        block += 1
    return bytes(out[skip : skip + size])


class Streamer(threading.Thread):
    """One TLS connection through the proxy to the echo backend, verifying every echoed byte."""

    def __init__(self, port: int, index: int) -> None:
        super().__init__(name=f"streamer-{index}", daemon=True)
        self.port, self.index = port, index
        self.sent = 0
        self.verified = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.max_gap = 0.0

    def run(self) -> None:
        rnd = random.Random(self.index)
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
            with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
                self.connected.set()
                while not self.stop.is_set():
                    size = rnd.randint(1, 20_000)
                    data = pattern(self.index, self.sent, size)
                    start = time.monotonic()
                    tls.sendall(data)
                    self.sent += size
                    got = bytearray()
                    while len(got) < size:
                        chunk = tls.recv(size - len(got))
                        if not chunk:
                            raise ConnectionError(f"EOF after {self.verified + len(got)} bytes")
                        got += chunk
                    if bytes(got) != data:
                        raise AssertionError(f"connection {self.index}: mismatch at offset {self.verified}")
                    self.verified += size
                    self.max_gap = max(self.max_gap, time.monotonic() - start)
                    time.sleep(STREAM_PAUSE)
                tls.unwrap()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.connected.set()


class Server:
    """`python -m ironsocket serve` as a subprocess, with its control socket and log."""

    def __init__(self, tmp: Path, backend_port: int, *extra: str) -> None:
        self.log_path = tmp / "serve.log"
        self.control = tmp / "ctl.sock"
        self.log = self.log_path.open("w")
        env = os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_RUN_DIR": str(tmp)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0",
             "--backend", f"127.0.0.1:{backend_port}", "--cert", str(CERTS / "ecdsa-p256.pem"),
             "--key", str(CERTS / "ecdsa-p256.key"), "--control-socket", str(self.control), *extra],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.port = int(self.wait_for(r"serving TLS 1\.3 on [\d.]+:(\d+)").group(1))

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, regex: str, count: int = 1) -> re.Match[str]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            matches = list(re.finditer(regex, self.text()))
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"server log never showed {regex!r}:\n{self.text()[-3000:]}")

    def fds(self) -> int:
        """The server's open fds but pipes (sockets, files, epoll...): these must match exactly."""
        return len(self._fds()) - self.pipe_fds()

    def pipe_fds(self) -> int:
        """Splice pipes come from a pool (relay.PipePool) whose size follows the traffic."""
        return sum(1 for target in self._fds() if target.startswith("pipe:"))

    def _fds(self) -> list[str]:
        out = []
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{self.proc.pid}/fd/{fd}"))
            except OSError:
                pass  # closed meanwhile
        return out

    def upgrade(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([sys.executable, "-m", "ironsocket", "upgrade", "--socket", str(self.control),
                                   "--timeout", str(TIMEOUT), *args], capture_output=True, text=True,
                                  timeout=TIMEOUT + 10, env=os.environ | {"PYTHONPATH": str(ROOT)})
        except subprocess.TimeoutExpired:
            raise AssertionError(f"upgrade did not answer; server log:\n{self.text()[-4000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def server(tmp_path: Path, echo_backend) -> Iterator[Server]:
    srv = Server(tmp_path, echo_backend[1], "--admin", "127.0.0.1:0")
    yield srv
    srv.close()
    print("--- server log (tail) ---\n" + "\n".join(srv.text().splitlines()[-80:]))  # shown on failure
    # Stopping with connections still streaming (a close_notify from the stopping thread while a
    # loop runs that connection's step) once logged "pump crashed" with a traceback.
    assert "Traceback" not in srv.text()


@pytest.fixture(scope="module")
def echo_backend() -> Iterator[tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "echo_backend.py")], stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    host, port = proc.stdout.readline().rsplit(" ", 1)[-1].strip().rsplit(":", 1)
    yield host, int(port)
    proc.terminate()
    proc.wait(5)
    proc.stdout.close()


wait_until = functools.partial(helpers.wait_until, timeout=TIMEOUT)


def echo_once(port: int, payload: bytes) -> bytes:
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            chunk = tls.recv(65536)
            if not chunk:
                break
            got += chunk
        tls.unwrap()
        return bytes(got)


class HalfHandshake:
    """A client that has sent its ClientHello and holds its Finished: an in-flight handshake."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context().wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        self.sock.sendall(self.outgoing.read())
        while True:  # read the server flight, complete on our side, keep the Finished
            self.incoming.write(self.sock.recv(65536))
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                continue
        self.finished = self.outgoing.read()

    def finish_and_echo(self, payload: bytes) -> bytes:
        self.tls.write(payload)
        self.sock.sendall(self.finished + self.outgoing.read())
        got = bytearray()
        while len(got) < len(payload):
            try:
                got += self.tls.read(65536)
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.incoming.write(data)
        self.sock.close()
        return bytes(got)


def test_upgrades_under_load_lose_nothing(server: Server) -> None:
    pid = server.proc.pid
    idle_fds = server.fds()
    streamers = [Streamer(server.port, i) for i in range(CONNECTIONS)]
    for s in streamers:
        s.start()
    for s in streamers:
        assert s.connected.wait(TIMEOUT)
        assert s.error is None, s.error
    wait_until(lambda: all(s.verified > 0 for s in streamers), what="every stream flowing")
    busy_fds = server.fds()

    for n in range(1, UPGRADES + 1):
        half = HalfHandshake(server.port)  # a handshake in progress when the upgrade starts
        newcomers: list[bytes] = []
        result: list[subprocess.CompletedProcess[str]] = []
        def upgrade_in_background() -> None:
            try:
                result.append(server.upgrade())
            except AssertionError as exc:
                failures.append(exc)

        failures: list[AssertionError] = []
        trigger = threading.Thread(target=upgrade_in_background)
        trigger.start()
        time.sleep(0.2)
        assert half.finish_and_echo(b"in-flight handshake %d" % n) == b"in-flight handshake %d" % n
        # A client connecting while the upgrade runs waits in the backlog and is served after.
        newcomers.append(echo_once(server.port, b"newcomer %d" % n))
        trigger.join(TIMEOUT + 20)
        assert not failures, failures[0]
        assert result and result[0].returncode == 0, (result[0].stdout + result[0].stderr) if result else "no result"
        assert "upgraded" in result[0].stdout
        assert newcomers == [b"newcomer %d" % n]
        server.wait_for(r"upgrade: restored (\d+) connections", count=n)
        assert server.proc.pid == pid and server.proc.poll() is None
        for s in streamers:
            assert s.error is None, f"stream {s.index}: {s.error!r}"
        progress = [s.verified for s in streamers]
        wait_until(lambda: all(s.verified > p for s, p in zip(streamers, progress)), what="streams flowing after upgrade")
        # No fd leaks: the same connections hold the same number of fds after every upgrade.
        try:
            wait_until(lambda: server.fds() == busy_fds, timeout=10, what=f"fd count back to {busy_fds}")
        except AssertionError:
            import collections
            raise AssertionError(f"fds {busy_fds} -> {server.fds()}: {collections.Counter(t.split(':')[0] for t in server._fds())}")

    for s in streamers:
        s.stop.set()
    for s in streamers:
        s.join(TIMEOUT)
        assert s.error is None, f"stream {s.index}: {s.error!r}"
        assert s.verified == s.sent > 0
    wait_until(lambda: server.fds() == idle_fds, timeout=20, what=f"idle fd count back to {idle_fds}")
    # Idle, no pump holds a pipe: what is left is the pool (the exec closed the previous one's)
    # and the wake-up pipes of the relay loops.
    assert server.pipe_fds() <= 2 * PIPE_POOL_KEEP + 16, server.pipe_fds()
    pauses = [float(m) for m in re.findall(r"upgrade: resumed after ([\d.]+) ms", server.text())]
    assert len(pauses) == UPGRADES
    print(f"\n{CONNECTIONS} connections, {UPGRADES} upgrades, pauses (ms): {pauses}, "
          f"largest client stall: {max(s.max_gap for s in streamers) * 1000:.0f} ms")


def flowing_streamer(server: Server, index: int) -> Streamer:
    """A started Streamer whose first echoes have been verified."""
    streamer = Streamer(server.port, index)
    streamer.start()
    assert streamer.connected.wait(TIMEOUT)
    wait_until(lambda: streamer.verified > 0, what="stream flowing")
    return streamer


def finish(streamer: Streamer) -> None:
    """Stop a Streamer; every byte it sent came back, without an error."""
    streamer.stop.set()
    streamer.join(TIMEOUT)
    assert streamer.error is None and streamer.verified == streamer.sent


def test_upgrade_to_a_broken_program_keeps_serving(server: Server, tmp_path: Path) -> None:
    broken = tmp_path / "broken-ironsocket"
    broken.write_text("#!/bin/sh\necho 'ImportError: cannot import name tls13 (simulated broken release)' >&2\nexit 1\n")
    broken.chmod(0o755)
    streamer = flowing_streamer(server, 7)
    result = server.upgrade("--exec", str(broken))
    assert result.returncode != 0
    assert "start-up check" in result.stderr and "simulated broken release" in result.stderr
    assert "Traceback" not in result.stderr
    before = streamer.verified
    wait_until(lambda: streamer.verified > before, what="stream still flowing")
    assert echo_once(server.port, b"still serving") == b"still serving"
    finish(streamer)


def checked_then_different(tmp_path: Path, name: str, extra_args: str) -> Path:
    """A new program that passes the pre-flight check as the real one, and once exec'd runs
    with ``extra_args`` added (what makes its restore fail)."""
    prog = tmp_path / name
    prog.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do [ "$a" = --upgrade-check ] && exec {sys.executable} -m ironsocket "$@"; done\n'
        f'exec {sys.executable} -m ironsocket "$@" {extra_args}\n'
    )
    prog.chmod(0o755)
    return prog


def test_restore_failure_after_exec_rolls_back(server: Server, tmp_path: Path) -> None:
    """A new program that passes the check but cannot restore (here: its certificate vanished)
    execs the previous program back; the connections survive and the caller learns why."""
    lying = checked_then_different(tmp_path, "lying-ironsocket", "--cert /nonexistent/cert.pem --key /nonexistent/key.pem")
    streamer = flowing_streamer(server, 11)
    result = server.upgrade("--exec", str(lying))
    assert result.returncode != 0, result.stdout
    assert "rolled back" in result.stderr and "nonexistent" in result.stderr
    server.wait_for(r"upgrade: restored (\d+) connections")
    before = streamer.verified
    wait_until(lambda: streamer.verified > before, what="stream flowing after rollback")
    assert echo_once(server.port, b"after rollback") == b"after rollback"
    finish(streamer)


def inspect(server: Server, *args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "ironsocket", "inspect-keys", "--socket", str(server.control), "--json",
                          *args], capture_output=True, text=True, timeout=TIMEOUT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["connections"]


def test_inspect_keys_view_continues_across_upgrade(tmp_path: Path, echo_backend) -> None:
    """inspect-keys before and after an upgrade: same connection id, same key fingerprints, and
    sequence numbers that continue exactly with the records the client sent and received; the
    debug state dump (0600) decodes to the same view."""
    from tests.test_proxy import RecordClient

    dump = tmp_path / "state.json"
    server = Server(tmp_path, echo_backend[1], "--upgrade-state-dump", str(dump))
    try:
        client = RecordClient(("127.0.0.1", server.port))
        client.handshake()
        for i in range(5):
            client.send(b"before %d" % i)
            assert client.recv_exact(8) == b"before %d" % i
        wait_until(lambda: len(inspect(server)) == 1 and inspect(server)[0]["tx"]["rec_seq"] == client.records_received,
                   what="the echoes counted")
        (before,) = inspect(server)
        assert (before["tx"]["rec_seq"], before["rx"]["rec_seq"]) == (client.records_received, client.records_sent)

        result = server.upgrade()
        assert result.returncode == 0, result.stderr
        (after,) = inspect(server)
        assert after["id"] == before["id"]
        assert after["tx"]["fingerprint"] == before["tx"]["fingerprint"]
        assert after["rx"]["fingerprint"] == before["rx"]["fingerprint"]
        # Nothing may be sent on the connection across the upgrade. (A TX one record ahead was
        # once the close_notify for a backend that had closed the idle connection: issue 11.)
        assert (after["tx"]["rec_seq"], after["rx"]["rec_seq"]) == (before["tx"]["rec_seq"], before["rx"]["rec_seq"]), \
            server.text()[-3000:]

        for i in range(3):
            client.send(b"after %d" % i)
            assert client.recv_exact(7) == b"after %d" % i
        wait_until(lambda: inspect(server)[0]["tx"]["rec_seq"] == client.records_received, what="the new echoes counted")
        (later,) = inspect(server)
        assert (later["tx"]["rec_seq"], later["rx"]["rec_seq"]) == (client.records_received, client.records_sent)

        assert oct(dump.stat().st_mode & 0o777) == "0o600"
        out = subprocess.run([sys.executable, "-m", "ironsocket", "inspect-keys", "--state", str(dump), "--json"],
                             capture_output=True, text=True, timeout=TIMEOUT, env=os.environ | {"PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr
        (saved,) = json.loads(out.stdout)["connections"]
        assert saved["tx"]["fingerprint"] == before["tx"]["fingerprint"]
        assert (saved["tx"]["rec_seq"], saved["rx"]["rec_seq"]) == (before["tx"]["rec_seq"], before["rx"]["rec_seq"])
        assert saved["client"] == before["client"]
        client.close_notify()
        client.close()
    finally:
        server.close()


# -- issue 12: a failed upgrade never reuses a nonce, never loses a connection ---------------------
def failing_program(tmp_path: Path, step_file: Path) -> Path:
    """A new program that passes the pre-flight check and, once exec'd with the state, fails
    right after the start-up step named in ``step_file`` (`runtime.STARTUP_STEPS`). A test seam
    on the outside of the product: it wraps the real program and patches one step method."""
    prog = tmp_path / "failing-ironsocket"
    prog.write_text(f"""#!{sys.executable}
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
step = open({str(step_file)!r}).read().strip()
if os.environ.get("IRONSOCKET_UPGRADE_STATE_FD"):
    from ironsocket import runtime
    real = getattr(runtime.Runtime, "_start_" + step)
    def fail_after(self, doc):
        real(self, doc)
        time.sleep(0.5)  # after "relay" the connections move bytes in this program meanwhile
        raise RuntimeError("injected failure after start-up step " + step)
    setattr(runtime.Runtime, "_start_" + step, fail_after)
from ironsocket.cli import main
sys.argv[0] = "ironsocket"
main()
""")
    prog.chmod(0o755)
    return prog


def admin_get(server: Server, path: str = "/healthz") -> int:
    import urllib.request

    port = int(server.wait_for(r"admin endpoint on http://127\.0\.0\.1:(\d+)/").group(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT) as resp:
        return resp.status


def test_failure_at_every_startup_step_rolls_back_with_the_current_state(tmp_path: Path, echo_backend) -> None:
    """The new program fails after each start-up step in turn ("relay" and later: after it has
    moved bytes). Every time the previous program comes back with the state *as it is then*:
    the streams stay byte-exact, and the server's sequence numbers match exactly the records a
    real client counted on the wire (a rewound document would send seq N twice: the client would
    fail with bad_record_mac, and the counts would differ)."""
    from ironsocket.runtime import STARTUP_STEPS
    from tests.test_proxy import RecordClient

    server = Server(tmp_path, echo_backend[1], "--admin", "127.0.0.1:0")
    try:
        pid, steps = server.proc.pid, [s for s in STARTUP_STEPS if s not in ("demo", "confirm")]
        assert steps == ["proxy", "admin", "control", "relay"]  # a new step needs a look here
        if IN_VM:  # each failed upgrade costs minutes under emulation: the first and the last
            steps = ["proxy", "relay"]
        step_file = tmp_path / "fail-at"
        prog = failing_program(tmp_path, step_file)
        streamers = [flowing_streamer(server, 20 + i) for i in range(3)]
        counted = RecordClient(("127.0.0.1", server.port))
        counted.handshake()
        fds = None
        for n, step in enumerate(steps, 1):
            step_file.write_text(step)
            for i in range(3):
                counted.send(b"ping %s %d" % (step.encode(), i))
                assert counted.recv_exact(len(step) + 7) == b"ping %s %d" % (step.encode(), i)
            fds = fds or server.fds()
            result = server.upgrade("--exec", str(prog))
            assert result.returncode != 0, result.stdout
            assert "rolled back" in result.stderr and f"injected failure after start-up step {step}" in result.stderr, result.stderr
            server.wait_for(r"upgrade: restored (\d+) connections", count=n)
            assert server.proc.pid == pid and server.proc.poll() is None
            for s in streamers:
                assert s.error is None, f"after a failure at {step}: stream {s.index}: {s.error!r}"
            progress = [s.verified for s in streamers]
            wait_until(lambda: all(s.verified > p for s, p in zip(streamers, progress)), what=f"streams after {step}")
            for i in range(3):
                counted.send(b"pong %s %d" % (step.encode(), i))
                assert counted.recv_exact(len(step) + 7) == b"pong %s %d" % (step.encode(), i)
            if not IN_VM or step == steps[-1]:  # (inspect-keys is a Python start: slow in the VM)
                mine = [c for c in inspect(server) if c["client"] == "127.0.0.1:%d" % counted.sock.getsockname()[1]]
                assert [(c["tx"]["rec_seq"], c["rx"]["rec_seq"]) for c in mine] == \
                    [(counted.records_received, counted.records_sent)]
            assert admin_get(server) == 200  # the admin listener came back too
            assert echo_once(server.port, b"new after %s" % step.encode()) == b"new after %s" % step.encode()
            wait_until(lambda: server.fds() == fds, timeout=10, what=f"fd count back to {fds} after {step}")
        for s in streamers:
            finish(s)
        counted.close_notify()
        counted.sock.close()
        assert "Traceback" not in server.text()
    finally:
        server.close()


MANY = 600  # 1,200 fds in the server: the bridge's and the new program's own sockets land above 1024


def test_upgrade_with_fds_above_1024_loses_nothing(nofile_hard: int, tmp_path: Path, echo_backend) -> None:
    """With more than 1,024 fds open, the bridge's socket pair got a number select() cannot
    take: the bridge crashed at its first wait and every connection it held was lost (found at
    10,000 connections by tools/bench/upgrade_stall.py). The control socket of the new program
    had the same wait. Both wait with poll() now."""
    from concurrent.futures import ThreadPoolExecutor

    ctx = client_context()

    def connect(i: int) -> ssl.SSLSocket:
        tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT),
                              server_hostname="localhost")
        try:
            tls.sendall(b"%d before" % i)
            assert tls.recv(64) == b"%d before" % i
        except BaseException:
            tls.close()
            raise
        return tls

    if nofile_hard < 3 * MANY + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {nofile_hard} is too low for {MANY} connections")
    # No idle timeout: under emulation 600 handshakes and two upgrades take longer than its 300 s.
    server = Server(tmp_path, echo_backend[1], "--idle-timeout", "0")
    conns: list[ssl.SSLSocket] = []
    try:
        # The first failed connection ends the test: the rest are cancelled rather than each
        # waiting out its own timeout (600 of them, 16 at a time, outlast any CI budget).
        pool = ThreadPoolExecutor(16)
        futures = [pool.submit(connect, i) for i in range(MANY)]
        try:
            for future in futures:
                conns.append(future.result(timeout=TIMEOUT))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for future in futures[len(conns):]:  # made after the failure: closed below too
                if future.done() and not future.cancelled() and future.exception() is None:
                    conns.append(future.result())
        for n in (1, 2):  # the second one goes through the new program's control socket
            result = server.upgrade()
            assert result.returncode == 0 and "upgraded" in result.stdout, result.stdout + result.stderr
        for i, tls in enumerate(conns):
            tls.sendall(b"%d after" % i)
            assert tls.recv(64) == b"%d after" % i, f"connection {i} lost"
    finally:
        for tls in conns:
            tls.close()
        server.close()
    assert "Traceback" not in server.text()
