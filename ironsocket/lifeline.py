"""A ``--workers`` worker dies with its supervisor.

Theory of operation
-------------------
The workers of ``serve --workers N`` are the supervisor's children. If the supervisor is
killed (SIGKILL, an OOM kill: it has no chance to forward anything), orphaned workers would keep
accepting on the port (SO_REUSEPORT) with nobody to restart, upgrade or stop them. So each
worker asks the kernel for a signal when its parent dies: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``
(a graceful stop: the listener closes at once, connections get the drain timeout).

- It is set by the worker's own start-up code (`hold`, from ``serve``), not by a
  ``preexec_fn`` of the supervisor: the same code runs in every image the worker execs into (an
  upgrade, a reload, a rollback: same PID, same start-up path), and sets it again there.
- The kernel clears the setting when the process's credentials change: ``serve --user`` calls
  `hold` again right after the drop.
- The parent may have died before the setting took effect: after setting it, the worker
  compares ``getppid()`` with the supervisor's PID (`ENV_SUPERVISOR`, put in the worker's
  environment by the supervisor); if they differ the supervisor is gone and the worker stops.
- The kernel signals when the parent *thread* that forked the worker exits: the supervisor
  starts (and restarts) its workers from its main thread, which lives as long as it does.
- Children of a worker (the bridge of an upgrade, the pre-flight check child) do not inherit
  the setting (it is cleared in a fork child), and the check child exits before `hold`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal

log = logging.getLogger("ironsocket")

ENV_SUPERVISOR = "IRONSOCKET_SUPERVISOR_PID"  # set by the --workers supervisor: its own PID
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                   ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def supervisor_pid() -> int | None:
    """The supervisor's PID if this process is a ``--workers`` worker, else None."""
    text = os.environ.get(ENV_SUPERVISOR, "")
    return int(text) if text.isdigit() else None


def hold() -> bool:
    """In a worker: ask for SIGTERM when the supervisor dies. False if it is already gone (the
    caller stops); True otherwise, and outside a worker."""
    expected = supervisor_pid()
    if expected is None:
        return True
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != expected:  # it died before the setting took effect: no signal will come
        log.error("the supervisor (pid %d) is gone: this worker stops", expected)
        return False
    return True
