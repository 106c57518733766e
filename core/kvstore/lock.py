"""A distributed mutex built only from the kvstore contract (create, leases, watch).

Backends without a native lock use it: the holder owns ``<name>`` on a lease of its own, so a
holder that dies releases the lock when its lease expires; waiters watch the key's deletion.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from meshagent.kvstore import EventType, KVStore

LOCK_TTL = 15.0


@contextlib.asynccontextmanager
async def kv_lock(store: KVStore, name: str, ttl: float = LOCK_TTL) -> AsyncIterator[None]:
    lease = await store.grant_lease(ttl)
    # kept alive from the start: waiting behind other holders may take longer than the TTL
    keeper = asyncio.create_task(keep_alive(store, lease, ttl), name=f"lock:{name}")
    try:
        while not await store.create(name, b"locked", lease=lease):
            # watch from a listing's revision: every backend can resume from that
            listing = await store.list_prefix(name)
            if not any(item.key == name for item in listing.items):
                continue
            async for event in store.watch(name, after_revision=listing.revision):
                if event.key == name and event.type is EventType.DELETE:
                    break
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(Exception):
            await store.revoke(lease)  # deletes the lock key


async def keep_alive(store: KVStore, lease, ttl: float) -> None:
    """Keep ``lease`` alive until cancelled; raises LeaseExpired once it is gone."""
    while True:
        await asyncio.sleep(ttl / 3)
        await store.keepalive(lease)
