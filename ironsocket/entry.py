"""The program's entry point (``ironsocket`` and ``python -m ironsocket``).

In a process exec'd with connections in its state document (a rollback's; an upgrade's are in
the bridge, `ironsocket.bridge`), they move again first (`resume.start_early`: record layer
only), and only then is the command line imported and parsed.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    if "IRONSOCKET_UPGRADE_STATE_FD" in os.environ and sys.argv[1:2] == ["serve"]:  # upgrade.ENV_STATE_FD
        from .resume import start_early

        start_early()
    from .cli import main as cli_main

    cli_main()
