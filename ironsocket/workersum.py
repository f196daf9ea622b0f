"""The admin endpoint of ``serve --workers N``: the supervisor's, the sum of its workers'.

Theory of operation
-------------------
Each worker is a whole ironsocket (its listeners, connections, control socket, upgrades); with
an admin endpoint asked for (``--admin``, ``[admin]``), each worker also serves its own, on a
unix socket of its own in the run directory (`worker_socket`: the supervisor adds ``--admin
unix:PATH`` to the worker's command line, which replaces the configuration file's ``[admin]``).
The endpoint the operator named is bound by the supervisor, which is never exec'd: it stays up
through every rolling upgrade, and answers from what the workers answer (`WorkersView`):

- ``/healthz``: 200 as soon as one worker says 200 (the port has a healthy acceptor); 503 with
  every worker's answer when none does. A worker in the middle of its exec does not answer for a
  while (its admin socket is carried over and answers again after): it only counts as not
  answering, so a load balancer polling ``/healthz`` never sees the node flap during an upgrade;
- ``/connections``: every worker's list, one JSON array (ids are ``W.N``: unique per machine);
- ``/metrics``: every worker's families, each ``# HELP``/``# TYPE`` once, each sample with a
  ``worker`` label, plus ``ironsocket_workers_answering``.

Workers are asked in parallel, each with ``WORKER_TIMEOUT``.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from pathlib import Path

from .admin import METRICS, TEXT, Reply

WORKER_TIMEOUT = 2.0  # seconds a worker has to answer one request of the supervisor


def worker_socket(run_dir: Path, supervisor_pid: int, index: int) -> Path:
    """Where worker ``index`` of the supervisor ``supervisor_pid`` serves its admin endpoint."""
    return run_dir / f"ironsocket-{supervisor_pid}-w{index}.admin"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def ask(path: Path, target: str, timeout: float = WORKER_TIMEOUT) -> tuple[int, str]:
    """GET ``target`` from the admin endpoint on the unix socket ``path``: (status, body).
    OSError (refused, missing, timed out) or http.client.HTTPException if it does not answer."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


class WorkersView:
    """What the supervisor's admin endpoint shows (see the module doc); ``sockets``: each
    worker's admin socket, by worker index."""

    def __init__(self, sockets: list[Path], timeout: float = WORKER_TIMEOUT) -> None:
        self.sockets = sockets
        self.timeout = timeout

    def _ask_all(self, target: str, *, first_ok: bool = False) -> dict[int, tuple[int, str] | str]:
        """Every worker's (status, body), or why it did not answer; with ``first_ok``, as soon as
        one has answered 200 (the others' answers may then be missing)."""
        answers: dict[int, tuple[int, str] | str] = {}
        done = threading.Condition()

        def one(i: int, path: Path) -> None:
            try:
                got: tuple[int, str] | str = ask(path, target, self.timeout)
            except (OSError, http.client.HTTPException) as exc:
                got = f"no answer ({exc.__class__.__name__}: {exc})"
            with done:
                answers[i] = got
                done.notify_all()

        threads = [threading.Thread(target=one, args=(i, p), name=f"is-admin-w{i}", daemon=True)
                   for i, p in enumerate(self.sockets)]
        for t in threads:
            t.start()
        with done:
            done.wait_for(lambda: len(answers) == len(threads)
                          or (first_ok and any(isinstance(a, tuple) and a[0] == 200 for a in answers.values())),
                          self.timeout + 1.0)
            return dict(answers)

    def healthz(self) -> Reply:
        answers = self._ask_all("/healthz", first_ok=True)
        ok = [i for i, a in answers.items() if isinstance(a, tuple) and a[0] == 200]
        lines = []
        for i in range(len(self.sockets)):
            a = answers.get(i, "not asked to wait (another worker answered)")
            lines.append(f"worker {i}: " + (a[1].splitlines()[0] if isinstance(a, tuple) and a[1] else str(a)))
        head = "ok" if ok else "unhealthy: no worker answered ok"
        return (200 if ok else 503), TEXT, "\n".join([head, f"workers {len(self.sockets)}", *lines]) + "\n"

    def connections(self) -> Reply:
        out: list[object] = []
        for i, a in sorted(self._ask_all("/connections").items()):
            if isinstance(a, tuple) and a[0] == 200:
                out += [{"worker": i} | c for c in json.loads(a[1])]
        return 200, "application/json", json.dumps(out, indent=1) + "\n"

    def metrics(self) -> Reply:
        answers = self._ask_all("/metrics")
        texts = [(i, a[1]) for i, a in sorted(answers.items()) if isinstance(a, tuple) and a[0] == 200]
        text = merge_metrics(texts)
        text += ("# HELP ironsocket_workers_answering Workers whose admin endpoint answered this scrape.\n"
                 "# TYPE ironsocket_workers_answering gauge\n"
                 f"ironsocket_workers_answering {len(texts)}\n")
        return 200, METRICS, text


def merge_metrics(texts: list[tuple[int, str]]) -> str:
    """Prometheus text of several workers as one: each family's HELP/TYPE once, every sample
    with a ``worker`` label (a family's samples follow its header, histograms' _bucket/_sum/_count
    included)."""
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in texts:
        family: str | None = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split()[2]
                if family not in headers:
                    order.append(family)
                    headers[family], samples[family] = [], []
                if line not in headers[family]:
                    headers[family].append(line)
            elif line and not line.startswith("#"):
                name = family or line.split("{", 1)[0].split(" ", 1)[0]
                if name not in headers:
                    order.append(name)
                    headers[name], samples[name] = [], []
                samples[name].append(_with_label(line, "worker", str(worker)))
    out: list[str] = []
    for family in order:
        out += headers[family] + samples[family]
    return "\n".join(out) + "\n" if out else ""


def _with_label(sample: str, key: str, value: str) -> str:
    """``name{a="b"} 1`` → ``name{key="value",a="b"} 1``; ``name 1`` → ``name{key="value"} 1``."""
    brace, space = sample.find("{"), sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = sample[brace + 1:]
        sep = "" if rest.startswith("}") else ","
        return f'{sample[:brace]}{{{key}="{value}"{sep}{rest}'
    return f'{sample[:space]}{{{key}="{value}"}}{sample[space:]}'
