"""ironsocket.logs: every line of a real `ironsocket serve` run, in each --log-format.

A real server (real echo backend, real TLS clients, a plain HTTP client on the TLS port, a real
SIGTERM) writes its log; every line is parsed: text by its line grammar, logfmt by the strict
parser below, json by json.loads. Each has ts (ISO 8601 UTC, ``Z``), level and msg; each closed
connection has one access line with the right byte counts.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ironsocket.logs import logfmt_value
from tests.conftest import ManagedProcess, cert_args
from tests.helpers import CERTS, ROOT, client_context, wait_until

TIMEOUT = 30.0
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LEVELS = {"debug", "info", "notice", "warning", "error", "critical"}
TEXT_LINE = re.compile(rf"({TS.pattern}) (DEBUG|INFO|NOTICE|WARNING|ERROR|CRITICAL) ([\w.]+): (\S.*)")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_BARE = re.compile(r'[^\s"=\\]+')
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r"}


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt parser: ``key=value`` pairs separated by exactly one space; a value is
    bare (no space, quote, ``=`` or backslash) or double-quoted with the escapes ``\\"``,
    ``\\\\``, ``\\n``, ``\\r``, ``\\xHH``, ``\\uHHHH``; no raw control or line-separator
    character; no key twice, nothing else on the line."""
    out: dict[str, str] = {}
    i = 0
    while True:
        key = _KEY.match(line, i)
        if key is None or line[key.end():key.end() + 1] != "=":
            raise ValueError(f"no key=... at column {i}: {line!r}")
        name, i = key.group(), key.end() + 1
        if name in out:
            raise ValueError(f"key {name} twice: {line!r}")
        if line[i:i + 1] == '"':
            i += 1
            value = []
            while True:
                if i >= len(line):
                    raise ValueError(f"unterminated quoted value of {name}: {line!r}")
                ch = line[i]
                if ch == '"':
                    i += 1
                    break
                if ch == "\\":
                    nxt = line[i + 1:i + 2]
                    if nxt in _ESCAPES:
                        value.append(_ESCAPES[nxt])
                        i += 2
                    elif nxt == "x" and re.fullmatch(r"[0-9a-f]{2}", line[i + 2:i + 4]):
                        value.append(chr(int(line[i + 2:i + 4], 16)))
                        i += 4
                    elif nxt == "u" and re.fullmatch(r"[0-9a-f]{4}", line[i + 2:i + 6]):
                        value.append(chr(int(line[i + 2:i + 6], 16)))
                        i += 6
                    else:
                        raise ValueError(f"bad escape in {name}: {line!r}")
                    continue
                if ord(ch) < 0x20 or ch in "\x7f\x85\u2028\u2029":
                    raise ValueError(f"control character in {name}: {line!r}")
                value.append(ch)
                i += 1
            out[name] = "".join(value)
        else:
            bare = _BARE.match(line, i)
            if bare is None:
                raise ValueError(f"empty or bad bare value of {name}: {line!r}")
            out[name], i = bare.group(), bare.end()
        if i == len(line):
            return out
        if line[i] != " " or line[i + 1:i + 2] in ("", " "):
            raise ValueError(f"not one space between pairs at column {i}: {line!r}")
        i += 1


@pytest.mark.parametrize("value", ["a b", 'say "hi"', "back\\slash", "two\nlines", "k=v", "", "tab\there",
                                   "plain", "127.0.0.1:443", "ünïcode", "line\u2028sep", "nel\x85", "del\x7f"])
def test_logfmt_values_round_trip_through_a_strict_parser(value: str) -> None:
    assert parse_logfmt(f"k={logfmt_value(value)}") == {"k": value}


def test_logfmt_quotes_only_what_needs_it() -> None:
    assert logfmt_value("a b") == '"a b"' and logfmt_value("localhost") == "localhost"
    assert logfmt_value(True) == "true" and logfmt_value(0.5) == "0.5" and logfmt_value(("::1", 8)) == "[::1]:8"
    with pytest.raises(ValueError):
        parse_logfmt('k="a b')  # the parser is strict: these are not logfmt
    with pytest.raises(ValueError):
        parse_logfmt("k=a b")
    with pytest.raises(ValueError):
        parse_logfmt("k=1 k=2")


def echo(port: int, payload: bytes) -> tuple[str, int]:
    """One TLS connection (SNI localhost) that sends ``payload``, reads it back and closes
    (close_notify). Returns its local address (the proxy's ``client``)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        me = tls.getsockname()[:2]
        tls.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            chunk = tls.recv(65536)
            assert chunk, "EOF before the echo"
            got += chunk
        assert bytes(got) == payload
        tls.unwrap()
    return me


def plain_http(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        while s.recv(4096):
            pass


def records(fmt: str, lines: list[str]) -> list[dict]:
    """Every line parsed (an AssertionError names the first that does not parse)."""
    out = []
    for line in lines:
        if fmt == "json":
            rec = json.loads(line)
            assert isinstance(rec, dict), line
        elif fmt == "logfmt":
            rec = parse_logfmt(line)
        else:
            m = TEXT_LINE.fullmatch(line)
            assert m, f"not a text log line: {line!r}"
            rec = {"ts": m.group(1), "level": m.group(2).lower(), "logger": m.group(3), "msg": m.group(4)}
        for key in ("ts", "level", "msg"):
            assert key in rec, (key, line)
        assert TS.fullmatch(str(rec["ts"])), line
        assert rec["level"] in LEVELS and rec["msg"], line
        assert "None" not in line, line
        out.append(rec)
    return out


def run_and_collect(fmt: str, tmp_path: Path, echo_backend: tuple[str, int], argv: list[str]) -> tuple[list[str], dict]:
    proc = ManagedProcess(argv, f"serve --log-format {fmt}")
    try:
        m = proc.wait_for_line(r"serving TLS 1\.3 on ([\d.]+):(\d+)")
        port = int(m.group(2))
        clients = {echo(port, b"a" * 1234): 1234, echo(port, b"b" * 70_000): 70_000}
        plain_http(port)

        def closes() -> int:
            return sum(1 for line in proc.output.splitlines() if re.search(r"\bclose\b", line))
        wait_until(lambda: closes() >= 2 and "plain HTTP" in proc.output, TIMEOUT, "two access lines")
    finally:
        proc.stop()
    assert proc.proc.returncode == 0, proc.output
    return proc.output.splitlines(), {"port": port, "clients": clients, "pid": proc.pid}


@pytest.mark.parametrize("fmt", ["text", "logfmt", "json"])
def test_every_line_of_a_real_run_parses(fmt: str, tmp_path: Path, echo_backend: tuple[str, int]) -> None:
    argv = [sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0", "--backend",
            f"{echo_backend[0]}:{echo_backend[1]}", *cert_args("ecdsa-p256"), "--log-format", fmt,
            "--admin", "127.0.0.1:0", "--control-socket", str(tmp_path / "ctl.sock"), "--drain-timeout", "1"]
    lines, run = run_and_collect(fmt, tmp_path, echo_backend, argv)
    recs = records(fmt, lines)
    assert not [line for line in lines if line.startswith("ironsocket:")], lines  # no bare echo lines
    for fact in ("serving TLS 1.3 on", "admin endpoint on", "control socket "):  # one line per fact
        assert sum(fact in str(r["msg"]) for r in recs) == 1, (fact, lines)
    backend = f"{echo_backend[0]}:{echo_backend[1]}"
    listener = f"127.0.0.1:{run['port']}"
    if fmt == "text":
        closes = [re.search(r"conn=(\d+) close pid=(\d+) listener=(\S+) route=(\S+) client=(\S+) sni=(\S+) "
                            r"backend=(\S+) bytes_c2b=(\d+) bytes_b2c=(\d+) duration=([\d.]+) reason=(.+)$", line)
                  for line in lines if re.search(r"conn=\d+ close ", line)]
        assert len(closes) == 2 and all(closes), lines
        seen = {}
        for c in closes:
            assert c is not None
            assert (int(c.group(2)), c.group(3), c.group(4), c.group(6), c.group(7)) == \
                   (run["pid"], listener, "listener", "localhost", backend)
            seen[c.group(5)] = (int(c.group(8)), int(c.group(9)))
        assert seen == {f"{h}:{p}": (n, n) for (h, p), n in run["clients"].items()}
        assert any(re.search(r"conn=\d+ handshake failed .*reason=plain HTTP request on the TLS port$", line)
                   for line in lines), lines
        return
    closes = [r for r in recs if r["msg"] == "close"]
    opens = [r for r in recs if r["msg"] == "open"]
    assert len(closes) == 2 and len(opens) == 2, lines
    assert {str(r["conn"]) for r in closes} == {str(r["conn"]) for r in opens}
    seen = {}
    for r in closes:
        assert (str(r["pid"]), r["listener"], r["route"], r["sni"], r["backend"]) == \
               (str(run["pid"]), listener, "listener", "localhost", backend), r
        assert float(r["duration"]) >= 0 and r["reason"], r
        seen[r["client"]] = (int(r["bytes_c2b"]), int(r["bytes_b2c"]))
    assert seen == {f"{h}:{p}": (n, n) for (h, p), n in run["clients"].items()}
    if fmt == "json":  # numbers are numbers
        assert all(isinstance(r["bytes_c2b"], int) and isinstance(r["conn"], int) for r in closes)
    [plain] = [r for r in recs if r["msg"] == "handshake failed"]
    assert plain["reason"] == "plain HTTP request on the TLS port", plain
    assert all(str(r["pid"]) == str(run["pid"]) for r in recs)


def test_config_log_format_key(tmp_path: Path, echo_backend: tuple[str, int]) -> None:
    cfg = tmp_path / "c.toml"
    body = (f'\n[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:0"\nbackend = "127.0.0.1:9"\n'
            f'[[listeners.certs]]\ncert = "{CERTS}/ecdsa-p256.pem"\nkey = "{CERTS}/ecdsa-p256.key"\n'
            f'[listeners.routes."localhost"]\nbackend = "{echo_backend[0]}:{echo_backend[1]}"\n')
    cfg.write_text('log_format = "yaml"\n' + body)
    out = subprocess.run([sys.executable, "-m", "ironsocket", "check", str(cfg)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode != 0 and "log_format" in out.stderr and "text, logfmt, json" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    cfg.write_text('log_format = "json"\n' + body)
    lines, run = run_and_collect("json", tmp_path, echo_backend,
                                 [sys.executable, "-m", "ironsocket", "serve", "--config", str(cfg)])
    recs = records("json", lines)
    closes = [r for r in recs if r["msg"] == "close"]
    assert len(closes) == 2, lines
    backend = f"{echo_backend[0]}:{echo_backend[1]}"
    assert all((r["listener"], r["route"], r["backend"]) == ("edge", "localhost", backend) for r in closes), closes
    assert sorted(r["bytes_c2b"] for r in closes) == [1234, 70_000]


def test_bad_log_format_flag_is_refused_with_the_choices() -> None:
    out = subprocess.run([sys.executable, "-m", "ironsocket", "serve", "--log-format", "yaml", "--backend",
                          "127.0.0.1:9"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("ironsocket: error: --log-format 'yaml'") and "text, logfmt, json" in line, line


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_tracebacks_and_thread_crashes_stay_one_parseable_line(fmt: str) -> None:
    """A bug's traceback (log.exception, a thread's uncaught exception, a warning) is one field
    of one line in logfmt/json: a log shipper never sees a line that does not parse."""
    import io
    import logging
    import threading
    import warnings

    from ironsocket import logs

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, threading.excepthook)
    stream = io.StringIO()
    try:
        logs.setup("info", logs.LogFormat(fmt), stream=stream)
        log = logging.getLogger("ironsocket")
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            log.exception("internal error", extra=logs.fields(conn=7, sni="a b", alpn=None))

        def crash() -> None:
            raise ValueError("thread bug")
        t = threading.Thread(target=crash, name="is-test")
        t.start()
        t.join(TIMEOUT)
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # pytest makes warnings errors
            warnings.warn("careful", UserWarning, stacklevel=1)
    finally:
        for handler in list(root.handlers):
            if handler not in saved[0]:
                root.removeHandler(handler)
        root.setLevel(saved[1])
        threading.excepthook = saved[2]
        logging.captureWarnings(False)
    lines = stream.getvalue().splitlines()
    recs = records(fmt, lines)
    assert len(recs) == 3, lines
    first, thread, warned = recs
    assert (first["msg"], str(first["conn"]), first["sni"], first["level"]) == ("internal error", "7", "a b", "error")
    assert "alpn" not in first and "RuntimeError: boom\nsecond line" in first["exc"]
    assert thread["msg"] == "uncaught exception in thread is-test" and "ValueError: thread bug" in thread["exc"]
    assert warned["logger"] == "py.warnings" and "careful" in warned["msg"]


def test_access_line_of_a_connection_carried_over_an_upgrade(tmp_path: Path, echo_backend: tuple[str, int]) -> None:
    """logfmt through a real exec upgrade (`ironsocket upgrade --socket CTL`): both programs'
    lines parse, the same pid, and the carried connection's one access line (written by the
    new program) counts the bytes of both programs."""
    from tests.test_upgrade import Server

    server = Server(tmp_path, echo_backend[1], "--log-format", "logfmt")
    try:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            me = "%s:%d" % tls.getsockname()[:2]

            def round_trip(data: bytes) -> None:
                tls.sendall(data)
                got = bytearray()
                while len(got) < len(data):
                    chunk = tls.recv(65536)
                    assert chunk, "EOF"
                    got += chunk
                assert bytes(got) == data

            round_trip(b"1" * 3000)
            result = server.upgrade()
            assert result.returncode == 0, result.stderr
            server.wait_for(r"upgrade: restored 1 connections")
            round_trip(b"2" * 4000)
            tls.unwrap()
        server.wait_for(r"msg=close ")
    finally:
        server.close()
    recs = records("logfmt", server.text().splitlines())
    assert {r["pid"] for r in recs} == {str(server.proc.pid)}
    [close] = [r for r in recs if r["msg"] == "close"]
    assert (close["client"], close["bytes_c2b"], close["bytes_b2c"], close["route"], close["sni"]) == \
           (me, "7000", "7000", "listener", "localhost"), close
    assert sum(r["msg"].startswith("serving TLS 1.3 on") for r in recs) == 2  # one per program image


def test_text_keeps_a_multi_line_message_on_its_line() -> None:
    import io
    import logging

    from ironsocket import logs

    import threading

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, threading.excepthook)
    stream = io.StringIO()
    try:
        logs.setup("info", logs.LogFormat.TEXT, stream=stream)
        logging.getLogger("ironsocket").error("upgrade: not done: child said\nline two",
                                              extra=logs.fields(conn=4, reason="a\nb", sni=None))
    finally:
        for handler in list(root.handlers):
            if handler not in saved[0]:
                root.removeHandler(handler)
        root.setLevel(saved[1])
        threading.excepthook = saved[2]
        logging.captureWarnings(False)
    [line] = stream.getvalue().splitlines()
    [rec] = records("text", [line])
    assert rec["msg"] == "conn=4 upgrade: not done: child said\\nline two reason=a\\nb", rec


@pytest.mark.parametrize("level", ["warning", "error"])
def test_serving_and_stopped_are_shown_at_every_log_level(level: str, tmp_path: Path) -> None:
    """The NOTICE lines (logs.NOTICE): an operator at --log-level warning still sees that the
    server is up and that it stopped; the info lines stay hidden."""
    proc = ManagedProcess([sys.executable, "-m", "ironsocket", "serve", "--listen", "127.0.0.1:0", "--backend",
                           "127.0.0.1:9", *cert_args("ecdsa-p256"), "--log-level", level,
                           "--control-socket", str(tmp_path / "ctl.sock")], "ironsocket serve")
    try:
        proc.wait_for_line(rf"^{TS.pattern} NOTICE ironsocket: serving TLS 1\.3 on 127\.0\.0\.1:\d+")
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait_for_line(rf"^{TS.pattern} NOTICE ironsocket: stopped$")
        assert proc.proc.wait(TIMEOUT) == 0
    finally:
        proc.stop()
    assert "control socket" not in proc.output and " INFO " not in proc.output, proc.output
    assert "graceful stop" not in proc.output, proc.output  # info: hidden
