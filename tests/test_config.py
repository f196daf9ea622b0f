"""ironsocket.config and `ironsocket check`: good files load, bad ones name the key and the line."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ironsocket.backend import BackendSpec
from ironsocket.config import ConfigError, KeyLines, format_path, load, load_file
from ironsocket.server import KtlsMode
from tests.helpers import CERTS, ROOT

GOOD = """\
log_level = "debug"

[admin]
listen = "127.0.0.1:9180"

[[listeners]]
name = "web"
listen = "127.0.0.1:8443"
backend = "127.0.0.1:8080"
alpn = ["h2", "http/1.1"]
ciphers = ["TLS_AES_256_GCM_SHA384"]
groups = ["x25519"]
proxy_protocol = "v2"
ktls = "off"
idle_timeout = 0
max_connections = 50

[[listeners.certs]]
cert = "@CERTS@/ecdsa-p256.pem"
key = "@CERTS@/ecdsa-p256.key"

[listeners.routes."alpha.test"]
cert = "@CERTS@/alpha.test.pem"
key = "@CERTS@/alpha.test.key"
backend = "127.0.0.1:8081"

[listeners.routes."*.beta.test"]
backend = "backend.internal:8082"
proxy_protocol = false

[[listeners]]
listen = "127.0.0.1:9443"
backend = "127.0.0.1:5432"
transparent = true
certs = [{ cert = "@CERTS@/rsa2048.pem", key = "@CERTS@/rsa2048.key" }]
"""


def write(tmp_path: Path, text: str, name: str = "ironsocket.toml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("@CERTS@", str(CERTS)))
    return path


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ironsocket", "check", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    n = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            n += 1
            if n == occurrence:
                return number
    raise AssertionError(needle)


def test_good_config_loads(tmp_path: Path) -> None:
    fc = load_file(write(tmp_path, GOOD))
    assert fc.log_level == "debug" and fc.admin is not None and fc.admin.listen == ("127.0.0.1", 9180)
    web, db = fc.listeners
    assert web.listen == ("127.0.0.1", 8443) and web.backend == ("127.0.0.1", 8080)
    assert web.tls.alpn_protocols == ("h2", "http/1.1")
    assert [s.name for s in web.tls.cipher_suites] == ["TLS_AES_256_GCM_SHA384"]
    assert web.ktls is KtlsMode.OFF and web.idle_timeout is None and web.max_connections == 50
    assert web.proxy_protocol == "v2" and not web.transparent
    assert len(web.tls.certificates.credentials) == 2
    assert web.routes is not None
    assert web.routes.lookup("alpha.test") == BackendSpec(address=("127.0.0.1", 8081), proxy_protocol="v2")
    assert web.routes.lookup("x.beta.test") == BackendSpec(address=("backend.internal", 8082), proxy_protocol=None)
    assert web.routes.lookup("other") is None  # → the listener's own backend (backend.select)
    assert db.transparent and db.name == "listeners[1]"
    again = load(write(tmp_path, GOOD))
    assert [(c.listen, c.backend, c.routes) for c in again] == [(c.listen, c.backend, c.routes) for c in fc.listeners]


def test_check_good_and_example(tmp_path: Path) -> None:
    out = check(write(tmp_path, GOOD))
    assert out.returncode == 0, out.stderr
    assert "OK, 2 listeners" in out.stdout
    assert "route: alpha.test -> 127.0.0.1:8081 (proxy-protocol v2)" in out.stdout
    example = check(ROOT / "examples" / "ironsocket.toml")
    assert example.returncode == 0, example.stderr


@pytest.mark.parametrize(
    ("old", "new", "key", "line_needle", "message"),
    [
        # an unknown key, with a suggestion
        ('backend = "127.0.0.1:5432"', 'backend = "127.0.0.1:5432"\nbakend = "x"', "listeners[1].bakend",
         "bakend", "unknown key; did you mean 'backend'?"),
        ('idle_timeout = 0', 'idle_timout = 0', "listeners[0].idle_timout", "idle_timout",
         "did you mean 'idle_timeout'?"),
        ('[admin]\nlisten', '[admin]\nlisen', "admin.lisen", "lisen", "did you mean 'listen'?"),
        # a missing file
        ('key = "@CERTS@/alpha.test.key"', 'key = "@CERTS@/missing.key"', 'listeners[0].routes."alpha.test".key',
         "missing.key", "cannot read"),
        # bad addresses
        ('backend = "127.0.0.1:8080"', 'backend = "127.0.0.1:80800"', "listeners[0].backend", "80800",
         "port 80800 out of range"),
        ('listen = "127.0.0.1:9443"', 'listen = "example.org:9443"', "listeners[1].listen", "example.org",
         "is not an IP address"),
        ('backend = "127.0.0.1:5432"', 'backend = "no port"', "listeners[1].backend", "no port", "not a number"),
        # a certificate with another certificate's key
        ('key = "@CERTS@/alpha.test.key"', 'key = "@CERTS@/beta.test.key"', 'listeners[0].routes."alpha.test".key',
         "beta.test.key", "does not match"),
        # values
        ('ktls = "off"', 'ktls = "maybe"', "listeners[0].ktls", "maybe", "auto, require or off"),
        ('proxy_protocol = "v2"', 'proxy_protocol = "v3"', "listeners[0].proxy_protocol", '"v3"', "v1"),
        ('groups = ["x25519"]', 'groups = ["x25519", "p521"]', "listeners[0].groups", "p521", "unknown value 'p521'"),
        ('max_connections = 50', 'max_connections = "50"', "listeners[0].max_connections", '"50"', "must be an integer"),
        ('listen = "127.0.0.1:9180"', 'listen = "0.0.0.0:9180"', "admin.listen", "0.0.0.0:9180", "allow_remote"),
    ],
)
def test_bad_config_names_key_and_line(tmp_path: Path, old: str, new: str, key: str, line_needle: str,
                                       message: str) -> None:
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    err = info.value
    expected_line = line_of(text, line_needle)
    assert (err.key, err.line) == (key, expected_line), str(err)
    assert message in str(err)
    assert str(err).startswith(f"{path}:{expected_line}: {key}: ")
    out = check(path)
    assert out.returncode == 2
    assert out.stdout == ""
    assert f"{path}:{expected_line}: {key}:" in out.stderr and message in out.stderr


def test_syntax_error_has_line(tmp_path: Path) -> None:
    text = GOOD.replace('name = "web"', 'name = "web', 1)
    out = check(write(tmp_path, text))
    assert out.returncode == 2
    assert f":{line_of(text, 'name = ')}: TOML syntax error" in out.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    out = check(tmp_path / "nope.toml")
    assert out.returncode == 2
    assert "nope.toml: cannot read the configuration: No such file or directory" in out.stderr


def test_missing_backend_and_certs(tmp_path: Path) -> None:
    path = write(tmp_path, '[[listeners]]\nlisten = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match=r":1: listeners\[0\].backend: is required"):
        load(path)
    path = write(tmp_path, 'log_level = "info"\n[[listeners]]\nbackend = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match=r":2: listeners\[0\].certs: at least one certificate"):
        load(path)


def test_key_lines_scanner() -> None:
    text = textwrap.dedent("""\
        a = 1
        [[listeners]]
        x = [
          "y",
        ]
        [[listeners]]
        [listeners.routes."a.b"]
        backend = "z"
        [[listeners.certs]]
        cert = '''
        multi
        '''
        key = "k"
    """)
    lines = KeyLines(text)
    assert lines.find(("a",)) == 1
    assert lines.find(("listeners", 0, "x")) == 3
    assert lines.find(("listeners", 1)) == 6
    assert lines.find(("listeners", 1, "routes", "a.b", "backend")) == 8
    assert lines.find(("listeners", 1, "certs", 0, "key")) == 13
    assert lines.find(("listeners", 1, "nope")) == 6  # the nearest written ancestor
    assert format_path(("listeners", 1, "routes", "a.b", "backend")) == 'listeners[1].routes."a.b".backend'


# -- issue 13.5: what the bind would refuse, what will soon stop working ---------------------------
TWO = """\
[[listeners]]
name = "a"
listen = "LISTEN_A"
backend = "127.0.0.1:8080"
certs = [{ cert = "@CERTS@/ecdsa-p256.pem", key = "@CERTS@/ecdsa-p256.key" }]

[[listeners]]
name = "NAME_B"
listen = "LISTEN_B"
backend = "127.0.0.1:8081"
certs = [{ cert = "@CERTS@/ecdsa-p256.pem", key = "@CERTS@/ecdsa-p256.key" }]
"""


def two(tmp_path: Path, a: str = "127.0.0.1:8443", b: str = "127.0.0.1:9443", name_b: str = "b") -> Path:
    return write(tmp_path, TWO.replace("LISTEN_A", a).replace("LISTEN_B", b).replace("NAME_B", name_b))


def test_duplicate_listener_names_are_refused(tmp_path: Path) -> None:
    path = two(tmp_path, name_b="a")
    with pytest.raises(ConfigError) as err:
        load_file(path)
    assert err.value.key == "listeners[1].name" and err.value.line == line_of(path.read_text(), 'name = "a"', 2)
    assert "'a' is already the name of listeners[0]" in str(err.value)
    result = check(path)
    assert result.returncode == 2 and "already the name" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("a,b,wild", [("0.0.0.0:8443", "127.0.0.1:8443", "0.0.0.0"),
                                      ("127.0.0.1:8443", "0.0.0.0:8443", "0.0.0.0"),
                                      ("[::]:8443", "127.0.0.1:8443", "::"),
                                      ("[::1]:8443", "[::]:8443", "::")])
def test_a_wildcard_and_an_address_on_one_port_are_refused(tmp_path: Path, a: str, b: str, wild: str) -> None:
    path = two(tmp_path, a, b)
    with pytest.raises(ConfigError) as err:
        load_file(path)
    assert err.value.key == "listeners[1].listen"
    assert f"({wild} covers both): the second bind would fail" in str(err.value)


def test_what_binds_together_is_accepted(tmp_path: Path) -> None:
    for a, b in (("127.0.0.1:8443", "127.0.0.2:8443"), ("0.0.0.0:8443", "[::1]:8443"), ("0.0.0.0:8443", "0.0.0.0:9443")):
        assert len(load_file(two(tmp_path, a, b)).listeners) == 2, (a, b)


def test_the_wildcard_conflict_is_real(tmp_path: Path) -> None:
    """What the check predicts is what the kernel does (the proxy sets SO_REUSEADDR)."""
    import socket

    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    first.bind(("0.0.0.0", 0))
    first.listen()
    second = socket.socket()
    second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        with pytest.raises(OSError):
            second.bind(("127.0.0.1", first.getsockname()[1]))
    finally:
        first.close()
        second.close()


def test_alpn_as_a_string_is_refused_with_the_list_to_write(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('alpn = ["h2", "http/1.1"]', 'alpn = "h2,http/1.1"'))
    with pytest.raises(ConfigError) as err:
        load_file(path)
    assert err.value.key == "listeners[0].alpn" and err.value.line == line_of(path.read_text(), "alpn =")
    assert 'must be a list of protocols, not the string \'h2,http/1.1\': write alpn = ["h2", "http/1.1"]' in str(err.value)


def make_cert(tmp_path: Path, name: str, not_before, not_after) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)  # as a key should be (no permission warning in the output)
    return cert_path, key_path


def test_certificates_that_expire_soon_or_have_expired_are_warned_about(tmp_path: Path) -> None:
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    soon = make_cert(tmp_path, "soon", now - datetime.timedelta(days=80), now + datetime.timedelta(days=5, hours=1))
    gone = make_cert(tmp_path, "gone", now - datetime.timedelta(days=90), now - datetime.timedelta(days=3, hours=1))
    later = make_cert(tmp_path, "later", now - datetime.timedelta(days=1), now + datetime.timedelta(days=15))
    text = TWO.replace("LISTEN_A", "127.0.0.1:0").replace("LISTEN_B", "127.0.0.1:0").replace("NAME_B", "b")
    text = text.replace('certs = [{ cert = "@CERTS@/ecdsa-p256.pem", key = "@CERTS@/ecdsa-p256.key" }]',
                        f'certs = [{{ cert = "{soon[0]}", key = "{soon[1]}" }}, {{ cert = "{later[0]}", key = "{later[1]}" }}]', 1)
    text = text.replace('certs = [{ cert = "@CERTS@/ecdsa-p256.pem", key = "@CERTS@/ecdsa-p256.key" }]',
                        f'certs = [{{ cert = "{gone[0]}", key = "{gone[1]}" }}]', 1)
    path = write(tmp_path, text)
    result = check(path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "warning:" in line]
    assert len(lines) == 2, result.stdout  # 15 days left: no warning
    assert re.search(rf"warning: certificate {soon[0]} expires in 5\.0 days, on \d{{4}}-\d\d-\d\d \d\d:\d\d UTC", lines[0])
    assert re.search(rf"warning: certificate {gone[0]} has EXPIRED: on \d{{4}}-\d\d-\d\d \d\d:\d\d UTC \(3 days ago\)", lines[1])

    # At start-up too: `serve --cert` and `serve --config` log the same warning.
    import os
    import signal
    import time

    env = os.environ | {"PYTHONPATH": str(ROOT), "IRONSOCKET_RUN_DIR": str(tmp_path)}
    for args in (["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--cert", str(soon[0]), "--key", str(soon[1])],
                 ["--config", str(path)]):
        log = tmp_path / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ironsocket", "serve", *args], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while "serving TLS 1.3" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert re.search(rf"WARNING ironsocket: certificate {soon[0]} expires in 5\.0 days", log.read_text()), log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_tickets_keys(tmp_path: Path) -> None:
    """``tickets = N`` (default 2, 0: off), ``ticket_key_file`` (0600), ``ticket_lifetime``."""
    web, db = load_file(write(tmp_path, GOOD)).listeners
    assert web.tls.tickets is not None and web.tls.tickets.count == 2 and not web.tls.tickets.keyring.is_fixed
    assert web.tls.tickets.keyring is not db.tls.tickets.keyring  # per listener
    keys = tmp_path / "tickets.key"
    keys.write_text("ab" * 16 + "0123456789abcdef" * 2 + "\n")
    keys.chmod(0o600)
    text = GOOD.replace("max_connections = 50", 'max_connections = 50\ntickets = 3\nticket_key_file = "tickets.key"\n'
                                                "ticket_lifetime = 600")
    text = text.replace("transparent = true", "transparent = true\ntickets = 0")
    web, db = load_file(write(tmp_path, text)).listeners
    assert web.tls.tickets is not None and web.tls.tickets.count == 3 and web.tls.tickets.keyring.is_fixed
    assert web.tls.tickets.keyring.lifetime == 600
    from ironsocket.tls13.tickets import PskKeyExchangeMode

    assert web.tls.tickets.psk_modes == {PskKeyExchangeMode.PSK_DHE_KE}
    psk_ke = load_file(write(tmp_path, GOOD.replace("max_connections = 50", "max_connections = 50\nticket_psk_ke = true")))
    assert psk_ke.listeners[0].tls.tickets is not None
    assert psk_ke.listeners[0].tls.tickets.psk_modes == {PskKeyExchangeMode.PSK_DHE_KE, PskKeyExchangeMode.PSK_KE}
    assert db.tls.tickets is None
    keys.chmod(0o640)
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path, text))
    message = str(info.value)
    assert "listeners[0].ticket_key_file" in message and "has mode 0640" in message and "\n" not in message
    with pytest.raises(ConfigError, match="must be 0..16"):
        load_file(write(tmp_path, GOOD.replace("max_connections = 50", "max_connections = 50\ntickets = 17")))
    with pytest.raises(ConfigError, match="at most 604800"):
        load_file(write(tmp_path, GOOD.replace("max_connections = 50", "max_connections = 50\nticket_lifetime = 604801")))
