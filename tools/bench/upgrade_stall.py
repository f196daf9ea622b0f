#!/usr/bin/env python3
"""How long do established connections stall while `ironsocket upgrade` execs the program?

    .venv/bin/python tools/bench/upgrade_stall.py [--connections 100,1000] [--upgrades 3]
        [--warmup 3] [--clients 2] [--interval 0] [--markdown-out docs/benchmarks.md]

For each N in --connections: starts `tests/echo_backend.py` and a real
`python -m ironsocket serve ... --control-socket CTL` (userspace record layer on a kernel
without kTLS; kTLS inside `tools/vm/ktls-vm run -- python tools/bench/upgrade_stall.py ...`, where
the section is its own, "VM", and the pause is also a ratio to a bare `python -c pass` started in
the same boot: the guest's repo is read-only, so take the printed section from the output), opens N TLS 1.3 connections from --clients asyncio client processes, and on every
connection streams 64-byte pings continuously (send, wait for the echo, verify every byte, next;
--interval adds think time). After --warmup seconds it triggers --upgrades upgrades one after the
other with `python -m ironsocket upgrade --socket CTL` and records, per upgrade:

- the upgrade command's wall time (includes its own interpreter start and the target check);
- the server's own numbers from its log: `paused in X ms` (quiesce: accept loop stopped,
  pumps parked, state written) and `resumed after X ms` (state document created -> restored
  in the exec'd program: exec, interpreter start, imports, restore);
- per connection, the largest gap between two consecutive completed round-trips that overlaps
  the upgrade window (command started .. command returned);
- connections lost (EOF/reset/timeout) and echo mismatches: both must be 0;
- the server's thread count with every connection open, before the first upgrade / after the
  last (``/proc/PID/status``): a constant, not a number per connection.

For comparison it also reports the same largest-gap statistic over a window of equal length
during the warm-up (no upgrade): on a busy 2-CPU host the load alone makes gaps.

Prints a markdown table; `--markdown-out FILE` writes it into its own section of FILE between
`<!-- bench:upgrade-stall begin ... -->` / `<!-- bench:upgrade-stall end -->` markers (replaced
on the next run; appended at the end the first time). Every process started here runs in its
own process group and is killed on exit. A printed table, never an assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import shlex
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from _procs import kill_everything, kill_group, spawn  # noqa: E402
CERTS = ROOT / "fixtures" / "certs"
PING = 64
IN_VM = os.environ.get("IRONSOCKET_IN_VM") == "1"  # set by tools/vm/ktls-vm in the guest
PLACE = "VM" if IN_VM else "host"
SECTION = "upgrade-stall-vm" if IN_VM else "upgrade-stall"  # one section each in docs/benchmarks.md
BEGIN = f"<!-- bench:{SECTION} begin (written by tools/bench/upgrade_stall.py; edits inside are overwritten) -->"
END = f"<!-- bench:{SECTION} end -->"


def log(msg: str) -> None:
    print(f"upgrade-stall: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes we start
def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def child_env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT)}


def wait_log(path: Path, regex: str, proc: subprocess.Popen, timeout: float, count: int = 1) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        matches = list(re.finditer(regex, path.read_text(errors="replace")))
        if len(matches) >= count:
            return matches[count - 1]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = "\n".join(path.read_text(errors="replace").splitlines()[-30:])
    raise RuntimeError(f"{path.name} never showed {regex!r}:\n{tail}")


# ------------------------------------------------------------------ client worker (asyncio)
def payload(conn: int, seq: int) -> bytes:
    head = struct.pack("!II", conn, seq)
    return head + bytes((conn + seq + i) & 0xFF for i in range(PING - len(head)))


class Conn:
    __slots__ = ("index", "times", "spans", "connected", "lost", "mismatch", "error", "rtts")

    def __init__(self, index: int) -> None:
        self.index = index
        self.times: list[float] = []  # completion times of round-trips since the last trim
        self.spans: list[tuple[float, float]] = []  # (sent, echoed) of each round-trip, same trim
        self.connected = False
        self.lost = False
        self.mismatch = 0
        self.error = ""
        self.rtts = 0


async def run_conn(c: Conn, port: int, ctx: ssl.SSLContext, gate: asyncio.Semaphore, interval: float,
                   stop: asyncio.Event, timeout: float) -> None:
    try:
        async with gate:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), timeout)
        c.connected = True
        c.times.append(time.monotonic())
        seq = 0
        if interval:  # spread the pings over the interval (otherwise they go in lockstep bursts)
            await asyncio.sleep(random.uniform(0, interval))
        while not stop.is_set():
            data = payload(c.index, seq)
            sent = time.monotonic()
            writer.write(data)
            got = await asyncio.wait_for(reader.readexactly(PING), timeout)
            if got != data:
                c.mismatch += 1
                c.error = f"mismatch at round-trip {seq}"
                break
            c.times.append(time.monotonic())
            c.spans.append((sent, c.times[-1]))
            c.rtts += 1
            seq += 1
            if interval:
                await asyncio.sleep(interval)
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)
    except Exception as exc:  # noqa: BLE001 - counted and reported
        if not stop.is_set():
            c.lost = True
            c.error = f"{type(exc).__name__}: {exc}"


def window_rtt(spans: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Longest round-trip (ping sent → echo back) that overlaps [t0, t1]: with think time
    between pings this is the stall itself, without the think time."""
    return max((b - a for a, b in spans if b >= t0 and a <= t1), default=0.0)


def window_gaps(times: list[float], t0: float, t1: float) -> float:
    """Largest gap between consecutive completions that overlaps [t0, t1]."""
    best = 0.0
    for a, b in zip(times, times[1:]):
        if b >= t0 and a <= t1:
            best = max(best, b - a)
    return best


def client_worker(port: int, indices: list[int], interval: float, timeout: float, pipe) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = ssl.create_default_context(cafile=str(CERTS / "ca.pem"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        gate = asyncio.Semaphore(32)  # handshakes in flight per worker
        conns = [Conn(i) for i in indices]
        tasks = [asyncio.create_task(run_conn(c, port, ctx, gate, interval, stop, timeout)) for c in conns]
        while True:
            cmd, *args = await loop.run_in_executor(None, pipe.recv)
            if cmd == "status":
                live = [c for c in conns if c.connected and not c.lost and not c.mismatch]
                pipe.send({"connected": sum(c.connected for c in conns), "lost": sum(c.lost for c in conns),
                           "mismatch": sum(c.mismatch for c in conns),
                           "errors": [f"#{c.index}: {c.error}" for c in conns if c.error][:5],
                           "rtts": sum(c.rtts for c in conns),
                           "min_last": min((c.times[-1] for c in live), default=0.0)})
            elif cmd == "gaps":
                t0, t1, trim = args
                pipe.send([(window_gaps(c.times, t0, t1), window_rtt(c.spans, t0, t1))
                           for c in conns if c.connected and not c.lost])
                if trim:
                    for c in conns:
                        c.times = c.times[-1:]
                        c.spans = c.spans[-1:]
            elif cmd == "stop":
                stop.set()
                await asyncio.wait(tasks, timeout=10)
                pipe.send({"lost": sum(c.lost for c in conns), "mismatch": sum(c.mismatch for c in conns),
                           "rtts": sum(c.rtts for c in conns)})
                return

    asyncio.run(main())


class Clients:
    def __init__(self, port: int, n: int, procs: int, interval: float, timeout: float) -> None:
        ctx = mp.get_context("fork")
        self.workers = []
        for k in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_worker, args=(port, list(range(k, n, procs)), interval, timeout, child),
                            daemon=True)
            p.start()
            self.workers.append((p, parent))

    def ask(self, *cmd) -> list:
        for _, pipe in self.workers:
            pipe.send(cmd)
        out = []
        for p, pipe in self.workers:
            if not pipe.poll(60):
                raise RuntimeError(f"client worker {p.pid} did not answer {cmd[0]}")
            out.append(pipe.recv())
        return out

    def status(self) -> dict:
        rows = self.ask("status")
        return {"connected": sum(r["connected"] for r in rows), "lost": sum(r["lost"] for r in rows),
                "mismatch": sum(r["mismatch"] for r in rows), "rtts": sum(r["rtts"] for r in rows),
                "errors": [e for r in rows for e in r["errors"]],
                "min_last": min(r["min_last"] for r in rows)}

    def gaps(self, t0: float, t1: float, trim: bool) -> list[tuple[float, float]]:
        """Per live connection: (largest gap between round-trips, longest round-trip) in the window."""
        return [g for part in self.ask("gaps", t0, t1, trim) for g in part]

    def close(self) -> dict:
        totals = {"lost": 0, "mismatch": 0, "rtts": 0}
        with contextlib.suppress(Exception):
            for r in self.ask("stop"):
                for k in totals:
                    totals[k] += r[k]
        for p, pipe in self.workers:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(2)
            pipe.close()
        return totals


# ------------------------------------------------------------------ one N
def log_time(line_prefix: str) -> float:
    """A log line's timestamp as epoch seconds: ISO 8601 UTC ("2026-12-02T04:53:39.123Z", today's
    logs) or asctime ("YYYY-mm-dd HH:MM:SS,mmm", local time, the logs before)."""
    if line_prefix.endswith("Z"):
        dt = datetime.datetime.strptime(line_prefix, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
        return dt.timestamp()
    return datetime.datetime.strptime(line_prefix, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def threads_of(pid: int) -> int:
    """The server's thread count (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(n: int, a, tmp: Path, backend_port: int) -> dict:
    """N connections through ``a.servers`` server processes sharing one port (SO_REUSEPORT, as
    `serve --workers` does), each upgraded in turn (a rolling upgrade) --upgrades times."""
    k_servers = max(1, a.servers) if n >= a.servers_from else 1
    listen = "127.0.0.1:0" if k_servers == 1 else f"127.0.0.1:{free_port()}"
    servers, slogs, ctls = [], [], []
    for i in range(k_servers):
        slogs.append(tmp / f"serve-{n}-{i}.log")
        ctls.append(tmp / f"ctl-{n}-{i}.sock")
        servers.append(spawn([sys.executable, "-m", "ironsocket", "serve", "--listen", listen,
                              "--backend", f"127.0.0.1:{backend_port}", "--cert", str(CERTS / "ecdsa-p256.pem"),
                              "--key", str(CERTS / "ecdsa-p256.key"), "--control-socket", str(ctls[i]),
                              "--workers", "1",  # each its own process and control socket (not a supervisor)
                              *(["--reuse-port"] if k_servers > 1 else [])],
                             slogs[i], env=child_env() | {"IRONSOCKET_RUN_DIR": str(tmp)}))
    clients = None
    res: dict = {"n": n, "servers": k_servers, "upgrades": [], "baseline": [], "lost": 0, "mismatch": 0, "errors": []}
    try:
        serving = [wait_log(slog, r"serving TLS 1\.3 on [\d.]+:(\d+), record layer: ([\w-]+)", srv, a.timeout)
                   for slog, srv in zip(slogs, servers)]
        port = int(serving[0].group(1))
        res["layer"] = serving[0].group(2)
        pids = [srv.pid for srv in servers]
        log(f"N={n}: server pid(s) {pids} on port {port}; connecting")
        t_conn = time.monotonic()
        clients = Clients(port, n, min(a.clients, n), a.interval, a.timeout)
        while True:
            st = clients.status()
            if st["connected"] + st["lost"] >= n and st["min_last"] > 0:
                break
            if time.monotonic() - t_conn > a.timeout * 3:
                raise RuntimeError(f"only {st['connected']}/{n} connected: {st['errors']}")
            time.sleep(0.2)
        log(f"N={n}: {st['connected']} connected in {time.monotonic() - t_conn:.1f} s (lost {st['lost']}); "
            f"warm-up {a.warmup} s")
        time.sleep(a.warmup)
        res["threads"] = [sum(threads_of(pid) for pid in pids)]  # every connection open, before any upgrade
        base_end = time.monotonic()
        status_before = clients.status()
        for k in range(1, a.upgrades + 1):
            t0 = time.monotonic()
            outs = []
            for i in range(k_servers):  # one after another, as a rolling upgrade of workers
                up = subprocess.run([sys.executable, "-m", "ironsocket", "upgrade", "--socket", str(ctls[i]),
                                     "--timeout", str(a.timeout)], capture_output=True, text=True,
                                    env=child_env(), timeout=a.timeout + 10, cwd=ROOT)
                if up.returncode != 0:
                    raise RuntimeError(f"upgrade {k} of server {i} failed ({up.returncode}): {up.stdout}{up.stderr}")
                wait_log(slogs[i], r"upgrade: resumed after ([\d.]+) ms", servers[i], a.timeout, count=k)
                outs.append(up.stdout.strip())
            t1 = time.monotonic()
            # the window is over once every live connection completed a round-trip after it
            deadline = time.monotonic() + a.timeout
            while (st := clients.status())["min_last"] <= t1 and time.monotonic() < deadline:
                time.sleep(0.05)
            if k == 1:  # baseline: a window of the same length, just before the first upgrade
                w = t1 - t0
                res["baseline"] = clients.gaps(base_end - w, base_end, False)
            window = clients.gaps(t0, t1, True)
            gaps = [g for g, _ in window]
            res["upgrades"].append({"wall_ms": (t1 - t0) * 1000, "gaps_ms": [g * 1000 for g in gaps],
                                    "rtt_ms": [r * 1000 for _, r in window], "stdout": " | ".join(outs)})
            log(f"N={n} upgrade {k}: command(s) {1000 * (t1 - t0):.0f} ms, largest client stall "
                f"{1000 * max(gaps, default=0):.0f} ms, longest round-trip "
                f"{1000 * max((r for _, r in window), default=0):.0f} ms, lost {st['lost']}, mismatched {st['mismatch']}"
                + (f"; first errors: {st['errors'][:3]}" if st["errors"] else ""))
            assert all(srv.poll() is None for srv in servers) and [srv.pid for srv in servers] == pids
            time.sleep(a.settle)
        res["threads"].append(sum(threads_of(pid) for pid in pids))  # after the upgrades, same connections
        res["paused_ms"], res["resumed_ms"], res["restored"], res["phases"] = [], [], [], []
        stamps = r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d{3}Z?) \S+ \S+: "
        for slog in slogs:
            text = slog.read_text(errors="replace")
            res["paused_ms"] += [float(x) for x in re.findall(r"upgrade: \d+ connections paused in ([\d.]+) ms", text)]
            res["resumed_ms"] += [float(x) for x in re.findall(r"upgrade: resumed after ([\d.]+) ms", text)]
            res["restored"] += [int(x) for x in re.findall(r"upgrade: restored (\d+) connections", text)]
            # time line from the log's own timestamps: exec -> restored (the whole new program's start-up)
            for m_exec in re.finditer(stamps + r"upgrade: \d+ connections paused in", text):
                t_exec = log_time(m_exec.group(1))
                after = text[m_exec.end():]
                m_rest = re.search(stamps + r"upgrade: restored", after)
                m_first = re.search(stamps, after)  # first line written by the exec'd program
                if m_rest:
                    res["phases"].append({"exec_to_first_log_ms": (log_time(m_first.group(1)) - t_exec) * 1000,
                                          "exec_to_restored_ms": (log_time(m_rest.group(1)) - t_exec) * 1000})
        totals = clients.close()
        clients = None
        res["lost"], res["mismatch"], res["rtts"] = totals["lost"], totals["mismatch"], totals["rtts"]
        res["errors"] = status_before["errors"]
        return res
    finally:
        if clients is not None:
            clients.close()
        for srv in servers:
            kill_group(srv)


# ------------------------------------------------------------------ start-up costs of a new program
def startup_costs(repeat: int = 3) -> dict[str, float]:
    cmds = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import ironsocket.cli'": [sys.executable, "-c", "import ironsocket.cli"],
        "python -m ironsocket serve --help": [sys.executable, "-m", "ironsocket", "serve", "--help"],
    }
    out = {}
    for name, argv in cmds.items():
        best = []
        for _ in range(repeat):
            t = time.monotonic()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(), cwd=ROOT)
            best.append((time.monotonic() - t) * 1000)
        out[name] = statistics.median(best)
    return out


# ------------------------------------------------------------------ output
def environment() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                cpu = row.split(":", 1)[1].strip()
                break
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "kernel": platform.uname().release, "cpu": f"{cpu} ({os.cpu_count()} CPUs)",
            "python": platform.python_version(), "ssl": ssl.OPENSSL_VERSION}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def trio(xs: list[float]) -> str:
    if not xs:
        return "—"
    return f"{min(xs):.0f} / {statistics.median(xs):.0f} / {max(xs):.0f}"


def render(results: list[dict], a, env: dict, command: str, load0: str, load1: str, costs: dict) -> str:
    # In the VM (software emulation) absolute times say little: the pause is also given as a
    # ratio to a bare interpreter start measured in the same boot.
    bare = costs.get("python -c pass")
    L = [f"### {PLACE}: {env['date']}", "", f"`{command}`", "",
         f"kernel `{env['kernel']}` · CPU {env['cpu']} · Python {env['python']} · {env['ssl']} · "
         f"load average at start / end: {load0} / {load1} (other jobs on this machine show up here)", "",
         f"Each connection: 64-byte ping, wait for the echo, verify, next"
         f"{f' (+{a.interval * 1000:.0f} ms think time)' if a.interval else ''}; "
         f"{a.clients} asyncio client processes; {a.warmup:.0f} s warm-up, then {a.upgrades} upgrades "
         f"{a.settle:.0f} s apart. Pause columns are min / median / max over the upgrades. "
         f"*Client stall*: per connection the largest gap between consecutive completed round-trips "
         f"overlapping the upgrade window (command start → command returned); median over all "
         f"connections and upgrades / max. *Baseline*: the same statistic over a window of equal "
         f"length just before the first upgrade (no upgrade running). *Round-trip*: per connection the "
         f"longest ping → echo overlapping the same windows (without the think time). *Pause*: the "
         f"server's own number, the longest any connection waited (the fork, or its batch's hand-over "
         f"from the bridge to the new program); *exec → restored*: the new program's whole start-up, "
         f"during which the bridge relays. With several processes (SO_REUSEPORT, as `serve --workers`), "
         f"each is upgraded in turn and threads are summed.", "",
         "| connections | server threads | upgrades | upgrade command ms | quiesce ms (`paused in`) | pause ms (`resumed after`) "
         "| exec → restored ms (log) | largest client stall ms (median / max) | baseline gap ms (median / max) "
         "| longest round-trip ms, upgrade (median / max) | baseline round-trip ms (median / max) "
         "| round-trips | lost | mismatched |" + (" pause ÷ `python -c pass` (median / max) | largest stall ÷ `python -c pass` |"
                                                if bare else ""),
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if bare else "")]
    for r in results:
        if "error" in r:
            L.append(f"| {r['n']} | | failed: {r['error']} | | | | | | | | | | | |" + (" | |" if bare else ""))
            continue
        gaps = [g for u in r["upgrades"] for g in u["gaps_ms"]]
        rtt = [x for u in r["upgrades"] for x in u["rtt_ms"]]
        base = [g * 1000 for g, _ in r["baseline"]]
        base_rtt = [x * 1000 for _, x in r["baseline"]]

        def mm(xs: list[float]) -> str:
            return f"{statistics.median(xs):.0f} / {max(xs):.0f}" if xs else "—"

        stall, bl = mm(gaps), mm(base)
        threads = " / ".join(str(t) for t in r.get("threads", [])) or "—"
        label = (f"{r['n']}" + (f" ({r['servers']} processes)" if r.get("servers", 1) > 1 else "")
                 + (f", {r['layer']}" if r.get("layer") else ""))
        ratios = ""
        if bare:
            paused = r["resumed_ms"]
            ratios = (f" {statistics.median(paused) / bare:.2f} / {max(paused) / bare:.2f} |" if paused else " — |") + \
                     (f" {max(gaps) / bare:.2f} |" if gaps else " — |")
        L.append(f"| {label} | {threads} | {len(r['upgrades'])} | {trio([u['wall_ms'] for u in r['upgrades']])} "
                 f"| {trio(r['paused_ms'])} | {trio(r['resumed_ms'])} "
                 f"| {trio([p['exec_to_restored_ms'] for p in r['phases']])} | {stall} | {bl} "
                 f"| {mm(rtt)} | {mm(base_rtt)} "
                 f"| {r.get('rtts', 0)} | {r['lost']} | {r['mismatch']} |" + ratios)
    L.append("")
    if costs:
        L.append(f"Start-up of a fresh interpreter on the same {PLACE} (median of 3, wall ms): "
                 + " · ".join(f"`{k}` {v:.0f}" for k, v in costs.items()) + ".")
        L.append("")
    errs = [e for r in results for e in r.get("errors", [])]
    if errs:
        L.append("Errors seen: " + "; ".join(errs[:10]))
        L.append("")
    return "\n".join(L) + "\n"


def update_markdown(path: Path, section: str) -> None:
    block = f"{BEGIN}\n## Upgrade stall\n\n{section}{END}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1].lstrip("\n")
        text = pre + block + ("\n" + post if post else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", default="100,1000", help="comma-separated N (default 100,1000)")
    p.add_argument("--upgrades", type=int, default=3, help="upgrades per N (default 3)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of streaming before the first upgrade")
    p.add_argument("--settle", type=float, default=1.0, help="seconds between upgrades")
    p.add_argument("--clients", type=int, default=2, help="asyncio client processes (default 2)")
    p.add_argument("--servers", type=int, default=1,
                   help="server processes on one port (SO_REUSEPORT, as serve --workers), upgraded one after another "
                        "(default 1; 2 for 10,000 connections under a 20,000-fd limit)")
    p.add_argument("--servers-from", type=int, default=0, metavar="N",
                   help="use --servers only for runs of at least N connections (default: every run)")
    p.add_argument("--interval", type=float, default=0.0, help="think time between pings, seconds (default 0)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-step timeout, seconds")
    p.add_argument("--no-startup", action="store_true", help="skip timing a fresh interpreter's start-up")
    p.add_argument("--log-dir", type=Path, help="keep the server/backend logs here (default: a temporary directory)")
    p.add_argument("--markdown-out", type=Path, help="write/replace the 'Upgrade stall' section of this file")
    a = p.parse_args(argv)
    ns = [int(x) for x in a.connections.split(",") if x.strip()]
    nofile = raise_nofile()
    if nofile < 2 * max(ns) + 200:
        log(f"warning: RLIMIT_NOFILE is {nofile}; the server needs ~2 fds per connection")
    command = "tools/bench/upgrade_stall.py" + ("" if not argv else " " + shlex.join(argv))

    def on_term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    env = environment()
    load0 = loadavg()
    results: list[dict] = []
    costs: dict = {}
    with tempfile.TemporaryDirectory(prefix="upgrade-stall-") as d:
        tmp = Path(d)
        if a.log_dir:
            a.log_dir.mkdir(parents=True, exist_ok=True)
            tmp = a.log_dir
        try:
            blog = tmp / "backend.log"
            backend = spawn([sys.executable, str(ROOT / "tests" / "echo_backend.py")], blog,
                            env=child_env(), stdout=subprocess.PIPE)
            line = backend.stdout.readline().decode()
            backend_port = int(line.rsplit(":", 1)[1])
            for n in ns:
                try:
                    results.append(run_one(n, a, tmp, backend_port))
                except (RuntimeError, AssertionError, subprocess.TimeoutExpired) as exc:
                    log(f"N={n}: {exc}")
                    results.append({"n": n, "error": str(exc).splitlines()[0][:200]})
            kill_everything()
            if not a.no_startup:
                costs = startup_costs()
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        finally:
            kill_everything()
    section = render(results, a, env, command, load0, loadavg(), costs)
    print(section)
    for r in results:
        for ph in r.get("phases", []):
            log(f"N={r['n']}: exec -> first log line of the new program {ph['exec_to_first_log_ms']:.0f} ms, "
                f"-> restored {ph['exec_to_restored_ms']:.0f} ms")
    if a.markdown_out:
        update_markdown(a.markdown_out, section)
        log(f"wrote section to {a.markdown_out}")
    failed = any("error" in r or r["lost"] or r["mismatch"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
