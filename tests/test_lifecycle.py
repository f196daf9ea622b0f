"""Signals as operators expect them, sd_notify, with the real `ironsocket serve` process (issue 13).

SIGHUP = reload (the exec upgrade to the same program, which re-reads the certificate files),
SIGUSR2 = upgrade, SIGTERM/SIGINT = graceful stop with drain progress, SIGQUIT = fast stop.
Streams are the byte-exact `Streamer`s of test_upgrade. Host only (not marked ``ktls``):
signals and notifications do not depend on the record layer, and the exec upgrade with kTLS
connections is tested in the VM by test_upgrade; an upgrade costs minutes under emulation.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import CERTS, ROOT
from tests.test_upgrade import TIMEOUT, Server, echo_backend, echo_once, finish, flowing_streamer, wait_until  # noqa: F401


class CertServer(Server):
    """test_upgrade's Server, but on certificate files of the test's own (so it can rewrite
    them) and with extra environment (NOTIFY_SOCKET)."""

    def __init__(self, tmp: Path, backend_port: int, cert: Path, key: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = tmp / "serve.log"
        self.control = tmp / "ctl.sock"
        self.log = self.log_path.open("w")
        full_env = os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_RUN_DIR": str(tmp)} | (env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0",
             "--backend", f"127.0.0.1:{backend_port}", "--cert", str(cert), "--key", str(key),
             "--control-socket", str(self.control), *extra],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        self.port = int(self.wait_for(r"serving TLS 1\.3 on [\d.]+:(\d+)").group(1))


def own_certs(tmp: Path, name: str = "ecdsa-p256") -> tuple[Path, Path]:
    cert, key = tmp / "site.pem", tmp / "site.key"
    shutil.copy(CERTS / f"{name}.pem", cert)
    shutil.copy(CERTS / f"{name}.key", key)
    return cert, key


def served_leaf(port: int) -> bytes:
    """The DER leaf certificate the server presents now (no verification: only the bytes)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der
    return der


def leaf_der(name: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert((CERTS / f"{name}-leaf.pem").read_text())


@pytest.fixture
def cert_server(tmp_path: Path, echo_backend):
    servers: list[CertServer] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> CertServer:
        cert, key = own_certs(tmp_path)
        srv = CertServer(tmp_path, echo_backend[1], cert, key, *extra, env=env)
        srv.cert, srv.key = cert, key  # type: ignore[attr-defined]
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()
        print("--- server log (tail) ---\n" + "\n".join(srv.text().splitlines()[-60:]))


def test_sighup_reloads_the_new_certificate_in_place(cert_server) -> None:
    """SIGHUP: same PID, every stream byte-exact across it, and the certificate now served is
    the one written to the files after start-up (re-read by the exec'd program)."""
    server = cert_server()
    pid = server.proc.pid
    assert served_leaf(server.port) == leaf_der("ecdsa-p256")
    streamers = [flowing_streamer(server, 60 + i) for i in range(4)]
    # Certificate rotation: the same files, another certificate with the same key type.
    shutil.copy(CERTS / "alpha.test.pem", server.cert)
    shutil.copy(CERTS / "alpha.test.key", server.key)
    os.kill(pid, signal.SIGHUP)
    server.wait_for(r"reload requested \(SIGHUP\)")
    server.wait_for(r"reload done \(SIGHUP\): .*; (\d+) connections carried")
    assert server.proc.poll() is None and server.proc.pid == pid
    assert served_leaf(server.port) == leaf_der("alpha.test")
    for s in streamers:
        assert s.error is None, f"stream {s.index}: {s.error!r}"
    progress = [s.verified for s in streamers]
    wait_until(lambda: all(s.verified > p for s, p in zip(streamers, progress)), what="streams flowing after reload")
    for s in streamers:
        finish(s)
    assert "Traceback" not in server.text()


def test_sighup_with_a_broken_certificate_is_refused_and_the_old_one_served(cert_server) -> None:
    server = cert_server()
    pid = server.proc.pid
    streamer = flowing_streamer(server, 70)
    server.cert.write_text("-----BEGIN CERTIFICATE-----\nbroken by the operator\n-----END CERTIFICATE-----\n")
    os.kill(pid, signal.SIGHUP)
    m = server.wait_for(r"reload refused: (.*)")
    assert "start-up check" in m.group(1) and "still serving with the current program" in m.group(1)
    assert server.proc.poll() is None and server.proc.pid == pid
    assert served_leaf(server.port) == leaf_der("ecdsa-p256")
    assert echo_once(server.port, b"still served") == b"still served"
    before = streamer.verified
    wait_until(lambda: streamer.verified > before, what="stream flowing after the refused reload")
    finish(streamer)
    # A second HUP once the file is fixed works: the refusal left nothing behind.
    shutil.copy(CERTS / "alpha.test.pem", server.cert)
    shutil.copy(CERTS / "alpha.test.key", server.key)
    os.kill(pid, signal.SIGHUP)
    server.wait_for(r"reload done \(SIGHUP\)")
    assert served_leaf(server.port) == leaf_der("alpha.test")
    assert "Traceback" not in server.text()


def idle_clients(port: int, n: int) -> list[ssl.SSLSocket]:
    from tests.test_workers import tls_connect

    clients = [tls_connect(port) for _ in range(n)]
    for c in clients:
        c.sendall(b"hi")
        assert c.recv(2) == b"hi"
    return clients


def test_sigterm_logs_drain_progress_then_close_notify(cert_server) -> None:
    server = cert_server("--drain-timeout", "3")
    clients = idle_clients(server.port, 2)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for(r"graceful stop \(SIGTERM\): listener closed, 2 connections have 3s to finish")
    server.wait_for(r"draining: 2 connections left, [12]s to go")
    for c in clients:
        c.settimeout(TIMEOUT)
        assert c.recv(10) == b""  # close_notify (ssl raises on an EOF without it)
        c.close()
    assert time.monotonic() - start >= 2.5
    assert server.proc.wait(TIMEOUT) == 0
    assert "drain timeout: close_notify to the 2 connections left" in server.text()
    assert "Traceback" not in server.text()


def closed_then_exited(server, clients: list[socket.socket]) -> None:
    """Every client sees the connection end, then the server exits 0."""
    for c in clients:
        c.settimeout(TIMEOUT)
        assert c.recv(10) == b""
        c.close()
    assert server.proc.wait(TIMEOUT) == 0


def test_sigquit_closes_every_connection_now(cert_server) -> None:
    """SIGQUIT: no drain (here 60 s): close_notify to every connection at once, exit 0."""
    server = cert_server("--drain-timeout", "60")
    clients = idle_clients(server.port, 3)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGQUIT)
    closed_then_exited(server, clients)
    assert time.monotonic() - start < 10
    assert re.search(r"fast stop \(SIGQUIT\): close_notify to 3 connections now", server.text())


def test_sigquit_during_a_drain_ends_it(cert_server) -> None:
    server = cert_server("--drain-timeout", "60")
    clients = idle_clients(server.port, 2)
    server.proc.send_signal(signal.SIGINT)
    server.wait_for(r"draining: 2 connections left")
    server.proc.send_signal(signal.SIGQUIT)
    closed_then_exited(server, clients)
    assert "fast stop (SIGQUIT) while draining: close_notify to 2 connections now" in server.text()


# -- sd_notify ----------------------------------------------------------------------------------
class NotifySocket:
    """What systemd does: an AF_UNIX datagram socket named by $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def next(self, key: str, timeout: float = TIMEOUT) -> dict[str, str]:
        """The next message with ``key`` (earlier others are kept in ``messages``)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key} message; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            if key in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_reloading_ready_stopping_across_an_upgrade(cert_server, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        server = cert_server(env={"NOTIFY_SOCKET": str(notify.path)})
        pid = server.proc.pid
        ready = notify.next("READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(pid)
        assert f"127.0.0.1:{server.port}" in ready["STATUS"]
        streamer = flowing_streamer(server, 80)
        result = server.upgrade()
        assert result.returncode == 0, result.stderr
        reloading = notify.next("RELOADING")
        assert reloading["RELOADING"] == "1"
        usec = int(reloading["MONOTONIC_USEC"])
        assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < TIMEOUT * 1e6
        again = notify.next("READY")  # sent by the new program, after the exec
        assert again["MAINPID"] == str(pid) and server.proc.pid == pid
        assert again["IRONSOCKET_UPGRADE"] == "ok"
        # SIGHUP is the same upgrade: RELOADING=1 then READY=1 again.
        os.kill(pid, signal.SIGHUP)
        assert notify.next("RELOADING")["RELOADING"] == "1"
        assert notify.next("READY")["MAINPID"] == str(pid)
        finish(streamer)
        server.proc.send_signal(signal.SIGTERM)
        assert notify.next("STOPPING")["STOPPING"] == "1"
        assert server.proc.wait(TIMEOUT) == 0
    finally:
        notify.close()


def test_sd_notify_after_a_refused_reload_is_ready_again(cert_server, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        server = cert_server(env={"NOTIFY_SOCKET": str(notify.path)})
        notify.next("READY")
        server.cert.write_text("not a certificate\n")
        os.kill(server.proc.pid, signal.SIGHUP)
        notify.next("RELOADING")
        ready = notify.next("READY")
        assert ready["IRONSOCKET_UPGRADE"] == "failed" and "reload not done" in ready["STATUS"]
        assert server.proc.poll() is None
    finally:
        notify.close()


def test_serve_config_notifies_and_survives_sighup(tmp_path: Path, echo_backend) -> None:
    """`serve --config`: READY=1 for systemd, and a SIGHUP (ExecReload of the example unit) is
    the exec reload, as without --config: RELOADING=1, then READY=1 from the same MAINPID."""
    config = tmp_path / "site.toml"
    config.write_text(f"""
[[listeners]]
listen = "127.0.0.1:0"
backend = "127.0.0.1:{echo_backend[1]}"
certs = [{{ cert = "{CERTS / 'ecdsa-p256.pem'}", key = "{CERTS / 'ecdsa-p256.key'}" }}]
""")
    notify = NotifySocket(tmp_path / "notify.sock")
    log_path = tmp_path / "serve.log"
    env = os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_RUN_DIR": str(tmp_path), "NOTIFY_SOCKET": str(notify.path)}
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ironsocket", "serve", "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        assert notify.next("READY")["MAINPID"] == str(proc.pid)
        port = int(re.search(r"serving TLS 1\.3 on [\d.]+:(\d+)", log_path.read_text()).group(1))
        proc.send_signal(signal.SIGHUP)
        assert notify.next("RELOADING")["RELOADING"] == "1"
        ready = notify.next("READY")
        assert ready["MAINPID"] == str(proc.pid) and ready.get("IRONSOCKET_UPGRADE") == "ok", ready
        wait_until(lambda: "reload done (SIGHUP)" in log_path.read_text(), what="reload done")
        assert proc.poll() is None
        assert echo_once(port, b"still here") == b"still here"
        proc.send_signal(signal.SIGQUIT)
        assert proc.wait(TIMEOUT) == 0
        assert notify.next("STOPPING")["STOPPING"] == "1"
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
