"""Following a kvstore prefix: list it, then watch it, for as long as the caller runs.

Used for what a cluster shares through its own kvstore (policies, services). A compacted
history makes it list again, and keys that did not come back are reported deleted.
"""

import inspect
from collections.abc import Awaitable, Callable, Iterable

from meshagent.kvstore import EventType, KVStore, RevisionCompacted


async def follow_prefix(store: KVStore, prefix: str,
                        apply: Callable[[str, bytes | None], None | Awaitable[None]],
                        known_keys: Callable[[], Iterable[str]],
                        on_listed: Callable[[], None]) -> None:
    """``apply(key, value)`` for every key under ``prefix`` (value None: deleted), forever;
    awaited when it is a coroutine function (one key at a time, in order)."""
    async def call(key: str, value: bytes | None) -> None:
        result = apply(key, value)
        if inspect.isawaitable(result):
            await result
    while True:
        listing = await store.list_prefix(prefix)
        present = set()
        for item in listing.items:
            present.add(item.key)
            await call(item.key, item.value)
        for key in set(known_keys()) - present:
            await call(key, None)
        on_listed()
        try:
            async for event in store.watch(prefix, after_revision=listing.revision):
                await call(event.key, event.value if event.type is EventType.PUT else None)
        except RevisionCompacted:
            continue
