"""Connecting to the backend: plain TCP, transparent (client's own source address), PROXY protocol.

- `BackendSpec` says where and how: address, connect timeout, PROXY protocol version (None, "v1",
  "v2") and whether to connect *transparently* (IP_TRANSPARENT + bind to the client's address,
  so the backend sees the client, not the proxy; docs/transparent.md has the routing it needs).
- `start_connect()` begins the connection without blocking (a `Connecting`, which the handshake
  pump drives on the relay loop) and, with a PROXY protocol, writes the header as the very first
  bytes before the socket is handed on, so the relay never races it; `connect()` is the same,
  blocking.
- `proxy_v1_header()` / `proxy_v2_header()` are pure functions, byte-exact to
  haproxy.org/download/2.9/doc/proxy-protocol.txt.
- `Routes` maps TLS server names (SNI) to backends: exact names first, then ``*.suffix``
  wildcards (the longest suffix wins; a wildcard matches any number of leading labels, unlike a
  certificate wildcard), then the default.
- `BackendHealth` is the failure accounting of one listener: connect failures by reason (an
  errno name: ``ECONNREFUSED``, ``ETIMEDOUT``, ...; for the admin ``/metrics``) and, per backend
  address, whether the last attempt to reach it worked. ``/healthz`` asks `BackendHealth.check`,
  which trusts an outcome younger than ``PROBE_INTERVAL`` seconds (a real client's connect or an
  earlier probe) and otherwise *probes*: a TCP connect with a ``PROBE_TIMEOUT`` timeout, which
  sends the PROXY protocol's own health-check header (v1 ``PROXY UNKNOWN``, v2 ``LOCAL``) to a
  backend that expects one, then closes. So a backend that went down is seen within a second by
  a load balancer polling ``/healthz``, even with no client traffic, and one that came back too;
  and polling ``/healthz`` often costs at most one backend connect per second per backend.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from select import POLLOUT, poll
import socket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

ProxyProtocol = Literal["v1", "v2"]

# Linux <linux/in.h> / <linux/in6.h>; Python's socket module lacks them on some builds.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)

# -- PROXY protocol v2 constants (proxy-protocol.txt §2.2) ----------------------------------------
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_VERSION = 0x20
V2_CMD_LOCAL = 0x00
V2_CMD_PROXY = 0x01
V2_FAM_UNSPEC = 0x00
V2_FAM_TCP4 = 0x11
V2_FAM_TCP6 = 0x21

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

V1_MAX_LENGTH = 107  # §2.1: the worst case, "PROXY TCP6 ffff:...:ffff ffff:...:ffff 65535 65535\r\n"


class BackendError(OSError):
    """The backend connection could not be made; the message says why, for a human."""


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    address: tuple[str, int]
    connect_timeout: float = 5.0
    proxy_protocol: ProxyProtocol | None = None
    transparent: bool = False

    def __post_init__(self) -> None:
        if self.proxy_protocol not in (None, "v1", "v2"):
            raise ValueError(f"proxy_protocol must be None, 'v1' or 'v2', not {self.proxy_protocol!r}")

    def describe(self) -> str:
        host, port = self.address
        extra = [f"proxy-protocol {self.proxy_protocol}"] if self.proxy_protocol else []
        if self.transparent:
            extra.append("transparent")
        return f"{_fmt_hostport(host, port)}" + (f" ({', '.join(extra)})" if extra else "")


def _fmt_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- SNI routing ----------------------------------------------------------------------------------
def normalize_name(name: str) -> str:
    return name.strip().lower().rstrip(".")


@dataclass(frozen=True)
class Routes:
    """Server name → BackendSpec. Keys are exact names (``alpha.example``) or wildcards
    (``*.example``: any name ending in ``.example``); lookup: exact, longest wildcard, default."""

    table: Mapping[str, BackendSpec] = field(default_factory=dict)
    default: BackendSpec | None = None

    def __post_init__(self) -> None:
        exact: dict[str, BackendSpec] = {}
        wild: list[tuple[str, BackendSpec]] = []
        for raw, spec in self.table.items():
            name = normalize_name(raw)
            if name.startswith("*."):
                suffix = name[1:]  # ".example"
                if len(suffix) < 2 or "*" in suffix:
                    raise ValueError(f"bad wildcard route {raw!r}: use *.suffix")
                wild.append((suffix, spec))
            else:
                if not name or "*" in name:
                    raise ValueError(f"bad route name {raw!r}: an exact name or *.suffix")
                exact[name] = spec
        wild.sort(key=lambda item: len(item[0]), reverse=True)
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_wild", tuple(wild))

    def lookup(self, server_name: str | None) -> BackendSpec | None:
        found = self.match(server_name)
        return found[1] if found is not None else None

    def match(self, server_name: str | None) -> tuple[str, BackendSpec] | None:
        """(the route that matched: the exact name, ``*.suffix`` or ``default``; its backend)."""
        if server_name:
            name = normalize_name(server_name)
            spec = self._exact.get(name)  # type: ignore[attr-defined]
            if spec is not None:
                return name, spec
            for suffix, spec in self._wild:  # type: ignore[attr-defined]
                if name.endswith(suffix) and len(name) > len(suffix):
                    return "*" + suffix, spec
        return ("default", self.default) if self.default is not None else None

    def specs(self) -> list[BackendSpec]:
        """Every backend of the table (and the default), once each."""
        out = list(self._exact.values()) + [spec for _, spec in self._wild]  # type: ignore[attr-defined]
        if self.default is not None:
            out.append(self.default)
        return list(dict.fromkeys(out))


def select(config: object, server_name: str | None) -> BackendSpec:
    """The backend for one connection of a `server.ProxyConfig`: its routes by SNI, else the
    listener's own backend (with its proxy_protocol/transparent/connect_timeout)."""
    return select_route(config, server_name)[1]


def _listener_spec(config: object) -> BackendSpec:
    return BackendSpec(
        address=config.backend,  # type: ignore[attr-defined]
        connect_timeout=getattr(config, "connect_timeout", 5.0),
        proxy_protocol=getattr(config, "proxy_protocol", None),
        transparent=getattr(config, "transparent", False),
    )


def select_route(config: object, server_name: str | None) -> tuple[str, BackendSpec]:
    """`select`, with the route's name for the logs: the SNI route that matched (exact name or
    ``*.suffix``), ``default`` (the routes' default), or ``listener`` (the listener's backend)."""
    routes: Routes | None = getattr(config, "routes", None)
    if routes is not None:
        found = routes.match(server_name)
        if found is not None:
            return found
    return "listener", _listener_spec(config)


def all_specs(config: object) -> list[BackendSpec]:
    """Every backend a listener may connect to (its routes', and its own unless every name
    routes elsewhere): what ``/healthz`` checks."""
    routes: Routes | None = getattr(config, "routes", None)
    specs = routes.specs() if routes is not None else []
    if routes is None or routes.default is None:
        specs.append(_listener_spec(config))
    return list(dict.fromkeys(specs))


# -- failure accounting and health (admin /metrics, /healthz) ------------------------------------
PROBE_INTERVAL = 1.0  # seconds an outcome (a real connect or a probe) is trusted by /healthz
PROBE_TIMEOUT = 1.0  # seconds a /healthz probe may take to connect


def failure_reason(exc: OSError) -> str:
    """The label of a failed connect: the errno's name (``ECONNREFUSED``, ``ETIMEDOUT``), else
    ``timeout`` / ``error``."""
    if exc.errno:
        return errno.errorcode.get(exc.errno, f"errno{exc.errno}")
    return "timeout" if isinstance(exc, TimeoutError) else "error"


def describe_error(exc: OSError) -> str:
    """The message of a `BackendError` (or any OSError) without Python's ``[Errno N]`` prefix."""
    return exc.strerror or str(exc) if isinstance(exc, BackendError) else str(exc)


@dataclass(frozen=True)
class Outcome:
    """The last attempt to reach one backend address."""

    ok: bool
    at: float  # time.monotonic()
    reason: str = ""  # why it failed, for a human (empty when ok)


class BackendHealth:
    """One listener's backend connects: failures counted by reason, the last outcome per
    address, and the probe `check` runs for ``/healthz``. Thread-safe."""

    def __init__(self, failures: dict[str, int] | None = None) -> None:
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()  # one probe at a time; others use the last outcome
        self.failures: dict[str, int] = dict(failures or {})  # reason -> count (carried over exec)
        self._last: dict[tuple[str, int], Outcome] = {}

    def failed(self, address: tuple[str, int], exc: OSError) -> None:
        reason = failure_reason(exc)
        with self._lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1
            self._last[address] = Outcome(False, time.monotonic(), describe_error(exc))

    def succeeded(self, address: tuple[str, int]) -> None:
        with self._lock:
            self._last[address] = Outcome(True, time.monotonic())

    def failure_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.failures)

    def check(self, spec: BackendSpec, *, max_age: float = PROBE_INTERVAL,
              timeout: float = PROBE_TIMEOUT) -> Outcome:
        """The backend's health: the last outcome if younger than ``max_age``, else a probe's.
        A probe's failure is not counted in `failures` (that counts clients' connects)."""
        with self._lock:
            last = self._last.get(spec.address)
        if last is not None and time.monotonic() - last.at < max_age:
            return last
        if not self._probe_lock.acquire(timeout=timeout + 1.0):
            return last if last is not None else Outcome(False, time.monotonic(), "probe busy")
        try:
            with self._lock:  # another thread may have probed while we waited
                last = self._last.get(spec.address)
            if last is not None and time.monotonic() - last.at < max_age:
                return last
            outcome = probe(spec, timeout)
            with self._lock:
                self._last[spec.address] = outcome
            return outcome
        finally:
            self._probe_lock.release()


def probe(spec: BackendSpec, timeout: float = PROBE_TIMEOUT) -> Outcome:
    """Connect to ``spec.address`` (never transparently: the probe is the proxy's own), send the
    PROXY protocol's health-check header if the backend expects one, close."""
    host, port = spec.address
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if spec.proxy_protocol == "v1":
                sock.sendall(proxy_v1_header(None, None))  # "PROXY UNKNOWN": a health check (§2.1)
            elif spec.proxy_protocol == "v2":
                sock.sendall(proxy_v2_header(None, None, local=True))  # LOCAL: a health check (§2.2)
    except OSError as exc:
        return Outcome(False, time.monotonic(), f"connect to {_fmt_hostport(host, port)}: {exc.strerror or exc}")
    return Outcome(True, time.monotonic())


# -- PROXY protocol headers -----------------------------------------------------------------------
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _pair(source: tuple[str, int] | None, dest: tuple[str, int] | None):
    """Both addresses as ip objects of one family, or None (→ UNKNOWN / UNSPEC)."""
    if source is None or dest is None:
        return None
    src, dst = _ip(source[0]), _ip(dest[0])
    if src.version != dst.version:
        # An IPv4 client on a dual-stack listener: the mapped form was undone above for both;
        # if they still differ, express both as IPv6 (§2.1 allows only one family per line).
        src = src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}")
        dst = dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}")
    return src, int(source[1]), dst, int(dest[1])


def proxy_v1_header(source: tuple[str, int] | None, dest: tuple[str, int] | None) -> bytes:
    """``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n`` (or TCP6, or ``PROXY UNKNOWN\\r\\n``)."""
    pair = _pair(source, dest)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    src, sport, dst, dport = pair
    proto = "TCP4" if src.version == 4 else "TCP6"
    line = f"PROXY {proto} {src.compressed} {dst.compressed} {sport} {dport}\r\n".encode("ascii")
    assert len(line) <= V1_MAX_LENGTH
    return line


def tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
        raise ValueError("TLV type is one byte, value at most 65535 bytes")
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(*, version: str | None = "TLSv1.3", cipher: str | None = None, client_cert_verified: bool = False,
            client: int = PP2_CLIENT_SSL) -> bytes:
    """PP2_TYPE_SSL: ``uint8 client; uint32 verify; sub-TLVs``. ``verify`` is 0 only when the
    client presented a certificate that was verified (§2.2.5); ironsocket never asks for one, so
    it says 1 — a backend must never mistake our connections for client-authenticated ones."""
    sub = b""
    if version:
        sub += tlv(PP2_SUBTYPE_SSL_VERSION, version.encode("ascii"))
    if cipher:
        sub += tlv(PP2_SUBTYPE_SSL_CIPHER, cipher.encode("ascii"))
    return tlv(PP2_TYPE_SSL, struct.pack("!BI", client, 0 if client_cert_verified else 1) + sub)


def proxy_v2_header(
    source: tuple[str, int] | None,
    dest: tuple[str, int] | None,
    *,
    alpn: str | bytes | None = None,
    authority: str | None = None,
    ssl_version: str | None = None,
    ssl_cipher: str | None = None,
    local: bool = False,
    extra_tlvs: bytes = b"",
) -> bytes:
    """The binary header: 12-byte signature, 0x21 (v2, PROXY) or 0x20 (LOCAL), family
    (0x11 TCP/IPv4, 0x21 TCP/IPv6, 0x00 UNSPEC), 2-byte length, addresses, then TLVs:
    ALPN (0x01), AUTHORITY (0x02, the SNI), SSL (0x20, with VERSION 0x21 / CIPHER 0x23 sub-TLVs
    when ``ssl_version`` is given)."""
    pair = None if local else _pair(source, dest)
    command = V2_CMD_LOCAL if local else V2_CMD_PROXY
    if pair is None:
        family, addresses = V2_FAM_UNSPEC, b""
    else:
        src, sport, dst, dport = pair
        family = V2_FAM_TCP4 if src.version == 4 else V2_FAM_TCP6
        addresses = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    tlvs = b""
    if alpn:
        tlvs += tlv(PP2_TYPE_ALPN, alpn.encode("ascii") if isinstance(alpn, str) else alpn)
    if authority:
        tlvs += tlv(PP2_TYPE_AUTHORITY, authority.encode("idna") if not authority.isascii() else authority.encode("ascii"))
    if ssl_version:
        tlvs += ssl_tlv(version=ssl_version, cipher=ssl_cipher)
    tlvs += extra_tlvs
    body = addresses + tlvs
    if len(body) > 0xFFFF:
        raise ValueError("PROXY v2 header too long")
    return V2_SIGNATURE + bytes([V2_VERSION | command, family]) + struct.pack("!H", len(body)) + body


# -- connecting -----------------------------------------------------------------------------------
def start_connect(
    spec: BackendSpec,
    *,
    client_addr: tuple[str, int],
    local_addr: tuple[str, int] | None,
    server_name: str | None = None,
    alpn: str | None = None,
    cipher: str | None = None,
    tls_version: str = "TLSv1.3",
) -> Connecting:
    """Begin connecting to ``spec.address`` without blocking (see `Connecting`).

    ``client_addr`` is the TLS client's (address, port); ``local_addr`` is the address the
    client connected to (the PROXY header's destination). With ``spec.transparent`` the
    connection's source address is the client's IP (port chosen by the kernel). A host name is
    resolved here, with ``getaddrinfo`` (blocking: a name in the configuration should resolve
    from /etc/hosts or be an address). Raises BackendError if the connect cannot even begin."""
    header = b""
    if spec.proxy_protocol == "v1":
        header = proxy_v1_header(client_addr, local_addr)
    elif spec.proxy_protocol == "v2":
        header = proxy_v2_header(client_addr, local_addr, alpn=alpn, authority=server_name,
                                 ssl_version=tls_version, ssl_cipher=cipher)
    return Connecting(spec, client_addr, header)


def connect(
    spec: BackendSpec,
    *,
    client_addr: tuple[str, int],
    local_addr: tuple[str, int] | None,
    server_name: str | None = None,
    alpn: str | None = None,
    cipher: str | None = None,
    tls_version: str = "TLSv1.3",
) -> socket.socket:
    """`start_connect`, then wait (at most ``spec.connect_timeout``) until the connection is made
    and the PROXY header written: the connected socket, blocking. Raises BackendError."""
    pending = start_connect(spec, client_addr=client_addr, local_addr=local_addr, server_name=server_name,
                            alpn=alpn, cipher=cipher, tls_version=tls_version)
    try:
        poller = poll()
        while not pending.progress():
            poller.register(pending.fileno(), POLLOUT)
            if not poller.poll(max(0.0, pending.deadline - time.monotonic()) * 1000):
                if time.monotonic() >= pending.deadline:
                    raise pending.timed_out()
            poller.unregister(pending.fileno())
        sock = pending.take()
    except BaseException:
        pending.close()
        raise
    sock.setblocking(True)
    return sock


class Connecting:
    """One backend connect in flight, non-blocking (the handshake pump's, ironsocket.handshake).

    Call `progress()` whenever `fileno()` is writable: True once connected and the PROXY header
    (if any) written, then `take()` the socket; False means wait for POLLOUT again. It raises
    BackendError, with a message for a human, when the connect failed. `timed_out()` is the
    error to give once ``deadline`` (monotonic) has passed. A host name with several addresses
    is tried address by address, like ``socket.create_connection``."""

    def __init__(self, spec: BackendSpec, client_addr: tuple[str, int], header: bytes) -> None:
        self.spec = spec
        self.deadline = time.monotonic() + spec.connect_timeout
        self._header = header
        self._connected = False
        self._sock: socket.socket | None = None
        host, port = spec.address
        self._where = _fmt_hostport(host, port)
        self._client_ip: str | None = None
        if spec.transparent:
            self._client_ip = str(_ip(client_addr[0]))
            v6 = ":" in self._client_ip
            try:
                infos = socket.getaddrinfo(host, port, socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise BackendError(errno.EADDRNOTAVAIL,
                                   f"transparent connect: backend {host} has no IPv{6 if v6 else 4} address for "
                                   f"client {self._client_ip} ({exc.strerror})") from None
            self._targets = infos[:1]
        else:
            try:
                self._targets = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise BackendError(errno.EHOSTUNREACH, f"connect to {self._where}: {exc.strerror}") from None
        self._begin_next()

    def fileno(self) -> int:
        """The socket to wait on (-1 once taken or closed)."""
        return self._sock.fileno() if self._sock is not None else -1

    def _begin_next(self) -> None:
        """connect() to the next address (non-blocking); raises BackendError if none is left."""
        family, type_, proto, _, target = self._targets.pop(0)
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            if self._client_ip is not None:
                self._bind_transparent(sock, family == socket.AF_INET6)
            code = sock.connect_ex(target)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
        except BackendError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            if self._targets:
                self._begin_next()
                return
            raise self._failed(exc) from None
        self._sock = sock

    def _bind_transparent(self, sock: socket.socket, v6: bool) -> None:
        assert self._client_ip is not None
        try:
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise BackendError(exc.errno,
                                   "transparent mode: setsockopt(IP_TRANSPARENT) not permitted — the proxy needs "
                                   "CAP_NET_ADMIN (run as root or grant it: setcap cap_net_admin+ep, or "
                                   "AmbientCapabilities=CAP_NET_ADMIN in the systemd unit)") from None
            raise BackendError(exc.errno or 0, f"transparent mode: setsockopt(IP_TRANSPARENT): {exc.strerror}") from None
        try:
            sock.bind((self._client_ip, 0))
        except OSError as exc:
            raise BackendError(exc.errno or 0,
                               f"transparent mode: cannot bind to the client's address {self._client_ip}: "
                               f"{exc.strerror}") from None

    def _failed(self, exc: OSError) -> BackendError:
        if self._client_ip is None:
            return BackendError(exc.errno or 0, f"connect to {self._where}: {exc.strerror or exc}")
        hint = ""
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EINVAL):
            hint = " (unroutable: see docs/transparent.md for the routing the operator must set up)"
        return BackendError(exc.errno or 0,
                            f"transparent connect from {self._client_ip} to {self._where}: {exc.strerror}{hint}")

    def timed_out(self) -> BackendError:
        """The error once ``deadline`` has passed (the caller closes this connect)."""
        timeout = self.spec.connect_timeout
        if self._client_ip is None:
            return BackendError(errno.ETIMEDOUT, f"connect to {self._where}: timed out after {timeout:g}s")
        ip = self._client_ip
        return BackendError(errno.ETIMEDOUT,
                            f"transparent connect from {ip} to {self._where} timed out after "
                            f"{timeout:g}s: the backend's replies to {ip} probably do not "
                            "route back to this host (see docs/transparent.md: the backend's route to clients must "
                            "go via the proxy, and the proxy needs 'ip rule add fwmark 1 lookup 100' + "
                            "'ip route add local 0.0.0.0/0 dev lo table 100' + a mangle rule marking the replies)")

    def progress(self) -> bool:
        """Go on without blocking: True once connected and the header written."""
        assert self._sock is not None
        if not self._connected:
            code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == 0:
                try:
                    self._sock.getpeername()
                except OSError:  # not connected yet (a spurious wake-up)
                    return False
                self._connected = True
            elif code == errno.EINPROGRESS:
                return False
            else:
                self._sock.close()
                self._sock = None
                if self._targets:
                    self._begin_next()
                    return False
                raise self._failed(OSError(code, os.strerror(code)))
        while self._header:
            try:
                sent = self._sock.send(self._header)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise BackendError(exc.errno or 0, f"sending the PROXY header to {self._where}: "
                                                   f"{exc.strerror or exc}") from None
            self._header = self._header[sent:]
        return True

    def take(self) -> socket.socket:
        """The connected socket (non-blocking), which the caller owns from now on."""
        assert self._sock is not None and self._connected and not self._header
        sock, self._sock = self._sock, None
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
