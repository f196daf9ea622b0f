"""The demo's self-signed certificate (ironsocket/selfsigned.py, issue 13.6) stays the same
across an exec upgrade with the real `ironsocket serve` (no --cert, no --backend): a client
that pinned it keeps working."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT
from tests.test_lifecycle import served_leaf
from tests.test_upgrade import TIMEOUT


def upgrade(control: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ironsocket", "upgrade", "--socket", str(control), "--timeout",
                           str(TIMEOUT)], capture_output=True, text=True, timeout=TIMEOUT + 10,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})


def test_demo_certificate_is_kept_across_upgrades(tmp_path: Path, start_proxy) -> None:
    control = tmp_path / "ctl.sock"
    proxy = start_proxy("--control-socket", str(control), certs=(), backend=None)
    before = hashlib.sha256(served_leaf(proxy.port)).hexdigest()
    for n in (1, 2):
        result = upgrade(control)
        assert result.returncode == 0, result.stdout + result.stderr + proxy.output[-3000:]
        assert hashlib.sha256(served_leaf(proxy.port)).hexdigest() == before, f"upgrade {n}: a new certificate"
    fds = []
    for p in Path(f"/proc/{proxy.pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # an fd closed while we list them
            fds.append(os.readlink(p))
    assert sum(t.startswith("/memfd:ironsocket-demo-cert") for t in fds) == 1  # kept, not one more per upgrade
    assert "Traceback" not in proxy.output
