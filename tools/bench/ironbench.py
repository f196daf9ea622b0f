#!/usr/bin/env python3
"""ironsocket side by side with stunnel, HAProxy and nginx, and the kernel's own kTLS limit.

Run it as `tools/bench/run [options]` (that wrapper picks the repo's venv python). Each contender
terminates TLS 1.3 (TLS_AES_128_GCM_SHA256, X25519, fixtures/certs/ecdsa-p256 chain) on loopback
in front of the SAME plain backend, started fresh per contender:

  backend   this file's `backend` subcommand: one epoll loop per CPU (pre-forked, sharing the
            listening socket), no thread per connection (10,000 idle connections must not cost
            10,000 threads). The first byte a client sends picks the mode: D = stream 1 MiB
            sends forever (download), U = read and discard (upload), E = echo, I = answer "K"
            then idle. It is measured alone first ("backend alone": plain TCP client, no TLS).
  clients   CPython `ssl` (OpenSSL, AES-NI) in several spawned processes, 1 MiB buffers:
            recv_into a preallocated buffer / sendall of a 256 KiB block. Why not openssl
            s_client/s_time: s_client reads and writes through 16 KiB stdio with one process
            per stream and cannot source data fast; s_time only does handshakes. The clients'
            own ceiling is printed first ("TLS client alone": the same clients against a TLS
            listener inside the backend, no proxy).

Tests (--quick shortens all of them; --tests runs only the named ones, e.g. `--tests latency`;
--rounds N runs the contenders N times in turn, --ironsocket-tree DIR adds another tree's
ironsocket to each round: old and new side by side, alternating; --ironsocket-workers N one with
--workers N):
  1 (bulk) MiB/s, 1 and 16 streams, download (backend→client) and upload (client→backend);
    for every contender the CPU seconds its processes spent per GB relayed (utime+stime)
  2 (handshakes) full and resumed handshakes/s with N concurrent client processes (tools/bench/handshakes.py's client;
    every contender with its default session tickets)
  3 (latency) 64-byte echo ping-pong latency p50/p99 on kept-alive connections (1 and 16 connections)
  4 (idle) RSS per idle connection at 1,000 and 10,000 connections (whole process group of the proxy)
  5 (limit) the limit (only where the kernel has kTLS): a loopback TCP pair with kTLS TX on one end and
    kTLS RX on the other, os.sendfile in, recv_into out, no proxy
  (crypto) AES-128-GCM alone, OpenSSL and the kernel's

Profiles: --profile samples ironsocket's Python with py-spy; --perf records the whole machine
with perf (kernel included: with kTLS the relayed bytes never reach Python) during every
1-stream bulk test and prints each contender's top symbols.

Everything started here runs in its own session and is killed by process group at the end,
also on Ctrl-C and on errors.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import handshakes as hs  # noqa: E402  (the handshake benchmark: its client and measure())
from _procs import STARTED, kill_everything, kill_group, spawn  # noqa: E402

CERTS = ROOT / "fixtures" / "certs"
CERT, KEY, CA = CERTS / "ecdsa-p256.pem", CERTS / "ecdsa-p256.key", CERTS / "ca.pem"
SUITE, GROUP = "TLS_AES_128_GCM_SHA256", "X25519"
PEERS = ("stunnel", "haproxy", "nginx", "ironsocket")
TESTS = ("bulk", "handshakes", "latency", "idle", "limit", "crypto")  # --tests: the numbered tests above, and crypto alone
MiB = 1 << 20
IN_VM = os.environ.get("IRONSOCKET_IN_VM") == "1"
VM_DEFAULT_KERNEL = "6.1"  # tools/vm/ktls-vm's default


def _where() -> str:
    """The section this run writes: "host", "VM" (the harness's default kernel) or "VM 6.12"."""
    if not IN_VM:
        return "host"
    major_minor = ".".join(platform.release().split(".")[:2])
    return "VM" if major_minor == VM_DEFAULT_KERNEL else f"VM {major_minor}"


HOST_OR_VM = _where()
CHUNK = 256 * 1024


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes we start
def group_pids(pgid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        if int(rest[2]) == pgid:
            pids.append(int(d))
    return pids


def group_rss_kib(pgid: int) -> int:
    total = 0
    for pid in group_pids(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def group_cpu_seconds(pgid: int) -> float:
    ticks = 0
    for pid in group_pids(pgid):
        try:
            rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(rest[11]) + int(rest[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, logfile: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {tail(logfile)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"not listening on {port} after {timeout:.0f}s: {tail(logfile)}")


def tail(path: Path, n: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


# ------------------------------------------------------------------ the backend (subprocess)
def backend_main(workers: int) -> None:
    """Plain listener (epoll, pre-forked) + a TLS listener (threads) for the client-alone baseline."""
    plain = socket.create_server(("127.0.0.1", 0), backlog=8192)
    tls = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(f"backend: plain {plain.getsockname()[1]} tls {tls.getsockname()[1]}", flush=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(CERT, KEY)
    ctx.num_tickets = 0
    for _ in range(workers - 1):
        if os.fork() == 0:
            break
    threading.Thread(target=_tls_accept_loop, args=(tls, ctx), daemon=True).start()
    _epoll_loop(plain)


def _tls_accept_loop(lsock: socket.socket, ctx: ssl.SSLContext) -> None:
    while True:
        try:
            c, _ = lsock.accept()
        except BlockingIOError:
            continue
        except OSError:
            return
        threading.Thread(target=_tls_conn, args=(c, ctx), daemon=True).start()


def _tls_conn(c: socket.socket, ctx: ssl.SSLContext) -> None:
    buf = bytearray(MiB)
    view = memoryview(buf)
    src = memoryview(b"x" * CHUNK)
    try:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = ctx.wrap_socket(c, server_side=True)
        n = s.recv_into(view)
        if not n:
            return
        mode, first = view[0], bytes(view[1:n])
        if mode == ord("D"):
            while True:
                s.sendall(src)
        elif mode == ord("E"):
            if first:
                s.sendall(first)
            while n := s.recv_into(view):
                s.sendall(view[:n])
        else:
            if mode == ord("I"):
                s.sendall(b"K")
            while s.recv_into(view):
                pass
    except (OSError, ValueError):
        pass
    finally:
        c.close()


def _epoll_loop(lsock: socket.socket) -> None:
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    buf = bytearray(MiB)
    view = memoryview(buf)
    src = memoryview(b"x" * MiB)
    D, E, I = ord("D"), ord("E"), ord("I")

    def close(s: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(s)
        s.close()

    while True:
        for key, ev in sel.select():
            s = key.fileobj
            st = key.data
            if st is None:
                while True:
                    try:
                        c, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # EMFILE etc.: try again on the next event
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(c, selectors.EVENT_READ, [None, b""])  # [mode, pending echo]
                continue
            try:
                if ev & selectors.EVENT_READ:
                    try:
                        n = s.recv_into(view)
                    except (BlockingIOError, InterruptedError):
                        n = -1
                    if n == 0:
                        close(s)
                        continue
                    if n > 0:
                        data = view[:n]
                        if st[0] is None:
                            st[0], data = view[0], view[1:n]
                            if st[0] == D:
                                sel.modify(s, selectors.EVENT_READ | selectors.EVENT_WRITE, st)
                            elif st[0] == I:
                                s.send(b"K")
                        if st[0] == E and len(data):
                            out = st[1] + bytes(data)
                            sent = s.send(out) if not st[1] else 0
                            st[1] = out[sent:]
                            if st[1]:
                                sel.modify(s, selectors.EVENT_READ | selectors.EVENT_WRITE, st)
                if ev & selectors.EVENT_WRITE:
                    if st[0] == D:
                        with contextlib.suppress(BlockingIOError):
                            s.send(src)
                    elif st[1]:
                        sent = s.send(st[1])
                        st[1] = st[1][sent:]
                        if not st[1]:
                            sel.modify(s, selectors.EVENT_READ, st)
            except OSError:
                close(s)


# ------------------------------------------------------------------ client workers (spawned)
def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(CA))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def connect(port: int, tls: bool, ctx: ssl.SSLContext | None, timeout: float = 60.0) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not tls:
        return raw
    assert ctx is not None
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    if s.cipher()[0] != SUITE:
        raise RuntimeError(f"negotiated {s.cipher()[0]}, wanted {SUITE}")
    return s


def _wait_until(t: float) -> None:
    while (d := t - time.time()) > 0:
        time.sleep(min(d, 0.05))


def _sync(sync, n_ok: int) -> float:
    """Tell the parent this worker is connected; return the common start time it then sets."""
    ready, go, start = sync
    ready.put(n_ok)
    go.wait()
    return start.value


def bulk_worker(port: int, tls: bool, direction: str, nthreads: int, warm: float, dur: float, sync, q) -> None:
    ctx = client_context() if tls else None
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    socks: list = [None] * nthreads
    for i in range(nthreads):
        with contextlib.suppress(Exception):
            socks[i] = connect(port, tls, ctx)
            socks[i].sendall(b"D" if direction == "down" else b"U")
    start_at = _sync(sync, sum(1 for x in socks if x))

    def one(s) -> None:
        count, err = 0, ""
        try:
            if s is None:
                raise RuntimeError("could not connect")
            w0 = start_at + warm
            w1 = w0 + dur
            _wait_until(start_at)
            if direction == "down":
                view = memoryview(bytearray(MiB))
                while (t := time.time()) < w1:
                    n = s.recv_into(view)
                    if not n:
                        raise RuntimeError("EOF from proxy")
                    if t >= w0:
                        count += n
            else:
                block = memoryview(b"u" * CHUNK)
                while time.time() < w1:
                    s.sendall(block)
                    if time.time() >= w0:
                        count += CHUNK
            with contextlib.suppress(OSError):
                s.close()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            err = f"{exc.__class__.__name__}: {exc}"
        with lock:
            results.append((count, err))

    threads = [threading.Thread(target=one, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put(results)


def latency_worker(port: int, tls: bool, nthreads: int, warm: float, dur: float, sync, q) -> None:
    ctx = client_context() if tls else None
    out: list[float] = []
    errs: list[str] = []
    lock = threading.Lock()
    socks: list = [None] * nthreads
    for i in range(nthreads):
        with contextlib.suppress(Exception):
            socks[i] = connect(port, tls, ctx)
            socks[i].sendall(b"E")
    start_at = _sync(sync, sum(1 for x in socks if x))

    def one(s) -> None:
        lat: list[float] = []
        try:
            if s is None:
                raise RuntimeError("could not connect")
            msg = b"p" * 64
            buf = bytearray(64)
            view = memoryview(buf)
            _wait_until(start_at)
            w0, w1 = start_at + warm, start_at + warm + dur
            while (now := time.time()) < w1:
                t0 = time.perf_counter()
                s.sendall(msg)
                got = 0
                while got < 64:
                    n = s.recv_into(view[got:])
                    if not n:
                        raise RuntimeError("EOF from proxy")
                    got += n
                if now >= w0:
                    lat.append(time.perf_counter() - t0)
            s.close()
        except Exception as exc:  # noqa: BLE001
            with lock:
                errs.append(f"{exc.__class__.__name__}: {exc}")
        with lock:
            out.extend(lat)

    threads = [threading.Thread(target=one, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put((out, errs))


def idle_worker(port: int, tls: bool, stages: list[int], q, go) -> None:
    """Opens connections up to stages[i] (this worker's share), reports, waits for go[i]."""
    ctx = client_context() if tls else None
    conns: list[socket.socket] = []
    errors = 0
    last = ""
    for i, target in enumerate(stages):
        while len(conns) < target and errors < 50:
            try:
                s = connect(port, tls, ctx, timeout=60)
                s.sendall(b"I")
                if s.recv(1) != b"K":
                    raise RuntimeError("no K from the backend")
                conns.append(s)
            except Exception as exc:  # noqa: BLE001
                errors += 1
                last = f"{exc.__class__.__name__}: {exc}"
        q.put((i, len(conns), errors, last))
        go[i].wait()
    for s in conns:
        with contextlib.suppress(OSError):
            s.close()


def run_procs(target, argsets: list[tuple], timeout: float) -> list:
    """Start workers; once all are connected, give them one start time (spawning is slow in the VM)."""
    mp = multiprocessing.get_context("spawn")
    q = mp.Queue()
    sync = (mp.Queue(), mp.Event(), mp.Value("d", 0.0))
    procs = [mp.Process(target=target, args=(*a, sync, q), daemon=True) for a in argsets]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            sync[0].get(timeout=600)
        sync[2].value = time.time() + 0.2
        sync[1].set()
        return [q.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(2)


# ------------------------------------------------------------------ contenders
@dataclass
class Settings:
    quick: bool
    bulk_dur: float
    warm: float
    hs_dur: float
    hs_workers: int
    lat_dur: float
    idle_counts: tuple[int, ...]
    procs: int
    ktls: bool
    tmp: Path
    profile: bool = False
    perf: bool = False
    startup_timeout: float = 60.0
    nofile: int = 20000
    tests: frozenset[str] = frozenset(TESTS)
    rounds: int = 1


@dataclass
class Contender:
    name: str
    label: str
    port: int = 0
    tls: bool = True
    proc: subprocess.Popen | None = None
    note: str = ""
    results: dict = field(default_factory=dict)

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc else None


def start_backend(s: Settings) -> tuple[subprocess.Popen, int, int]:
    logf = s.tmp / f"backend-{time.monotonic_ns()}.log"
    # Python's ssl cannot choose TLS 1.3 suites or groups: an OpenSSL config does, for the
    # backend's own TLS listener (the "TLS client alone" baseline) only.
    conf = s.tmp / "backend-openssl.cnf"
    conf.write_text("openssl_conf = conf\n[conf]\nssl_conf = ssl\n[ssl]\nsystem_default = sd\n"
                    f"[sd]\nCiphersuites = {SUITE}\nGroups = {GROUP}\nMinProtocol = TLSv1.3\n")
    p = spawn([sys.executable, str(Path(__file__)), "backend", "--workers", str(s.procs)], logf,
              env=dict(os.environ, OPENSSL_CONF=str(conf)))
    deadline = time.monotonic() + s.startup_timeout
    while time.monotonic() < deadline:
        if m := re.search(r"backend: plain (\d+) tls (\d+)", tail(logf, 200)):
            return p, int(m.group(1)), int(m.group(2))
        if p.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"backend did not start: {tail(logf)}")


def combined_pem(s: Settings) -> Path:
    path = s.tmp / "ecdsa-p256-combined.pem"
    if not path.exists():
        path.write_text(CERT.read_text() + KEY.read_text())
        path.chmod(0o600)
    return path


def start_peer(name: str, backend_port: int, s: Settings, tree: Path | str | None = None) -> Contender:
    """Start one contender; ``tree``: ironsocket from that source tree instead of this one, or
    (a str) this one with ``--workers tree``."""
    c = Contender(name, name)
    workers = tree if isinstance(tree, str) else None
    tree = None if isinstance(tree, str) else tree
    logf = s.tmp / f"{name}.log"
    d = s.tmp / name
    d.mkdir(exist_ok=True)
    if name == "ironsocket":
        from ironsocket import ktls

        c.port = free_port()
        # Every contender with its default session tickets (ironsocket: 2, as OpenSSL's).
        argv = [sys.executable, "-m", "ironsocket", "serve", "--listen", f"127.0.0.1:{c.port}",
                "--backend", f"127.0.0.1:{backend_port}", "--cert", str(CERT), "--key", str(KEY),
                "--ciphers", SUITE, "--groups", "x25519", "--log-level", "warning",
                "--max-connections", "30000", "--idle-timeout", "0", "--handshake-timeout", "60"]
        if workers:
            argv += ["--workers", workers]
        env = None
        if tree is not None:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(tree), os.environ.get("PYTHONPATH")))))
        # In the tree: `python -m` puts the working directory first on sys.path, so from the repo
        # this tree's package would shadow the other's PYTHONPATH (until 2026-12-04 it did: both
        # labels ran this tree).
        c.proc = spawn(argv, logf, env=env, cwd=tree if tree is not None else ROOT)
        wait_port(c.port, c.proc, logf, s.startup_timeout)  # at --log-level warning it says nothing
        layer = "kTLS" if ktls.probe().available else "userspace"
        c.note, c.label = f"record layer: {layer}", (f"ironsocket ({layer})" + (f" @{tree}" if tree else "")
                                                     + (f" --workers {workers}" if workers else ""))
        return c
    c.port = free_port()
    if name == "stunnel":
        conf = d / "stunnel.conf"
        conf.write_text(f"""foreground = yes
pid =
syslog = no
debug = 3
[tls]
accept = 127.0.0.1:{c.port}
connect = 127.0.0.1:{backend_port}
cert = {CERT}
key = {KEY}
sslVersionMin = TLSv1.3
sslVersionMax = TLSv1.3
ciphersuites = {SUITE}
curves = {GROUP}
TIMEOUTidle = 3600
""")
        exe = shutil.which("stunnel4") or shutil.which("stunnel")
        c.proc = spawn([exe, str(conf)], logf)
        c.label = "stunnel (userspace)"
    elif name == "haproxy":
        conf = d / "haproxy.cfg"
        conf.write_text(f"""global
    maxconn {(s.nofile - 200) // 2}
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-bind-ciphersuites {SUITE}
defaults
    mode tcp
    timeout connect 5s
    timeout client 3600s
    timeout server 3600s
frontend tls_in
    bind 127.0.0.1:{c.port} ssl crt {combined_pem(s)} curves {GROUP} ciphersuites {SUITE} ssl-min-ver TLSv1.3
    default_backend plain
backend plain
    server b1 127.0.0.1:{backend_port}
""")
        c.proc = spawn([shutil.which("haproxy"), "-db", "-f", str(conf)], logf)
        c.label = "HAProxy (userspace)"
    elif name == "nginx":
        mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
        ktls_line = "ssl_conf_command Options KTLS;" if s.ktls else ""
        conf = d / "nginx.conf"
        conf.write_text(f"""{"load_module " + mod + ";" if os.path.exists(mod) else ""}
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile {s.nofile};
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {s.nofile}; }}
stream {{
    server {{
        listen 127.0.0.1:{c.port} ssl;
        proxy_pass 127.0.0.1:{backend_port};
        ssl_certificate {CERT};
        ssl_certificate_key {KEY};
        ssl_protocols TLSv1.3;
        ssl_conf_command Ciphersuites {SUITE};
        ssl_ecdh_curve {GROUP};
        {ktls_line}
        proxy_timeout 3600s;
    }}
}}
""")
        c.proc = spawn([shutil.which("nginx"), "-e", str(d / "error.log"), "-p", str(d), "-c", str(conf)], logf)
        c.label = "nginx (kTLS TX via OpenSSL)" if s.ktls else "nginx (userspace)"
    else:
        raise ValueError(name)
    wait_port(c.port, c.proc, logf, s.startup_timeout)
    return c


# ------------------------------------------------------------------ measurements
def tls_stat() -> dict[str, int]:
    try:
        from ironsocket import ktls
        return ktls.tls_stat()
    except Exception:  # noqa: BLE001
        return {}


def measure_bulk(c: Contender, direction: str, streams: int, s: Settings, profile_to: Path | None = None,
                 perf_to: Path | None = None) -> dict:
    nproc = min(streams, s.procs)
    per = [streams // nproc + (1 if i < streams % nproc else 0) for i in range(nproc)]
    cpu0 = group_cpu_seconds(c.pgid) if c.pgid else 0.0
    prof = None
    if profile_to is not None and c.pgid:
        prof = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(c.pgid), "--rate", "250",
             "--duration", str(int(s.warm + s.bulk_dur + 4)), "--format", "raw",
             "--nonblocking", "-o", str(profile_to)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        STARTED.append(prof)
    perf = start_perf(perf_to) if perf_to is not None and c.pgid else None
    pids = group_pids(c.pgid) if c.pgid else []
    try:
        res = run_procs(bulk_worker, [(c.port, c.tls, direction, k, s.warm, s.bulk_dur) for k in per],
                        timeout=s.warm + s.bulk_dur + 120)
    finally:
        if perf is not None:
            stop_perf(perf, perf_to, pids)
    cpu1 = group_cpu_seconds(c.pgid) if c.pgid else 0.0
    if prof is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            prof.wait(30)
        kill_group(prof)
    flat = [r for chunk in res for r in chunk]
    total = sum(n for n, _ in flat)
    errors = [e for _, e in flat if e]
    # CPU over the whole test (incl. warm-up and the tail): bytes over the same span are unknown,
    # so scale the window's bytes by (warm+dur)/dur as the relayed estimate for this ratio.
    relayed = total * (s.warm + s.bulk_dur) / s.bulk_dur
    out = {"MiBps": total / s.bulk_dur / MiB, "errors": errors,
           "cpu_s_per_GB": (cpu1 - cpu0) / (relayed / 1e9) if relayed and c.pgid else None}
    return out


def start_perf(out: Path) -> subprocess.Popen | None:
    """System-wide `perf record` (kernel included: with kTLS the work is in the kernel, where
    py-spy cannot see). cpu-clock is a software event, so it also samples in the emulated VM."""
    exe = shutil.which("perf")
    if exe is None:
        log("perf not found (apt-get install linux-perf): no kernel profile")
        return None
    ready = Path(f"{out}.ready")
    # The workload runs once the counters are on; its marker says recording has begun (perf's
    # set-up takes seconds in the emulated VM, and a recording stopped before then is empty).
    workload = f"echo > {shlex.quote(str(ready))}; exec sleep 100000"
    with open(f"{out}.log", "wb") as err:
        p = subprocess.Popen([exe, "record", "-a", "-F", "499", "-e", "cpu-clock", "-q", "-o", str(out),
                              "--", "sh", "-c", workload],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    STARTED.append(p)
    deadline = time.monotonic() + 120
    while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not ready.exists():
        log(f"perf record did not start: {tail(Path(f'{out}.log'))}")
        kill_group(p)
        return None
    return p


def stop_perf(p: subprocess.Popen, out: Path, pids: list[int]) -> None:
    """Stop the recording (SIGINT makes perf write its file) and keep a flat report of the
    contender's own processes next to it (``out``.txt)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(60)
    kill_group(p)
    exe = shutil.which("perf")
    if not exe or not out.exists():
        return
    script = subprocess.run([exe, "script", "-i", str(out), "-F", "comm,pid,ip,sym,dso"], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=600)
    out.with_suffix(".txt").write_text(summarize_perf(script.stdout, set(pids)))


_PERF_SAMPLE = re.compile(r"^\s*(.+?)\s+(\d+)\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")


def summarize_perf(script: str, pids: set[int], top: int = 12) -> str:
    """`perf script` lines → the contender's self time by object and by symbol, and the whole
    machine's by command. Addresses without a symbol count per object (libcrypto has none)."""
    by_comm: dict[str, int] = {}
    by_obj: dict[str, int] = {}
    by_sym: dict[str, int] = {}
    total = mine = 0
    for line in script.splitlines():
        m = _PERF_SAMPLE.match(line)
        if not m:
            continue
        comm, pid, sym, dso = m.group(1), int(m.group(2)), m.group(3), Path(m.group(4)).name
        total += 1
        by_comm[comm] = by_comm.get(comm, 0) + 1
        if pid not in pids:
            continue
        mine += 1
        by_obj[dso] = by_obj.get(dso, 0) + 1
        key = f"{dso} {sym if sym and sym != '[unknown]' else '(no symbols)'}"
        by_sym[key] = by_sym.get(key, 0) + 1
    if not total:
        return "  (no samples)\n"

    def rows(counts: dict[str, int], of: int) -> list[str]:
        return [f"  {100 * n / of:5.1f}%  {k}" for k, n in sorted(counts.items(), key=lambda x: -x[1])[:top]]

    L = [f"{total} samples on the machine, {mine} in the contender's processes ({100 * mine / total:.0f}%)",
         "contender, self time by object:", *rows(by_obj, mine or 1),
         "contender, self time by symbol:", *rows(by_sym, mine or 1),
         "whole machine, by command (swapper = idle):", *rows(by_comm, total)]
    return "\n".join(L) + "\n"


def measure_latency(c: Contender, conns: int, s: Settings) -> dict:
    nproc = min(conns, s.procs)
    per = [conns // nproc + (1 if i < conns % nproc else 0) for i in range(nproc)]
    res = run_procs(latency_worker, [(c.port, c.tls, k, s.warm, s.lat_dur) for k in per],
                    timeout=s.warm + s.lat_dur + 120)
    lat = sorted(x for lats, _ in res for x in lats)
    errs = [e for _, es in res for e in es]
    if not lat:
        return {"errors": errs or ["no samples"]}

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6

    return {"p50_us": pct(0.5), "p99_us": pct(0.99), "n": len(lat), "errors": errs}


def measure_idle(c: Contender, s: Settings) -> dict:
    if not c.pgid:
        return {}
    nproc = max(2, s.procs) if max(s.idle_counts) > 2000 else 1
    stages = [[n // nproc + (1 if i < n % nproc else 0) for n in s.idle_counts] for i in range(nproc)]
    mp = multiprocessing.get_context("spawn")
    q = mp.Queue()
    go = [mp.Event() for _ in s.idle_counts]
    procs = [mp.Process(target=idle_worker, args=(c.port, c.tls, st, q, go), daemon=True) for st in stages]
    time.sleep(0.5)
    rss0 = group_rss_kib(c.pgid)
    out: dict = {"rss0_kib": rss0}
    for p in procs:
        p.start()
    try:
        for i, n in enumerate(s.idle_counts):
            t0 = time.monotonic()
            reports = [q.get(timeout=1800) for _ in procs]
            opened = sum(r[1] for r in reports)
            errors = sum(r[2] for r in reports)
            time.sleep(1.0)
            rss = group_rss_kib(c.pgid)
            out[n] = {"opened": opened, "errors": errors, "last_error": next((r[3] for r in reports if r[3]), ""),
                      "kib_per_conn": (rss - rss0) / opened if opened else None, "rss_kib": rss,
                      "secs": time.monotonic() - t0}
            log(f"  {c.name}: {opened} idle connections ({errors} errors), RSS {rss0 / 1024:.1f} → "
                f"{rss / 1024:.1f} MiB")
            go[i].set()
            if opened < n * 0.9:
                for later in go[i + 1:]:
                    later.set()
                break
    finally:
        for e in go:
            e.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    return out


def measure_handshakes(c: Contender, s: Settings) -> dict:
    """Full handshakes (a client without a session), then resumed ones (every client resumes the
    session of one first handshake: the contender's default tickets, psk_dhe_ke)."""
    r = hs.measure(c.port, s.hs_workers, s.hs_dur)
    out = {"rate": r["rate"], "p50_ms": r["p50"], "p99_ms": r["p99"], "errors": r["errors"]}
    try:
        res = hs.measure(c.port, s.hs_workers, s.hs_dur, resume=True)
        out |= {"resumed_rate": res["rate"], "resumed_p99_ms": res["p99"], "not_resumed": res["full"]}
    except SystemExit as exc:  # no resumption at all (no tickets)
        out["resumed_error"] = str(exc)
    return out


def ktls_limit(s: Settings) -> dict:
    """kTLS TX → kTLS RX on a loopback TCP pair, no proxy; plus the same pair without TLS."""
    from ironsocket import ktls
    from ironsocket.tls13.constants import CipherSuite
    from ironsocket.tls13.handoff import TrafficKeys

    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    keys = TrafficKeys(traffic_secret=bytes(32), key=bytes(range(16)), iv=bytes(range(100, 112)), rec_seq=0)
    src = s.tmp / "sendfile.bin"
    with open(src, "wb") as f:
        f.write(os.urandom(4 * MiB) * 4)  # 16 MiB, in the page cache
    out = {}
    for label, use_ktls in (("plain TCP pair (no TLS), sendfile → recv_into", False),
                            ("kTLS TX → kTLS RX pair, sendfile → recv_into", True)):
        lst = socket.create_server(("127.0.0.1", 0))
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
        lst.close()
        try:
            if use_ktls:
                ktls.install_tx(a, suite, keys)
                ktls.install_rx(b, suite, keys)
            stop = threading.Event()
            got = [0]

            def reader() -> None:
                view = memoryview(bytearray(MiB))
                with contextlib.suppress(OSError):
                    while n := b.recv_into(view):
                        got[0] += n

            rt = threading.Thread(target=reader, daemon=True)
            rt.start()

            def writer() -> None:
                with open(src, "rb") as f, contextlib.suppress(OSError):
                    size = os.fstat(f.fileno()).st_size
                    while not stop.is_set():
                        off = 0
                        while off < size and not stop.is_set():
                            off += os.sendfile(a.fileno(), f.fileno(), off, size - off)

            wt = threading.Thread(target=writer, daemon=True)
            wt.start()
            time.sleep(s.warm)
            g0, t0 = got[0], time.monotonic()
            time.sleep(s.bulk_dur)
            g1, t1 = got[0], time.monotonic()
            stop.set()
            a.shutdown(socket.SHUT_WR)
            wt.join(10)
            rt.join(10)
            out[label] = (g1 - g0) / (t1 - t0) / MiB
        except Exception as exc:  # noqa: BLE001
            out[label] = f"error: {exc}"
        finally:
            a.close()
            b.close()
    return out


def crypto_speed(dur: float = 2.0, record: int = 16384) -> dict:
    """AES-128-GCM over 16 KiB records on one core, no network: OpenSSL (what stunnel, HAProxy,
    nginx and the clients use, here through `cryptography`) next to the kernel's gcm(aes) (what
    kTLS uses), reached through AF_ALG, whose two copies per record are counted against it."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, nonce, aad = bytes(range(16)), bytes(12), bytes(5)
    data = os.urandom(record)
    out: dict = {}

    def rate(seal) -> float:
        n, t0 = 0, time.perf_counter()
        while (t := time.perf_counter()) - t0 < dur:
            seal()
            n += record
        return n / (t - t0) / MiB

    aead = AESGCM(key)
    out["OpenSSL AES-128-GCM (cryptography), 16 KiB records"] = rate(lambda: aead.encrypt(nonce, data, aad))
    label = "kernel gcm(aes) via AF_ALG, 16 KiB records"
    try:
        alg = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
    except (OSError, AttributeError) as exc:
        out[label] = f"n/a (AF_ALG: {getattr(exc, 'strerror', exc)})"
        return out
    with alg:
        try:
            alg.bind(("aead", "gcm(aes)"))
            alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_KEY, key)
            alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_AEAD_AUTHSIZE, None, 16)
            op, _ = alg.accept()
        except OSError as exc:
            out[label] = f"n/a ({exc.strerror})"
            return out
        with op:
            msg = [aad + data]

            def seal() -> None:
                op.sendmsg_afalg(msg, op=socket.ALG_OP_ENCRYPT, iv=nonce, assoclen=len(aad))
                op.recv(len(aad) + record + 16)

            speed = rate(seal)
        driver = _crypto_driver("gcm(aes)")
        out[label + (f" (driver {driver})" if driver else "")] = speed
    return out


def _crypto_driver(name: str) -> str:
    """The highest-priority driver /proc/crypto lists for ``name`` (the one the kernel picks)."""
    best, prio = "", -1
    with contextlib.suppress(OSError):
        for block in Path("/proc/crypto").read_text().split("\n\n"):
            f = dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in block.splitlines()))
            if f.get("name") == name and int(f.get("priority", -1)) > prio:
                best, prio = f.get("driver", ""), int(f["priority"])
    return best


# ------------------------------------------------------------------ orchestration
def fmt(v, spec: str = ".0f") -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    return format(v, spec)


def run_contender(c: Contender, s: Settings, profile_dir: Path | None) -> None:
    r = c.results
    stat0 = tls_stat()
    if "bulk" in s.tests:
        log(f"{c.label}: bulk")
    for direction in ("down", "up") if "bulk" in s.tests else ():
        for streams in (1, 16):
            prof = perf = None
            if profile_dir is not None and c.name == "ironsocket" and streams == 1:
                prof = profile_dir / f"ironsocket-{direction}-{streams}.txt"
            if s.perf and streams == 1:
                perf = s.tmp / f"perf-{c.name}-{direction}.data"
            try:
                r[f"{direction}{streams}"] = measure_bulk(c, direction, streams, s, prof, perf)
            except Exception as exc:  # noqa: BLE001
                r[f"{direction}{streams}"] = {"errors": [f"{exc.__class__.__name__}: {exc}"]}
            b = r[f"{direction}{streams}"]
            log(f"  {direction} × {streams}: {fmt(b.get('MiBps'))} MiB/s, {fmt(b.get('cpu_s_per_GB'), '.2f')} CPU s/GB"
                + (f"; errors: {b['errors'][:2]}" if b.get("errors") else ""))
    if c.tls and "handshakes" in s.tests:
        log(f"{c.label}: handshakes ({s.hs_workers} clients × {s.hs_dur:g}s)")
        try:
            r["hs"] = measure_handshakes(c, s)
        except BaseException as exc:  # noqa: BLE001 (handshakes.measure raises SystemExit)
            if isinstance(exc, KeyboardInterrupt):
                raise
            r["hs"] = {"errors": str(exc)}
        log(f"  {r['hs']}")
    if "latency" in s.tests:
        log(f"{c.label}: latency")
    for conns in (1, 16) if "latency" in s.tests else ():
        try:
            r[f"lat{conns}"] = measure_latency(c, conns, s)
        except Exception as exc:  # noqa: BLE001
            r[f"lat{conns}"] = {"errors": [str(exc)]}
        log(f"  {conns} conn: p50 {fmt(r[f'lat{conns}'].get('p50_us'))} µs, p99 {fmt(r[f'lat{conns}'].get('p99_us'))} µs"
            + (f"; errors: {r[f'lat{conns}']['errors'][:2]}" if r[f"lat{conns}"].get("errors") else ""))
    if c.pgid and "idle" in s.tests:
        log(f"{c.label}: idle memory at {', '.join(map(str, s.idle_counts))} connections")
        try:
            r["idle"] = measure_idle(c, s)
        except Exception as exc:  # noqa: BLE001
            r["idle"] = {"error": str(exc)}
    stat1 = tls_stat()
    if stat1:
        r["ktls_tx"] = stat1.get("TlsTxSw", 0) - stat0.get("TlsTxSw", 0) + stat1.get("TlsTxDevice", 0) - stat0.get("TlsTxDevice", 0)
        r["ktls_rx"] = stat1.get("TlsRxSw", 0) - stat0.get("TlsRxSw", 0) + stat1.get("TlsRxDevice", 0) - stat0.get("TlsRxDevice", 0)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def environment() -> dict[str, str]:
    env = hs.environment()
    env["where"] = HOST_OR_VM
    return env


def render(contenders: list[Contender], limit: dict | None, crypto: dict, s: Settings, command: str,
           env: dict) -> str:
    L = [f"### {env['where']}: {env['date']}", "",
         f"`{command}`", "",
         f"kernel `{env['kernel']}` · CPU {env['cpu']} · Python {env['python']} · {env['openssl']} · "
         f"client {env['python ssl']} · kTLS: {'yes' if s.ktls else 'no'} · load average at start / end: "
         f"{env.get('load0', '?')} / {env.get('load1', '?')} (other jobs on this machine show up here)", "",
         f"Bulk: {s.bulk_dur:g} s per cell after {s.warm:g} s warm-up, CPython ssl clients in "
         f"≤{s.procs} processes; MiB/s counted at the client. CPU s/GB: utime+stime of the contender's "
         "process group per GB relayed (1 stream). Same machine for clients, contender and backend.", "",
         "| contender | down 1 | down 16 | up 1 | up 16 | CPU s/GB down | CPU s/GB up | kTLS TX/RX sessions |",
         "|---|---:|---:|---:|---:|---:|---:|---|"]
    if "bulk" not in s.tests:
        del L[-4:]
        L.append(f"Tests run: {', '.join(t for t in TESTS if t in s.tests)} (`--tests`).")
    for c in contenders if "bulk" in s.tests else ():
        r = c.results

        def mb(k: str) -> str:
            v = r.get(k, {})
            return fmt(v.get("MiBps")) + (" (err)" if v.get("errors") else "")

        kt = f"{r['ktls_tx']}/{r['ktls_rx']}" if "ktls_tx" in r else "—"
        L.append(f"| {c.label} | {mb('down1')} | {mb('down16')} | {mb('up1')} | {mb('up16')} | "
                 f"{fmt(r.get('down1', {}).get('cpu_s_per_GB'), '.2f')} | {fmt(r.get('up1', {}).get('cpu_s_per_GB'), '.2f')} | {kt} |")
    L += ["", f"Handshakes: {s.hs_workers} client processes × {s.hs_dur:g} s, new connection and full handshake each "
          "(tools/bench/handshakes.py's client); then the same with every client resuming one session (each "
          "contender with its default session tickets, psk_dhe_ke). Latency: 64-byte echo ping-pong over kept-alive connections, "
          f"{s.lat_dur:g} s. Idle memory: RSS of the contender's process group after opening N TLS connections "
          "(handshake done, backend connected), minus RSS before, / N.", ""]
    idle_cols = [f"KiB/idle conn @{n}" for n in s.idle_counts]
    L.append("| contender | handshakes/s | hs p50 ms | hs p99 ms | resumed hs/s | resumed p99 ms | echo p50 µs (1) | "
             "echo p99 µs (1) | echo p50 µs (16) | echo p99 µs (16) | " + " | ".join(idle_cols) + " |")
    L.append("|---|" + "---:|" * (9 + len(idle_cols)))
    for c in contenders:
        r = c.results
        h = r.get("hs", {})
        idle = r.get("idle", {})
        cells = []
        for n in s.idle_counts:
            v = idle.get(n)
            if not v:
                cells.append("—")
            else:
                cell = fmt(v.get("kib_per_conn"), ".1f")
                if v["opened"] < n:
                    cell += f" (only {v['opened']})"
                cells.append(cell)
        resumed = fmt(h.get("resumed_rate")) + (f" ({h['not_resumed']} not resumed)" if h.get("not_resumed") else "")
        L.append(f"| {c.label} | {fmt(h.get('rate'))} | {fmt(h.get('p50_ms'), '.1f')} | {fmt(h.get('p99_ms'), '.1f')} | "
                 f"{resumed} | {fmt(h.get('resumed_p99_ms'), '.1f')} | "
                 f"{fmt(r.get('lat1', {}).get('p50_us'))} | {fmt(r.get('lat1', {}).get('p99_us'))} | "
                 f"{fmt(r.get('lat16', {}).get('p50_us'))} | {fmt(r.get('lat16', {}).get('p99_us'))} | " + " | ".join(cells) + " |")
    if limit:
        L += ["", "The kernel's own limit (no proxy, one loopback TCP pair, one sender thread, one receiver thread):", "",
              "| pair | MiB/s |", "|---|---:|"]
        for k, v in limit.items():
            L.append(f"| {k} | {fmt(v)} |")
    if crypto:
        L += ["", "Crypto alone (one core, no network; kTLS uses the kernel's, the userspace proxies and the "
              "clients OpenSSL's):", "", "| AES-128-GCM seal | MiB/s |", "|---|---:|"]
        for k, v in crypto.items():
            L.append(f"| {k} | {fmt(v)} |")
    errs = []
    for c in contenders:
        for k, v in c.results.items():
            if isinstance(v, dict) and v.get("errors"):
                e = v["errors"]
                errs.append(f"- {c.label} {k}: {e[:2] if isinstance(e, list) else e}")
            if k == "idle" and isinstance(v, dict):
                for n, row in v.items():
                    if isinstance(row, dict) and row.get("errors"):
                        errs.append(f"- {c.label} idle@{n}: {row['errors']} errors, last: {row['last_error']}")
                if v.get("error"):
                    errs.append(f"- {c.label} idle: {v['error']}")
    if errs:
        L += ["", "Errors seen:", *errs[:20]]
    return "\n".join(L) + "\n"


def latency_ratios(contenders: list[Contender]) -> str:
    """Each ironsocket row's echo p50/p99 as a multiple of the best peer's in the same round
    (issue 15 asks p50 <= 1.5x and p99 <= 2x with 16 connections)."""
    rounds: dict[str, list[Contender]] = {}
    for c in contenders:
        if c.name in PEERS:
            m = re.search(r" #(\d+)$", c.label)
            rounds.setdefault(m.group(1) if m else "", []).append(c)
    L = []
    for rnd, cs in rounds.items():
        peers = [c for c in cs if c.name != "ironsocket"]
        for c in cs:
            if c.name != "ironsocket":
                continue
            cells = []
            for conns in (1, 16):
                for q in ("p50_us", "p99_us"):
                    best = min((p.results.get(f"lat{conns}", {}).get(q) for p in peers), key=lambda v: v or 1e18,
                               default=None)
                    mine = c.results.get(f"lat{conns}", {}).get(q)
                    cells.append(f"{q[:3]}@{conns} {mine / best:.2f}x" if mine and best else f"{q[:3]}@{conns} —")
            L.append(f"{c.label} vs best peer of its round: " + ", ".join(cells))
    return "\n".join(L)


BEGIN = "<!-- bench:{} begin (written by tools/bench/run; edits inside are overwritten) -->"
END = "<!-- bench:{} end -->"
HEADER = """# Benchmarks

Written by `tools/bench/run` (see its `--help`): ironsocket next to stunnel, HAProxy and nginx,
each terminating TLS 1.3 in front of the same plain backend on loopback, plus the raw kTLS socket
pair where the kernel has kTLS. The host has no kTLS; the VM (`tools/vm/ktls-vm`) is
software-emulated and 10-50x slower: compare numbers only within one table.

"""


def update_markdown(path: Path, where: str, section: str) -> None:
    begin, end = BEGIN.format(where), END.format(where)
    block = f"{begin}\n## Measured on the {where}\n\n{section}{end}\n"
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1].lstrip("\n")
        text = pre + block + ("\n" + post if post else "")
    else:
        # host before VM; anything hand-written after the generated blocks stays after them
        other_end = END.format("host")
        vm_end = END.format("VM")
        if where.startswith("VM ") and vm_end in text:
            pre, post = text.split(vm_end, 1)
            text = pre + vm_end + "\n\n" + block + post
        elif where == "VM" and other_end in text:
            pre, post = text.split(other_end, 1)
            text = pre + other_end + "\n\n" + block + post
        elif where == "host" and BEGIN.format("VM") in text:
            pre, post = text.split(BEGIN.format("VM"), 1)
            text = pre + block + "\n" + BEGIN.format("VM") + post
        else:
            anchor = "\n## Where ironsocket loses"
            if anchor in text:
                pre, post = text.split(anchor, 1)
                text = pre.rstrip("\n") + "\n\n" + block + anchor + post
            else:
                text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


MARK_BEGIN = "----- bench markdown section {} begin -----"
MARK_END = "----- bench markdown section {} end -----"


def apply_from_log(logfile: Path, out: Path) -> None:
    text = logfile.read_text(errors="replace").replace("\r", "")
    for m in reversed(list(re.finditer(re.escape(MARK_BEGIN).replace(r"\{\}", "(.+?)"), text))):
        where = m.group(1)
        e = MARK_END.format(where)
        if e in text[m.end():]:
            section = text[m.end():].split(e, 1)[0].lstrip("\n")
            update_markdown(out, where, section)
            log(f"wrote the {where} section into {out}")
            return
    raise SystemExit(f"no markdown section found in {logfile}")


def ensure_peers(names: list[str]) -> list[str]:
    need = {"stunnel": ("stunnel4", "stunnel4"), "haproxy": ("haproxy", "haproxy"), "nginx": ("nginx", "nginx")}
    missing = [pkg for n in names if n in need and not shutil.which(need[n][0], path=os.environ.get("PATH", "") + ":/usr/sbin")
               for pkg in [need[n][1]]]
    if "nginx" in names and not os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so") and shutil.which("nginx", path="/usr/sbin"):
        missing.append("libnginx-mod-stream")
    elif "nginx" in missing:
        missing.append("libnginx-mod-stream")
    if missing:
        if IN_VM or os.geteuid() != 0:
            log(f"cannot install {' '.join(missing)} here ({'read-only VM' if IN_VM else 'not root'}); skipping those peers")
        else:
            log(f"apt-get install -y {' '.join(missing)}")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
            if subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], env=env, stdin=subprocess.DEVNULL)
                subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL)
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    ok = []
    for n in names:
        if n == "ironsocket" or (shutil.which(need[n][0]) and (n != "nginx" or os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so"))):
            ok.append(n)
        else:
            log(f"{n}: not installed, skipped")
    return ok


def raise_nofile(want: int = 200_000) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in ((want, max(hard, want)), (hard, hard)):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def summarize_profile(path: Path, top: int = 15) -> str:
    """py-spy --format raw: 'frame;frame;... count' lines → top self and inclusive functions."""
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        total += k
        lined = [re.sub(r"\(/[^)]*?/(ironsocket/|python3\.\d+/|site-packages/)", r"(\1", f.strip())
                 for f in stack.split(";")]
        frames = [re.sub(r":\d+\)$", ")", f) for f in lined]
        leaf = lined[-1]  # self time: keep the line number
        self_c[leaf] = self_c.get(leaf, 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
    if not total:
        return f"(no samples in {path})"
    L = [f"{total} samples", "", "top self (file:line where the samples were):"]
    for f, k in sorted(self_c.items(), key=lambda x: -x[1])[:top]:
        L.append(f"  {100 * k / total:5.1f}%  {f}")
    L += ["", "top inclusive:"]
    for f, k in sorted(incl.items(), key=lambda x: -x[1])[:top]:
        L.append(f"  {100 * k / total:5.1f}%  {f}")
    return "\n".join(L)


def main(argv: list[str]) -> int:
    if argv[:1] == ["backend"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("--workers", type=int, default=2)
        a = ap.parse_args(argv)
        backend_main(a.workers)
        return 0
    ap = argparse.ArgumentParser(prog="tools/bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short durations and 1,000 idle connections (smoke run)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list from {','.join(PEERS)}")
    ap.add_argument("--markdown-out", type=Path, help="write/update this run's host or VM section in this file")
    ap.add_argument("--no-baselines", action="store_true", help="skip 'backend alone' and 'TLS client alone'")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy record ironsocket during the 1-stream bulk tests; print the top frames")
    ap.add_argument("--perf", action="store_true",
                    help="perf record the whole machine (kernel included) during every 1-stream bulk test; "
                         "print each contender's top symbols")
    ap.add_argument("--idle", help="comma list of idle connection counts (default 1000,10000; 1000 with --quick or in the VM)")
    ap.add_argument("--vm", action="store_true",
                    help="run this same command inside tools/vm/ktls-vm and write its markdown section here on the host")
    ap.add_argument("--vm-kernel", metavar="VERSION",
                    help=f"with --vm: the guest kernel (tools/vm/ktls-vm --kernel; default {VM_DEFAULT_KERNEL}); "
                         "a non-default kernel writes its own 'VM <version>' section")
    ap.add_argument("--apply-markdown", type=Path, metavar="LOG",
                    help="take the markdown section printed in LOG (a captured VM run) into --markdown-out")
    ap.add_argument("--tests", default=",".join(TESTS),
                    help=f"comma list of the tests to run, from {','.join(TESTS)} (default: all), e.g. --tests latency")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the contenders this many times in turn (rows labelled #1, #2, ...): the spread of one machine")
    ap.add_argument("--ironsocket-workers", metavar="N|auto",
                    help="also run ironsocket with --workers N (worker processes on one port, as nginx's "
                         "worker_processes auto), after the others, in every round")
    ap.add_argument("--ironsocket-tree", action="append", default=[], metavar="DIR",
                    help="also run the ironsocket of this source tree (e.g. `git archive main` unpacked), labelled with DIR, "
                         "after this tree's, in every round")
    a = ap.parse_args(argv)
    tests = frozenset(t.strip() for t in a.tests.split(",") if t.strip())
    if unknown := tests - set(TESTS):
        ap.error(f"unknown test(s) {', '.join(sorted(unknown))}; choose from {','.join(TESTS)}")
    if a.markdown_out and not a.apply_markdown and (tests != set(TESTS) or a.rounds > 1 or a.ironsocket_tree
                                                    or a.ironsocket_workers):
        ap.error("--markdown-out writes the whole table: not with --tests, --rounds, --ironsocket-tree "
                 "or --ironsocket-workers")
    if a.apply_markdown:
        if not a.markdown_out:
            ap.error("--apply-markdown needs --markdown-out")
        apply_from_log(a.apply_markdown, a.markdown_out)
        return 0
    if a.vm:
        return run_in_vm(argv, a)

    names = [n.strip() for n in a.peers.split(",") if n.strip()]
    for n in names:
        if n not in PEERS:
            ap.error(f"unknown peer {n!r}")
    names = ensure_peers(names)
    nofile = raise_nofile()
    try:
        from ironsocket import ktls
        has_ktls = ktls.probe().available
    except Exception:  # noqa: BLE001
        has_ktls = False
    ncpu = os.cpu_count() or 2
    if a.idle:
        idle = tuple(int(x) for x in a.idle.split(","))
    elif a.quick or IN_VM:
        idle = (1000,)
    else:
        idle = (1000, 10000)
    if max(idle) * 2 + 200 > nofile:
        # a proxy holds 2 fds per connection (ironsocket with kTLS: 2 more per splice pipe)
        log(f"RLIMIT_NOFILE is {nofile} and cannot be raised here: idle counts capped")
        idle = tuple(min(n, (nofile - 200) // 2) for n in idle)
    tmp = Path(tempfile.mkdtemp(prefix="ironbench-"))
    s = Settings(quick=a.quick, bulk_dur=2.0 if a.quick else 5.0, warm=0.5 if a.quick else 1.0,
                 hs_dur=3.0 if a.quick else 5.0, hs_workers=2 if a.quick else max(2, 2 * ncpu),
                 lat_dur=2.0 if a.quick else 4.0, idle_counts=idle, procs=max(2, ncpu), ktls=has_ktls, tmp=tmp,
                 profile=a.profile, perf=a.perf, startup_timeout=300.0 if IN_VM else 60.0, nofile=nofile,
                 tests=tests, rounds=max(1, a.rounds))
    if IN_VM:
        s.warm = max(s.warm, 1.0)
    command = "tools/bench/run " + shlex.join(argv) if argv else "tools/bench/run"
    if IN_VM:
        kernel = "" if HOST_OR_VM == "VM" else f" --kernel {HOST_OR_VM.split()[1]}"
        command = f"tools/vm/ktls-vm run{kernel} --timeout 3000 -- {command}"
    env = environment()
    env["load0"] = loadavg()
    log(f"{env['where']}: kernel {env['kernel']}, {env['cpu']}, Python {env['python']}, kTLS {'yes' if has_ktls else 'no'}, "
        f"NOFILE {nofile}, scratch {tmp}")

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started in the background (SIGINT ignored)
    contenders: list[Contender] = []
    limit = None
    crypto: dict = {}
    profile_dir = tmp if a.profile else None
    t_start = time.monotonic()
    try:
        if not a.no_baselines:
            backend, bport, btls = start_backend(s)
            try:
                base = Contender("backend", "backend alone (plain TCP client, no TLS)", port=bport, tls=False)
                client = Contender("client", "TLS client alone (TLS to the backend's own listener, no proxy)", port=btls)
                for c in (base, client) if tests & {"bulk", "latency"} else ():
                    log(f"baseline: {c.label}")
                    for direction in ("down", "up") if "bulk" in tests else ():
                        for streams in (1, 16):
                            c.results[f"{direction}{streams}"] = measure_bulk(c, direction, streams, s)
                            log(f"  {direction} × {streams}: {fmt(c.results[f'{direction}{streams}']['MiBps'])} MiB/s")
                    for conns in (1, 16) if "latency" in tests else ():
                        c.results[f"lat{conns}"] = measure_latency(c, conns, s)
                        log(f"  {conns} conn: p50 {fmt(c.results[f'lat{conns}'].get('p50_us'))} µs, "
                            f"p99 {fmt(c.results[f'lat{conns}'].get('p99_us'))} µs")
                    contenders.append(c)
            finally:
                kill_group(backend)
        runs = [(n, None) for n in names]
        if "ironsocket" in names:
            at = names.index("ironsocket") + 1
            runs[at:at] = [("ironsocket", Path(t).resolve()) for t in a.ironsocket_tree]
            if a.ironsocket_workers:
                runs.insert(at, ("ironsocket", a.ironsocket_workers))
        for round_no in range(1, s.rounds + 1):
            for name, tree in runs:
                backend, bport, _ = start_backend(s)
                try:
                    try:
                        c = start_peer(name, bport, s, tree)
                    except Exception as exc:  # noqa: BLE001
                        log(f"{name}: could not start: {exc}")
                        continue
                    if s.rounds > 1:
                        c.label += f" #{round_no}"
                    try:
                        run_contender(c, s, profile_dir)
                        contenders.append(c)
                    finally:
                        kill_group(c.proc)
                finally:
                    kill_group(backend)
        if has_ktls and "limit" in tests:

            log("the limit: kTLS socket pair")
            limit = ktls_limit(s)
            log(f"  {limit}")
        if "crypto" in tests:
            log("crypto alone: OpenSSL and the kernel's AES-128-GCM")
            crypto = crypto_speed(1.0 if a.quick else 3.0)
            log(f"  {crypto}")
    finally:
        kill_everything()
    env["load1"] = loadavg()
    log(f"done in {time.monotonic() - t_start:.0f}s")
    section = render(contenders, limit, crypto, s, command, env)
    print()
    print(section)
    if "latency" in tests and (ratios := latency_ratios(contenders)):
        print(ratios)
        print()
    if a.profile:
        for f in sorted(tmp.glob("ironsocket-*.txt")):
            print(f"py-spy profile of ironsocket serve, {f.stem} (active threads, 250 Hz, --nonblocking):")
            print(summarize_profile(f))
            print()
    if a.perf:
        for f in sorted(tmp.glob("perf-*.txt")):
            print(f"perf profile, {f.stem} (cpu-clock, 499 Hz, all CPUs, during the 1-stream bulk test):")
            print(f.read_text())
    if a.markdown_out:
        try:
            update_markdown(a.markdown_out, env["where"], section)
            log(f"wrote the {env['where']} section of {a.markdown_out}")
        except OSError as exc:
            log(f"cannot write {a.markdown_out} ({exc.strerror}); section printed between markers below — "
                f"save this output and run: tools/bench/run --apply-markdown LOG --markdown-out {a.markdown_out}")
            print(MARK_BEGIN.format(env["where"]))
            print(section, end="")
            print(MARK_END.format(env["where"]), flush=True)
    if "Errors seen:" in section:
        log(f"logs of the contenders kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def run_in_vm(argv: list[str], a) -> int:
    inner, skip = [], False
    for i, x in enumerate(argv):  # drop --vm and --vm-kernel [VERSION]: they are for this side
        if skip:
            skip = False
        elif x == "--vm":
            continue
        elif x == "--vm-kernel":
            skip = True
        elif not x.startswith("--vm-kernel="):
            inner.append(x)
    kernel = ["--kernel", a.vm_kernel] if a.vm_kernel else []
    logf = Path(tempfile.mkstemp(prefix="ironbench-vm-", suffix=".log")[1])
    cmd = [str(ROOT / "tools" / "vm" / "ktls-vm"), "run", *kernel, "--timeout", "3000", "--", "tools/bench/run", *inner]
    log(f"{shlex.join(cmd)}  (log: {logf})")
    with open(logf, "wb") as out:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=ROOT)
        try:
            assert p.stdout is not None
            for chunk in iter(lambda: p.stdout.read1(65536), b""):
                out.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            rc = p.wait()
        finally:
            if p.poll() is None:
                kill_group(p)
    if a.markdown_out:
        apply_from_log(logf, a.markdown_out)
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        kill_everything()
        log("interrupted; everything started was stopped")
        sys.exit(130)
