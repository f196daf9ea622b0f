"""Counters the admin ``/metrics`` reports that outlive one program image.

- `Histogram`: a Prometheus-style histogram (cumulative buckets, sum, count), used for the
  handshake duration per listener;
- `PROCESS`: this process's upgrade outcomes (`UpgradeCounters`): upgrades done, rollbacks
  (the new program failed and the previous one was exec'd back) and refusals (the upgrade did
  not get as far as the exec).

Both go into the upgrade document's ``counters`` (`server.ProxyServer.snapshot`) and come back
in the next program (`server.ProxyServer.adopt`), so a counter never goes backwards across an
exec: the document is the only way a value crosses it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .handover import HistogramEntry, UpgradeCounts

# Seconds: a handshake on loopback takes ~1-5 ms, over the Internet tens to hundreds of ms;
# the handshake timeout (10 s by default) bounds the top.
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Observations counted into ``buckets`` (upper bounds, ascending; +Inf is implied)."""

    def __init__(self, buckets: tuple[float, ...] = HANDSHAKE_BUCKETS) -> None:
        self.buckets = buckets
        self._lock = threading.Lock()
        self._counts = [0] * (len(buckets) + 1)  # per bucket, not cumulative; the last is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def cumulative(self) -> tuple[list[tuple[str, int]], float, int]:
        """([(le, cumulative count) ..., ("+Inf", count)], sum, count)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, running = [], 0
        for bound, n in zip((*(repr(b) for b in self.buckets), "+Inf"), counts):
            running += n
            out.append((bound, running))
        return out, total, running

    def to_entry(self) -> HistogramEntry:
        with self._lock:
            return HistogramEntry(buckets=tuple(self.buckets), counts=tuple(self._counts), sum=self._sum)

    def restore(self, entry: HistogramEntry | None) -> None:
        """Take the counts of a previous program (ignored if its buckets differ)."""
        if entry is None or entry.buckets != self.buckets or len(entry.counts) != len(self._counts):
            return
        with self._lock:
            self._counts = list(entry.counts)
            self._sum = entry.sum


@dataclass
class UpgradeCounters:
    done: int = 0  # upgrades that completed (counted by the new program)
    rolled_back: int = 0  # the new program failed to start; the previous one took over again
    refused: int = 0  # not done, before the exec (pre-flight, pause, ...): the program kept serving
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def to_entry(self) -> UpgradeCounts:
        with self._lock:
            return UpgradeCounts(done=self.done, rolled_back=self.rolled_back, refused=self.refused)

    def restore(self, entry: UpgradeCounts | None) -> None:
        if entry is None:
            return
        with self._lock:
            self.done, self.rolled_back, self.refused = entry.done, entry.rolled_back, entry.refused


PROCESS = UpgradeCounters()
