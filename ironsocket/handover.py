"""The hand-over document: what an exec upgrade passes to the next program, defined once.

Theory of operation
-------------------
An upgrade (`upgrade.perform`), a rollback (`upgrade.roll_back_live`) and the bridge
(`bridge`: one connection at a time) all describe the running state to another program, and
that program reads it back. Both sides use the frozen dataclasses of this module, and only this
module spells the document's JSON keys:

- `Document`: format and version, the process (``pid``, ``created``, ``previous_exec``, the
  ``pid_file`` it holds: `pidfile`), the
  sockets carried besides the listeners (`Sockets`: admin, control, demo, the requester's
  ``reply_fd``), the bridge (`BridgeEntry`), the demo backend's connections
  (`DemoConnectionEntry`: socket, partial request, unsent answer), and one `ListenerEntry` per
  `ProxyServer`, in order.
- `ListenerEntry`: name, listening fd and address, id counter, `Counters`, session ticket keys,
  ``bridged`` (how many connections the bridge holds) and ``connections``: the `ConnectionEntry`
  of each connection the document carries itself (a rollback's, a version-1 program's).
- `ConnectionEntry`: client, backend and splice-pipe fds, `RecordMode`, suite, SNI, ALPN,
  addresses, byte counts, start time, the `TrafficKeys` per direction (``tx``: ours to the
  client, ``rx``: the client's to us) and, per mode, `UserspaceEntry` or `KtlsEntry`.

`Document.to_json` is the only writer and `Document.from_json` the only reader (the bridge
sends `ConnectionEntry.to_dict` objects inside its own frames). Reading checks the structure
(every field present and of its type, a known suite and mode, listener names unique) and
raises `StateError` with the path of the first bad field; `Document.check_fds` then checks
that every fd it names is open and of the right kind (sockets; pipes for the splice pipes):
`read_memfd` does both, before anything is touched.

Version 2 has one entry per listener. Version 1 (the programs before it: one listener, its
keys at the top level) is read as version 2 with ``from_version`` 1, and written back as
version 1 (``to_json(version=LEGACY_VERSION)``) for a rollback to such a program.

Secrets: the traffic secrets, keys and IVs and the ticket keys are in the document, which lives
in a sealed memfd (`write_memfd`: RAM only, unchangeable once written) and nowhere else unless
``serve --upgrade-state-dump FILE`` asks for a 0600 copy (`upgrade.dump_state`). The dataclasses
holding them never print them (`TrafficKeys.__repr__`, ``repr=False``).

A leaf module: it imports the record layer's types (`relay`, `tls13`), never the server or the
upgrade, so every producer and consumer can import it at the top.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import fcntl
import json
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .relay import KtlsChannel, PumpState, RecordMode, UserspaceChannel
from .tls13.constants import CipherSuite
from .tls13.handoff import TrafficKeys
from .tls13.tickets import TicketKey

if TYPE_CHECKING:
    from .connection import ConnectionInfo

STATE_FORMAT = "ironsocket-upgrade"
STATE_VERSION = 2  # 2: one entry per listener (``listeners``), for `serve --config`; the bridge
LEGACY_VERSION = 1  # one listener, its keys at the top level: read (converted), and written back
# to a version-1 program by a rollback, so that an upgrade from a version-1 program works both ways
_LISTENER_KEYS_V1 = ("listener_fd", "listen", "idle_timeout", "next_conn_id", "connections", "counters")


class StateError(Exception):
    """An upgrade state document that cannot be restored (the message says where and why)."""


class FdKind(enum.Enum):
    """What an fd named by the document must be."""

    SOCKET = "socket"
    PIPE = "pipe"

    def matches(self, mode: int) -> bool:
        return stat.S_ISSOCK(mode) if self is FdKind.SOCKET else stat.S_ISFIFO(mode)


# -- reading: typed fields with the path of the first bad one -------------------------------------
T = TypeVar("T")
_MISSING: Any = object()


class _Obj:
    """One JSON object being read; ``where`` names it in errors (``listeners[0].connections[2]``)."""

    def __init__(self, value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise StateError(f"{where}: an object is expected, not {_kind(value)}")
        self.value: dict[str, Any] = value
        self.where = where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.value:
            return self.value[key]
        if default is _MISSING:
            raise StateError(f"{self.path(key)}: missing")
        return default

    def typed(self, key: str, kind: type[T], default: Any = _MISSING) -> T:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value  # type: ignore[no-any-return]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StateError(f"{self.path(key)}: {kind.__name__} expected, not {_kind(value)}")
        return value

    def optional(self, key: str, kind: type[T]) -> T | None:
        if self.raw(key, None) is None:
            return None
        return self.typed(key, kind)

    def obj(self, key: str) -> _Obj:
        return _Obj(self.raw(key), self.path(key))

    def objects(self, key: str, default: Any = _MISSING) -> list[_Obj]:
        items = self.typed(key, list, default)
        return [_Obj(item, f"{self.path(key)}[{n}]") for n, item in enumerate(items)]

    def ints(self, key: str, default: Any = _MISSING) -> tuple[int, ...]:
        items = self.typed(key, list, default)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in items):
            raise StateError(f"{self.path(key)}: a list of integers expected")
        return tuple(items)

    def counts(self, key: str) -> dict[str, int]:
        items = self.typed(key, dict, {})
        return {str(k): v for k, v in items.items() if isinstance(v, int) and not isinstance(v, bool)}

    def b64(self, key: str) -> bytes:
        try:
            return base64.b64decode(self.typed(key, str).encode(), validate=True)
        except binascii.Error:
            raise StateError(f"{self.path(key)}: not base64") from None

    def hex(self, key: str) -> bytes:
        try:
            return bytes.fromhex(self.typed(key, str))
        except ValueError:
            raise StateError(f"{self.path(key)}: not hex") from None


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode()


def _keys_to(keys: TrafficKeys) -> dict[str, Any]:
    return {"traffic_secret": keys.traffic_secret.hex(), "key": keys.key.hex(), "iv": keys.iv.hex(), "rec_seq": keys.rec_seq}


def _keys_from(o: _Obj) -> TrafficKeys:
    return TrafficKeys(traffic_secret=o.hex("traffic_secret"), key=o.hex("key"), iv=o.hex("iv"),
                       rec_seq=o.typed("rec_seq", int))


# -- a connection ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class PumpEntry:
    """One direction's pump at the safe point (`relay.PumpState`): ended, bytes read and not
    yet written, and the splice pipe holding bytes (kTLS; its fds are carried)."""

    done: bool = False
    pending: bytes = field(default=b"", repr=False)  # application data: never in a log
    pipe: tuple[int, int] | None = None

    @classmethod
    def of(cls, state: PumpState) -> PumpEntry:
        return cls(done=state.done, pending=bytes(state.pending), pipe=state.pipe)

    def state(self) -> PumpState:
        return PumpState(done=self.done, pending=bytearray(self.pending), pipe=self.pipe)

    def to_dict(self) -> dict[str, Any]:
        return {"done": self.done, "pending": _b64(self.pending), "pipe": list(self.pipe) if self.pipe else None}

    @classmethod
    def from_obj(cls, o: _Obj) -> PumpEntry:
        pipe = o.ints("pipe") if o.raw("pipe", None) is not None else None
        if pipe is not None and len(pipe) != 2:
            raise StateError(f"{o.path('pipe')}: two fds expected, not {len(pipe)}")
        return cls(done=o.typed("done", bool), pending=o.b64("pending"),
                   pipe=(pipe[0], pipe[1]) if pipe else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class UserspaceEntry:
    """A userspace record layer's state (`tls13.session.Session`): the partial record received,
    the plaintext decrypted and not yet delivered, the ciphertext sealed and not yet sent."""

    unprocessed: bytes = field(default=b"", repr=False)
    plaintext: bytes = field(default=b"", repr=False)
    out: bytes = field(default=b"", repr=False)
    record_size_limit: int | None = None
    read_closed: bool = False
    write_closed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"unprocessed": _b64(self.unprocessed), "plaintext": _b64(self.plaintext), "out": _b64(self.out),
                "record_size_limit": self.record_size_limit, "read_closed": self.read_closed,
                "write_closed": self.write_closed}

    @classmethod
    def from_obj(cls, o: _Obj) -> UserspaceEntry:
        return cls(unprocessed=o.b64("unprocessed"), plaintext=o.b64("plaintext"), out=o.b64("out"),
                   record_size_limit=o.optional("record_size_limit", int),
                   read_closed=o.typed("read_closed", bool), write_closed=o.typed("write_closed", bool))


@dataclass(frozen=True, slots=True, kw_only=True)
class KtlsEntry:
    """A kTLS socket's state that the kernel does not hold (`relay.KtlsChannel`)."""

    write_closed: bool = False
    tx_update_owed: bool = False  # a KeyUpdate to send before the next record (not in version 1)

    def to_dict(self) -> dict[str, Any]:
        return {"write_closed": self.write_closed, "tx_update_owed": self.tx_update_owed}

    @classmethod
    def from_obj(cls, o: _Obj) -> KtlsEntry:
        return cls(write_closed=o.typed("write_closed", bool), tx_update_owed=o.typed("tx_update_owed", bool, False))


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionEntry:
    """One connection carried over exec (or handed over by the bridge)."""

    id: int
    client_fd: int
    backend_fd: int
    client: tuple[Any, ...]  # the client's address as accept gave it (host, port[, flow, scope])
    backend: tuple[Any, ...] | None  # the backend's address (None: not known)
    sni: str | None
    alpn: str | None
    suite: CipherSuite
    group: str | None  # the key exchange group's name (tls13.constants.Group)
    mode: RecordMode
    started: float  # Unix time
    bytes_c2b: int
    bytes_b2c: int
    c2b: PumpEntry
    b2c: PumpEntry
    tx: TrafficKeys  # ours: the server's application traffic keys, next rec_seq
    rx: TrafficKeys  # the client's
    userspace: UserspaceEntry | None = None  # mode USERSPACE
    ktls: KtlsEntry | None = None  # the kTLS modes

    def __post_init__(self) -> None:
        if (self.mode is RecordMode.USERSPACE) != (self.userspace is not None) or (self.userspace is None) == (self.ktls is None):
            raise StateError(f"connection {self.id}: mode {self.mode.value} needs the "
                             f"{'userspace' if self.mode is RecordMode.USERSPACE else 'ktls'} state, and only that")

    @property
    def fds(self) -> list[int]:
        """The fds it names, in a fixed order (the bridge sends them in this order)."""
        return [self.client_fd, self.backend_fd, *(self.c2b.pipe or ()), *(self.b2c.pipe or ())]

    def with_fds(self, fds: Sequence[int]) -> ConnectionEntry:
        """The same connection naming ``fds`` (in `fds` order: the receiver's numbers)."""
        if len(fds) != len(self.fds):
            raise StateError(f"connection {self.id}: {len(self.fds)} fds expected, {len(fds)} given")
        rest = iter(fds[2:])
        pipes = [(next(rest), next(rest)) if p.pipe else None for p in (self.c2b, self.b2c)]
        return dataclasses.replace(self, client_fd=fds[0], backend_fd=fds[1],
                                   c2b=dataclasses.replace(self.c2b, pipe=pipes[0]),
                                   b2c=dataclasses.replace(self.b2c, pipe=pipes[1]))

    def fd_kinds(self) -> list[tuple[int, FdKind, str]]:
        out = [(self.client_fd, FdKind.SOCKET, "client_fd"), (self.backend_fd, FdKind.SOCKET, "backend_fd")]
        for name, pump in (("c2b", self.c2b), ("b2c", self.b2c)):
            out += [(fd, FdKind.PIPE, f"{name} pipe") for fd in pump.pipe or ()]
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "client_fd": self.client_fd, "backend_fd": self.backend_fd,
            "client": list(self.client), "backend": list(self.backend or ()), "sni": self.sni, "alpn": self.alpn,
            "suite": self.suite.name, "group": self.group, "mode": self.mode.value, "started": self.started,
            "bytes_from_client": self.bytes_c2b, "bytes_to_client": self.bytes_b2c,  # wire keys since version 1
            "c2b": self.c2b.to_dict(), "b2c": self.b2c.to_dict(), "tx": _keys_to(self.tx), "rx": _keys_to(self.rx),
        }
        if self.userspace is not None:
            out["userspace"] = self.userspace.to_dict()
        if self.ktls is not None:
            out["ktls"] = self.ktls.to_dict()
        return out

    @classmethod
    def from_dict(cls, value: object, where: str = "connection") -> ConnectionEntry:
        return cls.from_obj(_Obj(value, where))

    @classmethod
    def from_obj(cls, o: _Obj) -> ConnectionEntry:
        conn_id = o.typed("id", int)
        suite_name = o.typed("suite", str)
        try:
            suite = CipherSuite[suite_name]
        except KeyError:
            raise StateError(f"{o.path('suite')}: {suite_name!r} is not a TLS 1.3 cipher suite") from None
        mode_name = o.typed("mode", str)
        try:
            mode = RecordMode(mode_name)
        except ValueError:
            raise StateError(f"{o.path('mode')}: {mode_name!r} is not a record mode "
                             f"({', '.join(m.value for m in RecordMode)})") from None
        backend = o.typed("backend", list, None)
        return cls(
            id=conn_id, client_fd=o.typed("client_fd", int), backend_fd=o.typed("backend_fd", int),
            client=tuple(o.typed("client", list)), backend=tuple(backend) if backend else None,
            sni=o.optional("sni", str), alpn=o.optional("alpn", str), suite=suite, group=o.optional("group", str),
            mode=mode, started=o.typed("started", float), bytes_c2b=o.typed("bytes_from_client", int),
            bytes_b2c=o.typed("bytes_to_client", int), c2b=PumpEntry.from_obj(o.obj("c2b")),
            b2c=PumpEntry.from_obj(o.obj("b2c")), tx=_keys_from(o.obj("tx")), rx=_keys_from(o.obj("rx")),
            userspace=UserspaceEntry.from_obj(o.obj("userspace")) if o.raw("userspace", None) is not None else None,
            ktls=KtlsEntry.from_obj(o.obj("ktls")) if o.raw("ktls", None) is not None else None)


def connection_entry(info: ConnectionInfo) -> ConnectionEntry:
    """The entry of a connection being relayed, as it is now (while its engine is paused). For
    kTLS the keys and rec_seq are read back from the kernel (`KtlsChannel.traffic_keys`)."""
    relay = info.relay
    assert relay is not None
    channel = relay.client
    write, read = channel.traffic_keys()
    userspace = ktls = None
    if isinstance(channel, UserspaceChannel):
        snap = channel.session.snapshot()
        userspace = UserspaceEntry(unprocessed=snap.unprocessed, plaintext=snap.plaintext, out=bytes(channel.out),
                                   record_size_limit=snap.record_size_limit, read_closed=channel.session.read_closed,
                                   write_closed=channel.session.write_closed)
    else:
        assert isinstance(channel, KtlsChannel)
        ktls = KtlsEntry(write_closed=channel.write_closed, tx_update_owed=channel.tx_update_owed)
    return ConnectionEntry(
        id=info.conn_id, client_fd=channel.sock.fileno(), backend_fd=relay.backend.fileno(),
        client=tuple(info.client_addr), backend=tuple(info.backend_addr) if info.backend_addr else None,
        sni=info.server_name, alpn=info.alpn_protocol, suite=channel.cipher_suite, group=info.group,
        mode=channel.mode, started=relay.stats.started, bytes_c2b=relay.stats.bytes_c2b,
        bytes_b2c=relay.stats.bytes_b2c, c2b=PumpEntry.of(relay.c2b), b2c=PumpEntry.of(relay.b2c),
        tx=write, rx=read, userspace=userspace, ktls=ktls)


# -- a listener -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class HistogramEntry:
    """A histogram's counts (`counters.Histogram`): taken only by one with the same buckets."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    def to_dict(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_obj(cls, o: _Obj) -> HistogramEntry:
        buckets = o.typed("buckets", list)
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in buckets):
            raise StateError(f"{o.path('buckets')}: a list of numbers expected")
        return cls(buckets=tuple(float(b) for b in buckets), counts=o.ints("counts"), sum=o.typed("sum", float, 0.0))


@dataclass(frozen=True, slots=True, kw_only=True)
class UpgradeCounts:
    """The process's upgrade outcomes (`counters.UpgradeCounters`)."""

    done: int = 0
    rolled_back: int = 0
    refused: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"done": self.done, "rolled_back": self.rolled_back, "refused": self.refused}

    @classmethod
    def from_obj(cls, o: _Obj) -> UpgradeCounts:
        return cls(done=o.typed("done", int, 0), rolled_back=o.typed("rolled_back", int, 0),
                   refused=o.typed("refused", int, 0))


@dataclass(frozen=True, slots=True, kw_only=True)
class Counters:
    """A listener's counters that must not go backwards across the exec (admin /metrics).
    Version 1 has the first four only: the others start at zero."""

    handshakes_ok: int = 0
    handshakes_failed: int = 0
    handshake_failures: Mapping[str, int] = field(default_factory=dict)  # alert label -> count
    bytes_closed: tuple[int, int] = (0, 0)  # from, to the client, of the connections that ended
    backend_failures: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    handshake_seconds: HistogramEntry | None = None
    upgrades: UpgradeCounts | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"handshakes_ok": self.handshakes_ok, "handshakes_failed": self.handshakes_failed,
                               "handshake_failures": dict(self.handshake_failures),
                               "bytes_closed": list(self.bytes_closed), "backend_failures": dict(self.backend_failures)}
        if self.handshake_seconds is not None:
            out["handshake_seconds"] = self.handshake_seconds.to_dict()
        if self.upgrades is not None:
            out["upgrades"] = self.upgrades.to_dict()
        return out

    @classmethod
    def from_obj(cls, o: _Obj) -> Counters:
        closed = o.ints("bytes_closed", [0, 0])
        if len(closed) != 2:
            raise StateError(f"{o.path('bytes_closed')}: two counts expected (from, to the client)")
        return cls(handshakes_ok=o.typed("handshakes_ok", int, 0), handshakes_failed=o.typed("handshakes_failed", int, 0),
                   handshake_failures=o.counts("handshake_failures"), bytes_closed=(closed[0], closed[1]),
                   backend_failures=o.counts("backend_failures"),
                   handshake_seconds=HistogramEntry.from_obj(o.obj("handshake_seconds"))
                   if o.raw("handshake_seconds", None) else None,
                   upgrades=UpgradeCounts.from_obj(o.obj("upgrades")) if o.raw("upgrades", None) else None)


def _ticket_keys_from(o: _Obj) -> tuple[TicketKey, ...] | None:
    """Malformed entries are dropped, not an error: the worst case is a full handshake."""
    if o.raw("ticket_keys", None) is None:
        return None
    keys = []
    for entry in o.typed("ticket_keys", list):
        try:
            keys.append(TicketKey(bytes.fromhex(entry["id"]), bytes.fromhex(entry["key"]), float(entry["created"])))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return tuple(keys)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerView:
    """What the pre-flight check child needs of a running listener (`runtime.match_listeners`,
    ``IRONSOCKET_UPGRADE_LISTENERS``): ``connections`` counts every one, bridged or carried."""

    name: str
    listen: tuple[Any, ...]
    connections: int
    passed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "listen": list(self.listen), "connections": self.connections, "passed": self.passed}

    @classmethod
    def from_dict(cls, value: object, where: str) -> ListenerView:
        o = _Obj(value, where)
        return cls(name=o.typed("name", str, ""), listen=tuple(o.typed("listen", list)),
                   connections=o.typed("connections", int), passed=o.typed("passed", bool, False))


def listener_views_to_json(views: Sequence[ListenerView]) -> str:
    return json.dumps([view.to_dict() for view in views])


def listener_views_from_json(text: str) -> list[ListenerView]:
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise StateError(f"the running listeners are not JSON: {exc}") from None
    if not isinstance(items, list):
        raise StateError("the running listeners: a list expected")
    return [ListenerView.from_dict(item, f"listeners[{n}]") for n, item in enumerate(items)]


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerEntry:
    """One listener (one `ProxyServer`) and what the document carries of it."""

    name: str = ""  # what the next program's configuration matches it by ("": in order)
    listener_fd: int
    listen: tuple[Any, ...]  # the bound address (host, port)
    idle_timeout: float | None = None  # for the early resume (resume.py), before the configuration
    passed: bool = False  # socket activation: the configured address does not apply
    next_conn_id: int = 1
    connections: tuple[ConnectionEntry, ...] = ()
    bridged: int = 0  # connections the bridge holds (not in ``connections``)
    counters: Counters = field(default_factory=Counters)
    # The session ticket keys (None: the document has none, as in version 1: the ring keeps its own)
    ticket_keys: tuple[TicketKey, ...] | None = field(default=None, repr=False)

    def view(self) -> ListenerView:
        return ListenerView(name=self.name, listen=self.listen, connections=len(self.connections) + self.bridged,
                            passed=self.passed)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "idle_timeout": self.idle_timeout, "listener_fd": self.listener_fd,
               "listen": list(self.listen), "passed": self.passed, "next_conn_id": self.next_conn_id,
               "connections": [conn.to_dict() for conn in self.connections], "bridged": self.bridged,
               "counters": self.counters.to_dict()}
        if self.ticket_keys is not None:
            out["ticket_keys"] = [{"id": k.key_id.hex(), "key": k.secret.hex(), "created": k.created}
                                  for k in self.ticket_keys]
        return out

    @classmethod
    def from_obj(cls, o: _Obj) -> ListenerEntry:
        return cls(name=o.typed("name", str, ""), listener_fd=o.typed("listener_fd", int),
                   listen=tuple(o.typed("listen", list)), idle_timeout=o.optional("idle_timeout", float),
                   passed=o.typed("passed", bool, False), next_conn_id=o.typed("next_conn_id", int, 1),
                   connections=tuple(ConnectionEntry.from_obj(c) for c in o.objects("connections")),
                   bridged=o.typed("bridged", int, 0),
                   counters=Counters.from_obj(o.obj("counters")) if o.raw("counters", None) is not None else Counters(),
                   ticket_keys=_ticket_keys_from(o))


# -- the document ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class BridgeEntry:
    """The bridge (bridge.py): our end of its socket pair, and its pid."""

    fd: int
    pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConnectionEntry:
    """One connection of the built-in demo backend (`demo.DemoBackend`), between two turns of
    its loop: the bytes received that are not a whole request yet, the answer not yet written,
    and whether to close once it is."""

    fd: int
    received: bytes = field(default=b"", repr=False)  # application data: never in a log
    unsent: bytes = field(default=b"", repr=False)
    close_after: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"fd": self.fd, "received": _b64(self.received), "unsent": _b64(self.unsent),
                "close_after": self.close_after}

    @classmethod
    def from_obj(cls, o: _Obj) -> DemoConnectionEntry:
        return cls(fd=o.typed("fd", int), received=o.b64("received"), unsent=o.b64("unsent"),
                   close_after=o.typed("close_after", bool, False))


@dataclass(frozen=True, slots=True, kw_only=True)
class Sockets:
    """The program's own sockets carried besides the listeners (fd numbers survive the exec)."""

    control_fd: int | None = None
    demo_fd: int | None = None
    admin_fd: int | None = None
    reply_fd: int | None = None  # the `ironsocket upgrade` requester's connection, to answer it

    @property
    def fds(self) -> list[int]:
        return [fd for fd in (self.control_fd, self.demo_fd, self.admin_fd, self.reply_fd) if fd is not None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Document:
    """The whole state an upgrade hands over (see the module doc)."""

    listeners: tuple[ListenerEntry, ...]
    pid: int
    created: float  # Unix time (the new program's pause is counted from it)
    paused_at_monotonic: float | None = None  # when the connections were paused (the bridge's fork)
    previous_exec: tuple[str, ...] | None = None  # argv of the program to roll back to (None: none)
    sockets: Sockets = field(default_factory=Sockets)
    bridge: BridgeEntry | None = None
    from_version: int | None = None  # read from a version-1 document: a rollback writes version 1
    pid_file: str | None = None  # the process's PID file now (`pidfile`); absent before: None
    demo_connections: tuple[DemoConnectionEntry, ...] = ()  # the demo backend's (its listener: ``sockets``)

    def __post_init__(self) -> None:
        if not self.listeners:
            raise StateError("the document names no listener")
        names = [entry.name for entry in self.listeners if entry.name]
        for name in names:
            if names.count(name) > 1:
                raise StateError(f"listener name {name!r} twice in the document")

    @property
    def fds(self) -> list[int]:
        """Every fd the document names (they must survive the exec)."""
        fds = self.sockets.fds
        if self.bridge is not None:
            fds.append(self.bridge.fd)
        for entry in self.listeners:
            fds.append(entry.listener_fd)
            for conn in entry.connections:
                fds += conn.fds
        fds += [conn.fd for conn in self.demo_connections]
        return fds

    def check_fds(self) -> None:
        """StateError unless every fd the document names is open and of the right kind."""
        sockets = self.sockets
        for name, fd in (("control_fd", sockets.control_fd), ("demo_fd", sockets.demo_fd), ("admin_fd", sockets.admin_fd)):
            if fd is not None:
                _expect(fd, FdKind.SOCKET, name)
        if self.bridge is not None:
            _expect(self.bridge.fd, FdKind.SOCKET, "bridge fd")
        for n, demo in enumerate(self.demo_connections):
            _expect(demo.fd, FdKind.SOCKET, f"demo_connections[{n}] fd")
        for n, entry in enumerate(self.listeners):
            label = f"listener {entry.name or n}"
            _expect(entry.listener_fd, FdKind.SOCKET, f"{label} listener_fd")
            for conn in entry.connections:
                for fd, kind, what in conn.fd_kinds():
                    _expect(fd, kind, f"{label} connection {conn.id} {what}")

    def to_dict(self, version: int = STATE_VERSION) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": STATE_FORMAT, "version": version, "pid": self.pid, "created": self.created,
            "paused_at_monotonic": self.paused_at_monotonic,
            "previous_exec": list(self.previous_exec) if self.previous_exec is not None else None,
            "control_fd": self.sockets.control_fd, "demo_fd": self.sockets.demo_fd,
            "admin_fd": self.sockets.admin_fd, "reply_fd": self.sockets.reply_fd,
            "bridge": {"fd": self.bridge.fd, "pid": self.bridge.pid} if self.bridge is not None else None,
        }
        # Written only when set: a document without them is what the code before them wrote.
        if self.pid_file is not None:
            out["pid_file"] = self.pid_file
        if self.demo_connections:
            out["demo_connections"] = [conn.to_dict() for conn in self.demo_connections]
        if version == STATE_VERSION:
            out["listeners"] = [entry.to_dict() for entry in self.listeners]
        elif version == LEGACY_VERSION:
            if len(self.listeners) != 1:
                raise StateError(f"a version-{LEGACY_VERSION} program has one listener, the state has {len(self.listeners)}")
            entry = self.listeners[0].to_dict()
            out.update({key: entry[key] for key in _LISTENER_KEYS_V1})
        else:
            raise StateError(f"state version {version} (this program writes {STATE_VERSION} and {LEGACY_VERSION})")
        return out

    def to_json(self, version: int = STATE_VERSION) -> str:
        """The document as the next program reads it (``version``: `LEGACY_VERSION` for a
        version-1 program, which has one listener)."""
        return json.dumps(self.to_dict(version), separators=(",", ":"))

    @classmethod
    def from_dict(cls, value: object) -> Document:
        if not isinstance(value, dict) or value.get("format") != STATE_FORMAT:
            raise StateError(f"not an {STATE_FORMAT} document")
        o = _Obj(value, "")
        version = value.get("version")
        if version == STATE_VERSION:
            listeners = tuple(ListenerEntry.from_obj(e) for e in o.objects("listeners"))
            from_version = None
        elif version == LEGACY_VERSION:  # one listener, at the top level
            listeners = (ListenerEntry.from_obj(_Obj({k: value[k] for k in _LISTENER_KEYS_V1 if k in value}, "")),)
            from_version = LEGACY_VERSION
        else:
            raise StateError(f"state version {version} (this program reads {STATE_VERSION} and {LEGACY_VERSION})")
        bridge = None
        if o.raw("bridge", None) is not None:
            b = o.obj("bridge")
            try:
                bridge = BridgeEntry(fd=b.typed("fd", int), pid=b.typed("pid", int))
            except StateError as exc:
                raise StateError(f"bridge: needs fd and pid ({exc})") from None
        previous = o.optional("previous_exec", list)
        if previous is not None and not all(isinstance(a, str) for a in previous):
            raise StateError("previous_exec: a list of strings expected")
        return cls(listeners=listeners, pid=o.typed("pid", int), created=o.typed("created", float),
                   paused_at_monotonic=o.optional("paused_at_monotonic", float),
                   previous_exec=tuple(previous) if previous is not None else None,
                   sockets=Sockets(control_fd=o.optional("control_fd", int), demo_fd=o.optional("demo_fd", int),
                                   admin_fd=o.optional("admin_fd", int), reply_fd=o.optional("reply_fd", int)),
                   bridge=bridge, from_version=from_version, pid_file=o.optional("pid_file", str),
                   demo_connections=tuple(DemoConnectionEntry.from_obj(c) for c in o.objects("demo_connections", [])))

    @classmethod
    def from_json(cls, text: str | bytes) -> Document:
        """The document in ``text`` (version 2 or 1), its structure checked (StateError)."""
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise StateError(f"state document is not JSON: {exc}") from None
        return cls.from_dict(value)


def _expect(fd: int, kind: FdKind, what: str) -> None:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise StateError(f"{what}: fd {fd} is not open") from None
    if not kind.matches(mode):
        raise StateError(f"{what}: fd {fd} is not a {kind.value}")


# -- the sealed memfd -------------------------------------------------------------------------------
def write_memfd(doc: Document, version: int = STATE_VERSION) -> int:
    """The document in a sealed memfd (RAM only; F_SEAL_WRITE: nobody can change it)."""
    data = doc.to_json(version).encode()
    fd = os.memfd_create("ironsocket-upgrade", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    return fd


def read_memfd(fd: int, check: Callable[[Document], None] = Document.check_fds) -> Document:
    """The document in ``fd``, its structure and (``check``) its fds checked: StateError."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    except OSError as exc:
        raise StateError(f"state fd {fd}: {exc.strerror}") from None
    doc = Document.from_json(b"".join(chunks))
    check(doc)
    return doc


# -- a post-mortem's view: what `inspect-keys --state FILE` shows ------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class KeysView:
    rec_seq: int
    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionView:
    """A connection as `key_views` reads it: whatever the file says, shown as it is."""

    id: Any
    client: Any
    backend: Any
    sni: Any
    alpn: Any
    suite: Any
    mode: Any
    tx: KeysView | None
    rx: KeysView | None


def key_views(value: object) -> list[ConnectionView]:
    """The connections and their keys of a state dump (``serve --upgrade-state-dump``), or of the
    minimal documented shape (version 1: ``connections`` with ``id``, ``client``, ``backend``,
    ``sni``, ``alpn``, ``suite``, ``mode``, and ``tx``/``rx`` of ``rec_seq``, ``key``, ``iv``).
    Lenient, unlike `Document.from_json`: a post-mortem file has no fds to check and may be
    written by hand; other fields are ignored. StateError on anything else."""
    if not isinstance(value, dict) or value.get("format") != STATE_FORMAT:
        raise StateError(f'not an upgrade state document (want "format": "{STATE_FORMAT}")')
    if value.get("version") == STATE_VERSION:  # one entry per listener: every listener's connections
        listeners = value.get("listeners")
        if not isinstance(listeners, list) or not all(isinstance(e, dict) and isinstance(e.get("connections"), list)
                                                      for e in listeners):
            raise StateError('"listeners" must be a list of objects with a "connections" list')
        conns: object = [conn for entry in listeners for conn in entry["connections"]]
    elif value.get("version") == LEGACY_VERSION:
        conns = value.get("connections")
    else:
        raise StateError(f"unsupported upgrade state version {value.get('version')!r} "
                         f"(this build reads versions {LEGACY_VERSION} and {STATE_VERSION})")
    if not isinstance(conns, list):
        raise StateError('"connections" must be a list')
    out = []
    for n, conn in enumerate(conns):
        if not isinstance(conn, dict):
            raise StateError(f"connections[{n}] is not an object")
        directions: list[KeysView | None] = []
        for d in ("tx", "rx"):
            src = conn.get(d)
            try:
                directions.append(None if src is None else KeysView(
                    rec_seq=int(src["rec_seq"]), key=bytes.fromhex(src["key"]), iv=bytes.fromhex(src["iv"])))
            except (KeyError, TypeError, ValueError):
                raise StateError(f"connections[{n}].{d} needs rec_seq (int), key and iv (hex)") from None
        out.append(ConnectionView(id=conn.get("id"), client=conn.get("client"), backend=conn.get("backend"),
                                  sni=conn.get("sni"), alpn=conn.get("alpn"), suite=conn.get("suite"),
                                  mode=conn.get("mode"), tx=directions[0], rx=directions[1]))
    return out
