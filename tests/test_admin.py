"""ironsocket.admin: /healthz, /connections, /metrics from a real `ironsocket serve` process."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ironsocket.admin import AdminError, AdminServer, is_loopback, metrics_text
from tests.conftest import ManagedProcess, cert_args
from tests.helpers import CERTS, ROOT, client_context

TIMEOUT = 15.0


@pytest.fixture
def proxy_with_admin(echo_backend: tuple[str, int]) -> Iterator[Callable[..., tuple[ManagedProcess, tuple[str, int], str]]]:
    procs: list[ManagedProcess] = []

    def start(*extra: str) -> tuple[ManagedProcess, tuple[str, int], str]:
        argv = [sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0", "--backend",
                f"{echo_backend[0]}:{echo_backend[1]}", *cert_args("ecdsa-p256"), "--handshake-timeout", "3", *extra]
        proc = ManagedProcess(argv, "ironsocket serve --admin")
        procs.append(proc)
        m = proc.wait_for_line(r"ironsocket: admin endpoint on (\S+)")
        s = proc.wait_for_line(r"ironsocket: serving TLS 1\.3 on ([\d.]+):(\d+)")
        return proc, (s.group(1), int(s.group(2))), m.group(1)

    yield start
    for p in procs:
        p.stop()


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def metrics(base: str) -> dict[tuple[str, tuple], float]:
    _, ctype, text = get(base + "metrics")
    assert ctype.startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def pick(samples: dict, name: str, **labels: str) -> float:
    hits = [v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items())]
    assert hits, f"no sample {name}{labels} in {sorted(samples)}"
    return sum(hits)


def test_healthz_connections_metrics(proxy_with_admin) -> None:
    proc, addr, base = proxy_with_admin("--admin", "127.0.0.1:0")
    assert base.startswith("http://127.0.0.1:")
    status, _, body = get(base + "healthz")
    assert status == 200 and body.startswith("ok\n") and "listeners 1" in body

    # a failed handshake (TLS 1.2 only → protocol_version alert), then a live connection
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = old.wrap_bio(bio_in, bio_out, server_hostname="localhost")
    with socket.create_connection(addr, timeout=TIMEOUT) as raw, pytest.raises(ssl.SSLError, match="VERSION"):
        while True:
            try:
                client.do_handshake()
            except ssl.SSLWantReadError:
                raw.sendall(bio_out.read())
                data = raw.recv(65536)
                if not data:
                    raise ssl.SSLError("EOF before the alert") from None
                bio_in.write(data)

    ctx = client_context()
    ctx.set_alpn_protocols(["http/1.1"])  # the proxy offers no ALPN here: none is chosen
    raw = socket.create_connection(addr, timeout=TIMEOUT)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    try:
        payload = b"x" * 5000
        tls.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += tls.recv(65536)
        me = tls.getsockname()[:2]

        deadline = time.monotonic() + TIMEOUT
        while True:
            _, ctype, body = get(base + "connections")
            conns = json.loads(body)
            if conns and conns[0]["bytes_c2b"] >= 5000 and conns[0]["bytes_b2c"] >= 5000:
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.05)
        assert ctype == "application/json"
        [c] = conns
        assert c["client"] == f"{me[0]}:{me[1]}"
        assert c["sni"] == "localhost"
        assert c["alpn"] is None
        assert c["suite"].startswith("TLS_") and c["mode"] in ("userspace", "ktls-sw", "ktls-device")
        assert c["backend"].startswith("127.0.0.1:") and c["age"] >= 0 and isinstance(c["id"], int)

        m = metrics(base)
        assert pick(m, "ironsocket_listeners") == 1
        assert pick(m, "ironsocket_handshakes_total") == 1
        assert pick(m, "ironsocket_handshake_failures_total", alert="protocol_version") == 1
        assert pick(m, "ironsocket_connections", mode=c["mode"]) == 1
        assert pick(m, "ironsocket_connections") == 1
        assert pick(m, "ironsocket_bytes_total", direction="c2b") == 5000
        assert pick(m, "ironsocket_bytes_total", direction="b2c") == 5000
        ktls_live = pick(m, "ironsocket_ktls_sessions")
        assert ktls_live == (0 if c["mode"] == "userspace" else 1)
        kernel = [k for k in m if k[0] in ("ironsocket_kernel_tls_total", "ironsocket_kernel_tls_current")]
        if Path("/proc/net/tls_stat").exists():
            assert ("ironsocket_kernel_tls_total", (("stat", "TlsTxSw"),)) in kernel, kernel
        else:
            assert kernel == []
        # the completed handshake is in the duration histogram; the certificate's expiry; the build
        assert pick(m, "ironsocket_handshake_duration_seconds_count") == 1
        assert pick(m, "ironsocket_handshake_duration_seconds_bucket", le="+Inf") == 1
        assert 0 < pick(m, "ironsocket_handshake_duration_seconds_sum") < 3  # below the --handshake-timeout
        from cryptography import x509

        leaf = x509.load_pem_x509_certificate((CERTS / "ecdsa-p256.pem").read_bytes())
        left = pick(m, "ironsocket_certificate_expiry_seconds", cert=str(CERTS / "ecdsa-p256.pem"),
                    subject=leaf.subject.rfc4514_string())
        assert abs(left - (leaf.not_valid_after_utc.timestamp() - time.time())) < 600, left
        [(_, build)] = [k for k in m if k[0] == "ironsocket_build_info"]
        assert dict(build)["python"] == sys.version.split()[0] and dict(build)["version"]
    finally:
        tls.close()

    # after close: no live connection, the bytes stay counted
    deadline = time.monotonic() + TIMEOUT
    while json.loads(get(base + "connections")[2]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    m = metrics(base)
    assert pick(m, "ironsocket_connections") == 0
    assert pick(m, "ironsocket_bytes_total", direction="c2b") == 5000
    with pytest.raises(urllib.error.HTTPError) as nf:
        get(base + "nope")
    assert nf.value.code == 404
    nf.value.close()


def test_admin_refuses_non_loopback_without_flag(echo_backend) -> None:
    argv = [sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0", "--backend",
            f"{echo_backend[0]}:{echo_backend[1]}", *cert_args("ecdsa-p256"), "--admin", "0.0.0.0:0"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0: not a loopback address" in out.stderr
    assert "--admin-allow-remote" in out.stderr
    with pytest.raises(AdminError, match="not a loopback address"):
        AdminServer([], listen=("0.0.0.0", 0))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_admin_allow_remote_flag(proxy_with_admin) -> None:
    _, _, base = proxy_with_admin("--admin", "0.0.0.0:0", "--admin-allow-remote")
    port = base.rsplit(":", 1)[1].strip("/")
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200


def test_admin_unix_socket_from_config(tmp_path: Path, echo_backend) -> None:
    sock_path = tmp_path / "admin.sock"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[admin]
unix = "{sock_path}"

[[listeners]]
listen = "127.0.0.1:0"
backend = "{echo_backend[0]}:{echo_backend[1]}"
[[listeners.certs]]
cert = "{CERTS}/ecdsa-p256.pem"
key = "{CERTS}/ecdsa-p256.key"

[[listeners]]
listen = "127.0.0.1:0"
backend = "{echo_backend[0]}:{echo_backend[1]}"
[[listeners.certs]]
cert = "{CERTS}/rsa2048.pem"
key = "{CERTS}/rsa2048.key"
""")
    proc = ManagedProcess([sys.executable, "-m", "ironsocket", "serve", "--config", str(cfg)], "serve --config")
    try:
        proc.wait_for_line(r"ironsocket: admin endpoint on unix:")
        assert oct(sock_path.stat().st_mode & 0o777) == "0o600"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(TIMEOUT)
            s.connect(str(sock_path))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]
        assert data.endswith(b"ok\nlisteners 2\n")
    finally:
        proc.stop()
    assert not sock_path.exists()


def test_metrics_text_kernel_counters() -> None:
    """Every /proc/net/tls_stat field becomes one sample: the cumulative ones typed counter, the
    TlsCurr* ones (sessions open now) gauge; none when the file is absent. (The host has no
    kTLS: the real file is read in the VM, test_healthz_connections_metrics.)"""
    text = metrics_text([], tls_stat=lambda: {"TlsTxSw": 3, "TlsRxSw": 2, "TlsDecryptError": 0, "TlsCurrTxSw": 1})
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["ironsocket_kernel_tls"].type == "counter"
    samples = {s.labels["stat"]: s.value for s in fams["ironsocket_kernel_tls"].samples}
    assert samples == {"TlsTxSw": 3, "TlsRxSw": 2, "TlsDecryptError": 0}
    assert fams["ironsocket_kernel_tls_current"].type == "gauge"
    assert {s.labels["stat"]: s.value for s in fams["ironsocket_kernel_tls_current"].samples} == {"TlsCurrTxSw": 1}
    assert "ironsocket_kernel_tls" not in metrics_text([], tls_stat=dict)


def test_metrics_text_help_and_type_lines() -> None:
    """Each family: one # HELP and one # TYPE line, before its samples, and the sample names
    of its type (counter: _total; histogram: _bucket/_sum/_count)."""
    from ironsocket.counters import Histogram

    class Listener:  # what metrics_text reads of a server, with a real Histogram and BackendHealth
        def __init__(self) -> None:
            from ironsocket.backend import BackendHealth
            from ironsocket.server import ProxyConfig
            from tests.helpers import config as tls_config

            self.config = ProxyConfig(listen=("127.0.0.1", 1), backend=("127.0.0.1", 9), tls=tls_config(), name="x")
            self.handshakes_ok, self.handshake_failures = 2, {}
            self.handshake_seconds = Histogram()
            self.handshake_seconds.observe(0.003)
            self.handshake_seconds.observe(20.0)
            self.backend_health = BackendHealth({"ECONNREFUSED": 4})

        def registry(self) -> tuple[list, list[int]]:
            return [], [0, 0]

    text = metrics_text([Listener()], tls_stat=lambda: {"TlsTxSw": 3, "TlsCurrTxSw": 1})
    lines = text.splitlines()
    declared: dict[str, str] = {}
    for i, line in enumerate(lines):
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert lines[i + 1].startswith(f"# TYPE {name} "), lines[i:i + 2]
            assert name not in declared, name
            declared[name] = lines[i + 1].split()[3]
        elif not line.startswith("#"):
            sample = re.match(r"[a-z_]+", line).group()
            family = max((n for n in declared if sample.startswith(n)), key=len)
            kind = declared[family]
            assert sample == family or (kind == "histogram" and sample in (family + "_bucket", family + "_sum",
                                                                          family + "_count")), line
            if kind == "counter":
                assert family.endswith("_total"), family
    assert declared["ironsocket_handshake_duration_seconds"] == "histogram"
    assert declared["ironsocket_backend_connect_failures_total"] == "counter"
    assert 'ironsocket_handshake_duration_seconds_bucket{listener="x",le="0.005"} 1' in lines
    assert 'ironsocket_handshake_duration_seconds_bucket{listener="x",le="10.0"} 1' in lines
    assert 'ironsocket_handshake_duration_seconds_bucket{listener="x",le="+Inf"} 2' in lines
    assert 'ironsocket_handshake_duration_seconds_count{listener="x"} 2' in lines
    assert 'ironsocket_backend_connect_failures_total{listener="x",reason="ECONNREFUSED"} 4' in lines
    fams = {f.name: f for f in text_string_to_metric_families(text)}  # and the real parser agrees
    assert fams["ironsocket_handshake_duration_seconds"].type == "histogram"


# -- limits: half-sent requests cannot pin the endpoint ---------------------------------------------
HALF = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"  # no empty line: the request never completes


def half_sent(address: tuple[str, int], n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(address, timeout=TIMEOUT)
        s.sendall(HALF)
        socks.append(s)
    return socks


def closed_without_answer(s: socket.socket, within: float) -> bool:
    """True if the server closes ``s`` within ``within`` seconds having sent nothing."""
    s.settimeout(within)
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def listen_backlog(port: int) -> int | None:
    """The backlog of the TCP listener on ``port`` (ss shows it as Send-Q), None without ss."""
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return None
    [line] = out.stdout.splitlines()
    return int(line.split()[2])


def test_half_sent_requests_time_out_and_do_not_block_healthz() -> None:
    """In-process AdminServer with a short timeout (a parameter) and bound, real sockets."""
    timeout, bound = 2.0, 8
    admin = AdminServer([], listen=("127.0.0.1", 0), request_timeout=timeout, max_connections=bound)
    admin.start()
    try:
        address = admin._httpd.server_address[:2]
        backlog = listen_backlog(address[1])
        assert backlog is None or backlog >= 128, backlog
        threads_before = threading.active_count()
        started = time.monotonic()
        socks = half_sent(address, 100)
        try:
            status, _, body = get(admin.address + "healthz")  # answered now, not after the timeout
            assert status == 200 and body.startswith("ok\n")
            assert time.monotonic() - started < timeout, "healthz had to wait for the half-sent requests"
            assert threading.active_count() <= threads_before + bound, threading.active_count()
            # every half-sent request is closed, none answered, by the deadline (+ reaper slack)
            assert all(closed_without_answer(s, max(0.1, started + timeout + 2 - time.monotonic())) for s in socks)
        finally:
            for s in socks:
                s.close()
        # a client that sends its request slowly, a header line at a time, is cut off too
        with socket.create_connection(address, timeout=TIMEOUT) as slow:
            t0 = time.monotonic()
            slow.sendall(b"GET /healthz HTTP/1.1\r\n")
            cut = False
            while time.monotonic() - t0 < timeout + 2:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    cut = True
                    break
                if closed_without_answer(slow, 0.2):
                    cut = True
                    break
            assert cut and time.monotonic() - t0 >= timeout * 0.9
        assert get(admin.address + "healthz")[0] == 200
    finally:
        admin.stop()


def test_serve_admin_survives_100_half_sent_requests(proxy_with_admin) -> None:
    """The real `ironsocket serve --admin`, default limits: 100 half-sent requests neither pin 100
    threads nor stop /healthz, and all are closed after REQUEST_TIMEOUT."""
    from ironsocket.admin import MAX_CONNECTIONS, REQUEST_TIMEOUT

    proc, _, base = proxy_with_admin("--admin", "127.0.0.1:0")
    port = int(base.rsplit(":", 1)[1].strip("/"))

    def threads() -> int:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(l for l in status.splitlines() if l.startswith("Threads:")).split()[1])

    assert get(base + "healthz")[0] == 200
    before = threads()
    started = time.monotonic()
    socks = half_sent(("127.0.0.1", port), 100)
    try:
        assert get(base + "healthz")[0] == 200
        assert threads() <= before + MAX_CONNECTIONS, threads()
        assert all(closed_without_answer(s, max(0.1, started + REQUEST_TIMEOUT + 3 - time.monotonic())) for s in socks)
    finally:
        for s in socks:
            s.close()
    assert get(base + "healthz")[0] == 200


def test_admin_unix_socket_replaces_only_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # another program's live socket
    other.bind(str(path))
    other.listen(4)
    try:
        with pytest.raises(AdminError, match=f"admin socket path {path} is a socket another program listens on"):
            AdminServer([], unix=str(path))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(path))  # still there, still theirs
    finally:
        other.close()
    admin = AdminServer([], unix=str(path))  # nobody listens any more: stale, replaced
    admin._httpd.server_close()  # (never started: stop() would wait for serve_forever)
    path.unlink()
    path.write_text("keep\n")
    with pytest.raises(AdminError, match=f"admin socket path {path} is a regular file"):
        AdminServer([], unix=str(path))
    assert path.read_text() == "keep\n"


def test_healthz_never_refuses_through_upgrades(tmp_path: Path, echo_backend) -> None:
    """Issue 13.4: the admin listener is carried over exec like the TLS listener, so a load
    balancer polling /healthz every 10 ms through 5 upgrades is never refused (a probe that
    arrives while the program execs waits in the backlog and is answered after). It used to be
    closed and bound again: ~0.5 s of refused probes per upgrade."""
    import urllib.error

    from tests.test_upgrade import Server

    server = Server(tmp_path, echo_backend[1], "--admin", "127.0.0.1:0")
    try:
        import re

        port = int(server.wait_for(r"admin endpoint on http://127\.0\.0\.1:(\d+)/").group(1))
        stop = threading.Event()
        seen = {"ok": 0, "refused": 0}
        other: list[str] = []

        def poll() -> None:
            while not stop.is_set():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as resp:
                        seen["ok" if resp.status == 200 else "refused"] += 1
                except urllib.error.URLError as exc:
                    if isinstance(exc.reason, ConnectionRefusedError):
                        seen["refused"] += 1
                    else:
                        other.append(repr(exc))
                except OSError as exc:
                    other.append(repr(exc))
                time.sleep(0.01)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        for n in range(1, 6):
            result = server.upgrade()
            assert result.returncode == 0, result.stderr
            server.wait_for(r"upgrade: restored (\d+) connections", count=n)
        time.sleep(0.2)
        stop.set()
        poller.join(70)
        assert seen["refused"] == 0 and not other, (seen, other[:3])
        assert seen["ok"] > 50, seen
        assert len(re.findall(r"admin endpoint on", server.text())) >= 1
    finally:
        server.close()


def healthz(port: int) -> tuple[int, str]:
    import urllib.error

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_backend_down_healthz_and_metrics_through_upgrades(tmp_path: Path) -> None:
    """A backend that refuses connections: /healthz 503 with the reason, a client's connect
    failure counted by reason; the counters survive a real upgrade (`ironsocket upgrade
    --socket CTL`), a rollback and a refused upgrade, each counted; the backend comes up:
    /healthz 200 again, with no client traffic (the probe)."""
    from tests.test_upgrade import Server, checked_then_different

    gate = socket.socket()  # bound but not listening: every connect to it is refused
    gate.bind(("127.0.0.1", 0))
    backend_port = gate.getsockname()[1]
    server = Server(tmp_path, backend_port, "--admin", "127.0.0.1:0")
    try:
        admin_port = int(server.wait_for(r"admin endpoint on http://127\.0\.0\.1:(\d+)/").group(1))
        base = f"http://127.0.0.1:{admin_port}/"
        status, body = healthz(admin_port)
        assert status == 503, body
        [reason] = body.splitlines()[:1]
        assert reason.startswith(f"unhealthy: backend 127.0.0.1:{backend_port} ") and "refused" in reason, body
        assert not [k for k in metrics(base) if k[0] == "ironsocket_backend_connect_failures_total"]  # probes: not counted

        raw = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        with client_context().wrap_socket(raw, server_hostname="localhost") as tls:  # the handshake completes
            with pytest.raises((ssl.SSLError, ConnectionError)):
                tls.recv(100)  # then internal_error: no backend
        server.wait_for(r"backend unreachable")

        def counters() -> tuple[float, ...]:
            m = metrics(base)
            return (pick(m, "ironsocket_backend_connect_failures_total", reason="ECONNREFUSED"),
                    pick(m, "ironsocket_handshake_duration_seconds_count"), pick(m, "ironsocket_upgrades_total"),
                    pick(m, "ironsocket_upgrade_rollbacks_total"), pick(m, "ironsocket_upgrades_refused_total"))

        assert counters() == (1, 1, 0, 0, 0)
        result = server.upgrade()
        assert result.returncode == 0, result.stderr
        server.wait_for(r"upgrade: restored (\d+) connections", count=1)
        assert counters() == (1, 1, 1, 0, 0)
        lying = checked_then_different(tmp_path, "lying-ironsocket", "--cert /nonexistent/c.pem --key /nonexistent/k.pem")
        result = server.upgrade("--exec", str(lying))
        assert result.returncode != 0 and "rolled back" in result.stderr, result.stderr
        server.wait_for(r"upgrade: restored (\d+) connections", count=2)
        assert counters() == (1, 1, 1, 1, 0)
        result = server.upgrade("--exec", str(tmp_path / "no-such-program"))
        assert result.returncode != 0
        assert counters() == (1, 1, 1, 1, 1)

        gate.listen(8)  # the backend is up: /healthz follows without a client's connect
        deadline = time.monotonic() + TIMEOUT
        while (answer := healthz(admin_port))[0] != 200:
            assert time.monotonic() < deadline, answer
            time.sleep(0.1)
        assert answer[1] == "ok\nlisteners 1\n"
    finally:
        server.close()
        gate.close()
