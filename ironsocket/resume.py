"""The first thing a program exec'd by an upgrade does: move its connections' bytes again.

Theory of operation
-------------------
The previous program paused every connection, wrote the state document and exec'd us; until
the pumps run again, every client waits. Most of a start-up is not needed to relay: the
command-line framework, the configuration, certificates and their x509 parsing, the handshake
message parser. So `start_early()` runs from the entry point (`ironsocket.entry`) before any of
that is imported: it reads the document, rebuilds every connection (kTLS state verified by
read-back, userspace sessions rebuilt), and starts the pumps on a fresh `engine.Engine`. The
imports it needs are the record layer's (`relay`, `ktls`, `tls13.session`) and the standard
library's.

Then the ordinary start-up runs (`runtime.STARTUP_STEPS`); its ``proxy`` step adopts this running
set (`ProxyServer.adopt` → `claim`) instead of building one, and takes over the listener. If any
later step fails, the rollback pauses these relays and carries their state as it is at that
moment (`upgrade.roll_back_live`: `Early` has the same ``pause``/``snapshot`` as a server), never
the document we were given, which the pumps have already moved past.

If the early restore itself fails (an invalid document, a kernel state that does not match),
it leaves every fd as it found them and the ordinary start-up meets the same error and rolls
back with the untouched document.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import upgrade
from .engine import Engine
from .relay import Relay

log = logging.getLogger("ironsocket.upgrade")

resumed: Early | None = None  # set by start_early() when the connections are moving again


class Early:
    """The connections an exec'd program resumed before its configuration was loaded."""

    def __init__(self, doc: dict[str, Any], state_fd: int, engine: Engine,
                 restored: list[tuple[Any, Relay]]) -> None:
        self.doc, self.state_fd, self.engine = doc, state_fd, engine
        self.restored = restored
        self.resumed_at = time.time()
        self.lock = threading.Lock()
        self._handler: Callable[[Any, Relay], None] | None = None
        self._ended: list[tuple[Any, Relay]] = []

    def _relay_done(self, info: Any, relay: Relay) -> None:
        with self.lock:
            handler = self._handler
            if handler is None:
                self._ended.append((info, relay))
                return
        handler(info, relay)

    def claim(self, adopt: Callable[[list[tuple[Any, Relay]], list[tuple[Any, Relay]]], None],
              on_done: Callable[[Any, Relay], None]) -> None:
        """Hand the relays over: ``adopt(alive, ended)`` runs under the lock (no relay can end
        meanwhile), then every relay that ends calls ``on_done(info, relay)``."""
        with self.lock:
            ended = list(self._ended)
            done = {id(r) for _, r in ended}
            alive = [(i, r) for i, r in self.restored if id(r) not in done]
            adopt(alive, ended)
            self._handler = on_done

    # -- what roll_back_live needs of a server (pause, snapshot), before there is one --------------
    def pause(self, handshake_deadline: float, park_deadline: float) -> None:
        if not self.engine.pause(park_deadline):
            raise upgrade.UpgradeError(f"the relay loops did not reach a safe point in {park_deadline:g}s")

    def snapshot(self, *, connections: bool = True) -> dict[str, Any]:
        """The document's server part, with the connections as they are now (while paused),
        and the bridge, if the document named one (it has not been asked yet)."""
        assert self.engine.paused
        doc = {k: v for k, v in self.doc.items() if k != "connections"}
        doc["connections"] = [upgrade.connection_doc(info) for info, relay in self.restored
                              if not relay.done.is_set()] if connections else []
        return doc


def start_early() -> None:
    """Resume the inherited connections now, if this process was exec'd by an upgrade. Never
    raises: on any failure the ordinary start-up finds the document untouched."""
    global resumed
    text = os.environ.get(upgrade.ENV_STATE_FD)
    if text is None:
        return
    restored: list[tuple[Any, Relay]] = []
    engine: Engine | None = None
    try:
        fd = int(text)
        doc = upgrade.read_memfd(fd)
        if not doc["connections"]:  # none, or all in the bridge: it relays them meanwhile
            return
        engine = Engine()
        for conn in doc["connections"]:
            restored.append(upgrade.restore_connection(conn, engine, doc.get("idle_timeout")))
    except Exception as exc:  # noqa: BLE001 - the ordinary start-up meets it again and rolls back
        for _, relay in restored:
            relay.client.sock.detach()
            relay.backend.detach()
        if engine is not None:
            engine.stop(0)
        log.debug("upgrade: early resume not possible (%s); the ordinary start-up decides", exc)
        return
    early = Early(doc, fd, engine, restored)
    for info, relay in restored:
        info.relay = relay
        relay.on_done = lambda r, info=info: early._relay_done(info, r)
    engine.start()
    for _, relay in restored:
        relay.start()
    resumed = early
