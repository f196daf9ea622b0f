"""ironsocket.config and `ironsocket check`: good files load, bad ones name the key and the line."""

from __future__ import annotations

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
