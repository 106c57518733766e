"""The agent's hold on full collections (meshagent.runtime.collect)."""

import gc
import weakref

from meshagent.runtime.collect import survivors_frozen


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it


def test_survivors_of_a_full_collection_are_frozen_and_released_at_the_end():
    before = gc.get_freeze_count()
    with survivors_frozen():
        assert gc.get_freeze_count() >= before
        kept = [Node() for _ in range(1000)]
        frozen = gc.get_freeze_count()
        gc.collect()
        assert gc.get_freeze_count() >= frozen + 1000  # the survivors, kept among them
        assert all(gc.is_tracked(node) for node in kept)
    assert gc.get_freeze_count() == 0


def test_garbage_of_the_young_is_still_collected():
    with survivors_frozen():
        node = Node()
        gone = weakref.ref(node)
        del node
        gc.collect()
        assert gone() is None


def test_nested_holds_unfreeze_when_the_last_one_leaves():
    with survivors_frozen():
        with survivors_frozen():
            pass
        kept = [Node() for _ in range(1000)]
        frozen = gc.get_freeze_count()
        gc.collect()
        assert gc.get_freeze_count() >= frozen + 1000  # the outer hold still freezes
        assert kept
    assert gc.get_freeze_count() == 0
