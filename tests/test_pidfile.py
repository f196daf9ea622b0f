"""``serve --pid-file`` (ironsocket/pidfile.py, issue 13.9) with the real `ironsocket serve`:
written at start, kept across an exec upgrade (same PID), removed at a clean stop; a file naming a
running ironsocket refused, a stale one replaced, a symlink refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ironsocket.workers import worker_argv
from tests.helpers import assert_refused, serve_outcome
from tests.test_upgrade import TIMEOUT, Server, echo_backend  # noqa: F401


def test_pid_file_written_kept_across_an_upgrade_and_removed_at_stop(tmp_path: Path, echo_backend) -> None:
    pid_file = tmp_path / "is.pid"
    server = Server(tmp_path, echo_backend[1], "--pid-file", str(pid_file))
    try:
        pid = server.proc.pid
        assert pid_file.read_text() == f"{pid}\n"
        assert pid_file.stat().st_mode & 0o777 == 0o644
        result = server.upgrade()
        assert result.returncode == 0, result.stdout + result.stderr + server.text()[-3000:]
        server.wait_for(r"upgrade: restored \d+ connections")
        assert server.proc.poll() is None and pid_file.read_text() == f"{pid}\n"  # the new program kept it
        os.kill(pid, signal.SIGUSR2)  # the signal way too
        server.wait_for(r"upgrade: restored \d+ connections", count=2)
        assert pid_file.read_text() == f"{pid}\n"
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(TIMEOUT) == 0
        server.wait_for(r"stopped")
        assert not pid_file.exists()
    finally:
        server.close()
    assert "Traceback" not in server.text()


def test_pid_file_of_a_running_server_is_refused(tmp_path: Path, echo_backend) -> None:
    pid_file = tmp_path / "is.pid"
    first = Server(tmp_path, echo_backend[1], "--pid-file", str(pid_file))
    try:
        started, output = serve_outcome("--pid-file", str(pid_file))
        assert_refused(started, output, str(pid_file), f"pid {first.proc.pid}", "running ironsocket")
        assert pid_file.read_text() == f"{first.proc.pid}\n"  # untouched
    finally:
        first.close()


def test_stale_pid_file_is_replaced(tmp_path: Path, start_proxy) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(TIMEOUT)
    pid_file = tmp_path / "is.pid"
    pid_file.write_text(f"{dead.pid}\n")
    proxy = start_proxy("--pid-file", str(pid_file), "--control-socket", str(tmp_path / "ctl.sock"))
    assert pid_file.read_text() == f"{proxy.pid}\n"
    proxy.wait_for_line(rf"pid file .* named pid {dead.pid}, which is not a running ironsocket: stale, replaced")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_symlink_at_the_pid_file_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious\n")
    link = tmp_path / "is.pid"
    link.symlink_to(target)
    started, output = serve_outcome("--pid-file", str(link))
    assert_refused(started, output, str(link), "symlink")
    assert link.is_symlink() and target.read_text() == "precious\n"


def test_workers_do_not_get_the_supervisors_pid_file() -> None:
    argv = ["py", "serve", "--pid-file", "/run/x.pid", "--workers", "2", "--pid-file=/run/y.pid", "--listen", "a:1"]
    assert worker_argv(argv) == ["py", "serve", "--listen", "a:1", "--workers", "1", "--reuse-port"]


def test_config_file_pid_file_relative_to_the_file(tmp_path: Path, echo_backend) -> None:
    from ironsocket.config import load_file
    from tests.conftest import ManagedProcess
    from tests.test_config import write

    path = write(tmp_path, f"""pid_file = "run/is.pid"

[[listeners]]
listen = "127.0.0.1:0"
backend = "127.0.0.1:{echo_backend[1]}"
certs = [{{ cert = "@CERTS@/ecdsa-p256.pem", key = "@CERTS@/ecdsa-p256.key" }}]
""")
    (tmp_path / "run").mkdir()
    assert load_file(path).pid_file == tmp_path / "run" / "is.pid"
    proc = ManagedProcess([sys.executable, "-m", "ironsocket", "serve", "--config", str(path),
                           "--control-socket", str(tmp_path / "ctl.sock")], "ironsocket serve --config")
    try:
        proc.wait_for_line(r"ironsocket: serving TLS 1\.3")
        assert (tmp_path / "run" / "is.pid").read_text() == f"{proc.pid}\n"
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(TIMEOUT) == 0
    finally:
        proc.stop()
    assert not (tmp_path / "run" / "is.pid").exists()


def test_with_workers_the_supervisor_writes_it(tmp_path: Path, echo_backend) -> None:
    from tests.test_workers import free_port, serve, wait_until

    pid_file = tmp_path / "is.pid"
    proc, log = serve(tmp_path, "--workers", "2", "--listen", f"127.0.0.1:{free_port()}",
                      "--backend", f"127.0.0.1:{echo_backend[1]}", "--pid-file", str(pid_file))
    try:
        wait_until(lambda: log.read_text().count("serving TLS 1.3 on") == 2, what="two workers serving")
        assert pid_file.read_text() == f"{proc.pid}\n"  # the supervisor's; no worker refused it
        assert "error" not in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_a_reload_that_changes_pid_file_moves_it_and_a_rollback_keeps_it(tmp_path: Path, echo_backend) -> None:
    """Issue 13.9 leftover: a SIGHUP whose new configuration names another pid_file left the old
    file behind. The new program writes the new file and removes the old one (it still names
    us); a new program that fails and rolls back leaves the previous program's file, and not
    its own."""
    from tests.test_config_upgrade import ConfigServer, set_cert, write_config
    from tests.test_upgrade import failing_program

    for name in ("web", "api"):
        set_cert(tmp_path, name, "ecdsa-p256")
    config = write_config(tmp_path, echo_backend[1])
    body = config.read_text()
    config.write_text('pid_file = "a.pid"\n' + body)
    server = ConfigServer(tmp_path, config)
    try:
        pid = server.proc.pid
        assert (tmp_path / "a.pid").read_text() == f"{pid}\n"
        config.write_text('pid_file = "b.pid"\n' + body)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"reload done \(SIGHUP\)")
        assert (tmp_path / "b.pid").read_text() == f"{pid}\n"
        assert not (tmp_path / "a.pid").exists(), "the old pid file was left behind"
        server.wait_for(r"pid file moved from \S*a\.pid to \S*b\.pid")

        step_file = tmp_path / "fail-at"
        step_file.write_text("relay")
        config.write_text('pid_file = "c.pid"\n' + body)
        result = server.upgrade("--exec", str(failing_program(tmp_path, step_file)))
        assert result.returncode != 0 and "rolled back" in result.stderr, result.stdout + result.stderr
        server.wait_for(r"upgrade: restored \d+ connections", count=2)  # the reload, the rollback
        assert server.proc.pid == pid and server.proc.poll() is None
        assert (tmp_path / "b.pid").read_text() == f"{pid}\n"  # the rollback kept the previous program's
        assert not (tmp_path / "c.pid").exists(), "the failed program's pid file was left behind"

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(TIMEOUT) == 0
        assert not (tmp_path / "b.pid").exists()
    finally:
        server.close()
    assert "Traceback" not in server.text()


def test_with_workers_a_config_pid_file_is_the_supervisors_only(tmp_path: Path, echo_backend) -> None:
    """With --workers and a --config file naming pid_file, the workers (which read the same file)
    must not claim it: it names the supervisor, a running ironsocket, and they were refused."""
    from tests.test_config_upgrade import set_cert, write_config
    from tests.test_workers import free_port, spawn_serve, wait_until

    for name in ("web", "api"):
        set_cert(tmp_path, name, "ecdsa-p256")
    config = write_config(tmp_path, echo_backend[1], ports={"web": free_port(), "api": free_port()})
    config.write_text('pid_file = "is.pid"\n' + config.read_text())
    proc, log = spawn_serve(tmp_path, "--config", str(config), "--workers", "2")
    try:
        wait_until(lambda: log.read_text().count("serving TLS 1.3 on") == 4, what="two workers serving two listeners")
        assert (tmp_path / "is.pid").read_text() == f"{proc.pid}\n"
        assert "error" not in log.read_text(), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert not (tmp_path / "is.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
