#!/usr/bin/env python3
"""TLS 1.3 handshakes per second: `ironsocket serve` vs `openssl s_server`, this machine.

Both servers use the same certificate (fixtures/certs/ecdsa-p256: ECDSA P-256 leaf +
intermediate), the same suite (TLS_AES_128_GCM_SHA256) and group (X25519), and send no session
tickets (`--tickets 0`, `-num_tickets 0`). N client worker processes (CPython ssl) each open a
new TCP connection, run a full handshake (no resumption: a fresh SSLContext session is never
reused) and close, in a loop for D seconds. With ``--resume`` both servers send their default
tickets (2 each) and every client resumes the session of one first full handshake
(psk_dhe_ke: no certificate signature, still an ECDHE); a handshake that was not resumed is
counted apart ("full"). A handshake counts when the client's do_handshake() returns (it has the server's
Finished and has sent its own); its latency is connect() + do_handshake().

Notes for reading the numbers: clients and servers share the machine's CPUs; openssl s_server
serves one connection at a time (single-threaded C); ironsocket runs every handshake as a step on
its relay loops (Python, one GIL) and also opens a backend connection (to a small sink process
here) per handshake.

    .venv/bin/python tools/bench/handshakes.py [--workers 2] [--duration 5] [--resume] [--markdown-out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CERTS = ROOT / "fixtures" / "certs"
CERT, KEY, CA = CERTS / "ecdsa-p256.pem", CERTS / "ecdsa-p256.key", CERTS / "ca.pem"
SUITE, GROUP = "TLS_AES_128_GCM_SHA256", "X25519"
READY_TIMEOUT = 30.0

# The backend ironsocket relays to: accepts, reads until EOF, closes. One thread per connection.
SINK_BACKEND = r"""
import socket, threading
s = socket.create_server(("127.0.0.1", 0), backlog=1024)
print("sink: listening on %s:%d" % s.getsockname()[:2], flush=True)
def drain(c):
    c.settimeout(60)
    try:
        while c.recv(65536):
            pass
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=drain, args=(c,), daemon=True).start()
"""


class Server:
    """A server subprocess; its output is drained by a thread and searched for a ready line."""

    def __init__(self, name: str, argv: list[str], ready: str) -> None:
        self.name = name
        # stdin stays an open pipe: openssl s_server quits when its stdin reaches EOF.
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        self.match = self._wait(re.compile(ready))

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            with self._cond:
                if len(self._lines) < 200:  # keep the start for error messages; drain the rest
                    self._lines.append(raw.decode("utf-8", "replace").rstrip())
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait(self, regex: re.Pattern[str]) -> re.Match[str]:
        deadline = time.monotonic() + READY_TIMEOUT
        with self._cond:
            while True:
                for line in self._lines:
                    if m := regex.search(line):
                        return m
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit(f"{self.name} did not start:\n" + "\n".join(self._lines))
                self._cond.wait(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def start_ironsocket(backend: tuple[str, int], resume: bool) -> tuple[list[Server], int]:
    srv = Server(
        "ironsocket serve",
        [sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0",
         "--backend", f"{backend[0]}:{backend[1]}", "--cert", str(CERT), "--key", str(KEY),
         "--ciphers", SUITE, "--groups", "x25519", "--log-level", "warning", "--handshake-timeout", "10",
         *(() if resume else ("--tickets", "0"))],
        r"serving TLS 1\.3 on [\d.]+:(\d+)",
    )
    return [srv], int(srv.match.group(1))


def start_openssl(resume: bool) -> tuple[list[Server], int]:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SystemExit("openssl not found")
    srv = Server(
        "openssl s_server",
        [openssl, "s_server", "-accept", "127.0.0.1:0", "-cert", str(CERT), "-key", str(KEY),
         "-cert_chain", str(CERTS / "intermediate.pem"),  # s_server sends only -cert's first cert
         "-tls1_3", "-ciphersuites", SUITE, "-groups", GROUP, *(() if resume else ("-num_tickets", "0"))],
        r"ACCEPT 127\.0\.0\.1:(\d+)",
    )
    return [srv], int(srv.match.group(1))


def first_session(ctx: ssl.SSLContext, port: int) -> ssl.SSLSession:
    """One full handshake, then read until the server's tickets have arrived."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.settimeout(0.5)  # the servers send nothing but the tickets
        try:
            tls.recv(1)
        except (TimeoutError, ssl.SSLError, OSError):
            pass
        session = tls.session
    if session is None or not session.has_ticket:
        raise SystemExit(f"no session ticket from the server on port {port}")
    return session


def client_worker(port: int, duration: float, start_at: float, resume: bool, out: multiprocessing.Queue) -> None:
    ctx = ssl.create_default_context(cafile=str(CA))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    latencies: list[float] = []
    errors = full = 0
    session = first_session(ctx, port) if resume else None
    while time.time() < start_at:
        time.sleep(0.001)
    end = time.monotonic() + duration
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:  # handshake here
                elapsed = time.perf_counter() - t0
                assert tls.version() == "TLSv1.3" and tls.cipher()[0] == SUITE
                if resume and not tls.session_reused:
                    full += 1
                else:
                    latencies.append(elapsed)
        except (OSError, ssl.SSLError):
            errors += 1
    out.put((latencies, errors, full))


def measure(port: int, workers: int, duration: float, resume: bool = False) -> dict[str, float]:
    mp = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = mp.Queue()
    start_at = time.time() + 1.5  # all workers start together, after spawning
    procs = [mp.Process(target=client_worker, args=(port, duration, start_at, resume, queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=duration + 60) for _ in procs]
    for p in procs:
        p.join(30)
    latencies = sorted(x for lat, _, _ in results for x in lat)
    errors = sum(e for _, e, _ in results)
    full = sum(f for _, _, f in results)
    if not latencies:
        raise SystemExit(f"no handshake completed on port {port} ({errors} errors)")

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {"count": len(latencies), "rate": len(latencies) / duration, "p50": pct(0.50), "p99": pct(0.99),
            "errors": errors, "full": full}


def environment() -> dict[str, str]:
    cpu = "unknown"
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                cpu = row.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    openssl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.uname().release,
        "cpu": f"{cpu} ({os.cpu_count()} CPUs)",
        "python": platform.python_version(),
        "openssl": openssl,
        "python ssl": ssl.OPENSSL_VERSION,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per server (default 5)")
    parser.add_argument("--resume", action="store_true", help="resumed handshakes (session tickets) instead of full ones")
    parser.add_argument("--markdown-out", type=Path, help="append the markdown table to this file")
    args = parser.parse_args()

    sink = Server("sink backend", [sys.executable, "-c", SINK_BACKEND], r"sink: listening on ([\d.]+):(\d+)")
    rows = []
    try:
        sink_addr = (sink.match.group(1), int(sink.match.group(2)))
        for name, start in (("ironsocket serve (userspace, Python)", lambda: start_ironsocket(sink_addr, args.resume)),
                            ("openssl s_server", lambda: start_openssl(args.resume))):
            servers, port = start()
            try:
                print(f"{name}: {args.workers} workers × {args.duration:g}s ...", file=sys.stderr, flush=True)
                rows.append((name, measure(port, args.workers, args.duration, args.resume)))
            finally:
                for s in servers:
                    s.stop()
    finally:
        sink.stop()

    env = environment()
    kind = "resumed" if args.resume else "full"
    what = ("each server's default session tickets, every handshake resumes one session (psk_dhe_ke)"
            if args.resume else "no tickets/resumption")
    lines = [
        f"### TLS 1.3 {kind} handshakes: ironsocket vs openssl s_server ({env['date']})",
        "",
        f"{SUITE}, {GROUP}, ECDSA P-256 cert (fixtures/certs/ecdsa-p256), {what}; "
        f"{args.workers} CPython ssl client processes × {args.duration:g} s, new connection per handshake.",
        "",
        f"kernel `{env['kernel']}` · CPU {env['cpu']} · Python {env['python']} · {env['openssl']} · "
        f"client {env['python ssl']}",
        "",
        f"| server | {kind} handshakes/s | p50 latency (ms) | p99 latency (ms) | handshakes | errors |"
        + (" not resumed |" if args.resume else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if args.resume else ""),
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['rate']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['count']} | {r['errors']} |"
                     + (f" {r['full']} |" if args.resume else ""))
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown_out:
        with args.markdown_out.open("a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
