"""ironsocket.backend: PROXY protocol headers, SNI routes, transparent connect — end to end.

The proxy runs as a real process (`ironsocket serve --config`); clients connect from 127.0.0.2
so the backend can tell the client's address from the proxy's (127.0.0.1). The PROXY headers are
checked by strict parsers written here from proxy-protocol.txt (haproxy.org/download/2.9/doc),
and, when the `haproxy` binary exists, by HAProxy itself (`bind ... accept-proxy`).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ironsocket import backend as bk
from tests.conftest import ManagedProcess
from tests.helpers import CERTS, ROOT, client_context

TIMEOUT = 15.0
CLIENT_IP = "127.0.0.2"


# -- strict parsers, from the spec -------------------------------------------------------------------
@dataclass
class ParsedV2:
    command: str
    family: str
    source: tuple[str, int] | None
    dest: tuple[str, int] | None
    tlvs: list[tuple[int, bytes]] = field(default_factory=list)
    length: int = 0  # whole header

    def tlv(self, kind: int) -> bytes | None:
        return next((v for k, v in self.tlvs if k == kind), None)


def parse_v2(data: bytes) -> ParsedV2:
    """§2.2, strictly: signature, version 2, a known command and family, exact address block
    sizes, TLVs that exactly fill the rest."""
    assert len(data) >= 16, "shorter than the fixed 16-byte part"
    assert data[:12] == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a", "bad signature"
    ver_cmd, fam = data[12], data[13]
    assert ver_cmd >> 4 == 2, f"version {ver_cmd >> 4} != 2"
    command = {0: "LOCAL", 1: "PROXY"}[ver_cmd & 0x0F]
    (length,) = struct.unpack("!H", data[14:16])
    assert len(data) >= 16 + length, "truncated"
    body = data[16 : 16 + length]
    families = {0x00: ("UNSPEC", 0), 0x11: ("TCP4", 12), 0x12: ("UDP4", 12), 0x21: ("TCP6", 36), 0x22: ("UDP6", 36),
                0x31: ("UNIX_STREAM", 216), 0x32: ("UNIX_DGRAM", 216)}
    assert fam in families, f"unknown family 0x{fam:02x}"
    family, size = families[fam]
    assert length >= size, "address block longer than the header"
    source = dest = None
    if family in ("TCP4", "TCP6"):
        n = 4 if family == "TCP4" else 16
        src, dst = body[:n], body[n : 2 * n]
        sport, dport = struct.unpack("!HH", body[2 * n : 2 * n + 4])
        source = (str(ipaddress.ip_address(src)), sport)
        dest = (str(ipaddress.ip_address(dst)), dport)
    tlvs = []
    rest = body[size:]
    while rest:
        assert len(rest) >= 3, "truncated TLV header"
        kind, tlen = rest[0], struct.unpack("!H", rest[1:3])[0]
        assert len(rest) >= 3 + tlen, "TLV longer than the header"
        tlvs.append((kind, rest[3 : 3 + tlen]))
        rest = rest[3 + tlen :]
    return ParsedV2(command, family, source, dest, tlvs, 16 + length)


def parse_ssl_tlv(value: bytes) -> tuple[int, int, dict[int, bytes]]:
    client, verify = struct.unpack("!BI", value[:5])
    subs, rest = {}, value[5:]
    while rest:
        kind, tlen = rest[0], struct.unpack("!H", rest[1:3])[0]
        assert len(rest) >= 3 + tlen
        subs[kind] = rest[3 : 3 + tlen]
        rest = rest[3 + tlen :]
    return client, verify, subs


def parse_v1(data: bytes) -> tuple[str, tuple[str, int] | None, tuple[str, int] | None, int]:
    """§2.1, strictly: "PROXY" SP proto SP src SP dst SP sport SP dport CRLF, at most 107 bytes."""
    end = data.find(b"\r\n")
    assert 0 < end <= 105, "no CRLF within 107 bytes"
    line = data[:end].decode("ascii")
    parts = line.split(" ")
    assert parts[0] == "PROXY"
    if parts[1] == "UNKNOWN":
        return "UNKNOWN", None, None, end + 2
    assert len(parts) == 6, f"{line!r}: want 6 fields separated by single spaces"
    proto, src, dst, sport, dport = parts[1:]
    assert proto in ("TCP4", "TCP6")
    want = 4 if proto == "TCP4" else 6
    for a in (src, dst):
        assert ipaddress.ip_address(a).version == want
    for p in (sport, dport):
        assert p.isdigit() and (p == "0" or not p.startswith("0")) and 0 <= int(p) <= 65535, p
    return proto, (src, int(sport)), (dst, int(dport)), end + 2


# -- pure builders, byte for byte ------------------------------------------------------------------
def test_v1_header_bytes() -> None:
    assert bk.proxy_v1_header(("192.168.0.1", 56324), ("192.168.0.11", 443)) == \
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    worst = bk.proxy_v1_header(("ffff:" * 7 + "ffff", 65535), ("ffff:" * 7 + "ffff", 65535))
    assert worst == b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(worst) == 104 <= bk.V1_MAX_LENGTH == 107  # §2.1: 107 is the worst case with "UNKNOWN"
    assert bk.proxy_v1_header(("2001:db8::1", 1), ("2001:db8::2", 2)) == b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"
    assert bk.proxy_v1_header(None, None) == b"PROXY UNKNOWN\r\n"
    # an IPv4 client seen through a dual-stack socket is reported as IPv4
    assert bk.proxy_v1_header(("::ffff:10.0.0.1", 5), ("::ffff:10.0.0.2", 6)) == b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n"


def test_v2_header_bytes() -> None:
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    assert bk.proxy_v2_header(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        sig + b"\x21\x11\x00\x0c" + bytes([192, 168, 0, 1, 192, 168, 0, 11]) + struct.pack("!HH", 56324, 443))
    v6 = bk.proxy_v2_header(("2001:db8::1", 1), ("2001:db8::2", 2))
    assert v6[12:16] == b"\x21\x21\x00\x24" and len(v6) == 16 + 36
    assert v6[16:32] == ipaddress.ip_address("2001:db8::1").packed
    assert bk.proxy_v2_header(None, None, local=True) == sig + b"\x20\x00\x00\x00"
    full = bk.proxy_v2_header(("10.0.0.1", 1000), ("10.0.0.2", 443), alpn="h2", authority="alpha.test",
                              ssl_version="TLSv1.3", ssl_cipher="TLS_AES_128_GCM_SHA256")
    tlvs = (b"\x01\x00\x02h2" + b"\x02\x00\x0aalpha.test"
            + b"\x20" + struct.pack("!H", 5 + 3 + 7 + 3 + 22) + b"\x01" + b"\x00\x00\x00\x01"
            + b"\x21\x00\x07TLSv1.3" + b"\x23\x00\x16TLS_AES_128_GCM_SHA256")
    assert full == sig + b"\x21\x11" + struct.pack("!H", 12 + len(tlvs)) + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + \
        struct.pack("!HH", 1000, 443) + tlvs
    parsed = parse_v2(full)
    assert parsed.source == ("10.0.0.1", 1000) and parsed.tlv(bk.PP2_TYPE_AUTHORITY) == b"alpha.test"


def test_routes_lookup() -> None:
    a, b, w, d = (bk.BackendSpec(address=("127.0.0.1", p)) for p in (1, 2, 3, 4))
    deep = bk.BackendSpec(address=("127.0.0.1", 5))
    routes = bk.Routes({"alpha.test": a, "Beta.Test.": b, "*.example": w, "*.x.example": deep}, default=d)
    assert routes.lookup("alpha.test") is a
    assert routes.lookup("ALPHA.test.") is a
    assert routes.lookup("beta.test") is b
    assert routes.lookup("www.example") is w
    assert routes.lookup("a.b.example") is w
    assert routes.lookup("y.x.example") is deep  # the longest suffix wins
    assert routes.lookup("example") is d  # "*.example" needs at least one more label
    assert routes.lookup("gamma.test") is d
    assert routes.lookup(None) is d
    assert bk.Routes({"alpha.test": a}).lookup("other") is None
    with pytest.raises(ValueError):
        bk.Routes({"a.*.test": a})


def test_connect_refused_is_a_clear_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(bk.BackendError, match=rf"connect to 127.0.0.1:{port}: Connection refused"):
        bk.connect(bk.BackendSpec(address=("127.0.0.1", port)), client_addr=("127.0.0.1", 1), local_addr=None)


# -- test backends and a proxy process -------------------------------------------------------------
class CaptureBackend:
    """A TCP backend (thread): for each connection, greets with ``name`` and records everything
    the proxy sends until ``stop_marker`` (or EOF), then closes."""

    def __init__(self, name: str, host: str = "127.0.0.1", stop_marker: bytes = b"END\n") -> None:
        self.name = name
        self.stop_marker = stop_marker
        self.sock = socket.create_server((host, 0))
        self.address = self.sock.getsockname()[:2]
        self.received: list[tuple[tuple[str, int], bytes]] = []
        self.cond = threading.Condition()
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn, peer), daemon=True).start()

    def _one(self, conn: socket.socket, peer) -> None:
        data = b""
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                conn.sendall(f"backend-{self.name}\n".encode())
                while self.stop_marker not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(b"bye\n")
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        with self.cond:
            self.received.append((peer[:2], data))
            self.cond.notify_all()

    def wait(self, count: int = 1) -> list[tuple[tuple[str, int], bytes]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.received) >= count, TIMEOUT), f"{self.name}: no connection"
            return list(self.received)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def backends() -> Iterator[Callable[[str], CaptureBackend]]:
    made: list[CaptureBackend] = []

    def make(name: str) -> CaptureBackend:
        b = CaptureBackend(name)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def _hp(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


@pytest.fixture
def run_config(tmp_path: Path) -> Iterator[Callable[[str], tuple[ManagedProcess, list[tuple[str, int]]]]]:
    """Write a TOML file and run `ironsocket serve --config` on it; yields (process, listen addresses)."""
    procs: list[ManagedProcess] = []

    def run(toml: str, *extra: str, count: int = 1) -> tuple[ManagedProcess, list[tuple[str, int]]]:
        path = tmp_path / f"proxy{len(procs)}.toml"
        path.write_text(textwrap.dedent(toml).replace("@CERTS@", str(CERTS)))
        proc = ManagedProcess([sys.executable, "-m", "ironsocket", "serve", "--config", str(path), *extra],
                              "ironsocket serve --config")
        procs.append(proc)
        deadline = time.monotonic() + TIMEOUT
        while len(lines := [ln for ln in proc.output.splitlines() if "serving TLS 1.3 on" in ln]) < count:
            proc.wait_for_line(r"serving TLS 1\.3 on", timeout=max(0.1, deadline - time.monotonic()),
                               start=proc.line_count())
        addrs = []
        for line in lines:
            host, port = line.split(" on ", 1)[1].split(" ", 1)[0].rsplit(":", 1)
            addrs.append((host, int(port)))
        return proc, addrs

    yield run
    for p in procs:
        p.stop()


def tls_exchange(addr: tuple[str, int], server_name: str, payload: bytes, *, alpn: list[str] | None = None,
                 source: str = CLIENT_IP) -> tuple[tuple[str, int], str | None, bytes]:
    """Python ssl client bound to ``source``: (client address, ALPN chosen, everything received)."""
    ctx = client_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection(addr, timeout=TIMEOUT, source_address=(source, 0))
    with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        me = tls.getsockname()[:2]
        tls.sendall(payload)
        got = b""
        while True:
            try:
                chunk = tls.recv(4096)
            except (ssl.SSLEOFError, ConnectionResetError):
                break
            if not chunk:
                break
            got += chunk
        return me, tls.selected_alpn_protocol(), got


LISTENER = """
    [[listeners]]
    listen = "127.0.0.1:0"
    backend = "{backend}"
    alpn = ["h2", "http/1.1"]
    proxy_protocol = {pp}
    [[listeners.certs]]
    cert = "@CERTS@/alpha.test.pem"
    key = "@CERTS@/alpha.test.key"
"""


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_proxy_protocol_end_to_end(version: str, backends, run_config) -> None:
    be = backends("pp")
    proc, [addr] = run_config(LISTENER.format(backend=_hp(be.address), pp=f'"{version}"'))
    me, alpn, got = tls_exchange(addr, "alpha.test", b"hello END\n", alpn=["h2"])
    assert alpn == "h2"
    assert got == b"backend-pp\nbye\n"
    [(peer, data)] = be.wait()
    assert peer[0] == "127.0.0.1"  # the TCP connection itself comes from the proxy
    if version == "v2":
        hdr = parse_v2(data)
        assert (hdr.command, hdr.family) == ("PROXY", "TCP4")
        assert hdr.source == me and me[0] == CLIENT_IP
        assert hdr.dest == addr
        assert hdr.tlv(bk.PP2_TYPE_ALPN) == b"h2"
        assert hdr.tlv(bk.PP2_TYPE_AUTHORITY) == b"alpha.test"
        client, verify, subs = parse_ssl_tlv(hdr.tlv(bk.PP2_TYPE_SSL))
        assert client & bk.PP2_CLIENT_SSL and verify != 0  # no client certificate was verified
        assert subs[bk.PP2_SUBTYPE_SSL_VERSION] == b"TLSv1.3"
        assert subs[bk.PP2_SUBTYPE_SSL_CIPHER].startswith(b"TLS_")
        rest = data[hdr.length :]
    else:
        proto, source, dest, n = parse_v1(data)
        assert (proto, source, dest) == ("TCP4", me, addr)
        rest = data[n:]
    assert rest == b"hello END\n"  # the header came first, then exactly the client's bytes


def test_sni_routing_with_openssl(backends, run_config) -> None:
    a, b, d = backends("A"), backends("B"), backends("default")
    _, [addr] = run_config(f"""
        [[listeners]]
        listen = "127.0.0.1:0"
        backend = "{_hp(d.address)}"
        [[listeners.certs]]
        cert = "@CERTS@/ecdsa-p256.pem"
        key = "@CERTS@/ecdsa-p256.key"
        [listeners.routes."alpha.test"]
        cert = "@CERTS@/alpha.test.pem"
        key = "@CERTS@/alpha.test.key"
        backend = "{_hp(a.address)}"
        [listeners.routes."beta.test"]
        cert = "@CERTS@/beta.test.pem"
        key = "@CERTS@/beta.test.key"
        backend = "{_hp(b.address)}"
    """)

    def s_client(name: str) -> str:
        out = subprocess.run(
            ["openssl", "s_client", "-connect", _hp(addr), "-servername", name, "-CAfile", str(CERTS / "ca.pem"),
             "-verify_return_error", "-verify_hostname", name, "-quiet"],
            input=b"END\n", capture_output=True, timeout=TIMEOUT)
        return out.stdout.decode()

    assert s_client("alpha.test").startswith("backend-A\n")
    assert s_client("beta.test").startswith("backend-B\n")
    ctx_out = subprocess.run(["openssl", "s_client", "-connect", _hp(addr), "-servername", "unknown.test", "-quiet"],
                             input=b"END\n", capture_output=True, timeout=TIMEOUT)
    assert ctx_out.stdout.decode().startswith("backend-default\n")
    assert len(a.wait()) == len(b.wait()) == len(d.wait()) == 1


# -- HAProxy as the backend ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (tools/setup installs it)")
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_haproxy_accept_proxy_sees_client(version: str, tmp_path: Path, run_config) -> None:
    port = _free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(textwrap.dedent(f"""
        global
            maxconn 100
        defaults
            mode http
            timeout connect 5s
            timeout client 10s
            timeout server 10s
        frontend fe
            bind 127.0.0.1:{port} accept-proxy
            http-request return status 200 content-type text/plain lf-string "src=%[src] sport=%[src_port] dst=%[dst]:%[dst_port]\\n"
    """))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    hap = ManagedProcess(["haproxy", "-db", "-f", str(cfg)], "haproxy")
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, hap.output
                time.sleep(0.05)
        _, [addr] = run_config(LISTENER.format(backend=f"127.0.0.1:{port}", pp=f'"{version}"'))
        me, _, got = tls_exchange(addr, "alpha.test", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = got.decode()
        assert text.startswith("HTTP/1.1 200"), text
        assert f"src={me[0]} sport={me[1]} dst={addr[0]}:{addr[1]}" in text, text
        assert me[0] == CLIENT_IP
    finally:
        hap.stop()


# -- transparent mode in network namespaces -------------------------------------------------------
NS_CLIENT, NS_BACKEND = "is-tp-cl", "is-tp-be"
NET = {"h_c": "10.200.0.1", "c": "10.200.0.2", "h_b": "10.201.0.1", "b": "10.201.0.2"}

PEER_BACKEND = r"""
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("peer-backend: listening", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(("peer=%s:%d\n" % peer[:2]).encode())
    c.shutdown(socket.SHUT_WR)
    c.settimeout(10)
    try:
        while c.recv(4096): pass
    except OSError: pass
    c.close()
"""

CLIENT = r"""
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[3]); ctx.minimum_version = ssl.TLSVersion.TLSv1_3
raw = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
with ctx.wrap_socket(raw, server_hostname="localhost") as t:
    print("client=%s:%d" % t.getsockname()[:2], flush=True)
    data = b""
    while True:
        try:
            chunk = t.recv(4096)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    print(data.decode().strip(), flush=True)
"""


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out


@pytest.fixture
def namespaces() -> Iterator[None]:
    """client ns (10.200.0.2) — host (10.200.0.1 | 10.201.0.1) — backend ns (10.201.0.2), with the
    policy routing of docs/transparent.md on the host."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    cleanup: list[list[str]] = []
    try:
        for ns, host_if, ns_if, h_ip, ns_ip in ((NS_CLIENT, "is-tp-hc", "is-tp-c", NET["h_c"], NET["c"]),
                                                 (NS_BACKEND, "is-tp-hb", "is-tp-b", NET["h_b"], NET["b"])):
            _sh("ip", "netns", "del", ns, check=False)
            _sh("ip", "link", "del", host_if, check=False)
            _sh("ip", "netns", "add", ns)
            cleanup.append(["ip", "netns", "del", ns])
            _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            cleanup.append(["ip", "link", "del", host_if])
            _sh("ip", "link", "set", ns_if, "netns", ns)
            _sh("ip", "addr", "add", f"{h_ip}/24", "dev", host_if)
            _sh("ip", "link", "set", host_if, "up")
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/24", "dev", ns_if)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", h_ip)
        # docs/transparent.md: replies to the client's address come back to the proxy's socket.
        _sh("ip", "rule", "add", "fwmark", "1", "lookup", "100")
        cleanup.append(["ip", "rule", "del", "fwmark", "1", "lookup", "100"])
        _sh("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        cleanup.append(["ip", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
        if shutil.which("iptables"):
            rule = ["PREROUTING", "-i", "is-tp-hb", "-p", "tcp", "-m", "socket", "--transparent",
                    "-j", "MARK", "--set-mark", "1"]
            _sh("iptables", "-t", "mangle", "-A", *rule)
            cleanup.append(["iptables", "-t", "mangle", "-D", *rule])
        else:  # without netfilter: every packet from the backend's link is local
            _sh("ip", "rule", "add", "iif", "is-tp-hb", "lookup", "100")
            cleanup.append(["ip", "rule", "del", "iif", "is-tp-hb", "lookup", "100"])
    except RuntimeError as exc:
        for cmd in reversed(cleanup):
            _sh(*cmd, check=False)
        pytest.skip(f"cannot build the namespaces here: {exc}")
    try:
        yield
    finally:
        for cmd in reversed(cleanup):
            _sh(*cmd, check=False)


def _run_transparent(run_config, transparent: bool) -> str:
    be = ManagedProcess(["ip", "netns", "exec", NS_BACKEND, sys.executable, "-c", PEER_BACKEND, NET["b"], "9000"],
                        "peer backend")
    try:
        be.wait_for_line("peer-backend: listening")
        _, [addr] = run_config(f"""
            [[listeners]]
            listen = "{NET['h_c']}:0"
            backend = "{NET['b']}:9000"
            transparent = {'true' if transparent else 'false'}
            connect_timeout = 3
            [[listeners.certs]]
            cert = "@CERTS@/ecdsa-p256.pem"
            key = "@CERTS@/ecdsa-p256.key"
        """)
        out = subprocess.run(["ip", "netns", "exec", NS_CLIENT, sys.executable, "-c", CLIENT, addr[0], str(addr[1]),
                              str(CERTS / "ca.pem")], capture_output=True, text=True, timeout=TIMEOUT + 5)
        assert out.returncode == 0, out.stderr
        return out.stdout
    finally:
        be.stop()


def test_transparent_backend_sees_client_address(namespaces, run_config) -> None:
    out = _run_transparent(run_config, transparent=True)
    client = out.split("client=", 1)[1].split()[0]
    peer = out.split("peer=", 1)[1].split()[0]
    assert client.startswith(NET["c"] + ":")
    assert peer.split(":")[0] == NET["c"], out  # the client's own address, not the proxy's 10.201.0.1


def test_not_transparent_backend_sees_proxy(namespaces, run_config) -> None:
    out = _run_transparent(run_config, transparent=False)
    assert out.split("peer=", 1)[1].split(":")[0] == NET["h_b"], out


def test_transparent_without_cap_net_admin_explains() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop the capability")
    code = ("from ironsocket import backend as bk\n"
            "try:\n"
            "    bk.connect(bk.BackendSpec(address=('127.0.0.1', 9), transparent=True),"
            " client_addr=('10.9.9.9', 1), local_addr=None)\n"
            "except bk.BackendError as e:\n"
            "    print(e)\n")
    out = subprocess.run(["setpriv", "--bounding-set=-net_admin,-net_raw", "--inh-caps=-net_admin,-net_raw",
                          sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert "IP_TRANSPARENT) not permitted" in out.stdout and "CAP_NET_ADMIN" in out.stdout, out.stdout + out.stderr


def test_transparent_unroutable_explains() -> None:
    """IP_TRANSPARENT works (root), but no route to the backend: the message says so."""
    if os.geteuid() != 0:
        pytest.skip("needs root for IP_TRANSPARENT")
    spec = bk.BackendSpec(address=("203.0.113.1", 9), transparent=True, connect_timeout=0.5)
    # 10.9.9.9 is not ours and has no route back: either unreachable or a timeout, both explained.
    with pytest.raises(bk.BackendError, match="transparent connect from 10.9.9.9 to 203.0.113.1:9") as info:
        bk.connect(spec, client_addr=("10.9.9.9", 1), local_addr=None)
    assert "transparent.md" in str(info.value)
