#!/usr/bin/env python3
"""Python calls and syscalls per echo round trip of ironsocket's relay (the cost behind echo_cpu.py).

Runs ``ironsocket serve`` (this tree's, or --tree DIR's) in front of the benchmark's echo
backend, under this file's ``serve`` wrapper, which installs a call counter
(``threading.setprofile``/``sys.setprofile`` on every thread: ``call`` events are Python
functions, ``c_call`` builtins and C methods) that counts only between a ``start`` and a
``stop`` written to a control socket — so the handshake and the warm-up are not counted. Then R
64-byte round trips on N connections (echo_cpu.py's client), and the counts divided by R.
``--top`` prints the functions most called per round trip. Syscalls: ``strace -c -f`` attached
to the server for the counted round trips (if strace is installed), per round trip by name.

Counts are exact (no sampling) but the profiler makes the server slow: use echo_cpu.py for time.

    tools/bench/echo_calls.py [--conns 1] [--round-trips 2000] [--top 25] [--tree DIR] [--no-strace]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# -- the wrapper: runs in the server process ------------------------------------------------------
def serve(control: str, argv: list[str]) -> None:
    """Run ``python -m ironsocket ARGV`` with a call counter driven by the unix socket ``control``."""
    import runpy

    counting = False
    calls: collections.Counter[tuple[str, str]] = collections.Counter()
    lock = threading.Lock()

    def profiler(frame, event, arg):  # type: ignore[no-untyped-def]
        if not counting:
            return
        if event == "call":
            code = frame.f_code
            key = ("py", f"{Path(code.co_filename).name}:{code.co_firstlineno} {code.co_qualname}")
        elif event == "c_call":
            key = ("c", getattr(arg, "__qualname__", None) or repr(arg))
        else:
            return
        with lock:
            calls[key] += 1

    def controller() -> None:
        nonlocal counting
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(control)
        srv.listen(1)
        while True:
            conn, _ = srv.accept()
            with conn, conn.makefile("rw") as f:
                for line in f:
                    cmd = line.strip()
                    if cmd == "start":
                        calls.clear()
                        counting = True
                        f.write("ok\n")
                    elif cmd == "stop":
                        counting = False
                        f.write(json.dumps([[k[0], k[1], v] for k, v in calls.items()]) + "\n")
                    f.flush()

    threading.Thread(target=controller, daemon=True).start()
    threading.setprofile(profiler)
    sys.setprofile(profiler)
    if argv[:2] == ["-m", "ironsocket"]:
        argv = argv[2:]
    sys.argv = ["ironsocket", *argv]
    runpy.run_module("ironsocket", run_name="__main__", alter_sys=True)


# -- the driver -----------------------------------------------------------------------------------
def command(path: str, cmd: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        with s.makefile("rw") as f:
            f.write(cmd + "\n")
            f.flush()
            return f.readline()


def strace_counts(out: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) != "total":
            counts[m.group(2)] = int(m.group(1))
    return counts


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(argv[1], argv[2:])
        return 0
    import echo_cpu
    from _procs import kill_everything

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--round-trips", type=int, default=2000, help="counted round trips, over all connections")
    ap.add_argument("--top", type=int, default=25, help="print the N functions most called per round trip")
    ap.add_argument("--tree", type=Path, help="the ironsocket of this source tree instead of this one's")
    ap.add_argument("--no-strace", action="store_true")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="echo-calls-"))
    control = str(tmp / "control.sock")
    wrapper = [sys.executable, str(Path(__file__).resolve()), "serve", control]
    tree = a.tree.resolve() if a.tree else None
    try:
        with echo_cpu.echo_server(tmp, tree, wrapper) as (port, pid):
            socks = echo_cpu.open_conns(port, a.conns)
            per_conn = max(1, a.round_trips // a.conns)
            rts = per_conn * a.conns
            echo_cpu.ping_pong(socks, 100)  # warm-up
            # calls
            command(control, "start")
            echo_cpu.ping_pong(socks, per_conn)
            counted = json.loads(command(control, "stop"))
            py = sum(v for kind, _, v in counted if kind == "py")
            c = sum(v for kind, _, v in counted if kind == "c")
            print(f"{tree or 'this tree'}: {a.conns} conn, {rts} round trips")
            print(f"  Python calls per round trip: {py / rts:.1f}   C calls (builtins, C methods): {c / rts:.1f}")
            if a.top:
                print(f"  most called per round trip (top {a.top}):")
                for kind, name, v in sorted(counted, key=lambda x: -x[2])[: a.top]:
                    print(f"    {v / rts:7.2f}  {kind:2} {name}")
            # syscalls, without the profiler's cost in the way (it does not make syscalls)
            if not a.no_strace and shutil.which("strace"):
                out = tmp / "strace.txt"
                st = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # attached to every thread
                echo_cpu.ping_pong(socks, per_conn)
                st.send_signal(signal.SIGINT)
                st.wait(30)
                counts = strace_counts(out.read_text())
                total = sum(counts.values())
                print(f"  syscalls per round trip (strace -c -f): {total / rts:.2f}  "
                      + ", ".join(f"{k} {v / rts:.2f}" for k, v in sorted(counts.items(), key=lambda x: -x[1])
                                  if v / rts >= 0.01))
            for s in socks:
                s.close()
    finally:
        kill_everything()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
