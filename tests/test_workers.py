"""``serve --workers N`` (SO_REUSEPORT) and the graceful stop, with real processes."""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ironsocket import control
from tests.helpers import CERTS, ROOT, client_context
from tests import helpers

TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


wait_until = functools.partial(helpers.wait_until, timeout=TIMEOUT)


def serve(tmp: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """`serve` with the test certificate and ``args``."""
    return spawn_serve(tmp, "--cert", str(CERTS / "ecdsa-p256.pem"), "--key", str(CERTS / "ecdsa-p256.key"), *args,
                       env=env)


def spawn_serve(tmp: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """`python -m ironsocket serve ARGS`, its run dir ``tmp``, its output in ``tmp``/serve.log."""
    log = tmp / "serve.log"
    env = os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_RUN_DIR": str(tmp)} | (env or {})
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ironsocket", "serve", *args], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc, log


def stop(proc: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
    """End a server the test started: ``signum``, then SIGKILL if it has not exited in time."""
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def worker_sockets(run_dir: Path) -> list[Path]:
    """The workers' control sockets in ``run_dir`` (not the supervisor's: a worker's ping names its
    supervisor)."""
    return [p for p in control.find_servers(run_dir) if control.request(p, {"command": "ping"}).get("supervisor")]


def tls_connect(port: int):
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return client_context().wrap_socket(raw, server_hostname="localhost")


def test_two_workers_share_the_port_and_stop_together(tmp_path: Path, echo_backend, monkeypatch) -> None:
    port = free_port()
    proc, log = serve(tmp_path, "--workers", "2", "--listen", f"127.0.0.1:{port}",
                      "--backend", f"{echo_backend[0]}:{echo_backend[1]}", "--drain-timeout", "1")
    try:
        wait_until(lambda: log.read_text().count("serving TLS 1.3 on") == 2, what="two workers serving")
        servers = worker_sockets(tmp_path)
        assert len(servers) == 2 and len(control.find_servers(tmp_path)) == 3  # and the supervisor's
        pids = {control.request(p, {"command": "ping"})["pid"] for p in servers}
        assert proc.pid not in pids and len(pids) == 2
        monkeypatch.setenv("IRONSOCKET_RUN_DIR", str(tmp_path))
        assert control.resolve() == control.default_socket_path(proc.pid)  # no --pid: the supervisor
        clients = [tls_connect(port) for _ in range(24)]
        for i, c in enumerate(clients):
            c.sendall(b"ping %d" % i)
            assert c.recv(64) == b"ping %d" % i
        counts = [len(control.request(p, {"command": "connections"})["connections"]) for p in servers]
        assert sum(counts) == 24
        assert min(counts) > 0, f"SO_REUSEPORT spread {counts}"  # all 24 on one worker: p = 2^-23
        for c in clients:
            c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        for pid in pids:
            wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what=f"worker {pid} gone")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_control_socket_with_workers_is_the_supervisors(tmp_path: Path, echo_backend) -> None:
    """`--control-socket PATH` with workers was refused (one path for N workers). Now it is the
    supervisor's; each worker keeps its default one."""
    path = tmp_path / "sup.sock"
    proc, log = serve(tmp_path, "--workers", "2", "--listen", f"127.0.0.1:{free_port()}", "--control-socket", str(path),
                      "--backend", f"{echo_backend[0]}:{echo_backend[1]}")
    try:
        wait_until(lambda: "all 2 workers serving" in log.read_text(), what="two workers serving")
        ping = control.request(path, {"command": "ping"})
        workers = {control.request(p, {"command": "ping"})["pid"] for p in worker_sockets(tmp_path)}
        assert ping["pid"] == proc.pid and set(ping["workers"]) == workers and len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert not path.exists()
    finally:
        stop(proc)


def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    proc, log = serve(tmp_path, "--workers", "2", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9")
    assert proc.wait(TIMEOUT) == 2
    assert "needs a fixed --listen port" in log.read_text()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_then_closes_with_close_notify(tmp_path: Path, echo_backend) -> None:
    """A graceful stop: the listener closes at once, a busy connection may finish within the
    drain timeout, and whatever is left then gets close_notify (a clean TLS close)."""
    proc, log = serve(tmp_path, "--listen", "127.0.0.1:0", "--backend", f"{echo_backend[0]}:{echo_backend[1]}",
                      "--drain-timeout", "2")
    try:
        wait_until(lambda: "serving TLS 1.3 on" in log.read_text(), what="serving")
        port = int(log.read_text().split("serving TLS 1.3 on 127.0.0.1:")[1].split(",")[0])
        busy, idle = tls_connect(port), tls_connect(port)
        for c in (busy, idle):
            c.sendall(b"hi")
            assert c.recv(2) == b"hi"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "graceful stop (SIGTERM)" in log.read_text(), what="graceful stop")
        wait_until(lambda: refused(port), timeout=5, what="the listener closed (new clients refused)")
        busy.sendall(b"still relayed while draining")
        assert busy.recv(64) == b"still relayed while draining"
        busy.unwrap()
        busy.close()
        assert idle.recv(10) == b""  # close_notify from the proxy after the drain timeout
        elapsed = time.monotonic() - start
        assert 1.5 <= elapsed <= 15, elapsed
        idle.close()
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_sighup_to_the_supervisor_upgrades_every_worker_in_turn(tmp_path: Path, echo_backend) -> None:
    """Issue 13.2: SIGHUP used to kill the supervisor and orphan the workers. Now each worker is
    reloaded in place, one after another (the next only once the previous reported READY=1 from
    its new program): same worker PIDs, byte-exact streams, the supervisor alive and notifying
    systemd; then SIGQUIT is forwarded: close_notify at once, everything exits."""
    from tests.test_lifecycle import NotifySocket
    from tests.test_upgrade import Streamer, finish

    port = free_port()
    notify = NotifySocket(tmp_path / "notify.sock")
    proc, log = serve(tmp_path, "--workers", "2", "--listen", f"127.0.0.1:{port}",
                      "--backend", f"{echo_backend[0]}:{echo_backend[1]}", "--drain-timeout", "60",
                      env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        ready = notify.next("READY")
        assert ready["MAINPID"] == str(proc.pid)  # the supervisor, once both workers serve
        servers = worker_sockets(tmp_path)
        pids = {control.request(p, {"command": "ping"})["pid"] for p in servers}
        assert len(pids) == 2 and proc.pid not in pids
        streamers = [Streamer(port, 90 + i) for i in range(12)]
        for s in streamers:
            s.start()
        for s in streamers:
            assert s.connected.wait(TIMEOUT) and s.error is None, s.error
        wait_until(lambda: all(s.verified > 0 for s in streamers), what="every stream flowing")
        counts = [len(control.request(p, {"command": "connections"})["connections"]) for p in servers]
        assert min(counts) > 0, f"SO_REUSEPORT spread {counts}"  # all 12 on one worker: p = 2^-11

        proc.send_signal(signal.SIGHUP)
        assert notify.next("RELOADING")["RELOADING"] == "1"
        assert notify.next("READY")["MAINPID"] == str(proc.pid)
        text = log.read_text()
        assert "reload done: 2 workers upgraded in place" in text, text[-3000:]
        assert proc.poll() is None
        assert {control.request(p, {"command": "ping"})["pid"] for p in worker_sockets(tmp_path)} == pids
        # One after another: the first worker's new program was serving before the second one
        # was asked.
        assert text.count("reload done (SIGHUP)") == 2
        assert text.index("reload done (SIGHUP)") < text.rindex("reload requested (SIGHUP)")
        done = re.findall(r"worker (\d) \(pid (\d+)\): reload done", text)
        assert [d[0] for d in done] == ["0", "1"] and {int(d[1]) for d in done} == pids
        progress = [s.verified for s in streamers]
        wait_until(lambda: all(s.verified > p for s, p in zip(streamers, progress)), what="streams after the reload")
        for s in streamers:
            finish(s)

        clients = [tls_connect(port) for _ in range(4)]
        for c in clients:
            c.sendall(b"hi")
            assert c.recv(2) == b"hi"
        start = time.monotonic()
        proc.send_signal(signal.SIGQUIT)
        for c in clients:
            assert c.recv(10) == b""  # close_notify now, not after the 60 s drain
            c.close()
        assert proc.wait(TIMEOUT) == 0
        assert time.monotonic() - start < 15
        assert notify.next("STOPPING")["STOPPING"] == "1"
        for pid in pids:
            wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what=f"worker {pid} gone")
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_a_refused_reload_stops_the_roll(tmp_path: Path, echo_backend) -> None:
    """A broken certificate: the first worker's pre-flight check refuses it, the supervisor
    does not try the second, and both keep serving."""
    import shutil

    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    shutil.copy(CERTS / "ecdsa-p256.pem", cert)
    shutil.copy(CERTS / "ecdsa-p256.key", key)
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_RUN_DIR": str(tmp_path)}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ironsocket", "serve", "--cert", str(cert), "--key", str(key),
                                 "--workers", "2", "--listen", f"127.0.0.1:{port}",
                                 "--backend", f"{echo_backend[0]}:{echo_backend[1]}"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        wait_until(lambda: "all 2 workers serving" in log.read_text(), what="two workers serving")
        cert.write_text("garbage\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "the other workers keep their current program" in log.read_text(), what="roll stopped")
        text = log.read_text()
        assert text.count("reload refused") == 1 and text.count("reload requested (SIGHUP)") == 2  # supervisor + worker 0
        assert re.search(r"worker 0 \(pid \d+\): reload not done: the new program failed its "
                         r"start-up check", text), text[-2000:]
        assert proc.poll() is None
        for i in range(4):
            c = tls_connect(port)
            c.sendall(b"x%d" % i)
            assert c.recv(8) == b"x%d" % i
            c.close()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_upgrade_and_inspect_keys_through_the_supervisor(tmp_path: Path, echo_backend) -> None:
    """Issue 14: `ironsocket upgrade` / `inspect-keys` against a --workers supervisor (its PID, or
    no --pid at all) used to find no control socket for it, or several servers. Now the
    supervisor's own control socket gathers every worker's connections and upgrades the workers
    one after another, printing each one's phases; the connections are carried, the PIDs stay. A
    broken certificate: the first worker's pre-flight refuses it, the second is not asked, the
    command fails with the reason and both keep serving."""
    import shutil

    from tests.test_cli import run

    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    shutil.copy(CERTS / "ecdsa-p256.pem", cert)
    shutil.copy(CERTS / "ecdsa-p256.key", key)
    port = free_port()
    proc, log = spawn_serve(tmp_path, "--cert", str(cert), "--key", str(key), "--workers", "2",
                            "--listen", f"127.0.0.1:{port}", "--backend", f"{echo_backend[0]}:{echo_backend[1]}")
    env = {"IRONSOCKET_RUN_DIR": str(tmp_path)}
    clients: list = []
    try:
        wait_until(lambda: "all 2 workers serving" in log.read_text(), what="two workers serving")
        pids = {control.request(p, {"command": "ping"})["pid"] for p in worker_sockets(tmp_path)}
        clients = [tls_connect(port) for _ in range(12)]
        for i, c in enumerate(clients):
            c.sendall(b"hello %d" % i)
            assert c.recv(64) == b"hello %d" % i
        for args in (("--pid", str(proc.pid)), ()):
            out = run("inspect-keys", *args, "--json", env=env)
            assert out.returncode == 0, out.stderr
            doc = json.loads(out.stdout)
            assert doc["pid"] == proc.pid and len(doc["connections"]) == 12
            ids = [row["id"] for row in doc["connections"]]
            assert len(set(ids)) == 12 and {i.split(".")[0] for i in ids} == {"0", "1"}, ids  # p(one worker) = 2^-11
            assert all(row["tx"]["rec_seq"] >= 1 and "key" not in row["tx"] for row in doc["connections"])
        out = run("inspect-keys", "--direct", "--pid", str(proc.pid), env=env)  # would have read "0 connections"
        assert out.returncode == 1 and f"pid {proc.pid} is a --workers supervisor (workers: " in out.stderr, out.stderr

        out = run("upgrade", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        lines = out.stdout.splitlines()
        order = [int(m.group(1)) for m in map(re.compile(r"worker \d \(pid (\d+)\): check:").match, lines) if m]
        assert len(order) == 2 and set(order) == pids, out.stdout
        restored = [int(m.group(1)) for m in map(re.compile(r"worker \d \(pid \d+\): restored (\d+) connections").match, lines) if m]
        assert sum(restored) == 12 and len(restored) == 2, out.stdout
        # One after another: the second worker is asked only once the first one is restored.
        assert out.stdout.index("restored") < out.stdout.index(f"(pid {order[1]}): check:")
        assert re.search(rf"upgraded: 2 workers of pid {proc.pid}, one after another \(same PIDs\), restored 12 "
                         r"connections", out.stdout), out.stdout
        assert {control.request(p, {"command": "ping"})["pid"] for p in worker_sockets(tmp_path)} == pids
        for i, c in enumerate(clients):
            c.sendall(b"again %d" % i)
            assert c.recv(64) == b"again %d" % i

        cert.write_text("garbage\n")
        out = run("upgrade", "--pid", str(proc.pid), env=env)
        assert out.returncode == 2, out.stdout + out.stderr
        assert re.search(rf"upgrade failed: worker 0 \(pid {order[0]}\): .*the other workers keep their current "
                         "program", out.stderr), out.stderr
        assert f"(pid {order[1]}): check:" not in out.stdout  # the roll stopped at the first refusal
        for i, c in enumerate(clients):
            c.sendall(b"still %d" % i)
            assert c.recv(64) == b"still %d" % i
        assert proc.poll() is None and "Traceback" not in log.read_text()
    finally:
        for c in clients:
            c.close()
        stop(proc)


def admin_get(port: int, target: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_workers_admin_is_their_sum_and_answers_through_a_rolling_upgrade(tmp_path: Path, echo_backend) -> None:
    """Issue 13.5: --workers with --admin was refused. Now the supervisor serves the endpoint
    (workersum.py) from each worker's own: one /connections list (ids W.N), /metrics with a
    worker label and each family declared once, and /healthz answering 200 throughout a rolling
    upgrade (it refused probes for ~0.5 s at every upgrade when the endpoint was the worker's)."""
    port, admin_port = free_port(), free_port()
    proc, log = serve(tmp_path, "--workers", "2", "--listen", f"127.0.0.1:{port}",
                      "--backend", f"{echo_backend[0]}:{echo_backend[1]}", "--admin", f"127.0.0.1:{admin_port}")
    try:
        wait_until(lambda: log.read_text().count("serving TLS 1.3 on") == 2, what="two workers serving")
        clients = [tls_connect(port) for _ in range(12)]
        for i, c in enumerate(clients):
            c.sendall(b"hello %d" % i)
            assert c.recv(64) == b"hello %d" % i
        status, body = admin_get(admin_port, "/connections")
        conns = json.loads(body)
        assert status == 200 and len(conns) == 12
        ids = [c["id"] for c in conns]
        assert len(set(ids)) == 12 and all(re.fullmatch(r"[01]\.\d+", i) for i in ids), ids
        assert {c["worker"] for c in conns} == {0, 1}, "SO_REUSEPORT put all 12 on one worker (p = 2^-11)"
        status, metrics = admin_get(admin_port, "/metrics")
        assert status == 200 and "ironsocket_workers_answering 2" in metrics
        declared = [line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE ")]
        assert len(declared) == len(set(declared)), "a family declared twice"
        assert 'worker="0"' in metrics and 'worker="1"' in metrics
        status, body = admin_get(admin_port, "/healthz")
        assert status == 200 and "workers 2" in body, body

        stop, probes, bad = threading.Event(), [0], []

        def poll() -> None:
            while not stop.is_set():
                try:
                    code, text = admin_get(admin_port, "/healthz")
                    if code != 200:
                        bad.append(text)
                except OSError as exc:
                    bad.append(repr(exc))
                probes[0] += 1
                time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "reload done: 2 workers upgraded in place" in log.read_text(), what="rolling reload")
        finally:
            stop.set()
            poller.join(TIMEOUT)
        assert not bad, bad[:3]
        assert probes[0] > 10
        for i, c in enumerate(clients):  # carried by the workers' upgrades
            c.sendall(b"again %d" % i)
            assert c.recv(64) == b"again %d" % i
            c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert refused(admin_port)
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_merge_metrics_declares_each_family_once() -> None:
    from ironsocket.workersum import merge_metrics

    one = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n# HELP h H.\n# TYPE h histogram\n" \
          'h_bucket{le="1"} 2\nh_sum 3\nh_count 2\n'
    two = "# HELP a_total A.\n# TYPE a_total counter\na_total 5\n"
    assert merge_metrics([(0, one), (1, two)]).splitlines() == [
        "# HELP a_total A.", "# TYPE a_total counter", 'a_total{worker="0"} 1', 'a_total{worker="1"} 5',
        "# HELP h H.", "# TYPE h histogram", 'h_bucket{worker="0",le="1"} 2', 'h_sum{worker="0"} 3',
        'h_count{worker="0"} 2']


@pytest.mark.parametrize("args", [("--workers", "auto"), ()], ids=["auto", "default"])
def test_workers_auto_is_one_per_cpu_and_the_default(tmp_path: Path, echo_backend, args: tuple[str, ...]) -> None:
    """Issue 14: one process used both cores of no machine unless told. Now `serve` without
    --workers is --workers auto: on a fixed port, one worker per CPU."""
    cpus = len(os.sched_getaffinity(0))
    proc, log = serve(tmp_path, *args, "--listen", f"127.0.0.1:{free_port()}",
                      "--backend", f"{echo_backend[0]}:{echo_backend[1]}")
    try:
        wait_until(lambda: log.read_text().count("serving TLS 1.3 on") == cpus, what=f"{cpus} workers serving")
        if cpus > 1:
            assert f"{cpus} workers on 127.0.0.1:" in log.read_text()
            assert len(worker_sockets(tmp_path)) == cpus
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        stop(proc)


def test_workers_auto_on_port_0_is_one_process_and_says_why(tmp_path: Path, echo_backend) -> None:
    """On port 0 each worker would get a port of its own: one process, and the log says why."""
    proc, log = serve(tmp_path, "--listen", "127.0.0.1:0", "--backend", f"{echo_backend[0]}:{echo_backend[1]}")
    try:
        wait_until(lambda: "serving TLS 1.3 on" in log.read_text(), what="serving")
        text = log.read_text()
        assert "one process (--workers auto): listen port 0" in text and "workers on" not in text, text
        [sock] = control.find_servers(tmp_path)
        assert control.request(sock, {"command": "ping"})["pid"] == proc.pid  # the server itself, no supervisor
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        stop(proc)


def test_reuse_port_given_is_one_process_and_several_share_the_port(tmp_path: Path, echo_backend) -> None:
    """`serve --reuse-port` is for operators who run several processes on one port themselves:
    under the default --workers auto each stays one process (a supervisor's bind check would
    take the port the others hold for a port in use)."""
    port = free_port()
    procs = []
    try:
        for i in range(2):
            (tmp_path / str(i)).mkdir()
            procs.append(serve(tmp_path / str(i), "--reuse-port", "--listen", f"127.0.0.1:{port}",
                               "--backend", f"{echo_backend[0]}:{echo_backend[1]}"))
        for proc, log in procs:
            wait_until(lambda: "serving TLS 1.3 on" in log.read_text(), what="serving")
            assert "one process (--workers auto): --reuse-port given" in log.read_text()
            assert "workers on" not in log.read_text()
        c = tls_connect(port)
        c.sendall(b"shared")
        assert c.recv(16) == b"shared"
        c.close()
    finally:
        for proc, _ in procs:
            stop(proc)


def test_workers_on_a_port_in_use_is_one_line_and_no_restart_loop(tmp_path: Path) -> None:
    """With workers, each one used to fail at its bind and be restarted every second forever (and
    SO_REUSEPORT would have joined another ironsocket's workers on the port). The supervisor
    tries the address first, as one process would: one line, exit 2."""
    from tests.test_cli import one_line_error, run

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for args in ((), ("--workers", "2")):
            result = run("serve", *args, "--listen", f"127.0.0.1:{port}", "--backend", "127.0.0.1:9",
                         "--cert", str(CERTS / "ecdsa-p256.pem"), "--key", str(CERTS / "ecdsa-p256.key"),
                         env={"IRONSOCKET_RUN_DIR": str(tmp_path)})
            assert result.returncode == 2, result.stderr
            assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in one_line_error(result)


def test_a_worker_that_dies_before_serving_stops_the_supervisor(tmp_path: Path, echo_backend) -> None:
    """A worker that exits before it ever served used to be restarted every second, forever
    (a bind or a load that fails once fails again). Now the supervisor stops the others and
    exits 1. The worker is SIGKILLed as soon as the supervisor logs its start; if it was already
    serving by then (it logs so first), that try does not count and the test tries again."""
    for attempt in range(3):
        run_dir = tmp_path / str(attempt)
        run_dir.mkdir()
        proc, log = serve(run_dir, "--workers", "2", "--listen", f"127.0.0.1:{free_port()}",
                          "--backend", f"{echo_backend[0]}:{echo_backend[1]}")
        try:
            started = re.compile(r"worker 1 started, pid (\d+)")
            wait_until(lambda: started.search(log.read_text()), timeout=TIMEOUT, what="worker 1 started")
            pid = int(started.search(log.read_text()).group(1))  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
            if f"ironsocket-{pid}.sock" in log.read_text():  # it logs its control socket before it is ready
                continue  # maybe it was serving: a crash, which is restarted (not this test)
            assert proc.wait(TIMEOUT) == 1
            text = log.read_text()
            assert re.search(rf"worker 1 \(pid {pid}\) exited with -9 before serving .*; stopping every worker", text), text
            assert "restarting" not in text and "Traceback" not in text
            return
        finally:
            stop(proc, signal.SIGKILL)
    pytest.fail("worker 1 was serving before it could be killed, three times")


@pytest.mark.parametrize("value, message", [("0", "--workers 0: at least 1"), ("many", "--workers 'many': a number")])
def test_bad_workers_is_one_line(value: str, message: str) -> None:
    from tests.test_cli import one_line_error, run

    result = run("serve", "--workers", value, "--listen", "127.0.0.1:9", "--backend", "127.0.0.1:9",
                 "--cert", str(CERTS / "ecdsa-p256.pem"), "--key", str(CERTS / "ecdsa-p256.key"))
    assert result.returncode == 2 and message in one_line_error(result)


def worker_pids(text: str) -> dict[int, int]:
    """worker index -> pid, from the supervisor's "worker N started, pid P" lines (the last of each)."""
    return {int(i): int(p) for i, p in re.findall(r"worker (\d+) started, pid (\d+)", text)}


def demo_request(port: int) -> tuple[str, str]:
    """(sha256 of the served leaf certificate, the demo page's connection id) of one connection."""
    import hashlib
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\nConnection: close\r\n\r\n")
            page = b""
            while chunk := tls.recv(4096):
                page += chunk
    found = re.search(rb"connection id: (\S+)", page)
    assert found, page
    return hashlib.sha256(der).hexdigest(), found.group(1).decode()


def test_demo_workers_share_one_certificate(tmp_path: Path) -> None:
    """Issue 13.6 with --workers: the supervisor makes the demo certificate once and passes its
    memfd to the workers, so connections that land on different workers see the same one."""
    port = free_port()
    proc, log = spawn_serve(tmp_path, "--workers", "2", "--listen", f"127.0.0.1:{port}")
    pids: dict[int, int] = {}  # worker index -> pid
    try:
        wait_until(lambda: log.read_text().count("serving TLS 1.3 on") == 2, what="two workers serving")
        pids = worker_pids(log.read_text())
        seen: dict[int, str] = {}  # worker pid -> fingerprint
        for _ in range(200):  # SO_REUSEPORT spreads by hash: two workers within a few tries
            fingerprint, conn_id = demo_request(port)
            seen.setdefault(pids[int(conn_id.split(".")[0])], fingerprint)
            if len(seen) == 2:
                break
        assert len(seen) == 2, f"every connection landed on one worker: {seen}"
        assert len(set(seen.values())) == 1, f"workers serve different certificates: {seen}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        kill_leftovers(proc, set(pids.values()))
    assert "Traceback" not in log.read_text()


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (gone, or a zombie nobody reaped: the orphans' reaper may not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def kill_supervisor_expect_workers_gone(proc: subprocess.Popen, pids: set[int], port: int) -> None:
    """SIGKILL the supervisor (it forwards nothing): every worker must exit and the port go quiet."""
    proc.kill()
    proc.wait(TIMEOUT)
    for pid in pids:
        wait_until(lambda: gone(pid), what=f"worker {pid} gone after its supervisor")
    assert refused(port)


def kill_leftovers(proc: subprocess.Popen, pids: set[int]) -> None:
    """(a test's finally) The supervisor and the workers we started through it, if still there."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_workers_die_with_their_supervisor_also_after_an_upgrade(tmp_path: Path, echo_backend) -> None:
    """Issue 13.2 leftover: a SIGKILLed supervisor used to leave its workers serving the port.
    Each worker sets PR_SET_PDEATHSIG itself (ironsocket/lifeline.py), in every image: after a
    rolling upgrade (same worker PIDs, parent still the supervisor, not killed by it), a SIGKILL
    of the supervisor makes every worker exit and the port is no longer served."""
    port = free_port()
    proc, log = serve(tmp_path, "--workers", "2", "--listen", f"127.0.0.1:{port}",
                      "--backend", f"{echo_backend[0]}:{echo_backend[1]}", "--drain-timeout", "1")
    pids: set[int] = set()
    try:
        wait_until(lambda: log.read_text().count("serving TLS 1.3 on") == 2, what="two workers serving")
        pids = set(worker_pids(log.read_text()).values())
        assert len(pids) == 2 and all(parent_of(pid) == proc.pid for pid in pids)
        proc.send_signal(signal.SIGUSR2)  # every worker execs its new program: same PID, same parent
        wait_until(lambda: "upgrade done: 2 workers upgraded in place" in log.read_text(),
                   what="the rolling upgrade")
        assert set(worker_pids(log.read_text()).values()) == pids  # none restarted
        assert all(not gone(pid) and parent_of(pid) == proc.pid for pid in pids)
        c = tls_connect(port)
        c.sendall(b"after the upgrade")
        assert c.recv(64) == b"after the upgrade"
        c.close()

        kill_supervisor_expect_workers_gone(proc, pids, port)
    finally:
        kill_leftovers(proc, pids)
    assert "Traceback" not in log.read_text()


def test_a_worker_whose_supervisor_is_already_gone_stops() -> None:
    """The supervisor may die before the worker set PR_SET_PDEATHSIG: then its parent is not the
    PID the supervisor gave it, and `hold` says stop."""
    code = "from ironsocket import lifeline; print(lifeline.hold())"
    env = os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_SUPERVISOR_PID": "1"}  # not our parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert out.stdout.strip() == "False" and "the supervisor (pid 1) is gone" in out.stderr, out
    env["IRONSOCKET_SUPERVISOR_PID"] = str(os.getpid())  # the parent it expects
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert out.stdout.strip() == "True", out
