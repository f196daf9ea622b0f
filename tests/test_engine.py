"""ironsocket.engine: the loops' own guarantees, with a minimal relay (the protocol's two pumps'
worth of one pump), not through a real connection: tests/test_relay_contract.py does that."""

from __future__ import annotations

import threading
import time

from ironsocket.engine import Engine, Pump, RelayLike

TIMEOUT = 5.0


class _Counting:
    """A relay of one pump that counts its steps and ends at the first."""

    def __init__(self) -> None:
        self.relay: RelayLike = self
        self.steps = 0
        self.ended = threading.Event()

    def step(self) -> bool:
        self.steps += 1
        return True

    def finished(self, exc: BaseException | None) -> None:
        self.ended.set()

    def pumps(self) -> list[Pump]:
        return [self]

    def fds(self) -> tuple[int, ...]:
        return ()

    def idle_for(self, now: float) -> float | None:
        return None

    def idle_timeout_expired(self) -> None:
        pass


def _engine() -> Engine:
    engine = Engine(loops=1)
    engine.start()
    return engine


def test_a_relay_runs_once_added() -> None:
    engine = _engine()
    try:
        relay = _Counting()
        engine.add(relay, None)
        assert relay.ended.wait(TIMEOUT)
        assert relay.steps == 1
    finally:
        engine.stop()


def test_a_relay_released_while_still_arriving_never_runs() -> None:
    """Given to a loop just as the pause came (still in its inbox), then released (a hand-over
    that failed after the fork lets its stale copies go): after the resume no step of it runs.
    Before, release looked only at the relays already added, the loop added this one after the
    resume, and its step ran on sockets let go of (CI: EBADF, then a slot released twice and the
    loop thread dead)."""
    engine = _engine()
    try:
        assert engine.pause(TIMEOUT)
        relay = _Counting()
        engine.add(relay, None)
        assert engine.loops[0].holds(relay)
        engine.release(relay)
        assert not engine.loops[0].holds(relay)
        engine.resume()
        witness = _Counting()  # added after the resume: once it has run, the inbox is empty
        engine.add(witness, None)
        assert witness.ended.wait(TIMEOUT)
        time.sleep(0.05)
        assert relay.steps == 0 and not relay.ended.is_set()
    finally:
        engine.stop()
