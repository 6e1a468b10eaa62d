"""The run's garbage-collector freeze (`latentmas.app.heap`): what it freezes, and what it leaves as it was."""

from __future__ import annotations

import contextlib
import gc
import weakref

from latentmas.app import heap


class _Node:
    """A container the collector tracks; two of them pointing at each other are a cycle only it frees."""

    def __init__(self):
        self.other = None


def _cycle() -> tuple[_Node, weakref.ref]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return a, weakref.ref(a)


@contextlib.contextmanager
def _no_automatic_collections():
    """Only the collections the test asks for (gc.collect still runs)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_survivors_are_frozen_and_later_garbage_is_still_collected():
    assert gc.get_freeze_count() == 0
    with _no_automatic_collections(), heap.survivors_frozen() as freeze:
        assert gc.get_freeze_count() == 0  # nothing until the run says it is warm
        assert freeze() >= 0.0
        frozen = gc.get_freeze_count()
        assert frozen > 0
        node, later = _cycle()  # made after the freeze: the collector still sees it
        del node
        gc.collect()
        assert later() is None
        assert 0 < gc.get_freeze_count() <= frozen  # still frozen (a busy process may free a few meanwhile)
    assert gc.get_freeze_count() == 0


def test_the_freeze_collects_first_so_a_dead_cycle_is_not_kept():
    with _no_automatic_collections(), heap.survivors_frozen() as freeze:
        node, dead = _cycle()
        del node
        assert dead() is not None
        freeze()
        assert dead() is None


def test_a_frozen_cycle_that_dies_waits_for_the_end_of_the_run():
    with _no_automatic_collections():
        with heap.survivors_frozen() as freeze:
            node, alive = _cycle()
            freeze()
            del node
            gc.collect()
            assert alive() is not None  # frozen: the collector does not walk it
        gc.collect()
        assert alive() is None  # unfrozen on leaving, then collected as before


def test_objects_frozen_before_the_run_stay_frozen_and_ours_join_them():
    """Where the process froze objects of its own, ours are frozen too and nothing is unfrozen on leaving
    (gc.unfreeze would unfreeze theirs as well)."""
    with _no_automatic_collections():
        gc.collect()
        gc.freeze()
        try:
            assert gc.get_freeze_count() > 0
            with heap.survivors_frozen() as freeze:
                node, alive = _cycle()
                freeze()
                del node
                gc.collect()
                assert alive() is not None  # ours are frozen: the collector does not walk them
            gc.collect()
            assert alive() is not None  # and stay frozen after the run, as theirs do
        finally:
            gc.unfreeze()
        gc.collect()
        assert alive() is None  # a cycle like any other once unfrozen
