"""systemd socket activation: `ironsocket serve` takes fd 3 when LISTEN_PID/LISTEN_FDS say so.

Real processes: the test owns the listening socket and starts ``python -m ironsocket serve`` with
it as fd 3, the way systemd does (a tiny exec wrapper puts it at fd 3 and sets LISTEN_PID to its
own pid, which `exec` keeps). Also through ``systemd-socket-activate`` when it is installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from ironsocket.activation import ActivationError, listen_socket
from tests.conftest import ManagedProcess, cert_args
from tests.helpers import ROOT, client_context

# Put the inherited fd at 3, announce it for our own pid, exec the server (same pid).
WRAPPER = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_FDS=sys.argv[2], LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="https")
os.execv(sys.executable, [sys.executable, "-m", "ironsocket", *sys.argv[3:]])
"""


def _serve_args(backend: tuple[str, int]) -> list[str]:
    return ["serve", "--listen", "127.0.0.1:1", "--backend", f"{backend[0]}:{backend[1]}",
            *cert_args("ecdsa-p256"), "--control-socket", ""]


def _spawn(sock_fd: int, args: list[str], count: int = 1) -> ManagedProcess:
    argv = [sys.executable, "-c", WRAPPER, str(sock_fd), str(count), *args]
    return _ManagedWithFds(argv, "ironsocket serve (socket-activated)", pass_fds=(sock_fd,))


class _ManagedWithFds(ManagedProcess):
    def __init__(self, argv: list[str], name: str, pass_fds: tuple[int, ...]) -> None:
        real_popen = subprocess.Popen

        def popen(*a, **kw):
            return real_popen(*a, pass_fds=pass_fds, env=os.environ | {"PYTHONPATH": str(ROOT)}, **kw)

        subprocess.Popen = popen  # type: ignore[misc]
        try:
            super().__init__(argv, name)
        finally:
            subprocess.Popen = real_popen  # type: ignore[misc]


def _echo_through(address: tuple[str, int]) -> bytes:
    raw = socket.create_connection(address, timeout=20)
    with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"activated\n")
        out = b""
        while len(out) < 10:
            chunk = tls.recv(100)
            if not chunk:
                break
            out += chunk
        return out


def test_serve_uses_fd_3_from_systemd(echo_backend, tmp_path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    args = _serve_args(echo_backend)
    args[args.index("--control-socket") + 1] = str(tmp_path / "ctl.sock")
    proc = _spawn(listener.fileno(), args)
    try:
        # The port it prints is ours, not --listen's 127.0.0.1:1.
        m = proc.wait_for_line(r"ironsocket: serving TLS 1\.3 on ([\d.]+):(\d+)")
        assert (m.group(1), int(m.group(2))) == address
        proc.wait_for_line(r"socket activation: listening on fd 3")
        listener.close()  # the server's copy keeps listening
        assert _echo_through(address) == b"activated\n"
        assert _echo_through(address) == b"activated\n"
    finally:
        proc.stop()
        listener.close()
    assert proc.proc.returncode in (0, -15), proc.output


def test_not_a_listening_socket_is_a_clear_error(echo_backend, tmp_path) -> None:
    unbound = socket.socket()  # a TCP socket that is not listening
    args = _serve_args(echo_backend)
    args[args.index("--control-socket") + 1] = str(tmp_path / "ctl.sock")
    proc = _spawn(unbound.fileno(), args)
    try:
        proc.proc.wait(20)
    finally:
        proc.stop()
        unbound.close()
    assert proc.proc.returncode == 2, proc.output
    assert "socket activation: fd 3 is not a listening TCP socket: it is not listening" in proc.output
    assert "Traceback" not in proc.output


def test_udp_socket_is_refused() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    saved = os.dup(3)
    try:
        os.dup2(udp.fileno(), 3)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
        with pytest.raises(ActivationError, match="SOCK_DGRAM"):
            listen_socket(env)
    finally:
        os.dup2(saved, 3)
        os.close(saved)
        udp.close()


def test_variables_unset_and_other_pid_ignored(monkeypatch) -> None:
    # For another pid (systemd's parent passing through): not ours, left alone.
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_socket() is None
    assert os.environ["LISTEN_FDS"] == "1"
    # Ours, with zero fds: nothing to take, and the variables are unset.
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    monkeypatch.setenv("LISTEN_FDNAMES", "")
    assert listen_socket() is None
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)
    # Not activated at all.
    assert listen_socket() is None


def test_listening_socket_taken_and_variables_unset(monkeypatch) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    saved = os.dup(3)
    try:
        os.dup2(listener.fileno(), 3)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        sock = listen_socket()
        assert sock is not None and sock.fileno() == 3
        assert sock.getsockname() == listener.getsockname()
        assert not os.get_inheritable(3)
        assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ
        sock.detach()
    finally:
        os.dup2(saved, 3)
        os.close(saved)
        listener.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed")
def test_systemd_socket_activate(echo_backend, tmp_path) -> None:
    with socket.socket() as probe:  # a free port for systemd-socket-activate to bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = _serve_args(echo_backend)
    args[args.index("--control-socket") + 1] = str(tmp_path / "ctl.sock")
    argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", sys.executable, "-m", "ironsocket", *args]
    proc = _ManagedWithFds(argv, "systemd-socket-activate", pass_fds=())
    try:
        # It execs the server on the first connection (the backlog holds it meanwhile).
        proc.wait_for_line(rf"Listening on 127\.0\.0\.1:{port} as 3")
        assert _echo_through(("127.0.0.1", port)) == b"activated\n"
        proc.wait_for_line(rf"ironsocket: serving TLS 1\.3 on 127\.0\.0\.1:{port}")
        assert _echo_through(("127.0.0.1", port)) == b"activated\n"
    finally:
        proc.stop()


def test_a_socket_activated_server_upgrades_in_place(echo_backend, tmp_path) -> None:
    """The address systemd bound is not --listen's (here 127.0.0.1:1): the upgrade's pre-flight
    and restore keep the passed socket instead of refusing it as a moved listener."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    ctl = tmp_path / "ctl.sock"
    args = _serve_args(echo_backend)
    args[args.index("--control-socket") + 1] = str(ctl)
    proc = _spawn(listener.fileno(), args)
    try:
        proc.wait_for_line(r"socket activation: listening on fd 3")
        listener.close()
        raw = socket.create_connection(address, timeout=20)
        with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"before")
            assert tls.recv(100) == b"before"
            res = subprocess.run([sys.executable, "-m", "ironsocket", "upgrade", "--socket", str(ctl)],
                                 capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
            assert res.returncode == 0, res.stdout + res.stderr + proc.output
            assert "upgraded: restored 1 connections" in res.stdout, res.stdout
            tls.sendall(b"after")
            assert tls.recv(100) == b"after"
        assert _echo_through(address) == b"activated\n"
    finally:
        proc.stop()
        listener.close()


def test_a_passed_socket_with_a_two_listener_config_is_not_silently_ignored(echo_backend, tmp_path) -> None:
    from tests.helpers import CERTS

    cfg = tmp_path / "two.toml"
    cfg.write_text("".join(f'[[listeners]]\nname = "l{i}"\nlisten = "127.0.0.1:0"\nbackend = "127.0.0.1:{echo_backend[1]}"\n'
                           f'certs = [{{ cert = "{CERTS}/ecdsa-p256.pem", key = "{CERTS}/ecdsa-p256.key" }}]\n'
                           for i in range(2)))
    listener = socket.create_server(("127.0.0.1", 0))
    proc = _spawn(listener.fileno(), ["serve", "--config", str(cfg), "--control-socket", str(tmp_path / "ctl.sock")])
    try:
        proc.wait_for_line(r"socket activation: the configuration has 2 listeners; the socket systemd passed is not used")
        proc.wait_for_line(r"serving TLS 1\.3 on [\d.]+:\d+ \(l1\)")
    finally:
        proc.stop()
        listener.close()
