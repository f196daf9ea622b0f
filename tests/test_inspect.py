"""`ironsocket inspect-keys`, the control socket, and the key log, end to end.

Marked ``ktls``: runs on the host (userspace record layer) and in the kTLS VM, where the rec_seq
shown must come from the kernel. The proxy runs as a real ``ironsocket serve`` subprocess
(`start_proxy` in conftest.py); the client is `RecordClient` (counts records); the client-side
traffic is captured on ``lo`` with scapy and decrypted with scapy's TLS 1.3 layer from the NSS key
log the server wrote.

Capture notes: there is no libpcap on these machines, so no BPF ``filter=``; packets are picked
with a Python ``lfilter``. On ``lo`` every packet is seen twice (outgoing and incoming): the
capture is de-duplicated before it is written to a pcap and decrypted offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ironsocket import control
from ironsocket.control import ControlError, ControlServer, Takeover
from ironsocket.inspect import describe_state, fingerprint, format_table
from ironsocket.relay import RecordMode
from ironsocket.tls13.constants import CipherSuite
from ironsocket.tls13.keyschedule import derive_traffic_keys
from tests.helpers import ROOT
from tests.helpers import RecordClient
from tests.test_proxy import record_mode, wait_until  # noqa: F401 - fixture

pytestmark = pytest.mark.ktls

CLI_TIMEOUT = 180


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private IRONSOCKET_RUN_DIR (short: unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="is-run-"))
    monkeypatch.setenv("IRONSOCKET_RUN_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ironsocket", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)


def control_path(proxy) -> Path:
    return Path(proxy.wait_for_line(r"ironsocket: control socket (\S+)").group(1))


# -- capture and decryption -----------------------------------------------------------------------
def _attach_port_filter(sock: socket.socket, port: int) -> None:
    """Classic BPF for "ip and tcp port PORT" on an Ethernet-framed interface (lo is), compiled
    by hand (what ``tcpdump -d`` prints): no libpcap here, so scapy cannot compile ``filter=``."""
    import ctypes

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Insn))]

    code = [
        (0x28, 0, 0, 12),        # 0 ldh [12]            ethertype
        (0x15, 0, 10, 0x0800),   # 1 jeq IPv4            else drop
        (0x30, 0, 0, 23),        # 2 ldb [23]            IP protocol
        (0x15, 0, 8, 6),         # 3 jeq TCP             else drop
        (0x28, 0, 0, 20),        # 4 ldh [20]            flags/fragment offset
        (0x45, 6, 0, 0x1FFF),    # 5 jset fragment       → drop
        (0xB1, 0, 0, 14),        # 6 ldxb 4*([14]&0xf)   IP header length
        (0x48, 0, 0, 14),        # 7 ldh [x+14]          TCP source port
        (0x15, 2, 0, port),      # 8 jeq port            → accept
        (0x48, 0, 0, 16),        # 9 ldh [x+16]          TCP destination port
        (0x15, 0, 1, port),      # 10 jeq port           else drop
        (0x06, 0, 0, 0x40000),   # 11 ret accept
        (0x06, 0, 0, 0),         # 12 ret drop
    ]
    insns = (Insn * len(code))(*[Insn(*c) for c in code])
    prog = Prog(len(code), ctypes.cast(insns, ctypes.POINTER(Insn)))
    sock.setsockopt(socket.SOL_SOCKET, 26, bytes(prog))  # SO_ATTACH_FILTER (copied by the kernel)


class Capture:
    """AsyncSniffer on lo for one TCP port (both directions).

    A busy lo (other test suites, 64 KiB segments) overflows scapy's 64 KiB socket buffer and
    drops packets, so: an in-kernel port filter and a large (forced) receive buffer."""

    def __init__(self, port: int) -> None:
        from scapy.all import TCP, AsyncSniffer, conf

        self.port = port
        sock = conf.L2listen(iface="lo")
        _attach_port_filter(sock.ins, port)
        sock.ins.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root)
        started = threading.Event()
        self.sniffer = AsyncSniffer(opened_socket=sock, store=True, started_callback=started.set,
                                    lfilter=lambda p: TCP in p and port in (p[TCP].sport, p[TCP].dport))
        self.sniffer.start()
        assert started.wait(10), "sniffer did not start"
        time.sleep(0.2)

    def stop(self, pcap: Path) -> Path:
        from scapy.all import IP, TCP, wrpcap

        time.sleep(0.3)  # let the last segments reach the sniffer
        packets = self.sniffer.stop()
        seen, unique = set(), []
        for p in packets:  # lo: each packet is seen outgoing and incoming
            key = (p[IP].src, p[TCP].sport, p[TCP].seq, p[TCP].ack, int(p[TCP].flags), bytes(p[TCP].payload))
            if key not in seen:
                seen.add(key)
                unique.append(p)
        assert unique, "captured nothing on lo"
        wrpcap(str(pcap), unique)
        return pcap


def decrypt(pcap: Path, keylog: Path, port: int) -> dict[str, dict]:
    """Decrypt the capture with scapy's TLS 1.3 layer and the NSS key log. Per direction
    ("c2s", "s2c"): the application-data plaintext and the count of records after Finished
    (the records protected with the application traffic keys, i.e. what rec_seq counts)."""
    from scapy.all import TCP, conf, load_layer, sniff
    from scapy.layers.tls.handshake import TLSFinished
    from scapy.layers.tls.record import TLS, TLSAlert, TLSApplicationData
    from scapy.layers.tls.record_tls13 import TLS13
    from scapy.packet import bind_layers, split_layers
    from scapy.sessions import TCPSession

    load_layer("tls")
    saved = conf.tls_session_enable, conf.tls_nss_filename
    conf.tls_session_enable = True
    conf.tls_nss_filename = str(keylog)
    bind_layers(TCP, TLS, sport=port)  # scapy binds TLS to 443 only
    bind_layers(TCP, TLS, dport=port)
    try:
        packets = sniff(offline=str(pcap), session=TCPSession)
    finally:
        split_layers(TCP, TLS, sport=port)
        split_layers(TCP, TLS, dport=port)
        conf.tls_session_enable, conf.tls_nss_filename = saved
    out = {d: {"plaintext": b"", "app_records": 0, "finished": False, "alerts": 0} for d in ("c2s", "s2c")}
    for p in packets:
        if TCP not in p:
            continue
        d = out["s2c" if p[TCP].sport == port else "c2s"]
        layer = p.getlayer(TLS13) if p.haslayer(TLS13) else None
        while layer is not None:
            if isinstance(layer, TLS13):
                inner = layer.inner
                assert inner is not None and layer.getfieldval("inner") is not None, "record not decrypted"
                msgs = inner.msg if isinstance(inner.msg, list) else [inner.msg]
                if d["finished"]:
                    d["app_records"] += 1
                    for m in msgs:
                        if isinstance(m, TLSApplicationData):
                            d["plaintext"] += m.data
                        elif isinstance(m, TLSAlert):
                            d["alerts"] += 1
                elif any(isinstance(m, TLSFinished) for m in msgs):
                    d["finished"] = True
            layer = layer.payload if layer.payload else None
    assert out["c2s"]["finished"] and out["s2c"]["finished"], f"could not decrypt the handshake: {out}"
    return out


def keylog_secrets(path: Path) -> dict[str, bytes]:
    secrets = {}
    for line in path.read_text().splitlines():
        label, _random, secret = line.split()
        secrets[label] = bytes.fromhex(secret)
    return secrets


# -- tests: capture, decrypt, rec_seq ---------------------------------------------------------------
MESSAGES = [b"first: hello through the proxy\n", b"second line " * 40 + b"\n", os.urandom(3000), b"last\n"]


def test_capture_decrypts_and_inspect_rec_seq_matches(record_mode, run_dir, start_proxy, tmp_path) -> None:
    keylog = tmp_path / "keylog"
    proxy = start_proxy("--keylog", str(keylog), "--ciphers", "TLS_AES_128_GCM_SHA256")
    path = control_path(proxy)
    capture = Capture(proxy.port)
    client = RecordClient((proxy.host, proxy.port))
    try:
        client.handshake()
        for m in MESSAGES:
            client.send(m)
            assert client.recv_exact(len(m)) == m
        time.sleep(0.2)
        # The real CLI, against the real server process, via its control socket.
        res = cli("inspect-keys", "--pid", str(proxy.pid), "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["pid"] == proxy.pid and doc["source"] == "control socket"
        [row] = doc["connections"]
        table = cli("inspect-keys", "--socket", str(path))
        assert table.returncode == 0, table.stderr
        # The control socket directly.
        answer = control.request(path, {"command": "inspect-keys"})
        assert answer["ok"], answer
        conns = control.request(path, {"command": "connections"})
        assert conns["ok"] and [r["id"] for r in conns["connections"]] == [row["id"]]
        # Let the server's record counters go quiet, then read them once more and stop the
        # capture: the comparison below needs the capture to hold every record they count.
        def seqs() -> tuple[int, int]:
            (r,) = control.request(path, {"command": "inspect-keys"})["connections"]
            return r["tx"]["rec_seq"], r["rx"]["rec_seq"]

        last, deadline = seqs(), time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if (now := seqs()) == last:
                break
            last = now
        res = cli("inspect-keys", "--pid", str(proxy.pid), "--json")
        assert res.returncode == 0, res.stderr
        [row] = json.loads(res.stdout)["connections"]
        answer = control.request(path, {"command": "inspect-keys"})
        direct = None
        if record_mode is not RecordMode.USERSPACE:
            direct = cli("inspect-keys", "--pid", str(proxy.pid), "--direct", "--json")
            assert direct.returncode == 0, direct.stderr
        pcap = capture.stop(tmp_path / "client.pcap")
    finally:
        if capture.sniffer.running:
            capture.sniffer.stop()
    local = client.sock.getsockname()
    counted = (client.records_sent, client.records_received)  # before close_notify adds one
    client.close_notify()
    client.close()

    assert stat.S_IMODE(keylog.stat().st_mode) == 0o600
    flows = decrypt(pcap, keylog, proxy.port)
    # Exactly the plaintext the client sent, and exactly what it received (the echo).
    assert flows["c2s"]["plaintext"] == b"".join(MESSAGES)
    assert flows["s2c"]["plaintext"] == b"".join(MESSAGES)
    # rec_seq = records protected with the application keys so far, counted in the capture.
    c2s, s2c = flows["c2s"]["app_records"], flows["s2c"]["app_records"]
    # Every record the client sent is on the wire. The client counts the records it needed for
    # its echoes; once (in the VM, under load) the wire carried one more server record than the
    # client had read when it counted, so that side is a lower bound; the exact check of the
    # server side is inspect-keys' rec_seq == the capture's count, below.
    assert c2s == counted[0]
    assert s2c >= counted[1]
    assert c2s == len(MESSAGES)
    for r in (row, answer["connections"][0]):
        assert r["mode"] == record_mode.value
        assert r["client"] == f"{local[0]}:{local[1]}"
        assert r["suite"] == "TLS_AES_128_GCM_SHA256" and r["sni"] == "localhost"
        assert r["backend"] is not None
        assert r["tx"]["rec_seq"] == s2c
        assert r["rx"]["rec_seq"] == c2s
        assert "key" not in r["tx"] and "iv" not in r["rx"]
    # The fingerprints are of the keys the key log's secrets derive (the kernel holds the right keys).
    secrets = keylog_secrets(keylog)
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    assert row["tx"]["fingerprint"] == fingerprint(*derive_traffic_keys(suite, secrets["SERVER_TRAFFIC_SECRET_0"]))
    assert row["rx"]["fingerprint"] == fingerprint(*derive_traffic_keys(suite, secrets["CLIENT_TRAFFIC_SECRET_0"]))
    line = next(l for l in table.stdout.splitlines() if l.startswith(f"{row['id']} "))
    assert f" {s2c} " in line and f" {c2s} " in line and row["tx"]["fingerprint"] in line
    if direct is not None:  # pidfd_getfd: the kernel's state of the server's socket, read by us
        drows = json.loads(direct.stdout)["connections"]
        mine = [r for r in drows if r["client"] == f"{local[0]}:{local[1]}"]
        assert len(mine) == 1, drows
        assert (mine[0]["tx"]["rec_seq"], mine[0]["rx"]["rec_seq"]) == (s2c, c2s)
        assert mine[0]["tx"]["fingerprint"] == row["tx"]["fingerprint"]


def test_direct_without_ktls_sockets_is_empty_not_an_error(run_dir, start_proxy) -> None:
    proxy = start_proxy()  # no connection yet: no kTLS socket in the process, on any kernel
    res = cli("inspect-keys", "--pid", str(proxy.pid), "--direct", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["connections"] == []
    res = cli("inspect-keys", "--pid", "999999999", "--direct")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "no process with pid" in res.stderr or "pidfd_open" in res.stderr


# -- tests: no key material without --reveal -------------------------------------------------------
def test_no_key_material_without_reveal(run_dir, start_proxy) -> None:
    proxy = start_proxy("--log-level", "debug")
    path = control_path(proxy)
    clients = []
    for i in range(2):
        c = RecordClient((proxy.host, proxy.port))
        c.handshake()
        c.send(b"hello %d" % i)
        assert c.recv_exact(7) == b"hello %d" % i
        clients.append(c)
    wait_until(lambda: len(control.request(path, {"command": "connections"})["connections"]) == 2,
               what="two relayed connections")
    outputs = []
    for args in (("inspect-keys",), ("inspect-keys", "--json"), ("inspect-keys", "--pid", str(proxy.pid))):
        res = cli(*args)
        assert res.returncode == 0, res.stderr
        outputs += [res.stdout, res.stderr]
    outputs.append(json.dumps(control.request(path, {"command": "connections"})))
    outputs.append(json.dumps(control.request(path, {"command": "inspect-keys"})))
    revealed = cli("inspect-keys", "--reveal", "--json")  # once, to learn the keys
    assert revealed.returncode == 0, revealed.stderr
    secrets = set()
    for row in json.loads(revealed.stdout)["connections"]:
        for d in ("tx", "rx"):
            secrets |= {row[d]["key"], row[d]["iv"]}
            assert bytes.fromhex(row[d]["key"]) and len(row[d]["iv"]) == 24
    assert len(secrets) == 8
    res = cli("inspect-keys")  # and after the reveal
    outputs += [res.stdout, res.stderr]
    for c in clients:
        c.send(b"bye")
        assert c.recv_exact(3) == b"bye"
        c.close_notify()
        c.close()
    wait_until(lambda: not control.request(path, {"command": "connections"})["connections"], what="connections closed")
    proxy.stop()
    log = proxy.output
    assert "DEBUG" in log and "control command inspect-keys" in log
    assert "--reveal" in log  # the server says keys were handed out, without printing them
    for secret in secrets:
        assert secret in revealed.stdout
        for text in [*outputs, log]:
            assert secret not in text.lower()


# -- tests: finding the server ----------------------------------------------------------------------
def test_no_server_is_a_clear_error(run_dir) -> None:
    # A stale socket (its server died) is ignored and removed.
    stale = run_dir / "ironsocket-424242.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    res = cli("inspect-keys")
    assert res.returncode != 0
    assert "no running ironsocket server found" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not stale.exists()
    res = cli("inspect-keys", "--pid", "424242")
    assert res.returncode != 0 and "Traceback" not in res.stderr and "424242" in res.stderr
    res = cli("inspect-keys", "--socket", str(run_dir / "nope.sock"))
    assert res.returncode != 0 and "no control socket at" in res.stderr and "Traceback" not in res.stderr


def test_two_servers_list_both_and_ask_for_pid(run_dir, start_proxy) -> None:
    a, b = start_proxy(), start_proxy()
    pa, pb = control_path(a), control_path(b)
    res = cli("inspect-keys")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "--pid" in res.stderr
    for proc, path in ((a, pa), (b, pb)):
        assert f"pid {proc.pid}: {path}" in res.stderr
    res = cli("inspect-keys", "--pid", str(b.pid), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["pid"] == b.pid
    b.stop()
    assert not pb.exists()  # unlinked on a clean stop
    res = cli("inspect-keys", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["pid"] == a.pid


# -- tests: the control socket itself ----------------------------------------------------------------
def test_control_socket_protocol(run_dir) -> None:
    later: list = []

    def takeover(request, conn) -> None:  # answers later, from another thread (the upgrade's shape)
        later.append(conn)
        threading.Thread(target=lambda: (time.sleep(0.2), conn.send({"ok": True, "later": request["n"]}), conn.close())).start()

    def boom(request):
        raise RuntimeError("secret detail")

    server = ControlServer(None, {"echo": lambda r: {"echo": r.get("x")}, "later": Takeover(takeover), "boom": boom},
                           read_timeout=0.5)
    try:
        path = server.path
        assert path == run_dir / f"ironsocket-{os.getpid()}.sock"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        ping = control.request(path, {"command": "ping"})
        assert ping["ok"] and ping["pid"] == os.getpid() and ping["version"]
        assert control.request(path, {"command": "echo", "x": [1, 2]}) == {"ok": True, "echo": [1, 2]}
        unknown = control.request(path, {"command": "nope"})
        assert not unknown["ok"] and "unknown command 'nope'" in unknown["error"] and "ping" in unknown["error"]
        assert control.request(path, {"command": "boom"}) == {"ok": False, "error": "internal error: RuntimeError"}
        assert control.request(path, {"command": "later", "n": 7}) == {"ok": True, "later": 7}
        assert control.find_servers() == [path]
        assert control.resolve(None, None) == path
        assert control.resolve(os.getpid(), None) == path
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(5)
            raw.connect(str(path))
            raw.sendall(b"{not json\n[1]\n")
            f = raw.makefile("rb")
            first, second = json.loads(f.readline()), json.loads(f.readline())
            assert not first["ok"] and "malformed JSON" in first["error"]
            assert not second["ok"] and "command" in second["error"]
            # No newline, no more bytes: the read times out with a clean error.
            raw.sendall(b'{"command": "ping"')
            third = json.loads(f.readline())
            assert not third["ok"] and "no complete request within" in third["error"]
            assert f.readline() == b""  # and the server closed the connection
            f.close()
        # Adopt the listening socket (as the program after exec does); the old object lets go.
        dup = os.dup(server.fileno())
        server.close(unlink=False)
        adopted = ControlServer.from_fd(dup, {"echo": lambda r: {"adopted": True}})
        try:
            assert adopted.path == path
            assert control.request(path, {"command": "echo"}) == {"ok": True, "adopted": True}
        finally:
            adopted.close()
        assert not path.exists()
        with pytest.raises(ControlError, match="no control socket"):
            control.request(path, {"command": "ping"})
    finally:
        server.close()


def test_control_dir_is_private(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("IRONSOCKET_RUN_DIR", str(tmp_path / "d"))
    assert control.control_dir() == tmp_path / "d"
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700


# -- tests: upgrade state documents ---------------------------------------------------------------
STATE = {
    "format": "ironsocket-upgrade", "version": 1,
    "connections": [
        {"id": 4, "client": "127.0.0.1:5000", "backend": "127.0.0.1:8080", "sni": "localhost", "alpn": "h2",
         "suite": "TLS_AES_128_GCM_SHA256", "mode": "ktls-sw",
         "tx": {"rec_seq": 12, "key": "11" * 16, "iv": "22" * 12}, "rx": {"rec_seq": 9, "key": "33" * 16, "iv": "44" * 12}},
    ],
}


def test_describe_state_and_cli(tmp_path) -> None:
    [row] = describe_state(STATE)
    assert row["tx"] == {"rec_seq": 12, "fingerprint": fingerprint(b"\x11" * 16, b"\x22" * 12)}
    assert row["rx"]["rec_seq"] == 9 and "key" not in row["rx"]
    assert describe_state(STATE, reveal=True)[0]["rx"]["key"] == "33" * 16
    text = format_table([row])
    assert re.search(r"^4\s+127\.0\.0\.1:5000\s+127\.0\.0\.1:8080\s+localhost\s+h2\s+TLS_AES_128_GCM_SHA256\s+ktls-sw\s+12\s+9\s",
                     text, re.M), text
    with pytest.raises(ValueError, match="version"):
        describe_state({**STATE, "version": 3})
    # Version 2 (what --upgrade-state-dump writes): the same connections, per listener.
    v2 = {"format": STATE["format"], "version": 2,
          "listeners": [{"name": "a", "connections": []}, {"name": "b", "connections": STATE["connections"]}]}
    assert describe_state(v2) == [row]
    with pytest.raises(ValueError, match="listeners"):
        describe_state({**v2, "listeners": [{"name": "a"}]})
    with pytest.raises(ValueError, match="format"):
        describe_state({"connections": []})
    doc = tmp_path / "state.json"
    doc.write_text(json.dumps(STATE))
    res = cli("inspect-keys", "--state", str(doc))
    assert res.returncode == 0, res.stderr
    assert row["tx"]["fingerprint"] in res.stdout and "11" * 16 not in res.stdout
    res = cli("inspect-keys", "--state", str(doc), "--reveal")
    assert "11" * 16 in res.stdout and "44" * 12 in res.stdout
    doc.write_text("{")
    res = cli("inspect-keys", "--state", str(doc))
    assert res.returncode != 0 and "not JSON" in res.stderr and "Traceback" not in res.stderr


def test_serve_control_socket_option(run_dir, start_proxy) -> None:
    path = run_dir / "custom.sock"
    proxy = start_proxy("--control-socket", str(path))
    assert control_path(proxy) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    res = cli("inspect-keys", "--pid", str(proxy.pid), "--json")  # found by asking it for its pid
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"pid": proxy.pid, "socket": str(path), "source": "control socket", "connections": []}
    proxy.stop()
    assert not path.exists()
