"""ironsocket.secretfile: where `--keylog` and `--upgrade-state-dump` may write secrets, and the
warning for private key files others can read. Real files and real `ironsocket serve`
processes; "another user" is uid 65534 (nobody) via os.chown (the tests run as root)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ironsocket import upgrade
from ironsocket.secretfile import SecretFileError, check_secret, open_secret
from tests.conftest import ManagedProcess
from tests.test_handover import SECRET, full_document
from tests.helpers import CERTS, ROOT, assert_refused, serve_outcome

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


# -- the helper itself -----------------------------------------------------------------------------
def test_open_secret_creates_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "new"
    old = os.umask(0)
    try:
        with open_secret(path, append=True) as f:
            f.write("a\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with open_secret(path, append=True) as f:  # our own 0600 file: appended to
        f.write("b\n")
    assert path.read_text() == "a\nb\n"
    with open_secret(path, truncate=True) as f:  # ... or replaced
        f.write("c\n")
    assert path.read_text() == "c\n"


def test_open_secret_refuses_symlink_fifo_and_loose_modes(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep\n")
    target.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(SecretFileError, match="is a symbolic link; refusing to follow it"):
        open_secret(link, append=True)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nothing-yet")
    with pytest.raises(SecretFileError, match="symbolic link"):
        open_secret(dangling, truncate=True)
    assert not (tmp_path / "nothing-yet").exists() and target.read_text() == "keep\n"

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretFileError, match="is not a regular file"):  # and does not block
        open_secret(fifo, append=True)
    with pytest.raises(SecretFileError, match="is not a regular file"):
        open_secret(tmp_path, append=True)

    loose = tmp_path / "loose"
    loose.write_text("old\n")
    loose.chmod(0o644)
    with pytest.raises(SecretFileError, match="has mode 0644.*chmod 600"):
        open_secret(loose, truncate=True)
    assert loose.read_text() == "old\n" and stat.S_IMODE(loose.stat().st_mode) == 0o644  # not touched
    with pytest.raises(SecretFileError, match="directory .* does not exist"):
        check_secret(tmp_path / "no" / "file")


@needs_root
def test_open_secret_refuses_a_file_of_another_user(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.write_text("")
    theirs.chmod(0o600)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(SecretFileError, match=f"is owned by uid {NOBODY}"):
        open_secret(theirs, append=True)
    with pytest.raises(SecretFileError, match=f"is owned by uid {NOBODY}"):
        check_secret(theirs)
    assert theirs.read_text() == ""


# -- --keylog ------------------------------------------------------------------------------------
def test_keylog_symlink_refused_at_startup(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "keylog"
    link.symlink_to(target)
    assert_refused(*serve_outcome("--keylog", str(link)), f"keylog file {link}", "symbolic link")
    assert target.read_text() == ""


@needs_root
def test_keylog_of_another_user_refused_at_startup(tmp_path: Path) -> None:
    theirs = tmp_path / "keylog"
    theirs.write_text("")
    theirs.chmod(0o600)
    os.chown(theirs, NOBODY, NOBODY)
    assert_refused(*serve_outcome("--keylog", str(theirs)), f"keylog file {theirs}", f"owned by uid {NOBODY}")
    loose = tmp_path / "loose"
    loose.write_text("")
    loose.chmod(0o640)
    assert_refused(*serve_outcome("--keylog", str(loose)), f"keylog file {loose}", "mode 0640")


# -- --upgrade-state-dump ---------------------------------------------------------------------------
def test_state_dump_symlink_refused_at_startup_and_at_dump(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    target.chmod(0o600)
    link = tmp_path / "state.json"
    link.symlink_to(target)
    assert_refused(*serve_outcome("--upgrade-state-dump", str(link)), f"upgrade state dump {link}", "symbolic link")
    # and if the link appears after start-up, the dump at the upgrade refuses it too (the upgrade
    # then fails: perform() resumes and reports it)
    with pytest.raises(SecretFileError, match="symbolic link"):
        upgrade.dump_state(full_document(), str(link))
    assert target.read_text() == "keep\n"
    fresh = tmp_path / "fresh.json"
    upgrade.dump_state(full_document(), str(fresh))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600 and SECRET in fresh.read_text()  # asked for: keys in


@needs_root
def test_state_dump_of_another_user_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "state.json"
    theirs.write_text("")
    theirs.chmod(0o600)
    os.chown(theirs, NOBODY, NOBODY)
    assert_refused(*serve_outcome("--upgrade-state-dump", str(theirs)), f"owned by uid {NOBODY}")
    with pytest.raises(SecretFileError, match=f"owned by uid {NOBODY}"):
        upgrade.dump_state({"secret": "x"}, str(theirs))
    assert theirs.read_text() == ""


# -- private key files others can read (a warning, like ssh's) -------------------------------------
def key_copies(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The fixture's certificate and two copies of its key: 0644 (loose) and 0600 (tight)."""
    loose, tight = tmp_path / "loose.key", tmp_path / "tight.key"
    for path, mode in ((loose, 0o644), (tight, 0o600)):
        path.write_bytes((CERTS / "ecdsa-p256.key").read_bytes())
        path.chmod(mode)
    return CERTS / "ecdsa-p256.pem", loose, tight


def test_serve_warns_about_a_key_file_others_can_read(tmp_path: Path, start_proxy) -> None:
    cert, loose, tight = key_copies(tmp_path)
    proxy = start_proxy("--cert", str(cert), "--key", str(loose), certs=())
    warnings = [l.split(" ", 1)[1] for l in proxy.output.splitlines() if "UNPROTECTED PRIVATE KEY FILE" in l]
    assert warnings == [f"WARNING ironsocket: UNPROTECTED PRIVATE KEY FILE {loose}: permissions 0644 are too open "
                        f"(group/others can read the key); chmod 600 {loose}"], proxy.output
    proxy = start_proxy("--cert", str(cert), "--key", str(tight), certs=())
    assert "UNPROTECTED" not in proxy.output, proxy.output


def test_check_and_serve_config_warn_about_a_key_file_others_can_read(tmp_path: Path) -> None:
    cert, loose, tight = key_copies(tmp_path)
    text = f'[[listeners]]\nlisten = "127.0.0.1:0"\nbackend = "127.0.0.1:9"\n' \
           f'[[listeners.certs]]\ncert = "{cert}"\nkey = "{{key}}"\n'
    cfg = tmp_path / "c.toml"
    cfg.write_text(text.format(key=loose))
    out = subprocess.run([sys.executable, "-m", "ironsocket", "check", str(cfg)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "OK, 1 listener" in out.stdout, out.stderr  # a warning, not an error
    assert f"ironsocket: warning: {cfg}:6: listeners[0].certs[0].key: UNPROTECTED PRIVATE KEY FILE {loose}: " \
           "permissions 0644 are too open" in out.stderr, out.stderr
    proc = ManagedProcess([sys.executable, "-m", "ironsocket", "serve", "--config", str(cfg)], "serve --config")
    try:
        proc.wait_for_line(r"ironsocket: serving TLS 1\.3")
        assert f"UNPROTECTED PRIVATE KEY FILE {loose}" in proc.output, proc.output
    finally:
        proc.stop()
    cfg.write_text(text.format(key=tight))
    out = subprocess.run([sys.executable, "-m", "ironsocket", "check", str(cfg)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "UNPROTECTED" not in out.stderr + out.stdout, out.stderr
