"""Session resumption with real clients against the real `ironsocket serve` (RFC 8446 §4.6.1).

CPython ssl (`session=`, `session_reused`), `openssl s_client -sess_out/-sess_in` ("Reused,
TLSv1.3") and `gnutls-cli --resume`, each echoing bytes through the proxy after resuming; a
ticket tampered in the client's session file gets a full handshake; a ticket issued before
`ironsocket upgrade` resumes after it (the ticket keys travel in the upgrade state document).

Marked ``ktls`` where the client is CPython: on the host the record layer is userspace, in the
VM it is kTLS, where the tickets are userspace records sent before TLS_TX is installed and the
kernel's TX sequence number must start after them (a wrong one and the echo cannot be read).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from ironsocket import ktls
from tests.helpers import ROOT, client_context
from tests.test_interop import CA, line, need, run_interactive, s_client

IN_VM = ktls.probe().available
TIMEOUT = 300.0 if IN_VM else 30.0
MODE = "ktls-(sw|device)" if IN_VM else "userspace"


def echo(proxy, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    """Connect, check one echoed line, and return the open socket (its session has the tickets)."""
    raw = socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT)
    tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    data = line()
    tls.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = tls.recv(len(data) - len(got))
        assert chunk, "EOF before the echo"
        got += chunk
    assert got == data  # read after the tickets: the client has processed them
    return tls


def close(tls: ssl.SSLSocket) -> None:
    try:
        tls.unwrap()
    except (OSError, ssl.SSLError):
        pass
    tls.close()


def need_ktls_in_vm() -> None:
    if os.environ.get("IRONSOCKET_REQUIRE_KTLS") and not IN_VM:
        pytest.fail("IRONSOCKET_REQUIRE_KTLS is set but kTLS is unavailable")


@pytest.mark.ktls
def test_cpython_resumes_and_echoes(start_proxy) -> None:
    need_ktls_in_vm()
    proxy = start_proxy()
    ctx = client_context()
    first = echo(proxy, ctx)
    session = first.session
    assert session is not None and session.has_ticket and not first.session_reused
    close(first)
    second = echo(proxy, ctx, session)
    assert second.session_reused
    close(second)
    proxy.wait_for_line(rf"conn=\S+ open .* mode={MODE} .*resumed=true$")


def test_tickets_zero_sends_none(start_proxy) -> None:
    proxy = start_proxy("--tickets", "0")
    ctx = client_context()
    first = echo(proxy, ctx)
    assert first.session is not None and not first.session.has_ticket
    close(first)


def sess_client(proxy, tmp_path: Path, *args: str, msgfile: Path | None = None):
    return s_client(proxy.port, "-tls1_3", "-servername", "localhost", "-verify_return_error", *args, data=line(),
                    msgfile=msgfile)


def test_openssl_s_client_sess_out_sess_in(start_proxy, tmp_path: Path) -> None:
    proxy = start_proxy()
    sess = tmp_path / "session.pem"
    first = sess_client(proxy, tmp_path, "-sess_out", str(sess))
    assert first.rc == 0 and "New, TLSv1.3" in first.text, first.describe()
    assert sess.exists()
    second = sess_client(proxy, tmp_path, "-sess_in", str(sess), msgfile=tmp_path / "msg")
    assert second.rc == 0 and "Reused, TLSv1.3" in second.text, second.describe()
    received = re.findall(r"^<<< TLS 1\.3, Handshake \[length [0-9a-f]+\], (\w+)", second.msg, re.MULTILINE)
    # A resumption: no Certificate/CertificateVerify; then our tickets.
    assert received == ["ServerHello", "EncryptedExtensions", "Finished", "NewSessionTicket", "NewSessionTicket"], second.msg


def _der_length(der: bytes, offset: int) -> tuple[int, int]:
    first = der[offset]
    if first < 0x80:
        return first, offset + 1
    n = first & 0x7F
    return int.from_bytes(der[offset + 1 : offset + 1 + n], "big"), offset + 1 + n


def tamper_session_ticket(pem: str) -> str:
    """Flip the last byte (in the AEAD tag) of the ticket inside an OpenSSL SSL_SESSION PEM:
    the SEQUENCE's [10] EXPLICIT OCTET STRING (tlsext_tick, ssl/ssl_asn1.c)."""
    import base64

    body = "".join(l for l in pem.splitlines() if l and not l.startswith("-----"))
    der = bytearray(base64.b64decode(body))
    assert der[0] == 0x30
    _, offset = _der_length(der, 1)
    while offset < len(der):
        tag = der[offset]
        length, start = _der_length(der, offset + 1)
        if tag == 0xAA:  # [10] constructed
            assert der[start] == 0x04  # OCTET STRING
            tick_len, tick_start = _der_length(der, start + 1)
            der[tick_start + tick_len - 1] ^= 0x01
            lines = base64.b64encode(bytes(der)).decode()
            wrapped = "\n".join(lines[i : i + 64] for i in range(0, len(lines), 64))
            return f"-----BEGIN SSL SESSION PARAMETERS-----\n{wrapped}\n-----END SSL SESSION PARAMETERS-----\n"
        offset = start + length
    raise AssertionError("no ticket in the session")


def test_openssl_tampered_ticket_gets_a_full_handshake(start_proxy, tmp_path: Path) -> None:
    proxy = start_proxy()
    sess = tmp_path / "session.pem"
    first = sess_client(proxy, tmp_path, "-sess_out", str(sess))
    assert first.rc == 0, first.describe()
    good = sess.read_text()
    (tmp_path / "tampered.pem").write_text(tamper_session_ticket(good))
    tampered = sess_client(proxy, tmp_path, "-sess_in", str(tmp_path / "tampered.pem"))
    # The client's binder is right for its PSK, but the ticket does not open: a full handshake.
    assert tampered.rc == 0 and "New, TLSv1.3" in tampered.text, tampered.describe()
    assert tampered.info.get("verification") == "OK"
    untouched = sess_client(proxy, tmp_path, "-sess_in", str(sess))  # the control: it resumes
    assert untouched.rc == 0 and "Reused, TLSv1.3" in untouched.text, untouched.describe()


def test_gnutls_cli_resume(start_proxy) -> None:
    proxy = start_proxy()
    argv = [need("gnutls-cli"), "--x509cafile", CA, "--priority", "NORMAL:-VERS-ALL:+VERS-TLS1.3",
            "--resume", "-p", str(proxy.port), "localhost"]
    data = line()
    run = run_interactive(argv, ready_marker=b"- Simple Client Mode:\n\n", data=data,
                          echo_after=b"- Simple Client Mode:\n\n")
    assert run.rc == 0, run.describe()
    assert "*** This is a resumed session" in run.text, run.describe()
    assert run.stdout.partition(b"- Simple Client Mode:\n\n")[2].startswith(data), run.describe()


def upgrade(control: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "ironsocket", "upgrade", "--socket", str(control),
                             "--timeout", str(TIMEOUT)], capture_output=True, text=True, timeout=TIMEOUT + 10,
                            env=os.environ | {"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.ktls
def test_ticket_from_before_an_upgrade_resumes_after_it(start_proxy, tmp_path: Path) -> None:
    need_ktls_in_vm()
    control = tmp_path / "ctl.sock"
    proxy = start_proxy("--control-socket", str(control), handshake_timeout=30 if IN_VM else 5)
    ctx = client_context()
    before = echo(proxy, ctx)
    session = before.session
    assert session is not None and session.has_ticket
    close(before)
    carried = echo(proxy, ctx)  # open across the upgrade too
    upgrade(control)
    proxy.wait_for_line(r"upgrade: restored \d+ connections")
    after = echo(proxy, ctx, session)
    assert after.session_reused
    close(after)
    # The connection that crossed the upgrade still echoes.
    data = line()
    carried.sendall(data)
    got = b""
    while len(got) < len(data):
        got += carried.recv(len(data) - len(got))
    assert got == data
    close(carried)
    count = len(re.findall(rf"conn=\S+ open .* mode={MODE} .*resumed=true$", proxy.output, re.MULTILINE))
    assert count == 1


def test_openssl_session_from_before_an_upgrade_resumes_after_it(start_proxy, tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    proxy = start_proxy("--control-socket", str(control), handshake_timeout=5)
    sess = tmp_path / "session.pem"
    first = sess_client(proxy, tmp_path, "-sess_out", str(sess))
    assert first.rc == 0, first.describe()
    upgrade(control)
    proxy.wait_for_line(r"upgrade: restored \d+ connections")
    second = sess_client(proxy, tmp_path, "-sess_in", str(sess))
    assert second.rc == 0 and "Reused, TLSv1.3" in second.text, second.describe()


def test_key_file_shared_by_two_servers_and_refused_when_readable(start_proxy, tmp_path: Path) -> None:
    keys = tmp_path / "tickets.key"
    keys.write_text(os.urandom(32).hex() + "\n")
    keys.chmod(0o600)
    a = start_proxy("--ticket-key-file", str(keys))
    b = start_proxy("--ticket-key-file", str(keys))
    ctx = client_context()
    first = echo(a, ctx)
    session = first.session
    close(first)
    other = echo(b, ctx, session)
    assert other.session_reused  # issued by a, resumed by b
    close(other)
    keys.chmod(0o644)
    run = subprocess.run([sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0",
                          "--ticket-key-file", str(keys)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode != 0
    assert f"ticket key file {keys} has mode 0644" in run.stderr and "Traceback" not in run.stderr


def test_workers_share_ticket_keys(tmp_path: Path, echo_backend) -> None:
    """With --workers 2 a ticket from one worker resumes at the other (one derived key ring)."""
    from ironsocket import control
    from tests.test_workers import free_port, serve, wait_until, worker_sockets

    port = free_port()
    proc, log = serve(tmp_path, "--workers", "2", "--listen", f"127.0.0.1:{port}",
                      "--backend", f"{echo_backend[0]}:{echo_backend[1]}", "--drain-timeout", "1")
    try:
        wait_until(lambda: log.read_text().count("serving TLS 1.3 on") == 2, what="two workers serving")

        from types import SimpleNamespace

        workers = SimpleNamespace(host="127.0.0.1", port=port)
        ctx = client_context()
        first = echo(workers, ctx)
        session = first.session
        close(first)
        resumed = [echo(workers, ctx, session) for _ in range(16)]
        assert all(c.session_reused for c in resumed)
        counts = [len(control.request(p, {"command": "connections"})["connections"]) for p in worker_sockets(tmp_path)]
        assert len(counts) == 2 and all(counts), counts  # both workers resumed some (SO_REUSEPORT spreads them)
        for c in resumed:
            close(c)
    finally:
        proc.terminate()
        proc.wait(30)


def _extension_types(server_hello: bytes) -> list[int]:
    body = server_hello[4:]
    offset = 2 + 32
    offset += 1 + body[offset]  # legacy_session_id_echo
    offset += 2 + 1  # cipher_suite, legacy_compression_method
    end = offset + 2 + int.from_bytes(body[offset : offset + 2], "big")
    offset += 2
    types = []
    while offset < end:
        types.append(int.from_bytes(body[offset : offset + 2], "big"))
        offset += 4 + int.from_bytes(body[offset + 2 : offset + 4], "big")
    return types


@pytest.mark.parametrize("psk_ke", [False, True], ids=["default", "ticket-psk-ke"])
def test_openssl_allow_no_dhe_kex(start_proxy, tmp_path: Path, psk_ke: bool) -> None:
    """A client that also offers psk_ke (OpenSSL lists both modes then) resumes with psk_dhe_ke,
    with or without --ticket-psk-ke: a fresh ECDHE is preferred whenever the client offers it
    (psk_ke itself, for a client offering only it: tests/tls13/test_tickets.py)."""
    from tests.test_interop import parse_msg_server_hellos

    proxy = start_proxy(*(["--ticket-psk-ke"] if psk_ke else []))
    sess = tmp_path / "session.pem"
    first = sess_client(proxy, tmp_path, "-sess_out", str(sess), "-allow_no_dhe_kex")
    assert first.rc == 0, first.describe()
    second = sess_client(proxy, tmp_path, "-sess_in", str(sess), "-allow_no_dhe_kex", msgfile=tmp_path / "msg")
    assert second.rc == 0 and "Reused, TLSv1.3" in second.text, second.describe()
    (server_hello,) = parse_msg_server_hellos(second.msg)
    types = _extension_types(server_hello)
    assert 41 in types  # pre_shared_key
    assert 51 in types  # key_share: psk_dhe_ke
