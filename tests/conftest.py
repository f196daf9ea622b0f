"""Shared pytest configuration for ironsocket's tests."""

from __future__ import annotations

import os
import resource
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ktls: needs a kernel with kTLS; runs in the VM (tools/vm/ktls-vm)")
    config.addinivalue_line("markers", "ktls7: needs kTLS rekey and TLS_TX_MAX_PAYLOAD_LEN (Linux 6.19+); runs in the VM "
                            "with --kernel 7 (tools/vm/ktls-vm run --kernel 7), not in the 6.1 run")


# ---------------------------------------------------------------------------------------------
# Interop fixtures (tests/test_interop.py): real processes, each killed in a finalizer.
# ---------------------------------------------------------------------------------------------
_ROOT = Path(__file__).resolve().parent.parent
_CERTS = _ROOT / "fixtures" / "certs"
_IN_VM = bool(os.environ.get("IRONSOCKET_IN_VM"))  # set by tools/vm/ktls-vm
# `serve` imports cryptography/typer: slow under the VM's emulated CPU
_READY_TIMEOUT = 180.0 if _IN_VM else 60.0


class ManagedProcess:
    """A subprocess whose stdout/stderr lines are collected by reader threads, so a test can
    wait for a line (a readiness check) and read the log, without ever blocking forever."""

    def __init__(self, argv: list[str], name: str) -> None:
        self.name = name
        self.argv = argv
        self.proc = subprocess.Popen(
            argv, cwd=_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.pid = self.proc.pid
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._pump, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for t in self._readers:
            t.start()

    def _pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                self._lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def wait_for_line(self, pattern: str, timeout: float = _READY_TIMEOUT, start: int = 0) -> re.Match[str]:
        """Wait until a line (at index >= start) matches ``pattern``; fail with the log if not."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines[start:]:
                    if m := regex.search(line):
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._readers)):
                    raise AssertionError(
                        f"{self.name}: no line matching {pattern!r} within {timeout}s "
                        f"(exit code {self.proc.poll()}); output:\n{chr(10).join(self._lines)}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def line_count(self) -> int:
        with self._cond:
            return len(self._lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for t in self._readers:
            t.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class ProxyProcess(ManagedProcess):
    port: int
    host: str = "127.0.0.1"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Git keeps no permissions but the executable bit: the test PKI's private keys check out
    0644, and `serve` rightly warns about a key others can read (one more line in every output a
    test reads). Keys are 0600 in real use; make the fixtures so too. (In the VM the checkout is
    read-only and the host suite has already done it.)"""
    for key in _CERTS.glob("*.key"):
        try:
            key.chmod(0o600)
        except OSError:
            pass


@pytest.fixture
def echo_backend() -> Iterator[tuple[str, int]]:
    """tests/echo_backend.py as a subprocess; yields (host, port)."""
    proc = ManagedProcess([sys.executable, str(_ROOT / "tests" / "echo_backend.py")], "echo backend")
    try:
        m = proc.wait_for_line(r"echo-backend: listening on ([\d.]+):(\d+)")
        yield m.group(1), int(m.group(2))
    finally:
        proc.stop()


def cert_args(*names: str) -> list[str]:
    """--cert/--key pairs for fixtures/certs/<name>.pem/.key."""
    out: list[str] = []
    for n in names:
        out += ["--cert", str(_CERTS / f"{n}.pem"), "--key", str(_CERTS / f"{n}.key")]
    return out


@pytest.fixture
def start_proxy(request: pytest.FixtureRequest) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory: ``start_proxy(*extra_args, certs=("ecdsa-p256",), backend="echo")`` runs
    ``python -m ironsocket serve --listen 127.0.0.1:0 ...`` and waits for its "serving" line.
    backend="echo" uses the echo_backend fixture, None the built-in demo HTTP backend."""
    started: list[ProxyProcess] = []

    def start(*extra: str, certs: tuple[str, ...] = ("ecdsa-p256",), backend: str | None = "echo",
              handshake_timeout: float = 30 if _IN_VM else 3) -> ProxyProcess:
        argv = [sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0",
                "--handshake-timeout", f"{handshake_timeout:g}", *cert_args(*certs), *extra]
        if backend == "echo":
            host, port = request.getfixturevalue("echo_backend")
            argv += ["--backend", f"{host}:{port}"]
        proc = ProxyProcess(argv, "ironsocket serve")
        started.append(proc)
        m = proc.wait_for_line(r"ironsocket: serving TLS 1\.3 on ([\d.]+):(\d+)")
        proc.host, proc.port = m.group(1), int(m.group(2))
        return proc

    try:
        yield start
    finally:
        for p in started:
            p.stop()


@pytest.fixture
def nofile_hard() -> Iterator[int]:
    """The fd soft limit raised to the hard one for this test (and the servers it starts, which
    inherit it): the VM's shell starts with 1,024. Yields the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
