"""`serve --config FILE` under the same lifecycle as the flags (issue 13): two listeners, live
byte-exact streams on both, SIGUSR2, SIGHUP (certificate rotation, a broken certificate
refused), `ironsocket upgrade` printing its phases, and the flags that conflict with --config.

Real processes: `python -m ironsocket serve --config` on certificate files of the test's own, the
echo backend of test_upgrade, CPython ssl clients. Host only (not marked ``ktls``): the exec
upgrade of kTLS connections is test_upgrade's, in the VM.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ironsocket import control
from tests.helpers import CERTS, ROOT
from tests.test_lifecycle import leaf_der, served_leaf
from tests.test_upgrade import (  # noqa: F401 - echo_backend is a fixture
    TIMEOUT,
    Server,
    Streamer,
    admin_get,
    echo_backend,
    echo_once,
    finish,
    wait_until,
)

NAMES = ("web", "api")


def write_config(tmp: Path, backend_port: int, listeners: tuple[str, ...] = NAMES,
                 ports: dict[str, int] | None = None, filename: str = "ironsocket.toml",
                 admin: bool = False) -> Path:
    """Two (or the given) listeners, each with its own certificate files in ``tmp`` (and an
    [admin] endpoint on a port of the kernel's choice)."""
    text = '[admin]\nlisten = "127.0.0.1:0"\n\n' if admin else ""
    for name in listeners:
        port = (ports or {}).get(name, 0)
        text += (f'[[listeners]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\nbackend = "127.0.0.1:{backend_port}"\n'
                 f'certs = [{{ cert = "{tmp / name}.pem", key = "{tmp / name}.key" }}]\n\n')
    path = tmp / filename
    path.write_text(text)
    return path


def set_cert(tmp: Path, listener: str, name: str) -> None:
    shutil.copy(CERTS / f"{name}.pem", tmp / f"{listener}.pem")
    shutil.copy(CERTS / f"{name}.key", tmp / f"{listener}.key")


class ConfigServer(Server):
    """test_upgrade's Server, but `serve --config FILE` (ports by listener name)."""

    def __init__(self, tmp: Path, config: Path, *extra: str) -> None:
        self.log_path = tmp / "serve.log"
        self.control = tmp / "ctl.sock"
        self.log = self.log_path.open("w")
        env = os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_RUN_DIR": str(tmp)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ironsocket", "serve", "--config", str(config), "--control-socket",
             str(self.control), *extra],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.wait_for(r"serving TLS 1\.3 on [\d.]+:\d+ \(api\)")
        self.ports = {m.group(2): int(m.group(1)) for m in
                      re.finditer(r"serving TLS 1\.3 on [\d.]+:(\d+) \((\w+)\)", self.text())}
        self.port = self.ports["web"]


@pytest.fixture
def config_server(tmp_path: Path, echo_backend) -> Iterator[ConfigServer]:
    for name in NAMES:
        set_cert(tmp_path, name, "ecdsa-p256")
    srv = ConfigServer(tmp_path, write_config(tmp_path, echo_backend[1], admin=True))
    srv.tmp = tmp_path  # type: ignore[attr-defined]
    srv.backend_port = echo_backend[1]  # type: ignore[attr-defined]
    yield srv
    srv.close()
    print("--- server log (tail) ---\n" + "\n".join(srv.text().splitlines()[-80:]))  # shown on failure


def streams_on_both(server: ConfigServer, per_listener: int = 2) -> list[Streamer]:
    streamers = [Streamer(server.ports[name], 100 * i + n) for i, name in enumerate(NAMES) for n in range(per_listener)]
    for s in streamers:
        s.start()
    for s in streamers:
        assert s.connected.wait(TIMEOUT)
    wait_until(lambda: all(s.verified > 0 for s in streamers), what="every stream flowing")
    return streamers


def still_flowing(streamers: list[Streamer], what: str) -> None:
    for s in streamers:
        assert s.error is None, f"stream {s.index}: {s.error!r}"
    progress = [s.verified for s in streamers]
    wait_until(lambda: all(s.verified > p for s, p in zip(streamers, progress)), what=f"every stream flowing {what}")


def connection_ids(server: ConfigServer) -> list[int]:
    answer = control.request(server.control, {"command": "connections"}, timeout=TIMEOUT)
    assert answer["ok"], answer
    return [row["id"] for row in answer["connections"]]


def test_usr2_hup_and_upgrade_carry_both_listeners(config_server: ConfigServer) -> None:
    """Two listeners, two streams each: SIGUSR2, then SIGHUP after a certificate rotation on one
    listener, then `ironsocket upgrade`: same PID, every stream byte-exact throughout, the
    rotated listener serves the new certificate and the other one its own."""
    server = config_server
    tmp: Path = server.tmp  # type: ignore[attr-defined]
    pid = server.proc.pid
    streamers = streams_on_both(server)
    ids = connection_ids(server)
    assert len(ids) == 4 and len(set(ids)) == 4, ids  # one id per connection of the process
    assert admin_get(server) == 200

    os.kill(pid, signal.SIGUSR2)
    server.wait_for(r"upgrade: restored 4 connections in pid (\d+) \(2 listeners\)")
    assert server.proc.poll() is None and server.proc.pid == pid
    still_flowing(streamers, "after SIGUSR2")
    assert sorted(connection_ids(server)) == sorted(ids)  # the same connections, the same ids

    set_cert(tmp, "web", "alpha.test")  # rotation: the same files, another certificate
    os.kill(pid, signal.SIGHUP)
    server.wait_for(r"reload done \(SIGHUP\): .*; 4 connections carried")
    assert server.proc.poll() is None and server.proc.pid == pid
    assert served_leaf(server.ports["web"]) == leaf_der("alpha.test")
    assert served_leaf(server.ports["api"]) == leaf_der("ecdsa-p256")
    still_flowing(streamers, "after SIGHUP")

    result = server.upgrade()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["check", "quiesce", "exec", "upgraded"], result.stdout
    assert "pausing 2 listeners, 4 connections" in lines[1], lines[1]
    assert lines[2].startswith("exec: 4 connections relayed by the bridge"), lines[2]
    assert re.match(rf"upgraded: restored 4 connections in pid {pid} ", lines[3]), lines[3]
    assert server.proc.pid == pid
    still_flowing(streamers, "after ironsocket upgrade")
    # The [admin] listener was carried: the same port all along (admin_get reads the first line).
    assert admin_get(server) == 200
    admins = re.findall(r"admin endpoint on (\S+)", server.text())
    assert len(admins) >= 4 and len(set(admins)) == 1, admins  # the start and three new programs
    # A new client on each listener after all of it.
    assert echo_once(server.ports["api"], b"api after three upgrades") == b"api after three upgrades"
    for s in streamers:
        finish(s)
    assert "Traceback" not in server.text()


def test_hup_with_a_broken_certificate_is_refused_on_every_listener(config_server: ConfigServer) -> None:
    server = config_server
    tmp: Path = server.tmp  # type: ignore[attr-defined]
    pid = server.proc.pid
    streamers = streams_on_both(server)
    (tmp / "api.pem").write_text("-----BEGIN CERTIFICATE-----\nbroken by the operator\n-----END CERTIFICATE-----\n")
    set_cert(tmp, "web", "alpha.test")  # a good change in the same reload is not applied either
    os.kill(pid, signal.SIGHUP)
    m = server.wait_for(r"reload refused: (.*)")
    assert "start-up check" in m.group(1) and "still serving with the current program" in m.group(1), m.group(1)
    assert "api.pem" in server.text()  # the check's own error names the file
    assert server.proc.poll() is None and server.proc.pid == pid
    assert served_leaf(server.ports["web"]) == leaf_der("ecdsa-p256")
    assert served_leaf(server.ports["api"]) == leaf_der("ecdsa-p256")
    still_flowing(streamers, "after the refused reload")
    assert echo_once(server.ports["web"], b"still served") == b"still served"
    # Fixed: the next HUP applies both.
    set_cert(tmp, "api", "alpha.test")
    os.kill(pid, signal.SIGHUP)
    server.wait_for(r"reload done \(SIGHUP\): .*; 4 connections carried")
    assert served_leaf(server.ports["web"]) == leaf_der("alpha.test")
    assert served_leaf(server.ports["api"]) == leaf_der("alpha.test")
    still_flowing(streamers, "after the reload")
    for s in streamers:
        finish(s)
    assert "Traceback" not in server.text()


def test_reload_adds_a_listener_and_refuses_to_drop_one_with_connections(config_server: ConfigServer) -> None:
    """The new image re-reads the file: a listener added is bound; one removed while it has
    connections is refused by the pre-flight (a reload never ends connections)."""
    server = config_server
    tmp: Path = server.tmp  # type: ignore[attr-defined]
    backend: int = server.backend_port  # type: ignore[attr-defined]
    pid = server.proc.pid
    streamers = streams_on_both(server, per_listener=1)
    config = write_config(tmp, backend, ("web",), ports=server.ports, admin=True)  # "api" gone, its stream alive
    os.kill(pid, signal.SIGHUP)
    m = server.wait_for(r"reload refused: (.*)")
    assert "listener api is not in the configuration any more and has 1 connections" in m.group(1), m.group(1)
    still_flowing(streamers, "after the refused reload")

    set_cert(tmp, "admin", "ecdsa-p256")
    write_config(tmp, backend, ("web", "api", "admin"), ports=server.ports, admin=True)
    assert config.exists()
    os.kill(pid, signal.SIGHUP)
    server.wait_for(r"reload done \(SIGHUP\): .*; 2 connections carried")
    port = int(server.wait_for(r"serving TLS 1\.3 on [\d.]+:(\d+) \(admin\)").group(1))
    assert echo_once(port, b"the new listener") == b"the new listener"
    assert server.proc.pid == pid
    still_flowing(streamers, "after the reload that added a listener")
    for s in streamers:
        finish(s)
    assert "Traceback" not in server.text()


@pytest.mark.parametrize("flag", [["--ktls", "require"], ["--listen", "127.0.0.1:9443"], ["--backend", "127.0.0.1:9"]])
def test_flags_that_conflict_with_config_are_an_error(tmp_path: Path, flag: list[str]) -> None:
    for name in NAMES:
        set_cert(tmp_path, name, "ecdsa-p256")
    config = write_config(tmp_path, 9, ports={"web": 18443, "api": 18444})
    res = subprocess.run([sys.executable, "-m", "ironsocket", "serve", "--config", str(config), *flag],
                         capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                         env=os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_RUN_DIR": str(tmp_path)})
    assert res.returncode == 2, res.stdout + res.stderr
    [line] = [l for l in res.stderr.splitlines() if l.strip()]
    assert line.startswith("ironsocket: error: ") and flag[0] in line, line


@pytest.mark.parametrize("failure", ["config", "admin-port"])
def test_a_restore_that_fails_after_exec_rolls_back_every_listener(config_server: ConfigServer, failure: str) -> None:
    """The new program passes the check but cannot restore: its configuration is broken once
    exec'd (it fails before any listener is adopted: the early-resumed connections of both
    listeners are carried back as they are now), or its admin port is taken (after both
    listeners were adopted). Either way the previous program comes back with every listener
    and every connection, byte-exact."""
    import socket

    from tests.test_upgrade import checked_then_different

    server = config_server
    tmp: Path = server.tmp  # type: ignore[attr-defined]
    streamers = streams_on_both(server)
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        if failure == "config":
            broken = write_config(tmp, server.backend_port, filename="broken.toml", admin=True)  # type: ignore[attr-defined]
            broken.write_text(broken.read_text().replace("api.pem", "missing.pem"))
            extra, needle = f"--config {broken}", "missing.pem"
        else:
            extra, needle = f"--admin 127.0.0.1:{taken.getsockname()[1]}", "Address already in use"
        lying = checked_then_different(tmp, f"lying-{failure}", extra)
        result = server.upgrade("--exec", str(lying))
        assert result.returncode != 0, result.stdout
        assert "rolled back" in result.stderr and needle in result.stderr, result.stderr
        server.wait_for(r"upgrade: restored 4 connections in pid \d+ \(2 listeners\)")
        still_flowing(streamers, "after the rollback")
        for name in NAMES:
            assert echo_once(server.ports[name], b"after the rollback") == b"after the rollback"
        ids = connection_ids(server)
        assert len(ids) == len(set(ids)), ids
        for s in streamers:
            finish(s)
        assert "is not open" not in server.text() and "Traceback" not in server.text()
    finally:
        taken.close()


def test_workers_with_config_reload_every_worker_and_name_connections_per_machine(tmp_path: Path, echo_backend) -> None:
    """`--workers 2 --config` with two listeners: every worker serves both; SIGHUP to the
    supervisor reloads the workers one after another (same PIDs, byte-exact streams on both
    listeners, the new certificate served by both workers); connection ids are ``<worker>.<n>``,
    unique on the machine, and every log line names its worker and PID."""
    from tests.test_workers import free_port

    for name in NAMES:
        set_cert(tmp_path, name, "ecdsa-p256")
    ports = {name: free_port() for name in NAMES}
    config = write_config(tmp_path, echo_backend[1], ports=ports)
    from tests.test_workers import spawn_serve, worker_sockets

    proc, log = spawn_serve(tmp_path, "--config", str(config), "--workers", "2")
    try:
        wait_until(lambda: "all 2 workers serving" in log.read_text(), what="two workers serving")
        sockets = worker_sockets(tmp_path)
        pids = {control.request(p, {"command": "ping"})["pid"] for p in sockets}
        assert len(pids) == 2 and proc.pid not in pids
        streamers = [Streamer(ports[name], 300 + 10 * i + n) for i, name in enumerate(NAMES) for n in range(4)]
        for s in streamers:
            s.start()
        for s in streamers:
            assert s.connected.wait(TIMEOUT)
        wait_until(lambda: all(s.verified > 0 for s in streamers), what="every stream flowing")
        ids = [row["id"] for p in sockets for row in control.request(p, {"command": "connections"})["connections"]]
        assert len(ids) == 8 and len(set(ids)) == 8, ids
        assert all(re.fullmatch(r"[01]\.\d+", i) for i in ids), ids
        text = log.read_text()
        opened = re.findall(r"conn=([01])\.\d+ open pid=(\d+)", text)  # the worker in the id, its pid
        assert len(opened) == 8 and all(int(pid) in pids for _, pid in opened), text[-3000:]
        assert len({(w, pid) for w, pid in opened}) == 2, opened  # one worker index per process

        for name in NAMES:
            set_cert(tmp_path, name, "alpha.test")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload done: 2 workers upgraded in place" in log.read_text(), what="rolling reload done")
        assert proc.poll() is None
        assert {control.request(p, {"command": "ping"})["pid"] for p in worker_sockets(tmp_path)} == pids
        for _ in range(4):  # SO_REUSEPORT spreads the handshakes: both workers serve the new one
            for name in NAMES:
                assert served_leaf(ports[name]) == leaf_der("alpha.test")
        still_flowing(streamers, "after the rolling reload")
        after = [row["id"] for p in worker_sockets(tmp_path)
                 for row in control.request(p, {"command": "connections"})["connections"]]
        assert sorted(after) == sorted(ids)
        gathered = control.request(tmp_path / f"ironsocket-{proc.pid}.sock", {"command": "connections"})  # the supervisor's
        assert sorted(row["id"] for row in gathered["connections"]) == sorted(ids)
        for s in streamers:
            finish(s)
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.mark.parametrize("with_config", [False, True])
def test_a_bad_admin_address_is_one_line_not_a_traceback(tmp_path: Path, with_config: bool) -> None:
    for name in NAMES:
        set_cert(tmp_path, name, "ecdsa-p256")
    args = ["--config", str(write_config(tmp_path, 9))] if with_config else ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"]
    res = subprocess.run([sys.executable, "-m", "ironsocket", "serve", *args, "--admin", "localhost:http"],
                         capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                         env=os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_RUN_DIR": str(tmp_path)})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    [line] = [l for l in res.stderr.splitlines() if "error" in l]
    assert line.startswith("ironsocket: error: --admin localhost:http: ") and "not a number" in line, line


def test_failure_after_every_startup_step_rolls_back_both_listeners(config_server: ConfigServer) -> None:
    """test_upgrade's every-step rollback with two listeners and [admin]: the new program fails
    after each start-up step in turn; the previous program comes back each time with both
    listeners, every stream byte-exact, the admin endpoint, and exactly the fds it had."""
    from ironsocket.runtime import STARTUP_STEPS
    from tests.test_upgrade import failing_program

    server = config_server
    tmp: Path = server.tmp  # type: ignore[attr-defined]
    steps = [s for s in STARTUP_STEPS if s not in ("demo", "confirm")]
    step_file = tmp / "fail-at"
    prog = failing_program(tmp, step_file)
    streamers = streams_on_both(server)
    fds = server.fds()
    for n, step in enumerate(steps, 1):
        step_file.write_text(step)
        result = server.upgrade("--exec", str(prog))
        assert result.returncode != 0, result.stdout
        assert f"injected failure after start-up step {step}" in result.stderr, result.stderr
        server.wait_for(r"upgrade: restored 4 connections in pid \d+ \(2 listeners\)", count=n)
        still_flowing(streamers, f"after a failure at {step}")
        assert admin_get(server) == 200
        for name in NAMES:
            assert echo_once(server.ports[name], b"new after %s" % step.encode()) == b"new after %s" % step.encode()
        wait_until(lambda: server.fds() == fds, timeout=10, what=f"fd count back to {fds} after {step}")
    for s in streamers:
        finish(s)
    assert "Traceback" not in server.text()


# -- state version 2 and the programs that read version 1 -------------------------------------------
V1_COMMIT = "f6592ee"  # the last ironsocket writing state version 1 (one listener at the top level)


DICT_COMMIT = "5c8f180"  # the last ironsocket whose document was dicts (before ironsocket.handover)


def _serve_from(tree: Path, tmp_path: Path, backend_port: int) -> Server:
    """`serve` started from another checkout ``tree`` (its own package, not ours), driven with
    test_upgrade's Server helpers."""
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"IRONSOCKET_RUN_DIR": str(tmp_path)}
    server = Server.__new__(Server)
    server.log_path, server.control, server.log = log_path, tmp_path / "ctl.sock", log_path.open("w")
    server.proc = subprocess.Popen(
        [sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend_port}",
         "--cert", str(CERTS / "ecdsa-p256.pem"), "--key", str(CERTS / "ecdsa-p256.key"),
         "--control-socket", str(server.control)],
        stdin=subprocess.DEVNULL, stdout=server.log, stderr=subprocess.STDOUT, env=env, cwd=tree)
    return server


def _v1_program(tmp: Path, commit: str = V1_COMMIT) -> Path:
    """That ironsocket's package, from this repository's history (skip without it)."""
    old = tmp / commit
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "ironsocket"], capture_output=True, timeout=60)
    if archive.returncode != 0:
        pytest.skip(f"no git history with {commit}: {archive.stderr.decode(errors='replace').strip()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True, timeout=60)
    return old


def _this_program(tmp: Path, name: str, extra_after_check: str = "", root: Path = ROOT) -> Path:
    """This tree's ironsocket as an --exec target that keeps the cwd (the v1 program's, so that
    its `python -m ironsocket` stays v1 for a rollback); ``extra_after_check``: arguments added
    once exec'd with the state (what makes its restore fail)."""
    prog = tmp / name
    boot = f"import sys; sys.path.insert(0, {str(root)!r}); sys.argv[0] = 'ironsocket'; from ironsocket.entry import main; main()"
    prog.write_text("#!/bin/sh\n"
                    f'for a in "$@"; do [ "$a" = --upgrade-check ] && exec {sys.executable} -c "{boot}" "$@"; done\n'
                    f'exec {sys.executable} -c "{boot}" "$@" {extra_after_check}\n')
    prog.chmod(0o755)
    return prog


def test_a_version_1_program_upgrades_to_this_one_and_is_rolled_back_to(tmp_path: Path, echo_backend) -> None:
    """The running fleet writes version 1: this program reads it (and says so to the v1 check),
    and a rollback to a v1 program writes version 1 again, with the state as it is then."""
    import socket

    from tests.test_upgrade import flowing_streamer

    old = _v1_program(tmp_path)
    server = _serve_from(old, tmp_path, echo_backend[1])
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        server.port = int(server.wait_for(r"serving TLS 1\.3 on [\d.]+:(\d+)").group(1))
        pid = server.proc.pid
        streamer = flowing_streamer(server, 500)
        # v1 → this program, failing after it adopted the connection: back to v1 with the state now.
        lying = _this_program(tmp_path, "lying-v2", f"--admin 127.0.0.1:{taken.getsockname()[1]}")
        result = server.upgrade("--exec", str(lying))
        assert result.returncode != 0 and "rolled back" in result.stderr, result.stdout + result.stderr
        assert re.search(r"upgrade: restore failed: admin: .*Address already in use.*with the current state", server.text())
        back = server.wait_for(r"upgrade: restored 1 connections in pid \d+(.*)")
        assert "listeners" not in back.group(1), back.group(0)  # the version-1 program's line
        assert server.proc.pid == pid
        still_flowing([streamer], "after the rollback to the version-1 program")
        # v1 → this program for real.
        result = server.upgrade("--exec", str(_this_program(tmp_path, "this-v2")))
        assert result.returncode == 0, result.stdout + result.stderr
        server.wait_for(r"upgrade: restored 1 connections in pid \d+ \(1 listeners\)")
        assert server.proc.pid == pid
        still_flowing([streamer], "after the upgrade from version 1")
        finish(streamer)
        assert "Traceback" not in server.text()
    finally:
        taken.close()
        server.close()


def test_the_program_before_the_typed_document_upgrades_to_this_one_and_is_rolled_back_to(
        tmp_path: Path, echo_backend) -> None:
    """The documents and the bridge's batches of the program whose document was dicts (main at
    DICT_COMMIT) and of this one (ironsocket.handover) are one format: this program takes that
    one's connections from its bridge, a rollback hands them back in a document this program
    wrote, the upgrade then goes through, and so does one back to the old program (which takes
    them from this one's bridge); every byte keeps flowing."""
    from tests.test_upgrade import failing_program, flowing_streamer

    old = _v1_program(tmp_path, DICT_COMMIT)
    server = _serve_from(old, tmp_path, echo_backend[1])
    try:
        server.port = int(server.wait_for(r"serving TLS 1\.3 on [\d.]+:(\d+)").group(1))
        pid = server.proc.pid
        streamers = [flowing_streamer(server, 500 + i) for i in range(2)]
        # old → this program, failing after it took the connections from the old program's bridge
        # and moved bytes: back to the old program with a document this one wrote.
        step_file = tmp_path / "fail-at"
        step_file.write_text("relay")
        result = server.upgrade("--exec", str(failing_program(tmp_path, step_file)))
        assert result.returncode != 0 and "rolled back" in result.stderr, result.stdout + result.stderr
        assert "injected failure after start-up step relay" in result.stderr, result.stderr
        assert re.search(r"upgrade: \d+ connections taken from the bridge", server.text())
        server.wait_for(r"upgrade: restored 2 connections in pid \d+ \(1 listeners\)")
        assert server.proc.pid == pid
        still_flowing(streamers, "after the rollback to the program of the dict document")
        # old → this program for real (the old program's bridge hands the connections over).
        result = server.upgrade("--exec", str(_this_program(tmp_path, "this-typed")))
        assert result.returncode == 0, result.stdout + result.stderr
        server.wait_for(r"upgrade: restored 2 connections in pid \d+ \(1 listeners\)", count=2)
        assert server.proc.pid == pid
        still_flowing(streamers, "after the upgrade to the typed document")
        # and back to the old program: it takes the connections from this one's bridge.
        result = server.upgrade("--exec", str(_this_program(tmp_path, "old-again", root=old)))
        assert result.returncode == 0, result.stdout + result.stderr
        server.wait_for(r"upgrade: restored 2 connections in pid \d+ \(1 listeners\)", count=3)
        assert server.proc.pid == pid
        still_flowing(streamers, "after the upgrade back to the program of the dict document")
        for s in streamers:
            finish(s)
        assert "Traceback" not in server.text()
    finally:
        server.close()


def test_match_listeners_rules() -> None:
    """Which running listener each configured one takes over, and what a reload refuses."""
    from ironsocket.runtime import match_listeners
    from ironsocket.server import ProxyConfig, StartupError
    from tests.helpers import config as tls_config

    def cfg(name: str, port: int) -> ProxyConfig:
        return ProxyConfig(name=name, listen=("127.0.0.1", port), backend=("127.0.0.1", 9), tls=tls_config())

    from ironsocket.handover import ListenerView

    running = [ListenerView(name="web", listen=("127.0.0.1", 8443), connections=3),
               ListenerView(name="", listen=("127.0.0.1", 9000), connections=1),
               ListenerView(name="", listen=("127.0.0.1", 9001), connections=0)]
    assert match_listeners(running, [cfg("", 9000), cfg("new", 7000), cfg("web", 8443), cfg("", 0)]) == [1, None, 0, 2]
    assert match_listeners(running, [cfg("web", 0), cfg("", 9000)]) == [0, 1]  # 9001 gone: no connections
    with pytest.raises(StartupError, match=r"listener web is not in the configuration any more and has 3 connections"):
        match_listeners(running, [cfg("", 9000), cfg("", 9001)])
    with pytest.raises(StartupError, match=r"listener web: listen 127\.0\.0\.1:8444 but the running program listens on "
                                           r"127\.0\.0\.1:8443"):
        match_listeners(running, [cfg("web", 8444), cfg("", 9000)])
    passed = [dataclasses.replace(running[0], passed=True)]  # socket activation: systemd's address, not ours
    assert match_listeners(passed, [cfg("web", 1)]) == [0]
