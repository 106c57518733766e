"""Keeping Python's full collections short while the agent follows a large mesh.

A full collection walks every object the collector tracks, and the agent holds one or two per
remote ipcache entry: with 100,000s of them a full collection stops the event loop for
100s of ms, and every update arriving meanwhile waits that long (docs/architecture.md,
"At the watch's pace"). What survived a full collection is the agent's state (table
rows, plugins, modules); it goes by reference counting when it goes. So it is frozen out of
later collections (:func:`gc.freeze`), which then walk only what came since. The price: a
reference cycle among frozen objects that becomes garbage later is not reclaimed until the
agent stops.
"""

import contextlib
import gc
from collections.abc import Iterator

_holders = 0


def _freeze_survivors(phase: str, info: dict) -> None:
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


@contextlib.contextmanager
def survivors_frozen() -> Iterator[None]:
    """While held: what exists now, and what survives each full collection, is frozen.
    Nested holds (several agents in one process) share one; the last to leave unfreezes."""
    global _holders
    _holders += 1
    if _holders == 1:
        gc.callbacks.append(_freeze_survivors)
    gc.freeze()
    try:
        yield
    finally:
        _holders -= 1
        if _holders == 0:
            gc.callbacks.remove(_freeze_survivors)
            gc.unfreeze()
