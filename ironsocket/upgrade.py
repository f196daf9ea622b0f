"""Replacing the running program by exec without dropping a connection.

Theory of operation
-------------------
The upgrade is in place: the process that serves the connections execs the new program, so
the PID stays the same and no second server ever competes for the sockets.

1. **Check.** The target (default: this very program; ``--exec PATH`` another installed
   ironsocket) is first run in a short-lived child with the same arguments plus
   ``--upgrade-check``: it must start, import, parse the configuration (load the certificates)
   and name the state format it reads. If it cannot, nothing else happens and the caller is
   told why.
2. **Quiesce.** Accepting stops (`acceptor.Acceptor.hold`) (the listening socket stays open: new clients wait in
   the kernel backlog, never refused); handshakes in flight get ``HANDSHAKE_DEADLINE`` to finish
   while the relays keep moving bytes, and the ones still running are then cut (a client that
   never finishes its handshake must not be able to veto every upgrade); then
   the relay loops park between two steps (`engine.Engine.pause`): every pump at a safe point. A pump holds its bytes either in its
   splice pipe (kTLS; the pipe fds are carried) or in a Python buffer (carried in the document).
3. **Bridge.** The program forks (`bridge`): the child keeps relaying every connection of
   every listener while the new program loads, and hands them over a batch at a time when the
   new program asks (a connection waits only for its own batch's hand-over, not for the new
   program's start-up). The connections' fds stay close-on-exec: after the exec only the bridge
   holds them.
4. **State and exec.** One JSON document in a sealed memfd (never on disk), defined in
   `ironsocket.handover` (`Document`: its only writer and reader): format and version, the
   admin, control and demo fds, the bridge (its socket and pid), and one `ListenerEntry` per
   `ProxyServer`, in order (name, listening fd, address, id counter, counters, ``bridged``: how
   many connections the bridge holds, and ``connections``: those the document carries itself —
   a rollback's). A connection's `ConnectionEntry` (`handover.connection_entry`, also what the
   bridge sends with each connection it hands over): client, backend and pipe fds, mode, suite,
   SNI, ALPN, addresses, counters, start time, the traffic secrets and — read back from the
   kernel at that moment — the key, IV and next rec_seq per direction; for userspace
   connections also the partial record and buffered bytes. Every fd
   named in the document is made inheritable for this one exec; every other fd stays
   close-on-exec (Python's default). ``execv(target)`` with ``IRONSOCKET_UPGRADE_STATE_FD`` in
   the environment, if the target file is still the one the check ran (else the upgrade is
   refused); an exec that fails takes the connections back from the bridge and resumes.
5. **Restore.** The new program validates the document (format, version, every fd open and of
   the right kind), adopts the listeners, admin and control sockets, and only then (at the
   ``relay`` step of `runtime.STARTUP_STEPS`) starts the acceptors and takes the connections
   from the bridge (each kTLS socket's suite, keys and rec_seq read back equal to its
   description), and answers the requester.
6. **Rollback.** A restore that fails (bad config, invalid state, a crash in restore code)
   never closes what it inherited, and execs the previous program (``previous_exec``) with
   ``IRONSOCKET_UPGRADE_FAILED`` set to the reason. If nothing was adopted yet, with the same
   document (no byte has moved); once the connections are adopted, with the state as it is then:
   `roll_back_live` pauses them again and writes a new document, so the previous program
   continues every sequence number where the failed one left it — never a nonce twice.

Remaining window: a crash of the new program between exec and its first line of Python no
longer loses the connections (the bridge keeps relaying what it still holds until those end; only
the listeners are gone). A kill -9 of the bridge loses what it holds; a kill -9 of the new
program after the hand-over, or a previous program that can no longer be exec'd when a rollback
needs it, loses the connections.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias

from . import bridge, ktls
from .connection import ConnectionInfo
from .engine import Engine
from .handover import (
    LEGACY_VERSION, STATE_FORMAT, STATE_VERSION, BridgeEntry, ConnectionEntry, DemoConnectionEntry, Document,
    ListenerEntry, Sockets, StateError, connection_entry, write_memfd,
)
from .relay import KtlsChannel, Relay, RelayStats, UserspaceChannel
from .tls13.constants import Group
from .tls13.handoff import Handoff
from .tls13.keyschedule import derive_traffic_keys
from .tls13.session import Session

log = logging.getLogger("ironsocket.upgrade")

ENV_STATE_FD = "IRONSOCKET_UPGRADE_STATE_FD"
ENV_FAILED = "IRONSOCKET_UPGRADE_FAILED"
CHECK_FLAG = "--upgrade-check"
CHECK_TIMEOUT = 180.0  # the check child imports everything: slow machines (and the emulated VM) need time
HANDSHAKE_DEADLINE = 3.0
PARK_DEADLINE = 5.0


class UpgradeError(Exception):
    """The upgrade did not happen; the message says why (connections are unaffected)."""


def current_program() -> list[str]:
    """argv that re-runs this program as it was started (interpreter included)."""
    return [sys.executable, *sys.orig_argv[1:]]


def target_program(exec_path: str | None) -> list[str]:
    if exec_path is None:
        return current_program()
    # Another installed ironsocket (a console script): same arguments after the program name.
    return [exec_path, *sys.argv[1:]]


def check_target(argv: list[str], env: dict[str, str] | None = None) -> str:
    """Run the target with ``--upgrade-check`` (``env``: added to its environment); return its
    report or raise UpgradeError."""
    child_env = {k: v for k, v in os.environ.items() if k != ENV_STATE_FD} | (env or {})
    try:
        proc = subprocess.run([*argv, CHECK_FLAG], capture_output=True, text=True, timeout=CHECK_TIMEOUT,
                              stdin=subprocess.DEVNULL, env=child_env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UpgradeError(f"cannot run the new program {argv[0]}: {exc}") from None
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-5:])
        raise UpgradeError(f"the new program failed its start-up check (exit {proc.returncode}): {tail}")
    expected = f"state {STATE_FORMAT} v{STATE_VERSION}"
    if expected not in out:
        raise UpgradeError(f"the new program does not read {expected}: {out[-300:]}")
    return out


def check_report() -> str:
    """What ``--upgrade-check`` prints (after the configuration loaded)."""
    # A version-1 program looks for "state ironsocket-upgrade v1": this one reads that too.
    return (f"ironsocket upgrade-check: ok, pid {os.getpid()}, reads state {STATE_FORMAT} v{STATE_VERSION} "
            f"(and state {STATE_FORMAT} v{LEGACY_VERSION})")


# -- the document (ironsocket.handover defines it) ---------------------------------------------------
def dump_state(doc: Document, path: str) -> None:
    """Debugging only (``serve --upgrade-state-dump FILE``): the document, secrets included, in a
    file created 0600 — for ``ironsocket inspect-keys --state FILE`` post-mortems."""
    from .secretfile import open_secret  # no symlink, no file of another user or readable by others

    with open_secret(path, truncate=True, what="upgrade state dump") as f:
        json.dump(doc.to_dict(), f, indent=1)
    log.warning("upgrade: state document (with traffic secrets) written to %s as asked", path)


# -- restore --------------------------------------------------------------------------------------
def restore_connection(conn: ConnectionEntry, engine: Engine, idle_timeout: float | None) -> tuple[ConnectionInfo, Relay]:
    """One connection from its document entry; verifies kTLS state against the kernel."""
    client = socket.socket(fileno=conn.client_fd)
    backend = socket.socket(fileno=conn.backend_fd)
    try:
        return _restore_connection(conn, client, backend, engine, idle_timeout)
    except BaseException:
        # The fds stay open for the rollback (a socket object collected would close them).
        client.detach()
        backend.detach()
        raise


def _restore_connection(conn: ConnectionEntry, client: socket.socket, backend: socket.socket,
                        engine: Engine, idle_timeout: float | None) -> tuple[ConnectionInfo, Relay]:
    suite, tx, rx = conn.suite, conn.tx, conn.rx
    channel: UserspaceChannel | KtlsChannel
    if conn.userspace is not None:
        us = conn.userspace
        handoff = Handoff(cipher_suite=suite, group=Group[conn.group] if conn.group else Group.X25519,
                          read=rx, write=tx, server_name=conn.sni, alpn_protocol=conn.alpn,
                          plaintext=us.plaintext, unprocessed=us.unprocessed, record_size_limit=us.record_size_limit)
        session = Session(handoff)
        session.read_closed = us.read_closed
        session.write_closed = us.write_closed
        channel = UserspaceChannel(client, session, us.out)
    else:
        assert conn.ktls is not None
        state = ktls.read_back(client)
        if state.cipher_suite is not suite or state.tx is None or state.rx is None:
            raise StateError(f"connection {conn.id}: kernel holds {state.cipher_suite}, document says {suite.name}")
        if (state.tx.rec_seq, state.rx.rec_seq) != (tx.rec_seq, rx.rec_seq):
            raise StateError(f"connection {conn.id}: kernel rec_seq tx/rx {state.tx.rec_seq}/{state.rx.rec_seq}, "
                             f"document {tx.rec_seq}/{rx.rec_seq}")
        if (state.tx.key, state.rx.key) != (tx.key, rx.key):
            raise StateError(f"connection {conn.id}: kernel keys differ from the document")
        if (derive_traffic_keys(suite, tx.traffic_secret), derive_traffic_keys(suite, rx.traffic_secret)) != (
                (tx.key, tx.iv), (rx.key, rx.iv)):
            raise StateError(f"connection {conn.id}: the document's traffic secrets are not those of its keys")
        channel = KtlsChannel(client, suite, rx.traffic_secret, tx.traffic_secret, tx_update_owed=conn.ktls.tx_update_owed)
        channel.write_closed = conn.ktls.write_closed
    info = ConnectionInfo(conn_id=conn.id, client_addr=tuple(conn.client), started=conn.started,
                          server_name=conn.sni, alpn_protocol=conn.alpn, cipher_suite=suite.name,
                          group=conn.group, mode=conn.mode,
                          backend_addr=tuple(conn.backend) if conn.backend else None)
    stats = RelayStats(bytes_c2b=conn.bytes_c2b, bytes_b2c=conn.bytes_b2c,
                       started=conn.started)
    relay = Relay(conn.id, channel, backend, engine=engine, idle_timeout=idle_timeout,
                  c2b=conn.c2b.state(), b2c=conn.b2c.state(), stats=stats)
    return info, relay


# -- performing one ------------------------------------------------------------------------------
class Listener(Protocol):
    """What an upgrade needs of one listener's server (`server.ProxyServer`; this module does
    not import the server: the server imports it)."""

    engine: Engine
    connections: dict[int, ConnectionInfo]
    bytes_closed: list[int]
    parked_at: float | None

    def pause(self, handshake_deadline: float, park_deadline: float) -> None: ...
    def resume(self) -> None: ...
    def live_connections(self) -> list[tuple[ConnectionInfo, Relay]]: ...
    def snapshot(self, *, connections: bool = True) -> ListenerEntry: ...
    def release_stale(self) -> None: ...
    def take_carried(self, conn: ConnectionEntry) -> None: ...


class DemoLoop(Protocol):
    """What an upgrade needs of the built-in demo backend (`demo.DemoBackend`)."""

    def pause(self, deadline: float) -> None: ...
    def resume(self) -> None: ...
    def snapshot(self) -> tuple[DemoConnectionEntry, ...]: ...


Progress: TypeAlias = Callable[[str, dict[str, Any]], None]
"""``progress(phase, details)``: told as each phase of `perform` begins (``check``, ``quiesce``,
``exec``), for `ironsocket upgrade` to print them as they happen."""


def perform(servers: Sequence[Listener], target: list[str], reply: socket.socket | None = None,
            sockets: Sockets = Sockets(), dump_path: str | None = None,
            also_pause: Sequence[Any] = (), progress: Progress | None = None,
            check_env: dict[str, str] | None = None, pid_file: str | None = None,
            demo: DemoLoop | None = None) -> None:
    """Check, quiesce, snapshot and exec. Returns only if the upgrade did not happen (raises
    UpgradeError with the reason after resuming everything). ``servers``: every listener's
    `ProxyServer`, carried in this order; ``sockets``: the program's other sockets carried.
    ``also_pause``: other services whose listener is carried (the admin endpoint), paused with
    the servers (``pause()``: finish what is in progress, take nothing new) and resumed if the
    exec does not happen. ``check_env``: for the
    check child (what it must verify the new configuration against: `runtime.ENV_LISTENERS`).
    ``pid_file``: the PID file this process holds (the new program moves it if its
    configuration names another one, `pidfile`). ``demo``: the built-in demo backend, paused
    with the rest and its connections carried in the document."""
    tell = progress or (lambda phase, details: None)
    identity = _identity(target[0])  # the file the check runs: exec'd only if still the same
    tell("check", {"program": " ".join(target)})
    report = check_target(target, check_env)
    log.info("upgrade: target checked: %s", report.splitlines()[-1] if report else "")
    paused: list[Any] = []
    servers_paused: list[Listener] = []
    bridged: bridge.BridgeClient | None = None
    try:
        tell("quiesce", {"listeners": len(servers),
                         "connections": sum(len(server.connections) for server in servers)})
        for service in [*also_pause, *([demo] if demo is not None else [])]:
            # first: their wait (up to a poll interval) is not the connections' pause
            service.pause(PARK_DEADLINE)
            paused.append(service)
        started = time.monotonic()
        for server in servers:
            server.pause(HANDSHAKE_DEADLINE, PARK_DEADLINE)  # resumes by itself if it raises
            servers_paused.append(server)
        if _identity(target[0]) != identity:
            raise UpgradeError(f"{target[0]} changed after its start-up check; not running it")
        # The connections' pause begins when the first listener's loops parked (until then,
        # while handshakes finished, bytes moved).
        parked = min((s.parked_at for s in servers if s.parked_at is not None), default=started)
        doc = document(servers, dataclasses.replace(sockets, reply_fd=reply.fileno() if reply is not None else None),
                       previous_exec=current_program(), paused_at=parked, connections=False, pid_file=pid_file,
                       demo=demo.snapshot() if demo is not None else ())
        live = [(info, relay, index) for index, server in enumerate(servers)
                for info, relay in server.live_connections()]
        if dump_path is not None:  # a debugging aid: the connections as they are at the fork
            listeners = tuple(dataclasses.replace(entry, connections=tuple(
                connection_entry(i) for i, _ in server.live_connections())) for entry, server in zip(doc.listeners, servers))
            dump_state(dataclasses.replace(doc, listeners=listeners), dump_path)
        pid, sock = bridge.fork([server.engine for server in servers], live, doc.fds,
                                lambda: [sum(s.bytes_closed[0] for s in servers), sum(s.bytes_closed[1] for s in servers)])
        bridged = bridge.BridgeClient(sock.detach(), pid)
        doc = dataclasses.replace(doc, bridge=bridged.document())
        log.info("upgrade: %d connections paused in %.1f ms, relayed by the bridge (pid %d) until the new "
                 "program takes them; exec %s", len(live), (time.monotonic() - started) * 1000, pid, " ".join(target))
        tell("exec", {"connections": len(live), "listeners": len(servers), "bridge": pid})
        exec_with_state(target, doc)
    except BaseException as exc:
        for service in paused:
            service.resume()
        if bridged is not None:  # the exec failed: our relays are stale copies, the bridge has them
            _take_back(servers, bridged)
        for server in servers_paused:
            server.resume()
        if isinstance(exc, UpgradeError) or len(servers_paused) < len(servers):
            raise
        raise UpgradeError(f"exec failed: {exc}") from None


def _take_back(servers: Sequence[Listener], bridged: bridge.BridgeClient) -> None:
    """After an exec that failed with the bridge forked: take every connection back from it."""
    for server in servers:
        server.release_stale()
    bridged.drain(lambda listener, conn: servers[listener].take_carried(conn), paused_at=None)


def _identity(path: str) -> tuple[int, ...] | None:
    """What tells a program file from its replacement (device, inode, size, mtime, ctime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def document(servers: Sequence[Any], sockets: Sockets, *, previous_exec: Sequence[str] | None,
             paused_at: float, connections: bool = True, bridged: BridgeEntry | None = None,
             pid_file: str | None = None, demo: Sequence[DemoConnectionEntry] = ()) -> Document:
    """The state document of paused servers (anything with ``snapshot()`` → a `ListenerEntry`:
    a `ProxyServer`, a `resume.Early`, a `Carried` entry), as it is at this moment
    (``connections`` False: `ProxyServer`s only, whose connections a bridge is about to hold)."""
    entries = [server.snapshot() if connections else server.snapshot(connections=False) for server in servers]
    return Document(listeners=tuple(entries), pid=os.getpid(), created=time.time(), paused_at_monotonic=paused_at,
                    previous_exec=tuple(previous_exec) if previous_exec is not None else None, sockets=sockets,
                    bridge=bridged, pid_file=pid_file, demo_connections=tuple(demo))


def exec_with_state(target: list[str] | tuple[str, ...], doc: Document, *, failed: str | None = None,
                    version: int = STATE_VERSION) -> None:
    """exec ``target`` with ``doc`` (written as ``version``) in a sealed memfd and exactly its
    fds inheritable. Returns only by raising (the exec failed), after making every fd
    close-on-exec again."""
    memfd = write_memfd(doc, version)
    fds = [*doc.fds, memfd]
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
        env = dict(os.environ)
        env[ENV_STATE_FD] = str(memfd)
        env.pop(ENV_FAILED, None)
        if failed is not None:
            env[ENV_FAILED] = failed[:2000]
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.execve(target[0], target, env)
    finally:  # reached only if the exec failed
        for fd in fds:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        os.close(memfd)


def rollback(doc: Document, state_fd: int, reason: str) -> None:
    """After a failed restore that adopted nothing (no byte moved, so ``doc`` is still exact):
    exec the previous program with the same state. Never returns unless that exec fails."""
    previous = doc.previous_exec
    if not previous:
        log.critical("upgrade: restore failed (%s) and there is no program to roll back to; "
                     "the carried connections are lost", reason)
        raise StateError(f"restore failed ({reason}) and the document names no previous program")
    env = dict(os.environ)
    env[ENV_STATE_FD] = str(state_fd)
    env[ENV_FAILED] = reason[:2000]
    log.error("upgrade: restore failed: %s; rolling back to %s", reason, " ".join(previous))
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execve(previous[0], previous, env)


class Carried:
    """A listener entry of the inherited document that nothing in this program took over yet
    (no byte of its connections moved here): a rollback carries it exactly as it came."""

    def __init__(self, entry: ListenerEntry) -> None:
        self.entry = entry

    def pause(self, handshake_deadline: float, park_deadline: float) -> None:
        pass

    def snapshot(self) -> ListenerEntry:
        return self.entry


def roll_back_live(servers: Sequence[Any], sockets: Sockets, bridged: BridgeEntry | None, doc: Document,
                   state_fd: int, reason: str, demo: DemoLoop | None = None) -> None:
    """After a failure in a program that has adopted the connections (and may have moved bytes):
    pause them, write the state as it is *now* and exec the previous program with it. The old
    document would rewind sequence numbers (a nonce used twice) and replay bytes. ``sockets``:
    the program's own as it inherited them; ``bridged``: the bridge, if it still holds some;
    ``demo``: the demo backend built from the document (None: not built yet, the document's
    demo connections are passed on as they came)."""
    previous = doc.previous_exec
    if not previous:
        log.critical("upgrade: restore failed (%s) and there is no program to roll back to; "
                     "the carried connections are lost", reason)
        raise StateError(f"restore failed ({reason}) and the document names no previous program")
    log.error("upgrade: restore failed: %s; rolling back to %s with the current state", reason, " ".join(previous))
    for server in servers:
        server.pause(HANDSHAKE_DEADLINE, PARK_DEADLINE)
    if demo is not None:
        demo.pause(PARK_DEADLINE)
    demo_now = demo.snapshot() if demo is not None else doc.demo_connections
    # previous_exec None: if the previous program cannot restore either, there is nowhere to go
    # (going back and forth would never end).
    # pid_file: the one we inherited (a rollback keeps the previous program's PID file)
    now = document(servers, sockets, previous_exec=None, paused_at=time.monotonic(), bridged=bridged,
                   pid_file=doc.pid_file, demo=demo_now)
    # the previous program reads version 1 only: write that (StateError if it cannot hold the state)
    version = LEGACY_VERSION if doc.from_version == LEGACY_VERSION else STATE_VERSION
    now.to_dict(version)
    # What we inherited and do not pass on (the old document, fds of connections that ended
    # here) must not leak into the previous program.
    for fd in {*doc.fds, state_fd} - set(now.fds):
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass
    exec_with_state(previous, now, failed=reason, version=version)


def send_reply(doc: Document, message: dict[str, Any]) -> None:
    """Answer the `ironsocket upgrade` that asked (its connection was carried over exec)."""
    fd = doc.sockets.reply_fd
    if fd is None:
        return
    try:
        with socket.socket(fileno=fd) as sock:
            sock.settimeout(5)
            sock.sendall((json.dumps(message) + "\n").encode())
    except OSError as exc:
        log.warning("upgrade: could not answer the requester: %s", exc)
