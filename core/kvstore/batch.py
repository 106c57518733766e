"""Batched writes for stores without a native batch, and a coalescer for their callers.

:func:`create_each` and :func:`put_each` implement the contract's ``create_many`` and
``put_many`` one key at a time (a store whose only multi-key write is all-or-nothing, like
Consul's transactions, cannot express independent creates in one request). :class:`Coalescer`
gathers the single requests of many concurrent callers into one batch call.
"""

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from meshagent.kvstore.contract import KeyValue, KVStore, Lease

T = TypeVar("T")
R = TypeVar("R")


def check_distinct(items: Sequence[tuple[str, bytes]]) -> None:
    """ValueError if a key occurs twice (create_many and put_many take distinct keys)."""
    keys = {key for key, _ in items}
    if len(keys) != len(items):
        raise ValueError("create_many/put_many: the keys must be distinct")


async def create_each(store: KVStore, items: Sequence[tuple[str, bytes]], *,
                      lease: Lease | None = None) -> list[KeyValue | None]:
    """``create_many`` by one :meth:`create` (and a :meth:`get` when it loses) per key."""
    check_distinct(items)
    results: list[KeyValue | None] = []
    for key, value in items:
        while True:
            if await store.create(key, value, lease=lease):
                results.append(None)
                break
            if (current := await store.get(key)) is not None:
                results.append(current)
                break
            # deleted between the create and the get: try to create it again
    return results


async def put_each(store: KVStore, items: Sequence[tuple[str, bytes]], *,
                   lease: Lease | None = None) -> int:
    """``put_many`` by one :meth:`put` per key."""
    check_distinct(items)
    revision = 0
    for key, value in items:
        revision = max(revision, await store.put(key, value, lease=lease))
    return revision


class Coalescer(Generic[T, R]):
    """Calls ``send`` with every item submitted during one turn of the event loop, as one
    list, and gives each submitter its own result (``send`` returns one per item, in order).
    An exception of ``send`` reaches every submitter of that batch. At most ``limit`` items go
    in one call; batches do not wait for each other."""

    def __init__(self, send: Callable[[list[T]], Awaitable[Sequence[R]]], limit: int = 1000):
        self._send = send
        self._limit = limit
        self._pending: list[tuple[T, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        elif len(self._pending) >= self._limit:
            self._flush()
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)  # referenced until done
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        try:
            results = await self._send([item for item, _ in batch])
            if len(results) != len(batch):  # a submitter must never wait forever
                raise RuntimeError(f"a batch of {len(batch)} got {len(results)} results")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # handed to every submitter
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
