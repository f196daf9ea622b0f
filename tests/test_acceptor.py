"""ironsocket.acceptor: accepting as a pump on a relay loop (real sockets, a real engine)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from ironsocket.acceptor import Acceptor
from ironsocket.engine import Engine

from .helpers import open_fds, wait_until

TIMEOUT = 10.0
wait_until = partial(wait_until, timeout=TIMEOUT)
ROOT = Path(__file__).resolve().parents[1]


class Harness:
    """A listener, an engine of one loop and an Acceptor whose slots and accepted sockets the
    test sees."""

    def __init__(self, slots: int = 1000) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.engine = Engine(1)
        self.engine.start()
        self.slots = slots
        self.slot_asks = 0
        self.accepted: list[socket.socket] = []
        self.threads: set[str] = set()
        self.fail_next = False
        self.acceptor = Acceptor(self.listener, self.engine, name="test", take_slot=self._take,
                                 give_slot=self._give, on_accept=self._on_accept)

    def _take(self) -> bool:
        self.slot_asks += 1
        if self.slots == 0:
            return False
        self.slots -= 1
        return True

    def _give(self) -> None:
        self.slots += 1

    def _on_accept(self, sock: socket.socket, addr: tuple) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a bug in on_accept")
        self.threads.add(threading.current_thread().name)
        self.accepted.append(sock)

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=TIMEOUT)

    def close(self) -> None:
        self.acceptor.stop()
        self.listener.close()
        self.engine.stop()
        for s in self.accepted:
            s.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def test_accepts_a_burst_once_each_on_the_loop_thread(harness: Harness) -> None:
    harness.acceptor.start()
    clients = [harness.connect() for _ in range(60)]
    wait_until(lambda: len(harness.accepted) == 60, what="60 accepted")
    time.sleep(0.2)
    assert len(harness.accepted) == 60  # none twice
    assert harness.threads == {"is-relay-0"}  # the loop's thread, no thread of its own
    ours = sorted(s.getpeername() for s in harness.accepted)
    assert ours == sorted(c.getsockname() for c in clients)
    assert harness.slots == 1000 - 60
    for c in clients:
        c.close()


def test_hold_keeps_new_clients_in_the_backlog_until_release(harness: Harness) -> None:
    harness.acceptor.start()
    first = harness.connect()
    wait_until(lambda: len(harness.accepted) == 1, what="first accepted")
    assert harness.acceptor.hold(TIMEOUT)
    held = harness.connect()  # the kernel completes the TCP handshake: the backlog holds it
    time.sleep(0.5)
    assert len(harness.accepted) == 1
    harness.acceptor.release()
    wait_until(lambda: len(harness.accepted) == 2, what="accepted after release")
    assert harness.accepted[1].getpeername() == held.getsockname()
    for c in (first, held):
        c.close()


def test_at_the_connection_limit_it_waits_for_a_freed_slot_without_spinning(harness: Harness) -> None:
    harness.slots = 1
    harness.acceptor.start()
    first, second = harness.connect(), harness.connect()
    wait_until(lambda: len(harness.accepted) == 1, what="first accepted")
    asks = harness.slot_asks
    time.sleep(0.5)
    assert len(harness.accepted) == 1  # the second waits in the backlog
    assert harness.slot_asks - asks <= 2  # asleep on its eventfd, not asking in a loop
    harness.slots += 1  # a connection ended (the server's _release_slot)
    harness.acceptor.slot_freed()
    wait_until(lambda: len(harness.accepted) == 2, what="second accepted once a slot is free")
    for c in (first, second):
        c.close()


def test_a_bug_in_on_accept_costs_that_connection_not_the_acceptor(harness: Harness, caplog) -> None:
    harness.engine.loops[0].set_idle_scan(0.05)  # the back-off ends at the loop's next scan
    harness.acceptor.start()
    harness.fail_next = True
    with caplog.at_level(logging.ERROR, logger="ironsocket"):
        victim = harness.connect()
        wait_until(lambda: any("internal error in the accept loop" in r.message for r in caplog.records),
                   what="the error logged")
        victim.settimeout(TIMEOUT)
        assert victim.recv(1) == b""  # closed by the acceptor, not leaked
        assert harness.slots == 1000  # and its slot given back
        after = harness.connect()
        wait_until(lambda: len(harness.accepted) == 1, what="the next client accepted")
    assert harness.accepted[0].getpeername() == after.getsockname()
    for c in (victim, after):
        c.close()


def test_stop_leaves_no_fd_and_accepts_nothing_more() -> None:
    before = open_fds()
    h = Harness()
    h.acceptor.start()
    c = h.connect()
    wait_until(lambda: len(h.accepted) == 1, what="accepted")
    h.acceptor.stop()
    late = h.connect()  # still listening (the owner closes the listener): nobody accepts
    time.sleep(0.3)
    assert len(h.accepted) == 1
    late.close()
    c.close()
    h.close()
    assert open_fds() == before


# Out of file descriptors: a child process with a low RLIMIT_NOFILE runs an Acceptor that keeps
# every socket it accepts. Once accept() fails with EMFILE it must say so (at most once a
# second), wait instead of spinning on the readable listener, and accept again when sockets close.
_EMFILE_CHILD = r"""
import logging, os, resource, socket, sys, time
from ironsocket.acceptor import Acceptor
from ironsocket.engine import Engine
logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
listener = socket.create_server(("127.0.0.1", 0), backlog=64)
listener.setblocking(False)
engine = Engine(1)
engine.start()
engine.loops[0].set_idle_scan(0.2)
held, steps, total = [], [0], [0]
def take():
    steps[0] += 1
    return True
def took(sock, addr):
    held.append(sock)
    total[0] += 1
acceptor = Acceptor(listener, engine, name="emfile", take_slot=take, give_slot=lambda: None, on_accept=took)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 5, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
acceptor.start()
print("port", listener.getsockname()[1], flush=True)
for line in sys.stdin:
    if line.startswith("count"):
        print("held", len(held), "steps", steps[0], "total", total[0], flush=True)
    elif line.startswith("free"):
        for s in held:
            s.close()
        held.clear()
        acceptor.slot_freed()
        print("freed", flush=True)
    else:
        break
"""


def test_out_of_fds_it_backs_off_warns_once_a_second_and_recovers() -> None:
    child = subprocess.Popen([sys.executable, "-c", _EMFILE_CHILD], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients: list[socket.socket] = []
    assert child.stdin is not None and child.stdout is not None

    def ask(what: str) -> str:
        child.stdin.write(what + "\n")
        child.stdin.flush()
        while True:
            line = child.stdout.readline()
            assert line, "the child exited"
            if not line.startswith("accept failed"):
                return line.strip()
            warnings.append(line)

    warnings: list[str] = []
    try:
        port = int(child.stdout.readline().split()[1])
        for _ in range(12):  # more than its fd limit leaves: some wait in the backlog
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        time.sleep(0.5)
        first = ask("count")
        time.sleep(1.5)
        second = ask("count")
        held1, steps1 = int(first.split()[1]), int(first.split()[3])
        held2, steps2 = int(second.split()[1]), int(second.split()[3])
        assert 0 < held1 == held2 < 12, (first, second)
        assert steps2 - steps1 < 100, (first, second)  # waiting, not retrying in a loop
        assert ask("free") == "freed"
        # The backlog is served again once fds are free (until the limit is reached again).
        wait_until(lambda: int(ask("count").split()[5]) > held1, what="accepting again after fds were freed")
        child.stdin.write("quit\n")
        child.stdin.flush()
        rest = child.communicate(timeout=TIMEOUT)[0]
        warnings += [line for line in rest.splitlines() if line.startswith("accept failed")]
        assert warnings and all("Too many open files" in w and "retrying as connections close" in w for w in warnings)
        assert len(warnings) <= 4, warnings  # ~2 s of EMFILE: once a second, not once a retry
        assert "Traceback" not in rest
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(TIMEOUT)
        for stream in (child.stdin, child.stdout):
            if not stream.closed:
                stream.close()
        for c in clients:
            c.close()
