"""The garbage collector around the upgrade's hand-over.

A connection's pause in an exec upgrade is its batch's hand-over (`bridge`): a few hundred
microseconds of work per connection. Measured at 1,000 connections, the longest batch waited
43–179 ms, and nearly all of it was one full (generation 2) collection that happened to start
inside the batch: CPython collects generation 2 each time the heap of tracked objects has grown
by a quarter, and a hand-over grows it by every connection it rebuilds; the collection walks
the whole heap (the modules, the configuration, every connection so far), so the longest wait
grew with the number of connections. Two rules take it out of the pause:

- `settle`: once the program has loaded (imports, configuration, certificates) and before it
  holds any connection, collect once and *freeze* what is left (`gc.freeze`: the permanent
  generation, never walked again). Later full collections walk only what came after: the
  connections. Nothing that is frozen can be freed by the collector, so this is only done
  before connections exist (their objects die with them and must stay collectable).
- `no_collection`: no collection at all while connections are being handed over (the new
  program's drain, and the bridge, which lives only until it has handed everything over). What
  would have been collected waits for the next collection after it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def settle() -> None:
    """(loaded, no connection yet) Collect once, then freeze everything left."""
    gc.collect()
    gc.freeze()


@contextmanager
def no_collection() -> Iterator[None]:
    """No garbage collection inside; as it was after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
