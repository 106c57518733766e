"""Consul behind the kvstore contract (py-consul's asyncio client).

Mapping: revisions are Consul's indexes (``ModifyIndex`` per key, ``X-Consul-Index`` for a
listing); compare-and-swap is ``?cas=``; a lease is a session with a TTL and behavior
``delete`` that keys are acquired by; a watch is a loop of blocking queries.

Consul keeps no history: a blocking query returns the current state, so a watch reports the
difference from the state it last saw. Changes between two answers are coalesced (a key put
and deleted in between shows as one delete), and a watch can resume only from the revision it
reached last — an older revision raises RevisionCompacted, and the caller lists again.
"""

import asyncio
import itertools
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

import aiohttp
import consul.aio
from consul.exceptions import ConsulException

from meshagent.plugin import (
    EventType,
    KVStoreError,
    KVStoreStatus,
    KVStoreUnavailable,
    KeyValue,
    Lease,
    LeaseExpired,
    Listing,
    PAGE_SIZE,
    RevisionCompacted,
    WatchEvent,
    create_each,
    kv_lock,
    pages_of,
    put_each,
)

MIN_TTL = 10  # Consul refuses shorter session TTLs
REQUEST_TIMEOUT = 5.0
LIST_TIMEOUT = 30.0  # a large cluster's full listing is one response
WAIT = 5.0  # seconds a blocking query may wait for a change
# Consul adds up to WAIT/16 of jitter; past this a long-poll has stalled (a hung server, a
# dropped connection) and the watch ends so it can be made again
WAIT_TIMEOUT = WAIT * 17 / 16 + REQUEST_TIMEOUT
SNAPSHOTS = 16
_CONNECTION_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


class ConsulKVStore:
    """One client of one Consul cluster; meets :class:`meshagent.kvstore.KVStore`."""

    def __init__(self, address: str, token: str | None = None):
        parts = urlsplit(address if "://" in address else f"http://{address}")
        self.address = f"{parts.scheme}://{parts.hostname}:{parts.port or 8500}"
        self.host = parts.hostname
        self._consul = consul.aio.Consul(host=parts.hostname, port=parts.port or 8500,
                                         scheme=parts.scheme, token=token)
        self._sessions: dict[int, str] = {}
        self._ids = itertools.count(1)
        # (prefix, revision) -> {key: ModifyIndex}: the states a watch can resume from
        self._snapshots: OrderedDict[tuple[str, int], dict[str, int]] = OrderedDict()
        self.connected = False
        self.closed = False
        self.leader = ""
        self.last_error = ""

    async def _call(self, coroutine, timeout: float = REQUEST_TIMEOUT):
        if self.closed:
            coroutine.close()
            raise KVStoreUnavailable("client is closed")
        try:
            result = await asyncio.wait_for(coroutine, timeout)
        except asyncio.TimeoutError:
            self.connected = False
            self.last_error = f"{self.address}: no answer within {timeout:.0f}s"
            raise KVStoreUnavailable(self.last_error) from None
        except _CONNECTION_ERRORS as exc:
            self.connected = False
            self.last_error = f"{self.address}: {exc or type(exc).__name__}"
            raise KVStoreUnavailable(self.last_error) from None
        except ConsulException as exc:
            raise KVStoreError(f"{self.address}: {exc}") from None
        self.connected = True
        return result

    async def connect(self) -> None:
        self.leader = await self._call(self._consul.status.leader())

    def _kv(self, item: dict) -> KeyValue:
        session = item.get("Session")
        lease = next((i for i, s in self._sessions.items() if s == session), None)
        return KeyValue(item["Key"], item.get("Value") or b"", item["ModifyIndex"],
                        item["CreateIndex"], lease)

    async def get(self, key: str) -> KeyValue | None:
        _, item = await self._call(self._consul.kv.get(key))
        return self._kv(item) if item else None

    async def list_prefix(self, prefix: str) -> Listing:
        index, items = await self._call(self._consul.kv.get(prefix, recurse=True), LIST_TIMEOUT)
        items = items or []
        self._remember(prefix, int(index), {i["Key"]: i["ModifyIndex"] for i in items})
        return Listing([self._kv(i) for i in items], int(index))

    async def list_pages(self, prefix: str, page_size: int = PAGE_SIZE):
        async for page in pages_of(await self.list_prefix(prefix), page_size):
            yield page

    def _remember(self, prefix: str, revision: int, state: dict[str, int]) -> None:
        self._snapshots[(prefix, revision)] = dict(state)
        self._snapshots.move_to_end((prefix, revision))
        while len(self._snapshots) > SNAPSHOTS:
            self._snapshots.popitem(last=False)

    async def _put(self, key: str, value: bytes, lease: Lease | None, **kwargs) -> bool:
        if lease is not None:
            if lease.id not in self._sessions:
                raise LeaseExpired(f"lease {lease.id} is gone")
            kwargs["acquire"] = self._sessions[lease.id]
        try:
            return await self._call(self._consul.kv.put(key, value, **kwargs))
        except KVStoreError as exc:
            if lease is not None and "session" in str(exc).lower():
                raise LeaseExpired(str(exc)) from None
            raise

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        if not await self._put(key, value, lease):
            raise KVStoreError(f"{key} is held by another session")
        return (await self.get(key)).mod_revision

    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> bool:
        return await self._put(key, value, lease, cas=0)

    async def update_if(self, key: str, value: bytes, *, mod_revision: int,
                        lease: Lease | None = None) -> bool:
        return await self._put(key, value, lease, cas=mod_revision)

    async def create_many(self, items: Sequence[tuple[str, bytes]], *,
                          lease: Lease | None = None) -> list[KeyValue | None]:
        # Consul's /v1/txn is all-or-nothing: one failed cas would undo the other creates
        return await create_each(self, items, lease=lease)

    async def put_many(self, items: Sequence[tuple[str, bytes]], *,
                       lease: Lease | None = None) -> int:
        return await put_each(self, items, lease=lease)

    async def delete(self, key: str) -> bool:
        current = await self.get(key)
        return current is not None and await self.delete_if(key,
                                                            mod_revision=current.mod_revision)

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        return await self._call(self._consul.kv.delete(key, cas=mod_revision))

    async def delete_prefix(self, prefix: str) -> int:
        count = len((await self.list_prefix(prefix)).items)
        await self._call(self._consul.kv.delete(prefix, recurse=True))
        return count

    async def watch(self, prefix: str, *, after_revision: int) -> AsyncIterator[WatchEvent]:
        state = self._snapshots.get((prefix, after_revision))
        if state is None:
            raise RevisionCompacted(after_revision, after_revision + 1)
        index = after_revision
        while True:
            new_index, items = await self._call(self._consul.kv.get(
                prefix, recurse=True, index=index, wait=f"{WAIT:.0f}s"), WAIT_TIMEOUT)
            new_index = int(new_index)
            if new_index == index:
                continue  # the wait ran out with no change
            if new_index < index:  # Consul's index went backwards (a restore): list again
                raise RevisionCompacted(index, new_index)
            current = {i["Key"]: i for i in items or []}
            events = [WatchEvent(EventType.PUT, k, i.get("Value") or b"", i["ModifyIndex"])
                      for k, i in current.items() if state.get(k) != i["ModifyIndex"]]
            events += [WatchEvent(EventType.DELETE, k, None, new_index)
                       for k in state if k not in current]
            events.sort(key=lambda e: (e.revision, e.key))
            state = {k: i["ModifyIndex"] for k, i in current.items()}
            index = new_index
            self._remember(prefix, index, state)
            for event in events:
                if event.revision < index:  # resuming from here must see what came after
                    self._remember(prefix, event.revision, state)
                yield event

    async def grant_lease(self, ttl: float) -> Lease:
        seconds = max(MIN_TTL, math.ceil(ttl))
        session = await self._call(self._consul.session.create(
            ttl=seconds, behavior="delete", lock_delay=0))
        lease = Lease(next(self._ids), float(seconds))
        self._sessions[lease.id] = session
        return lease

    async def keepalive(self, lease: Lease) -> None:
        session = self._sessions.get(lease.id)
        try:
            renewed = await self._call(self._consul.session.renew(session)) if session else None
        except KVStoreError as exc:
            if "not found" not in str(exc).lower():
                raise
            renewed = None
        if not renewed:
            self._sessions.pop(lease.id, None)
            raise LeaseExpired(f"lease {lease.id} (session {session}) is gone")

    async def revoke(self, lease: Lease) -> None:
        session = self._sessions.pop(lease.id, None)
        if session:
            await self._call(self._consul.session.destroy(session))

    def lock(self, name: str):
        return kv_lock(self, name)

    def status(self) -> KVStoreStatus:
        connected = self.connected and not self.closed
        if connected:
            summary = (f"consul: connected to {self.address}, leader {self.leader},"
                       f" sessions={len(self._sessions)}")
        else:
            state = "closed" if self.closed else (self.last_error or "not connected yet")
            summary = f"consul: not connected: {state}"
        return KVStoreStatus(connected, summary, addresses=(self.host,))

    async def close(self) -> None:
        self.closed = True
        self.connected = False
        await self._consul.http.close()
