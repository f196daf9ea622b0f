"""Interop: the real `ironsocket serve` process against real TLS 1.3 clients.

Every test starts its own proxy (``python -m ironsocket serve --listen 127.0.0.1:0 ...``) in
front of a real backend process (tests/echo_backend.py, or the built-in demo HTTP backend) and
talks to it with openssl s_client, curl, gnutls-cli, CPython's ssl, or a raw socket. Fixtures
(`start_proxy`, `echo_backend`) live in conftest.py; every process is killed in a finalizer and
every blocking read has a deadline.

The host has no kTLS, so this exercises the userspace record layer.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from .conftest import ProxyProcess
from .helpers import CERTS, client_context

CA = str(CERTS / "ca.pem")
TIMEOUT = 15.0  # generous: a loaded 2-core CI machine
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

# Alert descriptions (RFC 8446 §6)
CLOSE_NOTIFY, UNEXPECTED_MESSAGE, BAD_RECORD_MAC = 0, 10, 20
ILLEGAL_PARAMETER, DECODE_ERROR, DECRYPT_ERROR, PROTOCOL_VERSION = 47, 50, 51, 70


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


# ---------------------------------------------------------------------------------------------
# subprocess clients
# ---------------------------------------------------------------------------------------------
class StreamCollector:
    """Reads a pipe in a thread; `wait_for` waits (with a deadline) for a predicate on the bytes."""

    def __init__(self, stream) -> None:
        self.data = bytearray()
        self.closed = False
        self._cond = threading.Condition()
        self._stream = stream
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self._stream.fileno()
        while chunk := os.read(fd, 65536):
            with self._cond:
                self.data += chunk
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[bytes], bool], timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(bytes(self.data)):
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    return predicate(bytes(self.data))
                self._cond.wait(remaining)
            return True

    def join(self, timeout: float = TIMEOUT) -> bytes:
        self._thread.join(timeout)
        return bytes(self.data)


@dataclass
class ClientRun:
    rc: int
    stdout: bytes
    stderr: bytes
    msg: str = ""  # s_client -msgfile contents
    info: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    def describe(self) -> str:
        return f"rc={self.rc}\n--- stdout\n{self.text}\n--- stderr\n{self.stderr.decode('utf-8', 'replace')}"


def run_interactive(
    argv: list[str],
    *,
    ready_marker: bytes | None,
    data: bytes | None,
    echo_after: bytes,
    timeout: float = TIMEOUT,
) -> ClientRun:
    """Run a line-oriented TLS client: wait for ``ready_marker`` on stdout (handshake done),
    write ``data``, wait until ``echo_after + data`` shows up on stdout, close stdin (the client
    then sends close_notify and exits) and wait for the exit. Never blocks past the deadline."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = StreamCollector(proc.stdout), StreamCollector(proc.stderr)
    try:
        if data is not None and ready_marker is not None and out.wait_for(lambda b: ready_marker in b, timeout):
            # Write only after the handshake finished, so the data is a record of its own.
            proc.stdin.write(data)
            proc.stdin.flush()
            out.wait_for(lambda b: (echo_after + data) in b, timeout)
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    stdout, stderr = out.join(), err.join()
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    return ClientRun(rc=rc, stdout=stdout, stderr=stderr)


S_CLIENT_PATTERNS = {
    "protocol": r"^New, (TLSv[\d.]+), Cipher is \S+",
    "cipher": r"^New, TLSv[\d.]+, Cipher is (\S+)",
    "temp_key": r"^Server Temp Key: (.+)$",
    "peer_sig_type": r"^Peer signature type: (.+)$",
    "peer_sig_digest": r"^Peer signing digest: (.+)$",
    "subject": r"^subject=(.+)$",
    "leaf_pkey": r"^\s*a:PKEY: (.+?); sigalg",
    "server_key_bits": r"^Server public key is (\d+) bit",
    "verify": r"^Verify return code: (\d+ \(.*\))",
    "verification": r"^Verification: (.+)$",
    "alpn": r"^ALPN protocol: (.+)$",
}


def parse_s_client(text: str) -> dict[str, str]:
    """The facts `openssl s_client` prints about the session (first match of each)."""
    info = {}
    for key, pattern in S_CLIENT_PATTERNS.items():
        if m := re.search(pattern, text, re.MULTILINE):
            info[key] = m.group(1).strip()
    return info


def parse_msg_server_hellos(msg: str) -> list[bytes]:
    """The ServerHello handshake messages (raw bytes) from an s_client -msg dump."""
    hellos: list[bytes] = []
    current: bytearray | None = None
    for line in msg.splitlines():
        if line.startswith(("<<<", ">>>")):
            if current is not None:
                hellos.append(bytes(current))
            current = bytearray() if line.startswith("<<<") and line.rstrip().endswith(", ServerHello") else None
        elif current is not None and line.startswith("    "):
            current += bytes.fromhex(line.strip())
    if current is not None:
        hellos.append(bytes(current))
    return hellos


def s_client(
    port: int, *args: str, data: bytes | None = None, msgfile: Path | None = None, timeout: float = TIMEOUT
) -> ClientRun:
    argv = [need("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", CA, *args]
    if msgfile is not None:
        argv += ["-msg", "-msgfile", str(msgfile)]
    # The echo follows the session block or a NewSessionTicket's block (or "read R BLOCK").
    run = run_interactive(argv, ready_marker=b"Verify return code", data=data, echo_after=b"\n", timeout=timeout)
    run.info = parse_s_client(run.text)
    if msgfile is not None and msgfile.exists():
        run.msg = msgfile.read_text()
    return run


# What s_client prints for each TLS 1.3 NewSessionTicket (the server sends 2 by default,
# --tickets), and when a read returned a handshake record instead of data: not application data.
S_CLIENT_TICKET_NOISE = re.compile(
    rb"---\nPost-Handshake New Session Ticket arrived:\nSSL-Session:\n(?:(?:    [^\n]*)?\n)*?---\n|read R BLOCK\n"
)


def echoed_after_session_block(run: ClientRun) -> bytes:
    """What s_client wrote to stdout after its session summary: the application data."""
    head, sep, tail = run.stdout.partition(b"Verify return code: 0 (ok)\n---\n")
    assert sep, run.describe()
    return S_CLIENT_TICKET_NOISE.sub(b"", tail)


def line() -> bytes:
    return f"ping {secrets.token_hex(16)} \x01\xff end\n".encode("latin-1")


# ---------------------------------------------------------------------------------------------
# CPython ssl and raw socket clients
# ---------------------------------------------------------------------------------------------
def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(65536, n - len(out)))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def read_until_eof(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """All bytes until the peer closes; fails if it has not closed within ``timeout``."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"peer did not close within {timeout}s (got {bytes(out).hex()})"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(out)  # closed (RST): what came before still counts
        except TimeoutError:
            continue
        if not chunk:
            return bytes(out)
        out += chunk


def echo_roundtrip(port: int, payload: bytes | None = None, server_hostname: str = "localhost") -> tuple[str, str]:
    """One good TLS 1.3 connection through the proxy to the echo backend; close_notify both ways."""
    payload = payload if payload is not None else secrets.token_bytes(4096)
    ctx = client_context()
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
        tls.sendall(payload)
        assert recv_exactly(tls, len(payload)) == payload
        version, cipher = tls.version(), tls.cipher()[0]
        tls.unwrap()
    return version, cipher


def client_hello(**ctx_attrs) -> bytes:
    """A real ClientHello record from CPython's ssl (MemoryBIO; nothing sent anywhere)."""
    ctx = client_context() if "maximum_version" not in ctx_attrs else ssl.create_default_context(cafile=CA)
    for k, v in ctx_attrs.items():
        setattr(ctx, k, v)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    record = outgoing.read()
    assert record[0] == 0x16 and record[5] == 0x01 and len(record) == 5 + int.from_bytes(record[3:5], "big")
    return record


def hello_parts(record: bytes) -> tuple[bytes, list[bytes]]:
    """Split a one-record ClientHello into (body before the extensions block, [raw extensions])."""
    body = record[9:]
    p = 2 + 32
    p += 1 + body[p]  # legacy_session_id
    p += 2 + int.from_bytes(body[p : p + 2], "big")  # cipher_suites
    p += 1 + body[p]  # legacy_compression_methods
    ext_len = int.from_bytes(body[p : p + 2], "big")
    exts, q, raw = [], 0, body[p + 2 : p + 2 + ext_len]
    assert len(raw) == ext_len and p + 2 + ext_len == len(body)
    while q < len(raw):
        n = int.from_bytes(raw[q + 2 : q + 4], "big")
        exts.append(raw[q : q + 4 + n])
        q += 4 + n
    return body[:p], exts


def hello_record(body: bytes) -> bytes:
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def raw_exchange(port: int, payload: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send ``payload`` on a plain TCP connection; return everything the server sends before it
    closes (asserting it does close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        return read_until_eof(sock, timeout)


def plaintext_alert(description: int) -> bytes:
    return bytes((0x15, 3, 3, 0, 2, 2, description))


# ---------------------------------------------------------------------------------------------
# leak checks: /proc/<pid>/fd and /proc/<pid>/task of the proxy
# ---------------------------------------------------------------------------------------------
def proc_counts(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def wait_counts(pid: int, expected: tuple[int, int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := proc_counts(pid)) != expected:
        assert time.monotonic() < deadline, f"(fds, threads) of the proxy: {now}, expected {expected}: leak"
        time.sleep(0.05)


def idle_baseline(proxy: ProxyProcess) -> tuple[int, int]:
    """Warm the proxy up with one good connection, wait until it is fully closed, and return
    the (fds, threads) of the idle proxy."""
    start = proxy.line_count()
    echo_roundtrip(proxy.port)
    proxy.wait_for_line(r"conn=\d+ close .*reason=closed by both sides", start=start)
    samples = [proc_counts(proxy.pid)]
    deadline = time.monotonic() + 10
    while len(samples) < 3 or len(set(samples[-3:])) != 1:  # stable for 3 samples
        assert time.monotonic() < deadline, f"proxy never settled: {samples}"
        time.sleep(0.05)
        samples.append(proc_counts(proxy.pid))
    return samples[-1]


def assert_survives_without_leak(proxy: ProxyProcess, bad_connection: Callable[[], object], batch: int = 10) -> None:
    baseline = idle_baseline(proxy)
    for _ in range(batch):
        bad_connection()
    echo_roundtrip(proxy.port)  # still serving
    wait_counts(proxy.pid, baseline)


# =============================================================================================
# 1. openssl s_client: every suite × every group
# =============================================================================================
SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
GROUPS = {  # s_client -groups name → (Server Temp Key text, ironsocket's log name)
    "X25519": ("X25519, 253 bits", "X25519"),
    "P-256": ("ECDH, prime256v1, 256 bits", "SECP256R1"),
    "P-384": ("ECDH, secp384r1, 384 bits", "SECP384R1"),
}


@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("suite", SUITES)
def test_s_client_suite_and_group(start_proxy, suite: str, group: str) -> None:
    proxy = start_proxy()
    data = line()
    run = s_client(
        proxy.port, "-tls1_3", "-ciphersuites", suite, "-groups", group,
        "-verify_return_error", "-servername", "localhost", "-verify_hostname", "localhost", data=data,
    )
    assert run.rc == 0, run.describe()
    assert run.info["protocol"] == "TLSv1.3"
    assert run.info["cipher"] == suite
    assert run.info["temp_key"] == GROUPS[group][0]
    assert run.info["verify"] == "0 (ok)" and run.info["verification"] == "OK"
    assert echoed_after_session_block(run) == data  # byte-exact, nothing extra
    proxy.wait_for_line(rf"conn=\d+ open .* sni=localhost .*suite={suite} group={GROUPS[group][1]} mode=userspace")
    # s_client sent close_notify when its stdin closed: the proxy saw an orderly close.
    proxy.wait_for_line(rf"conn=\d+ close .*bytes_c2b={len(data)} bytes_b2c={len(data)} .*reason=closed by both sides")


# =============================================================================================
# 2. HelloRetryRequest
# =============================================================================================
def test_hello_retry_request_forced_by_server_groups(start_proxy, tmp_path: Path) -> None:
    proxy = start_proxy("--groups", "p256")
    data = line()
    # X25519:P-256 (openssl's default order) sends a key share for X25519 only.
    run = s_client(
        proxy.port, "-tls1_3", "-groups", "X25519:P-256", "-verify_return_error", "-servername", "localhost",
        data=data, msgfile=tmp_path / "msg.txt",
    )
    assert run.rc == 0, run.describe() + run.msg
    hellos = parse_msg_server_hellos(run.msg)
    assert len(hellos) == 2, run.msg
    assert hellos[0][0] == 2 and hellos[0][6:38] == HRR_RANDOM  # HelloRetryRequest
    assert hellos[1][0] == 2 and hellos[1][6:38] != HRR_RANDOM  # the real ServerHello
    assert run.info["temp_key"] == GROUPS["P-256"][0]
    assert echoed_after_session_block(run) == data
    proxy.wait_for_line(r"conn=\d+ open .*group=SECP256R1")


def test_no_hello_retry_request_when_share_fits(start_proxy, tmp_path: Path) -> None:
    """Control for the test above: same client, server accepts X25519 → one ServerHello."""
    proxy = start_proxy("--groups", "p256,x25519")
    run = s_client(proxy.port, "-tls1_3", "-groups", "X25519:P-256", "-servername", "localhost",
                   data=line(), msgfile=tmp_path / "msg.txt")
    assert run.rc == 0, run.describe()
    hellos = parse_msg_server_hellos(run.msg)
    assert len(hellos) == 1 and hellos[0][6:38] != HRR_RANDOM
    assert run.info["temp_key"] == GROUPS["X25519"][0]


# =============================================================================================
# 3. curl against the built-in demo backend
# =============================================================================================
def curl(port: int, *args: str) -> ClientRun:
    argv = [need("curl"), "-sS", "-v", "--max-time", str(int(TIMEOUT)), "--cacert", CA, "--tlsv1.3",
            "-H", "Accept: text/plain", *args, f"https://localhost:{port}/"]
    done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT + 5)
    return ClientRun(rc=done.returncode, stdout=done.stdout, stderr=done.stderr)


def page_rows(text: str) -> dict[str, str]:
    return dict(row.split(": ", 1) for row in text.splitlines() if ": " in row)


def test_curl_demo_page(start_proxy) -> None:
    proxy = start_proxy(backend=None)
    run = curl(proxy.port)
    assert run.rc == 0, run.describe()
    m = re.search(r"SSL connection using TLSv1\.3 / (\S+)", run.stderr.decode())
    assert m, run.describe()
    rows = page_rows(run.text)
    assert rows["cipher suite"] == m.group(1) == "TLS_AES_128_GCM_SHA256"  # server preference
    assert rows["key exchange group"] == "X25519"
    assert rows["SNI"] == "localhost"
    assert rows["record layer"] == "userspace"
    assert rows["ALPN"] == "-"


@pytest.mark.parametrize("suite", SUITES)
def test_curl_demo_page_server_suite_choice(start_proxy, suite: str) -> None:
    proxy = start_proxy("--ciphers", suite, backend=None)
    run = curl(proxy.port)
    assert run.rc == 0, run.describe()
    assert f"SSL connection using TLSv1.3 / {suite}" in run.stderr.decode()
    assert page_rows(run.text)["cipher suite"] == suite


def test_curl_alpn_http11(start_proxy) -> None:
    proxy = start_proxy("--alpn", "h2,http/1.1", backend=None)
    run = curl(proxy.port, "--http1.1")
    assert run.rc == 0, run.describe()
    assert "ALPN: server accepted http/1.1" in run.stderr.decode(), run.describe()
    assert page_rows(run.text)["ALPN"] == "http/1.1"


# =============================================================================================
# 4. gnutls-cli
# =============================================================================================
def test_gnutls_cli_echo(start_proxy) -> None:
    proxy = start_proxy()
    data = line()
    argv = [need("gnutls-cli"), "--x509cafile", CA, "--priority", "NORMAL:-VERS-ALL:+VERS-TLS1.3",
            "-p", str(proxy.port), "localhost"]
    run = run_interactive(argv, ready_marker=b"- Simple Client Mode:\n\n", data=data,
                          echo_after=b"- Simple Client Mode:\n\n")
    assert run.rc == 0, run.describe()
    assert "- Status: The certificate is trusted." in run.text
    assert re.search(r"- Description: \(TLS1\.3-X\.509\)-\(ECDHE-X25519\)-\(ECDSA-SECP256R1-SHA256\)-\(AES-128-GCM\)", run.text), run.text
    tail = run.stdout.partition(b"- Simple Client Mode:\n\n")[2]
    assert tail.startswith(data), run.describe()
    assert tail[len(data):] in (b"", b"- Peer has closed the GnuTLS connection\n"), run.describe()
    proxy.wait_for_line(rf"conn=\d+ close .*bytes_c2b={len(data)} bytes_b2c={len(data)} .*reason=closed by both sides")


# =============================================================================================
# 5. CPython ssl: 1 MiB both ways, close_notify both ways
# =============================================================================================
def test_cpython_ssl_1mib_and_close_notify_both_ways(start_proxy) -> None:
    proxy = start_proxy()
    payload = secrets.token_bytes(1 << 20)
    ctx = client_context()
    received = bytearray()
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.3"
        chunk = 64 * 1024
        for i in range(0, len(payload), chunk):  # ping-pong per chunk: no deadlock, one SSL object
            tls.sendall(payload[i : i + chunk])
            received += recv_exactly(tls, len(payload[i : i + chunk]))
        assert bytes(received) == payload
        # unwrap(): our close_notify goes out; it returns only once the server's close_notify
        # arrived (the proxy sends it when the echo backend, half-closed, shuts its side).
        plain = tls.unwrap()
        plain.settimeout(TIMEOUT)
        assert plain.recv(1) == b""  # and then the TCP FIN: nothing after close_notify
    proxy.wait_for_line(rf"conn=\d+ close .*bytes_c2b={1 << 20} bytes_b2c={1 << 20} .*reason=closed by both sides")


def test_half_close_server_keeps_sending_after_client_close_notify(start_proxy, echo_backend) -> None:
    """RFC 8446 §6.1: after the client's close_notify the server may still send; the proxy
    forwards the backend's remaining bytes, then its own close_notify."""
    proxy = start_proxy()
    payload = secrets.token_bytes(300_000)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                chunk = sock.recv(65536)
                assert chunk
                incoming.write(chunk)
        sock.sendall(outgoing.read())
        obj.write(payload)
        with pytest.raises(ssl.SSLWantReadError):
            obj.unwrap()  # our close_notify right behind the data, before reading any echo
        sock.sendall(outgoing.read())
        got = bytearray()
        server_closed = False
        deadline = time.monotonic() + TIMEOUT
        while not server_closed:
            assert time.monotonic() < deadline
            chunk = sock.recv(65536)
            assert chunk, "TCP EOF before the server's close_notify"
            incoming.write(chunk)
            while True:
                try:
                    got += obj.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    server_closed = True
                    break
        assert bytes(got) == payload


# =============================================================================================
# 6. certificate selection: signature algorithms and SNI
# =============================================================================================
@pytest.mark.parametrize(
    ("sigalg", "peer_sig_type", "leaf_pkey"),
    [
        ("rsa_pss_rsae_sha256", "RSA-PSS", "rsaEncryption, 2048 (bit)"),
        ("ed25519", "ed25519", "ED25519, 256 (bit)"),
        ("ecdsa_secp256r1_sha256", "ECDSA", "id-ecPublicKey, 256 (bit)"),
    ],
)
def test_certificate_chosen_by_signature_algorithms(start_proxy, sigalg: str, peer_sig_type: str, leaf_pkey: str) -> None:
    proxy = start_proxy(certs=("ecdsa-p256", "rsa2048", "ed25519"))
    data = line()
    run = s_client(proxy.port, "-tls1_3", "-sigalgs", sigalg, "-verify_return_error",
                   "-servername", "localhost", "-verify_hostname", "localhost", data=data)
    assert run.rc == 0, run.describe()
    assert run.info["peer_sig_type"] == peer_sig_type, run.text
    assert run.info["leaf_pkey"] == leaf_pkey, run.text
    assert run.info["subject"] == "O = ironsocket test, CN = localhost"
    assert echoed_after_session_block(run) == data


def test_certificate_no_matching_signature_algorithm(start_proxy, tmp_path: Path) -> None:
    """Only an ECDSA P-256 cert, client accepts only Ed25519 → handshake_failure (40)."""
    proxy = start_proxy(certs=("ecdsa-p256",))
    run = s_client(proxy.port, "-tls1_3", "-sigalgs", "ed25519", "-servername", "localhost",
                   msgfile=tmp_path / "msg.txt")
    assert run.rc != 0
    assert "Alert [length 0002], fatal handshake_failure" in run.msg, run.msg
    proxy.wait_for_line(r"handshake failed .*handshake_failure")
    echo_roundtrip(proxy.port)


@pytest.mark.parametrize("name", ["alpha.test", "beta.test"])
def test_certificate_chosen_by_sni(start_proxy, name: str) -> None:
    proxy = start_proxy(certs=("alpha.test", "beta.test"))
    data = line()
    run = s_client(proxy.port, "-tls1_3", "-servername", name, "-verify_hostname", name,
                   "-verify_return_error", data=data)
    assert run.rc == 0, run.describe()
    assert run.info["subject"] == f"O = ironsocket test, CN = {name}"
    assert run.info["verify"] == "0 (ok)"
    assert echoed_after_session_block(run) == data
    proxy.wait_for_line(rf"conn=\d+ open .*sni={re.escape(name)} ")


# =============================================================================================
# 7. negative tests: the right alert on the wire, the server keeps serving, nothing leaks
# =============================================================================================
def test_tls12_only_client_gets_protocol_version(start_proxy, tmp_path: Path) -> None:
    proxy = start_proxy()
    # A real TLS 1.2-only client...
    run = s_client(proxy.port, "-tls1_2", "-servername", "localhost", msgfile=tmp_path / "msg.txt")
    assert run.rc != 0
    assert "Alert [length 0002], fatal protocol_version" in run.msg, run.msg
    assert "\n    15 03 03 00 02\n" in run.msg and "\n    02 46\n" in run.msg
    # ...and the exact bytes on the wire for a TLS 1.2-only ClientHello.
    hello12 = client_hello(minimum_version=ssl.TLSVersion.TLSv1_2, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert raw_exchange(proxy.port, hello12) == plaintext_alert(PROTOCOL_VERSION)
    proxy.wait_for_line(r"handshake failed .*protocol_version")
    assert_survives_without_leak(
        proxy, lambda: raw_exchange(proxy.port, hello12) == plaintext_alert(PROTOCOL_VERSION) or pytest.fail("alert")
    )


def test_garbage_gets_an_alert_and_close(start_proxy) -> None:
    proxy = start_proxy()
    response = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert response in (plaintext_alert(UNEXPECTED_MESSAGE), plaintext_alert(DECODE_ERROR))
    # What ironsocket does: 'G' (0x47) is no record content type → unexpected_message.
    assert response == plaintext_alert(UNEXPECTED_MESSAGE)
    proxy.wait_for_line(r"handshake failed .*unexpected_message")

    def bad() -> None:
        assert raw_exchange(proxy.port, secrets.token_bytes(1) + b"garbage" * 50)[:5] == b"\x15\x03\x03\x00\x02"

    assert_survives_without_leak(proxy, bad)


def test_truncated_client_hello_gets_decode_error(start_proxy) -> None:
    proxy = start_proxy()
    body = client_hello()[9:]
    cut = body[: len(body) // 2]  # both the handshake and the record length fixed to match
    truncated = hello_record(cut)
    assert raw_exchange(proxy.port, truncated) == plaintext_alert(DECODE_ERROR)
    proxy.wait_for_line(r"handshake failed .*decode_error")
    assert_survives_without_leak(
        proxy, lambda: raw_exchange(proxy.port, truncated) == plaintext_alert(DECODE_ERROR) or pytest.fail("alert")
    )


def test_duplicate_extension_gets_illegal_parameter(start_proxy) -> None:
    proxy = start_proxy()
    original = client_hello()
    head, exts = hello_parts(original)
    ok_exts = b"".join(exts)
    assert hello_record(head + len(ok_exts).to_bytes(2, "big") + ok_exts) == original  # faithful rebuild
    ems = next(e for e in exts if e[:2] == b"\x00\x17")  # extended_master_secret, empty
    dup_exts = b"".join([ems, *exts])  # first, so pre_shared_key-last rules are not involved
    record = hello_record(head + len(dup_exts).to_bytes(2, "big") + dup_exts)
    assert raw_exchange(proxy.port, record) == plaintext_alert(ILLEGAL_PARAMETER)
    proxy.wait_for_line(r"handshake failed .*illegal_parameter: duplicate extension")
    assert_survives_without_leak(
        proxy, lambda: raw_exchange(proxy.port, record) == plaintext_alert(ILLEGAL_PARAMETER) or pytest.fail("alert")
    )


# -- a scripted client for a wrong Finished ---------------------------------------------------
def hkdf_expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """RFC 8446 §7.1, SHA-256 (the suite is pinned to TLS_AES_128_GCM_SHA256 below)."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes((len(full),)) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


class RecordKey:
    def __init__(self, secret: bytes) -> None:
        self.aead = AESGCM(hkdf_expand_label(secret, b"key", 16))
        self.iv = hkdf_expand_label(secret, b"iv", 12)

    def nonce(self, seq: int) -> bytes:
        return (int.from_bytes(self.iv, "big") ^ seq).to_bytes(12, "big")

    def open(self, record: bytes, seq: int = 0) -> tuple[int, bytes]:
        inner = self.aead.decrypt(self.nonce(seq), record[5:], record[:5]).rstrip(b"\x00")
        return inner[-1], inner[:-1]

    def seal(self, content_type: int, content: bytes, seq: int = 0) -> bytes:
        inner = content + bytes((content_type,))
        header = bytes((0x17, 3, 3)) + (len(inner) + 16).to_bytes(2, "big")
        return header + self.aead.encrypt(self.nonce(seq), inner, header)


def split_records(data: bytes) -> list[bytes]:
    out, p = [], 0
    while p < len(data):
        n = int.from_bytes(data[p + 3 : p + 5], "big")
        out.append(data[p : p + 5 + n])
        p += 5 + n
    assert p == len(data)
    return out


def handshake_until_client_finished(port: int, keylog: Path) -> tuple[socket.socket, list[bytes], dict[str, bytes]]:
    """Run CPython's client over MemoryBIOs until it has produced its Finished; return the open
    socket, the client's last flight (records, not sent yet) and the secrets from its key log."""
    ctx = client_context()
    ctx.keylog_filename = str(keylog)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    sock.sendall(pending)
                chunk = sock.recv(65536)
                assert chunk, "server closed during the handshake"
                incoming.write(chunk)
        flight = split_records(outgoing.read())
    except BaseException:
        sock.close()
        raise
    secrets_ = {}
    for row in keylog.read_text().splitlines():
        if not row.startswith("#"):
            label, _, secret = row.split()
            secrets_[label] = bytes.fromhex(secret)
    return sock, flight, secrets_


@pytest.mark.parametrize("tamper", ["verify_data", "ciphertext"])
def test_wrong_client_finished(start_proxy, tmp_path: Path, tamper: str) -> None:
    """verify_data flipped (record re-encrypted correctly) → decrypt_error (51);
    a ciphertext byte flipped → the record does not decrypt → bad_record_mac (20) (§5.2).
    The alert is sealed under the server *application* traffic key (the server has switched
    write keys after its Finished), so we decrypt it with SERVER_TRAFFIC_SECRET_0."""
    proxy = start_proxy("--ciphers", "TLS_AES_128_GCM_SHA256")
    expected = DECRYPT_ERROR if tamper == "verify_data" else BAD_RECORD_MAC
    expected_name = "decrypt_error" if tamper == "verify_data" else "bad_record_mac"

    def attempt(n: int) -> None:
        keylog = tmp_path / f"keys-{n}.log"
        sock, flight, keys = handshake_until_client_finished(proxy.port, keylog)
        with sock:
            assert flight[-1][0] == 0x17 and all(r[:1] == b"\x14" for r in flight[:-1])  # [CCS,] Finished
            client_hs = RecordKey(keys["CLIENT_HANDSHAKE_TRAFFIC_SECRET"])
            inner_type, finished = client_hs.open(flight[-1])
            assert inner_type == 0x16 and finished[:4] == b"\x14\x00\x00\x20"
            if tamper == "verify_data":
                bad = finished[:-1] + bytes((finished[-1] ^ 0x01,))
                forged = client_hs.seal(0x16, bad)
            else:
                forged = flight[-1][:10] + bytes((flight[-1][10] ^ 0x01,)) + flight[-1][11:]
            sock.sendall(b"".join(flight[:-1]) + forged)
            response = read_until_eof(sock)
        records = split_records(response)
        assert len(records) == 1 and records[0][0] == 0x17, response.hex()  # one encrypted record, then close
        content_type, alert = RecordKey(keys["SERVER_TRAFFIC_SECRET_0"]).open(records[0])
        assert (content_type, alert) == (0x15, bytes((2, expected)))

    attempt(0)
    proxy.wait_for_line(rf"handshake failed .*{expected_name}")
    counter = iter(range(1, 1000))
    assert_survives_without_leak(proxy, lambda: attempt(next(counter)), batch=5)


def test_stalled_handshake_times_out(start_proxy) -> None:
    proxy = start_proxy(handshake_timeout=3)
    half = client_hello()[:100]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
        t0 = time.monotonic()
        sock.sendall(half)
        response = read_until_eof(sock, timeout=TIMEOUT)
        elapsed = time.monotonic() - t0
    assert 2.5 <= elapsed <= 6.5, f"closed after {elapsed:.2f}s, --handshake-timeout 3"
    assert response in (b"", plaintext_alert(UNEXPECTED_MESSAGE), plaintext_alert(DECODE_ERROR)), response.hex()
    proxy.wait_for_line(r"handshake failed .*handshake timeout")


def test_many_concurrent_bad_connections_then_good_one(start_proxy) -> None:
    proxy = start_proxy(handshake_timeout=3)
    baseline = idle_baseline(proxy)
    half = client_hello()[:100]
    stalled = []
    try:
        for _ in range(25):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
            stalled.append(s)
            s.sendall(half)
        with ThreadPoolExecutor(max_workers=25) as pool:
            garbage = list(pool.map(lambda _: raw_exchange(proxy.port, b"\x00garbage\r\n" * 10), range(25)))
        assert all(r == plaintext_alert(UNEXPECTED_MESSAGE) for r in garbage), {r.hex() for r in garbage}
        # 25 connections still stalled in their handshake: a good client is served anyway.
        assert proc_counts(proxy.pid)[0] >= baseline[0] + 25  # they really are open in the proxy
        assert echo_roundtrip(proxy.port) == ("TLSv1.3", "TLS_AES_128_GCM_SHA256")
        for s in stalled:  # the server closes each after --handshake-timeout
            assert read_until_eof(s, timeout=TIMEOUT) == b""
    finally:
        for s in stalled:
            s.close()
    wait_counts(proxy.pid, baseline)


class PipelinedClient:
    """CPython's ssl over MemoryBIOs on a raw socket; holds its Finished back so the test can
    put more records in the same TCP write."""

    def __init__(self, port: int) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = client_context().wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.server_closed = False
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := self.outgoing.read():
                    self.sock.sendall(pending)
                chunk = self.sock.recv(65536)
                assert chunk, "server closed during the handshake"
                self.incoming.write(chunk)
        # The client Finished (and CCS) now wait in self.outgoing.

    def queue_close_notify(self) -> None:
        with pytest.raises(ssl.SSLWantReadError):
            self.obj.unwrap()

    def flush(self) -> None:
        self.sock.sendall(self.outgoing.read())

    def read(self, until: Callable[[bytes], bool]) -> bytes:
        """Plaintext until ``until(got)`` or the server's close_notify or TCP EOF (deadline)."""
        got = bytearray()
        deadline = time.monotonic() + TIMEOUT
        while not self.server_closed and not until(bytes(got)):
            assert time.monotonic() < deadline, f"timed out with {bytes(got)!r}"
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            self.incoming.write(chunk)
            while True:
                try:
                    got += self.obj.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    self.server_closed = True
                    break
        return bytes(got)


def test_client_data_pipelined_with_finished_is_relayed_once(start_proxy) -> None:
    """Application data in the same TCP segment as the client Finished (what gnutls-cli does
    when data is waiting on stdin) must reach the backend exactly once."""
    proxy = start_proxy()
    data = b"pipelined-" + secrets.token_hex(8).encode() + b"\n"
    client = PipelinedClient(proxy.port)
    with client.sock:
        client.obj.write(data)
        client.flush()  # CCS + Finished + data in one write
        got = client.read(lambda b: len(b) >= len(data))
        client.queue_close_notify()
        client.flush()
        got += client.read(lambda b: False)  # everything else until the server's close_notify
        assert client.server_closed
    assert got == data
    proxy.wait_for_line(rf"conn=\d+ close .*bytes_c2b={len(data)} bytes_b2c={len(data)} ")


def test_client_data_and_close_notify_pipelined_with_finished(start_proxy) -> None:
    """Finished + data + close_notify in one write (a client that sends a request and closes
    its write side at once): the data is echoed, then close_notify comes back."""
    proxy = start_proxy()
    data = b"request-" + secrets.token_hex(8).encode() + b"\n"
    client = PipelinedClient(proxy.port)
    with client.sock:
        client.obj.write(data)
        client.queue_close_notify()
        client.flush()  # CCS + Finished + data + close_notify in one write
        got = client.read(lambda b: False)
        assert client.server_closed, f"no close_notify from the server; got {got!r}"
    assert got == data
    proxy.wait_for_line(rf"conn=\d+ close .*bytes_c2b={len(data)} bytes_b2c={len(data)} .*reason=closed by both sides")


@pytest.mark.parametrize("how", ["rst", "fin"])
def test_abort_right_after_the_handshake_is_clean(start_proxy, tmp_path: Path, how: str) -> None:
    """Issue 12: a client that aborts the TCP connection right after its Finished (the moment
    the server has sent everything of its own: flight and any post-handshake messages) must
    cost the proxy one logged close, not a traceback, a crashed pump or a leaked fd/thread.
    (It already was clean in the userspace record layer: a regression test.)"""
    proxy = start_proxy("--ciphers", "TLS_AES_128_GCM_SHA256")
    counter = iter(range(1000))

    def attempt() -> None:
        sock, flight, _ = handshake_until_client_finished(proxy.port, tmp_path / f"keys-{next(counter)}.log")
        with sock:
            sock.sendall(b"".join(flight))
            if how == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_WR)
                read_until_eof(sock)

    start = proxy.line_count()
    attempt()
    proxy.wait_for_line(r"conn=\d+ close ", start=start)
    assert_survives_without_leak(proxy, attempt, batch=5)
    log = proxy.output
    assert "Traceback" not in log and "crashed" not in log and "internal error" not in log, log
