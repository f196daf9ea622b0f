"""``serve --workers N``: N worker processes accept on one port (SO_REUSEPORT), so every core
works despite the GIL; each worker owns its connections, control socket and upgrades.

The parent only supervises: SIGTERM/SIGINT → graceful stop of every worker; SIGUSR2 → every
worker upgrades itself in place (same PIDs); a worker that dies unexpectedly is restarted
after a second. It never touches a connection.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("ironsocket.workers")

RESTART_DELAY = 1.0


def worker_argv(argv: list[str]) -> list[str]:
    """This program's argv without ``--workers N`` and with ``--reuse-port``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [*out, "--reuse-port"]


def supervise(count: int, argv: list[str]) -> int:
    """Run ``count`` workers of ``argv`` until SIGTERM/SIGINT; the exit code."""
    stopping = threading.Event()
    workers: list[subprocess.Popen[bytes] | None] = [None] * count

    def spawn(i: int) -> None:
        workers[i] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        log.info("worker %d started, pid %d", i, workers[i].pid)  # type: ignore[union-attr]

    def forward(signum: int) -> None:
        for w in workers:
            if w is not None and w.poll() is None:
                w.send_signal(signum)

    def on_stop(signum: int, _frame: object) -> None:
        stopping.set()
        forward(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR2, lambda signum, _f: forward(signum))
    for i in range(count):
        spawn(i)
    while True:
        alive = 0
        for i, w in enumerate(workers):
            if w is None:
                continue
            code = w.poll()
            if code is None:
                alive += 1
            elif stopping.is_set():
                workers[i] = None
            else:
                log.error("worker %d (pid %d) exited with %s; restarting in %gs", i, w.pid, code, RESTART_DELAY)
                time.sleep(RESTART_DELAY)
                if not stopping.is_set():
                    spawn(i)
                    alive += 1
        if stopping.is_set() and alive == 0:
            return 0
        time.sleep(0.2)


def main_argv() -> list[str]:
    return [sys.executable, *sys.orig_argv[1:]]
