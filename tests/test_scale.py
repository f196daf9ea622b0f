"""2,000 concurrent idle TLS connections held by one in-process ProxyServer (one worker).

The clients live in a separate process so the proxy's memory (this process's RSS) is measured
without them; the echo backend is a process too. Memory per connection is printed, not asserted
beyond a sanity bound.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time

import pytest

from ironsocket.server import KtlsMode, ProxyConfig, ProxyServer
from ironsocket.tls13.server import ServerConfig
from tests.helpers import CERTS, ROOT, open_fds, store, thread_count

N = 2000

CLIENTS = r"""
import socket, ssl, sys
from concurrent.futures import ThreadPoolExecutor
host, port, n, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3

def one(i):
    raw = socket.create_connection((host, port), timeout=60)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    msg = b"%d\n" % i
    tls.sendall(msg)
    got = b""
    while len(got) < len(msg):
        got += tls.recv(100)
    assert got == msg, (got, msg)
    return tls

with ThreadPoolExecutor(16) as pool:
    conns = list(pool.map(one, range(n)))
print("ready", len(conns), flush=True)
sys.stdin.readline()
for c in conns:
    c.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def nofile(nofile_hard: int) -> None:
    if nofile_hard < 3 * N + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {nofile_hard} is too low for {N} connections")


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_2000_idle_connections_one_worker(nofile, echo_backend) -> None:
    server = ProxyServer(ProxyConfig(listen=("127.0.0.1", 0), backend=echo_backend, ktls=KtlsMode.AUTO,
                                     tls=ServerConfig(certificates=store("ecdsa-p256")), backlog=4096))
    server.start()
    clients = None
    try:
        # Warm up (imports, buffer pool, first handshake) before the baseline.
        warm = subprocess.run([sys.executable, "-c", CLIENTS, *map(str, server.address), "4", str(CERTS / "ca.pem")],
                              input="\n\n", capture_output=True, text=True, timeout=60)
        assert "closed" in warm.stdout, warm.stderr
        _wait(lambda: not server.connections, 20, "warm-up connections closed")
        gc.collect()
        fds0, threads0, rss0 = open_fds(), thread_count(), rss_kib()
        start = time.monotonic()
        clients = subprocess.Popen([sys.executable, "-c", CLIENTS, *map(str, server.address), str(N), str(CERTS / "ca.pem")],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert clients.stdout is not None and clients.stdin is not None
        line = clients.stdout.readline()
        assert line.strip() == f"ready {N}", line
        opened = time.monotonic() - start
        _wait(lambda: len(server.connections) == N
              and all(i.relay is not None for i in list(server.connections.values())), 30, f"{N} relayed connections")
        gc.collect()
        rss1 = rss_kib()
        per_conn = (rss1 - rss0) * 1024 / N
        print(f"\n{N} idle TLS connections ({server.record_layer}) opened in {opened:.1f}s; "
              f"proxy RSS {rss0 / 1024:.1f} → {rss1 / 1024:.1f} MiB: {per_conn / 1024:.1f} KiB per connection; "
              f"fds +{open_fds() - fds0}, threads +{thread_count() - threads0}")
        assert per_conn < 1024 * 1024
        assert open_fds() - fds0 >= 2 * N
        clients.stdin.write("\n")
        clients.stdin.flush()
        assert clients.stdout.readline().strip() == "closed"
        _wait(lambda: not server.connections, 60, "registry empty")
        fds_pipes = fds0 + 2  # the clients' stdin and stdout pipes, still open here
        _wait(lambda: open_fds() == fds_pipes, 20, f"fds back to {fds_pipes} (now {open_fds()})")
        _wait(lambda: thread_count() == threads0, 20, f"threads back to {threads0} (now {thread_count()})")
    finally:
        if clients is not None:
            if clients.poll() is None:
                clients.stdin.write("\n")  # type: ignore[union-attr]
                clients.stdin.close()  # type: ignore[union-attr]
                clients.wait(30)
            clients.stdout.close()  # type: ignore[union-attr]
        server.stop()
