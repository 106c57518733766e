"""Following a kvstore prefix: list it, then watch it, for as long as the caller runs.

The one list-then-watch loop of the agent: ClusterMesh follows each kind of a remote cluster
with it, and the policy and service components follow what their cluster shares. A compacted
history makes it list again, and keys that did not come back are reported deleted. A caller
that keeps the :class:`Position` resumes from the revision it reached (a reconnect does not
list again unless the history is gone).
"""

import asyncio
import contextlib
import gc
import logging
from collections.abc import Awaitable, Callable, Iterable

import attrs

from meshagent.kvstore.contract import EventType, KVStore, RevisionCompacted

log = logging.getLogger(__name__)

# keys applied between two turns of the event loop while listing: some 10-20 ms of work, so a
# listing of a million keys does not keep the agent from answering (or a store from reading
# ahead) for the whole of a page
YIELD_EVERY = 2_000


@attrs.define
class Position:
    """How far a follower got: the last revision it applied (None: list before watching)."""

    revision: int | None = None


async def follow_prefix(store: KVStore, prefix: str,
                        apply: Callable[[str, bytes | None], None | Awaitable[None]],
                        known_keys: Callable[[], Iterable[str]],
                        on_listed: Callable[[], None],
                        position: Position | None = None,
                        on_progress: Callable[[], None] | None = None,
                        page_scope: Callable[[], contextlib.AbstractContextManager]
                        = contextlib.nullcontext) -> None:
    """``apply(key, value)`` for every key under ``prefix`` (value None: deleted), forever;
    what it returns, if not None, is awaited (one key at a time, in order). ``known_keys`` are
    the keys applied so far (a listing deletes those it does not return); ``on_listed`` runs
    each time the follower is caught up, ``on_progress`` after each listing and event;
    ``page_scope()`` is entered around each page of a listing (the tables hold their change
    notices in it).

    A synchronous ``apply`` is called without a coroutine per key: a remote cluster's listing
    may hold 100,000 of them."""
    position = position if position is not None else Position()

    while True:
        if position.revision is None:
            try:
                position.revision = await _list(store, prefix, apply, known_keys, page_scope)
            except RevisionCompacted as exc:  # between two pages: what they gave stays
                log.info("%s: %s while listing; listing again", prefix, exc)
                continue
            if on_progress is not None:
                on_progress()
        on_listed()
        try:
            async for event in store.watch(prefix, after_revision=position.revision):
                pending = apply(event.key, event.value if event.type is EventType.PUT else None)
                if pending is not None:
                    await pending
                position.revision = event.revision
                if on_progress is not None:
                    on_progress()
        except RevisionCompacted as exc:
            log.info("%s: %s; listing again", prefix, exc)
            position.revision = None


@contextlib.contextmanager
def _collection_paused():
    """No cyclic garbage collection while a page is applied, and what it kept moved out of
    the collector's sight afterwards (``gc.freeze``): a page's rows are the tables' to keep,
    and each full collection on the way walked every row kept so far (a million). What else
    is alive then is frozen with them: a cycle among those that turns to garbage later is not
    collected, a few objects a page."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        if was:
            gc.enable()


async def _list(store: KVStore, prefix: str, apply, known_keys, page_scope) -> int:
    """Apply a listing of ``prefix``, page by page; its revision. A remote cluster's may hold
    100,000s of keys: one page is held at a time, and only the keys known before (none on a
    first listing) are kept aside, to delete those the listing does not return."""
    gone = set(known_keys())
    revision = 0
    async for page in store.list_pages(prefix):
        revision = page.revision
        with _collection_paused(), page_scope():
            for at, item in enumerate(page.items, 1):
                gone.discard(item.key)
                if (pending := apply(item.key, item.value)) is not None:
                    await pending
                elif not at % YIELD_EVERY:
                    await asyncio.sleep(0)  # the loop's other work (and a store's next page)
        del page  # not held while the next one is read
    for key in gone:  # gone while nobody was watching
        if (pending := apply(key, None)) is not None:
            await pending
    return revision
