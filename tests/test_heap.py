"""ironsocket.heap: the collector's rules around the hand-over (in this test process)."""

from __future__ import annotations

import gc

import pytest

from ironsocket import heap


def test_settle_freezes_what_is_loaded() -> None:
    gc.unfreeze()
    loaded = [object() for _ in range(10)] + [{"k": i} for i in range(10)]
    try:
        heap.settle()
        assert gc.get_freeze_count() >= len(loaded)
        frozen = gc.get_freeze_count()
        after = [{"n": i} for i in range(100)]  # what comes later stays collectable
        assert gc.get_freeze_count() == frozen
        assert after
    finally:
        gc.unfreeze()


def test_no_collection_inside_and_as_before_after() -> None:
    assert gc.isenabled()
    before = sum(g["collections"] for g in gc.get_stats())
    with heap.no_collection():
        assert not gc.isenabled()
        garbage = []
        for _ in range(50_000):  # far past generation 0's threshold
            cycle: list[object] = []
            cycle.append(cycle)
            garbage.append(cycle)
        del garbage
        assert sum(g["collections"] for g in gc.get_stats()) == before
    assert gc.isenabled()
    with pytest.raises(RuntimeError), heap.no_collection():
        raise RuntimeError("the collector comes back on errors too")
    assert gc.isenabled()
    gc.disable()
    try:
        with heap.no_collection():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
