"""An in-process kvstore with etcd's semantics: global revisions, history, leases, locks.

Stores are shared by name within one event loop, so each test's loop gets fresh ones.
``set_available(False)`` simulates an outage: every operation and watch fails until it is back.
"""

import asyncio
import contextlib
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence

from meshagent.plugin import (
    EventType,
    KVStoreStatus,
    KVStoreUnavailable,
    KeyValue,
    Lease,
    LeaseExpired,
    Listing,
    PAGE_SIZE,
    RevisionCompacted,
    WatchEvent,
    check_distinct,
    pages_of,
)

HISTORY_LIMIT = 100_000
HUNG_POLL = 0.05  # how often a request to a hung store looks whether it answers again
_CLOSED = object()

_stores: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, SharedStore]]" = (
    weakref.WeakKeyDictionary()
)


def shared_store(name: str) -> "SharedStore":
    """The store called ``name`` in the running event loop, created on first use."""
    stores = _stores.setdefault(asyncio.get_running_loop(), {})
    if name not in stores:
        stores[name] = SharedStore(name)
    return stores[name]


class SharedStore:
    """The server side: data, history and leases every client of the store sees."""

    def __init__(self, name: str):
        self.name = name
        self.data: dict[str, KeyValue] = {}
        self.revision = 0
        self.history: deque[WatchEvent] = deque()
        self.compacted = 0
        self.available = True
        self.hung = False
        self.leases: dict[int, asyncio.TimerHandle] = {}
        self.lease_keys: dict[int, set[str]] = {}
        self._next_lease = 1
        self.watchers: set[asyncio.Queue] = set()
        self.locks: dict[str, asyncio.Lock] = {}

    # -- faults and history, for tests --------------------------------------------------------

    def set_available(self, available: bool) -> None:
        self.available = available
        if not available:
            self._broadcast(_CLOSED)

    def set_hung(self, hung: bool) -> None:
        """A hung server (stopped, or partitioned away): requests and watches wait, and the
        connection still looks fine. Only a client that expects answers notices."""
        self.hung = hung

    def compact(self, revision: int) -> None:
        while self.history and self.history[0].revision <= revision:
            self.history.popleft()
        self.compacted = max(self.compacted, revision)

    # -- writes ---------------------------------------------------------------------------------

    def check_lease(self, lease: Lease | None) -> None:
        if lease is not None and lease.id not in self.leases:
            raise LeaseExpired(f"lease {lease.id} is gone")

    def write(self, key: str, value: bytes, lease: Lease | None) -> int:
        self.check_lease(lease)
        self.revision += 1
        old = self.data.get(key)
        if old is not None and old.lease is not None:
            self.lease_keys.get(old.lease, set()).discard(key)
        create = old.create_revision if old else self.revision
        lease_id = lease.id if lease else None
        self.data[key] = KeyValue(key, bytes(value), self.revision, create, lease_id)
        if lease_id is not None:
            self.lease_keys[lease_id].add(key)
        self._record(WatchEvent(EventType.PUT, key, bytes(value), self.revision))
        return self.revision

    def remove(self, key: str) -> bool:
        old = self.data.pop(key, None)
        if old is None:
            return False
        if old.lease is not None:
            self.lease_keys.get(old.lease, set()).discard(key)
        self.revision += 1
        self._record(WatchEvent(EventType.DELETE, key, None, self.revision))
        return True

    def _record(self, event: WatchEvent) -> None:
        self.history.append(event)
        if len(self.history) > HISTORY_LIMIT:
            self.compacted = self.history.popleft().revision
        self._broadcast(event)

    def _broadcast(self, item: object) -> None:
        for queue in self.watchers:
            queue.put_nowait(item)

    # -- leases ---------------------------------------------------------------------------------

    def grant(self, ttl: float) -> Lease:
        lease = Lease(self._next_lease, ttl)
        self._next_lease += 1
        self.lease_keys[lease.id] = set()
        self._arm(lease)
        return lease

    def _arm(self, lease: Lease) -> None:
        if handle := self.leases.get(lease.id):
            handle.cancel()
        self.leases[lease.id] = asyncio.get_running_loop().call_later(
            lease.ttl, self.end_lease, lease.id)

    def keepalive(self, lease: Lease) -> None:
        self.check_lease(lease)
        self._arm(lease)

    def end_lease(self, lease_id: int) -> None:
        handle = self.leases.pop(lease_id, None)
        if handle is not None:
            handle.cancel()
        for key in sorted(self.lease_keys.pop(lease_id, ())):
            self.remove(key)


class MemoryKVStore:
    """One client of a :class:`SharedStore`; meets :class:`meshagent.kvstore.KVStore`."""

    def __init__(self, store: SharedStore):
        self.store = store
        self.closed = False
        self._queues: set[asyncio.Queue] = set()

    async def _answer(self) -> SharedStore:
        while self.store.hung and not self.closed:
            await asyncio.sleep(HUNG_POLL)
        return self._check()

    def _check(self) -> SharedStore:
        if self.closed:
            raise KVStoreUnavailable("client is closed")
        if not self.store.available:
            raise KVStoreUnavailable(f"memory store {self.store.name!r} is unavailable")
        return self.store

    async def connect(self) -> None:
        await self._answer()

    async def get(self, key: str) -> KeyValue | None:
        return (await self._answer()).data.get(key)

    async def list_prefix(self, prefix: str) -> Listing:
        store = await self._answer()
        items = [kv for key, kv in sorted(store.data.items()) if key.startswith(prefix)]
        return Listing(items, store.revision)

    async def list_pages(self, prefix: str, page_size: int = PAGE_SIZE):
        async for page in pages_of(await self.list_prefix(prefix), page_size):
            yield page

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        return (await self._answer()).write(key, value, lease)

    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> bool:
        store = await self._answer()
        if key in store.data:
            return False
        store.write(key, value, lease)
        return True

    async def create_many(self, items: Sequence[tuple[str, bytes]], *,
                          lease: Lease | None = None) -> list[KeyValue | None]:
        check_distinct(items)
        store = await self._answer()
        store.check_lease(lease)  # before any write: the batch fails whole
        results: list[KeyValue | None] = []
        for key, value in items:
            results.append(store.data.get(key))
            if results[-1] is None:
                store.write(key, value, lease)
        return results

    async def put_many(self, items: Sequence[tuple[str, bytes]], *,
                       lease: Lease | None = None) -> int:
        check_distinct(items)
        store = await self._answer()
        store.check_lease(lease)  # before any write: the batch fails whole
        revision = 0
        for key, value in items:
            revision = store.write(key, value, lease)
        return revision

    async def update_if(self, key: str, value: bytes, *, mod_revision: int,
                        lease: Lease | None = None) -> bool:
        store = await self._answer()
        current = store.data.get(key)
        if current is None or current.mod_revision != mod_revision:
            return False
        store.write(key, value, lease)
        return True

    async def delete(self, key: str) -> bool:
        return (await self._answer()).remove(key)

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        store = await self._answer()
        current = store.data.get(key)
        if current is None or current.mod_revision != mod_revision:
            return False
        return store.remove(key)

    async def delete_prefix(self, prefix: str) -> int:
        store = await self._answer()
        keys = [key for key in store.data if key.startswith(prefix)]
        for key in sorted(keys):
            store.remove(key)
        return len(keys)

    async def watch(self, prefix: str, *, after_revision: int) -> AsyncIterator[WatchEvent]:
        store = await self._answer()
        if after_revision < store.compacted:
            raise RevisionCompacted(after_revision, store.compacted)
        queue: asyncio.Queue = asyncio.Queue()
        # Subscribe and copy the backlog without awaiting in between: no event is missed.
        store.watchers.add(queue)
        self._queues.add(queue)
        backlog = [e for e in store.history if e.revision > after_revision]
        last = after_revision
        try:
            for event in backlog:
                if event.key.startswith(prefix):
                    yield event
                last = event.revision
            while True:
                item = await queue.get()
                while store.hung and not self.closed:
                    await asyncio.sleep(HUNG_POLL)
                if item is _CLOSED:
                    self._check()
                    raise KVStoreUnavailable(f"memory store {store.name!r} is unavailable")
                if item.revision <= last:
                    continue
                last = item.revision
                if item.key.startswith(prefix):
                    yield item
        finally:
            store.watchers.discard(queue)
            self._queues.discard(queue)

    async def grant_lease(self, ttl: float) -> Lease:
        return (await self._answer()).grant(ttl)

    async def keepalive(self, lease: Lease) -> None:
        (await self._answer()).keepalive(lease)

    async def revoke(self, lease: Lease) -> None:
        (await self._answer()).end_lease(lease.id)

    @contextlib.asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        store = await self._answer()
        mutex = store.locks.setdefault(name, asyncio.Lock())
        async with mutex:
            yield

    def status(self) -> KVStoreStatus:
        store = self.store
        connected = not self.closed and store.available
        state = "connected" if connected else ("closed" if self.closed else "unavailable")
        return KVStoreStatus(
            connected,
            f"memory: store {store.name!r} {state}, {len(store.data)} keys,"
            f" revision {store.revision}, {len(store.leases)} leases",
        )

    async def close(self) -> None:
        self.closed = True
        for queue in list(self._queues):
            queue.put_nowait(_CLOSED)
