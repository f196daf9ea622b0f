"""The processes a benchmark starts (servers, peers, profilers): each in its own session, so it
is killed with its whole process group (nginx workers outlive their leader), remembered in
``STARTED`` until then, and all killed at the end, also on Ctrl-C and on errors. Shared by
ironbench.py and upgrade_stall.py."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STARTED: list[subprocess.Popen] = []


def spawn(argv: list[str], logfile: Path, *, stdout=None, cwd: Path = ROOT, **kw) -> subprocess.Popen:
    """Start ``argv`` in ``cwd`` (default: the repo), its output appended to ``logfile`` (stdout
    may go elsewhere)."""
    out = open(logfile, "ab")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout or out, stderr=out,
                         start_new_session=True, cwd=cwd, **kw)
    out.close()
    STARTED.append(p)
    return p


def kill_group(p: subprocess.Popen, grace: float = 5.0) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)  # the group may outlive its leader (nginx workers)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(5)
    if p in STARTED:
        STARTED.remove(p)


def kill_everything() -> None:
    """Every process still in STARTED, and this process's multiprocessing children."""
    for p in list(STARTED):
        kill_group(p, grace=2.0)
    for child in multiprocessing.active_children():
        child.kill()
        child.join(2)
