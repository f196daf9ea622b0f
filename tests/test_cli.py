"""The command line as a user meets it (issue 13.4, 13.6): real `python -m ironsocket` runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version

import pytest

from ironsocket import ktls
from tests.helpers import CERTS, ROOT

TIMEOUT = 60


def run(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    full = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    return subprocess.run([*prefix, sys.executable, "-m", "ironsocket", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=full, cwd=ROOT, stdin=subprocess.DEVNULL)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ironsocket: error: "), result.stderr
    return lines[0]


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ironsocket {version('ironsocket')}"


def _help_texts() -> list[str]:
    import typer

    from ironsocket.cli import app

    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return [" ".join(p.help.split()) for p in serve.params if getattr(p, "help", None) and not p.hidden]


@pytest.mark.parametrize("env", [{"COLUMNS": "100"}, {"CI": "true", "TERM": "dumb"}], ids=["columns-100", "ci-no-tty"])
def test_serve_help_names_values_and_prints_every_description_whole(env: dict[str, str]) -> None:
    result = run("serve", "--help", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    types = re.findall(r"<(?:str|int|float|bool|path|list\[\w+\]|auto\|require\|off)>", out)
    assert not types, f"type names in the help: {types}"
    assert "…" not in out and "..." not in out.replace("SUITE,...", "").replace("PROTO,...", "").replace("GROUP,...", "")
    flat = " ".join(out.split())
    flat = re.sub(r"(\S)- (\S)", r"\1-\2", flat)  # a word click wrapped at a hyphen
    for text in _help_texts():
        assert text in flat, f"cut or missing: {text!r}"
    assert "docs/config.md" not in out  # not in the wheel
    for metavar in ("--listen HOST:PORT", "--cert FILE", "--drain-timeout SECONDS", "--log-level LEVEL"):
        assert metavar in out
    assert "--admin-allow-remote " in out and "--no-admin-allow-remote" not in out


def test_top_level_help_does_not_cut_command_descriptions() -> None:
    out = run("--help", env={"COLUMNS": "100"}).stdout
    assert "..." not in out.replace("COMMAND [ARGS]...", "") and "…" not in out
    assert "--version" in out


def test_doctor_exit_status_and_fix() -> None:
    """Real kernel: on this host kTLS is missing (exit 1 and what to try); in the VM present (0)."""
    result = run("doctor")
    if ktls.probe().available:
        assert result.returncode == 0 and "kTLS: available" in result.stdout
    else:
        assert result.returncode == 1
        assert "kTLS: NOT available" in result.stdout
        assert "modprobe tls" in result.stdout and "CONFIG_TLS" in result.stdout


def test_inspect_keys_on_a_process_that_is_not_ironsocket() -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for args in (("--pid", str(sleeper.pid)), ("--pid", str(sleeper.pid), "--direct")):
            result = run("inspect-keys", *args, env={"IRONSOCKET_RUN_DIR": tempfile.mkdtemp()})
            assert result.returncode == 1, result.stdout
            assert f"pid {sleeper.pid} is not an ironsocket server: sleep 60" in one_line_error(result)
            assert "connection(s)" not in result.stdout
    finally:
        sleeper.kill()
        sleeper.wait()
    result = run("inspect-keys", "--pid", str(sleeper.pid), env={"IRONSOCKET_RUN_DIR": tempfile.mkdtemp()})
    assert result.returncode == 1 and f"no process with pid {sleeper.pid}" in one_line_error(result)


def test_unknown_log_level_is_refused() -> None:
    result = run("serve", "--log-level", "chatty", "--backend", "127.0.0.1:9")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "'chatty'" in line and "debug, info, warning, error" in line


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to run the server as an unprivileged user (setpriv)")
def test_a_privileged_port_as_non_root_says_how_to_allow_it() -> None:
    from pathlib import Path

    if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 443:
        pytest.skip("this kernel lets anyone bind port 443 (net.ipv4.ip_unprivileged_port_start)")
    run_dir = tempfile.mkdtemp()
    os.chown(run_dir, 65534, 65534)
    key = Path(run_dir) / "ecdsa-p256.key"  # the user's own key, 0600 (the fixture's is root's)
    key.write_bytes((CERTS / "ecdsa-p256.key").read_bytes())
    key.chmod(0o600)
    os.chown(key, 65534, 65534)
    result = run("serve", "--listen", "127.0.0.1:443", "--backend", "127.0.0.1:9",
                 "--cert", str(CERTS / "ecdsa-p256.pem"), "--key", str(key),
                 env={"IRONSOCKET_RUN_DIR": run_dir, "HOME": run_dir},
                 prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                         "--bounding-set=-all"))
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert "cannot listen on 127.0.0.1:443: Permission denied" in line
    assert "setcap cap_net_bind_service=+ep" in line and "socket activation" in line


def test_license_is_mit() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the ironsocket authors" in text
