#!/usr/bin/env python3
"""Server CPU per echo round trip: where ironsocket's echo latency goes, without a stopwatch.

Starts the benchmark backend (ironbench.py's, echo mode) and ``ironsocket serve`` in front of
it, opens N TLS connections (CPython ssl), then runs R 64-byte ping-pongs on each (all N in
flight at once, one client thread per connection) and reads the server's utime+stime from
/proc/PID/stat (every thread of the process) before and after: CPU µs per round trip. The
round-trip count is large enough that the 10 ms tick does not matter (the default, 20,000 round
trips, is 1-3 s of server CPU). Repeat it (--repeat) and compare trees (--tree DIR: the
ironsocket of another source tree, e.g. `git archive main | tar -x -C /tmp/main`), alternating,
because other jobs share this machine: report the spread, not one number.

    tools/bench/echo_cpu.py [--conns 1,16] [--round-trips 20000] [--repeat 3] [--tree DIR ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ironbench as ib  # noqa: E402
from _procs import kill_everything, kill_group, spawn  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
MSG = b"p" * 64


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def settings(tmp: Path) -> ib.Settings:
    return ib.Settings(quick=True, bulk_dur=1, warm=0, hs_dur=1, hs_workers=1, lat_dur=1, idle_counts=(),
                       procs=1, ktls=False, tmp=tmp)


def server_argv(port: int, backend_port: int) -> list[str]:
    """``ironsocket serve`` as ironbench.py runs it (the arguments after ``python``)."""
    return ["-m", "ironsocket", "serve", "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend_port}",
            "--cert", str(ib.CERT), "--key", str(ib.KEY), "--ciphers", ib.SUITE, "--groups", "x25519",
            "--log-level", "warning", "--idle-timeout", "0", "--handshake-timeout", "60", "--workers", "1"]  # one process's CPU


@contextlib.contextmanager
def echo_server(tmp: Path, tree: Path | None, wrapper: list[str] | None = None) -> Iterator[tuple[int, int]]:
    """(port, server pid) of an ironsocket (``tree``'s, or this one's) in front of an echo
    backend; ``wrapper``: what runs instead of ``python`` (it gets server_argv after it)."""
    s = settings(tmp)
    backend, bport, _ = ib.start_backend(s)
    port = ib.free_port()
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(tree), env.get("PYTHONPATH"))))
    logf = tmp / f"ironsocket-{time.monotonic_ns()}.log"
    proc = spawn([*(wrapper or [sys.executable]), *server_argv(port, bport)], logf, env=env)
    try:
        ib.wait_port(port, proc, logf, 60)
        yield port, proc.pid
    finally:
        kill_group(proc)
        kill_group(backend)


def open_conns(port: int, n: int) -> list[socket.socket]:
    ctx = ib.client_context()
    socks = []
    for _ in range(n):
        s = ib.connect(port, True, ctx)
        s.sendall(b"E")  # the backend's echo mode
        socks.append(s)
    return socks


def ping_pong(socks: list[socket.socket], round_trips: int) -> None:
    """``round_trips`` 64-byte echoes on each socket, every socket in its own thread."""
    errors: list[BaseException] = []

    def one(s: socket.socket) -> None:
        buf = bytearray(64)
        view = memoryview(buf)
        try:
            for _ in range(round_trips):
                s.sendall(MSG)
                got = 0
                while got < 64:
                    n = s.recv_into(view[got:])
                    if not n:
                        raise RuntimeError("EOF from the proxy")
                    got += n
                if buf != MSG:
                    raise RuntimeError("the echo differs from what was sent")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def measure(port: int, pid: int, conns: int, round_trips: int) -> tuple[float, float]:
    """Server CPU µs per round trip with ``conns`` connections busy at once: (user, system)."""
    socks = open_conns(port, conns)
    try:
        per_conn = max(1, round_trips // conns)
        ping_pong(socks, min(200, per_conn))  # warm-up
        c0 = cpu_seconds(pid)
        ping_pong(socks, per_conn)
        c1 = cpu_seconds(pid)
        return ((c1[0] - c0[0]) * 1e6 / (per_conn * conns), (c1[1] - c0[1]) * 1e6 / (per_conn * conns))
    finally:
        for s in socks:
            s.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", default="1,16", help="comma list of connection counts (default 1,16)")
    ap.add_argument("--round-trips", type=int, default=20000, help="round trips per measurement, over all connections")
    ap.add_argument("--repeat", type=int, default=3, help="measurements per tree and connection count")
    ap.add_argument("--tree", action="append", default=[], type=Path,
                    help="also measure the ironsocket of this source tree (alternating with this one)")
    a = ap.parse_args(argv)
    conns = [int(x) for x in a.conns.split(",")]
    trees: list[Path | None] = [None, *(t.resolve() for t in a.tree)]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="echo-cpu-"))
    try:
        for rep in range(a.repeat):
            for tree in trees:
                name = str(tree) if tree else "this tree"
                with echo_server(tmp, tree) as (port, pid):
                    for n in conns:
                        user, system = measure(port, pid, n, a.round_trips)
                        results.setdefault((name, n), []).append((user, system))
                        print(f"[{rep + 1}/{a.repeat}] {name}, {n} conn: {user + system:.1f} µs server CPU per round trip "
                              f"(user {user:.1f}, system {system:.1f})", flush=True)
    finally:
        kill_everything()
    print()
    print(f"server CPU µs per 64-byte round trip ({a.round_trips} round trips × {a.repeat}; median [min–max]; "
          "user / system medians):")
    for (name, n), v in results.items():
        total = [u + s for u, s in v]
        print(f"  {name:>40}  {n:>3} conn: {statistics.median(total):6.1f}  [{min(total):.1f}–{max(total):.1f}]  "
              f"user {statistics.median(u for u, _ in v):.1f} / system {statistics.median(s for _, s in v):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
