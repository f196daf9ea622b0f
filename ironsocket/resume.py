"""The first thing a program exec'd with connections in its state document does: move their
bytes again.

Theory of operation
-------------------
An upgrade hands its connections over through the bridge (`ironsocket.bridge`): they keep
moving there while this program loads, and its document carries none. A rollback document
does (`upgrade.roll_back_live`: the failed program paused them and wrote them down as they
were), and so does a document from a version-1 program; until their pumps run again, every
such client waits. Most of a start-up is not needed to relay: the
command-line framework, the configuration, certificates and their x509 parsing, the handshake
message parser. So `start_early()` runs from the entry point (`ironsocket.entry`) before any of
that is imported: it reads the document, rebuilds every connection (kTLS state verified by
read-back, userspace sessions rebuilt), and starts the pumps on a fresh `engine.Engine`. The
imports it needs are the record layer's (`relay`, `ktls`, `tls13.session`) and the standard
library's.

The document has one entry per listener (``listeners``: name, listening fd, connections); each
gets its own `Early` with its own engine, exactly what one `ProxyServer` would own. Then the
ordinary start-up runs (`runtime.STARTUP_STEPS`); its ``proxy`` step builds one `ProxyServer`
per configured listener, and each adopts the running set of its own entry (`ProxyServer.adopt`
→ `Early.claim`) instead of building one, and takes over that listener. If any later step
fails, the rollback pauses these relays and carries their state as it is at that moment
(`upgrade.roll_back_live`: `Early` has the same ``pause``/``snapshot`` as a server), never the
document we were given, which the pumps have already moved past.

If the early restore itself fails (an invalid document, a kernel state that does not match),
it leaves every fd as it found them and the ordinary start-up meets the same error and rolls
back with the untouched document.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import handover, upgrade
from .engine import Engine
from .handover import Document, ListenerEntry
from .relay import Relay

log = logging.getLogger("ironsocket.upgrade")

resumed: Resumed | None = None  # set by start_early() when the connections are moving again


class Early:
    """One listener's connections, resumed before the configuration was loaded (an entry of the
    document's ``listeners``, with its own engine: each `ProxyServer` claims its own)."""

    def __init__(self, entry: ListenerEntry, engine: Engine, restored: list[tuple[Any, Relay]]) -> None:
        self.entry, self.engine = entry, engine
        self.restored = restored
        self.lock = threading.Lock()
        self._handler: Callable[[Any, Relay], None] | None = None
        self._ended: list[tuple[Any, Relay]] = []
        self.claimed = False

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
            self.claimed = True

    # -- what roll_back_live needs of a server (pause, snapshot), before there is one --------------
    def pause(self, handshake_deadline: float, park_deadline: float) -> None:
        if not self.engine.pause(park_deadline):
            raise upgrade.UpgradeError(f"the relay loops did not reach a safe point in {park_deadline:g}s")

    def snapshot(self) -> ListenerEntry:
        """The listener's document entry, with the connections as they are now (while paused)."""
        assert self.engine.paused
        return dataclasses.replace(self.entry, connections=tuple(
            handover.connection_entry(info) for info, relay in self.restored if not relay.done.is_set()))


class Resumed:
    """Every listener's `Early`, in the document's order, and when their bytes moved again."""

    def __init__(self, doc: Document, state_fd: int, listeners: list[Early]) -> None:
        self.doc, self.state_fd, self.listeners = doc, state_fd, listeners
        self.resumed_at = time.time()


def _stop_restored(restored: list[tuple[Any, Relay]], engine: Engine | None) -> None:
    for _, relay in restored:
        relay.client.sock.detach()
        relay.backend.detach()
    if engine is not None:
        engine.stop(0)


def start_early() -> None:
    """Resume the inherited connections now, if this process was exec'd by an upgrade. Never
    raises: on any failure the ordinary start-up finds the document untouched."""
    global resumed
    text = os.environ.get(upgrade.ENV_STATE_FD)
    if text is None:
        return
    built: list[tuple[ListenerEntry, Engine, list[tuple[Any, Relay]]]] = []
    restored: list[tuple[Any, Relay]] = []  # the listener being rebuilt
    engine: Engine | None = None
    try:
        fd = int(text)
        doc = handover.read_memfd(fd)
        if not any(entry.connections for entry in doc.listeners):
            return  # none carried here (a bridge relays them meanwhile, ironsocket.bridge)
        for entry in doc.listeners:
            engine, restored = Engine(), []
            for conn in entry.connections:
                restored.append(upgrade.restore_connection(conn, engine, entry.idle_timeout))
            built.append((entry, engine, restored))
            engine, restored = None, []
    except Exception as exc:  # noqa: BLE001 - the ordinary start-up meets it again and rolls back
        _stop_restored(restored, engine)
        for _, built_engine, built_restored in built:
            _stop_restored(built_restored, built_engine)
        log.debug("upgrade: early resume not possible (%s); the ordinary start-up decides", exc)
        return
    listeners = []
    for entry, engine, restored in built:
        early = Early(entry, engine, restored)
        for info, relay in restored:
            info.relay = relay
            relay.on_done = lambda r, info=info, early=early: early._relay_done(info, r)
        listeners.append(early)
    for early in listeners:
        early.engine.start()
        for _, relay in early.restored:
            relay.start()
    resumed = Resumed(doc, fd, listeners)
