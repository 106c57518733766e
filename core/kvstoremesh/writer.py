"""Copying one remote cluster into the local kvstore's cache (KVStoreMesh's follower).

Each kind is listed and watched on the remote cluster; every entry is judged by the same
:class:`~meshagent.clustermesh.sync.EntryChecks` an agent uses, and only what it accepts is
written, unchanged, under the cache prefix (:mod:`meshagent.clustermesh.cache`). Writes are
queued per key and flushed in batches (``put_many``: one etcd transaction per 127 keys): a
burst of changes to one key is written once, and a 100,000-entry listing is not 100,000 round
trips. A kind's sync canary is written once
everything its listing produced is in the local kvstore, so an agent reading the cache never
acts on half a cluster.

A restarted writer loads what the cache holds first: the listing then deletes what went while
it was away and rewrites nothing that did not change.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

from meshagent.clustermesh.cache import CacheLayout
from meshagent.clustermesh.mesh import ClusterConfigError
from meshagent.clustermesh.legacy import LegacyIPCache
from meshagent.clustermesh.sync import KINDS, EntryChecks, Kind, SyncCanaries
from meshagent.kvstore import KVStore
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstore.follow import Position, follow_prefix
from meshagent.model.cluster import ClusterConfig, ClusterInfo
from meshagent.runtime.tasks import run_together

log = logging.getLogger(__name__)

BATCH = 256  # writes in flight at once: enough to fill etcd's batches, few enough to be fair
WITHDRAW_RETRY = 1.0


class PrefixReflector:
    """One kind of one remote cluster, copied into the local cache: list, then watch."""

    def __init__(self, checks: EntryChecks, kind: Kind, local: KVStore,
                 canaries: SyncCanaries | None):
        self.checks, self.kind, self.local = checks, kind, local
        self.canaries = canaries  # the remote's, when it writes them
        self.cache = CacheLayout(kind.prefix, checks.cluster)
        self.remote_canary = kvkeys.synced_key(checks.cluster, kind.canary)
        self.legacy = (LegacyIPCache(checks.cluster, self._apply, lambda key: key in self.copied)
                       if kind.prefix == kvkeys.IPCACHE else None)
        self.position = Position()
        self.copied: dict[str, bytes] = {}  # state key -> value in (or on its way to) the cache
        self.pending: dict[str, bytes | None] = {}  # cache key -> value to write (None: delete)
        self.written = asyncio.Event()  # set whenever ``pending`` is empty and nothing in flight
        self.written.set()
        self._queued = asyncio.Event()
        self.synced = False
        self.writes = 0
        self.last_event_at: float | None = None

    async def load(self) -> None:
        """What the cache already holds, as if this writer had copied it."""
        listing = await self.local.list_prefix(self.cache.prefix)
        for item in listing.items:
            try:
                self.copied[self.cache.to_state(item.key)] = item.value
            except ValueError:
                self._queue(item.key, None)  # not a key this kind has: not ours to keep

    async def run(self, remote: KVStore, on_synced: Callable[[], None]) -> None:
        """Copy until the remote (or the local) store fails."""
        listed = asyncio.Event()

        async def canary() -> None:
            while True:
                await listed.wait()
                listed.clear()
                await self.written.wait()  # all the listing produced is in the cache
                await self.local.put(self.cache.canary, kvkeys.rfc3339_now())
                self.synced = True
                on_synced()

        if self.canaries is not None and self.position.revision is None:
            await self.canaries.seen(self.remote_canary)  # the remote's copy is complete
        legacy = self.legacy
        async with asyncio.TaskGroup() as tasks:
            helpers = [tasks.create_task(self._write(), name=f"cache-write:{self.kind.name}"),
                       tasks.create_task(canary(), name=f"cache-canary:{self.kind.name}")]
            try:
                await follow_prefix(remote, self.kind.prefix,
                                    legacy.apply if legacy else self._apply,
                                    lambda: [*self.copied, *(legacy.keys() if legacy else ())],
                                    listed.set, self.position)
            finally:
                for helper in helpers:
                    helper.cancel()

    def _apply(self, key: str, value: bytes | None) -> None:
        self.last_event_at = time.time()
        if value is None:
            if self.copied.pop(key, None) is not None:
                self._queue(self.cache.to_cache(key), None)
            return
        if self.checks.decode(self.kind, key, value) is None:
            return  # rejected and counted; what the cache had for the key stays
        if self.copied.get(key) != value:
            self.copied[key] = value
            self._queue(self.cache.to_cache(key), value)

    def _queue(self, cache_key: str, value: bytes | None) -> None:
        self.pending.pop(cache_key, None)  # a key changed again goes to the back of the line
        self.pending[cache_key] = value
        self.written.clear()
        self._queued.set()

    async def _write(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self.pending:
                batch = [(key, self.pending.pop(key))
                         for key in list(itertools.islice(self.pending, BATCH))]  # oldest first
                puts = [(key, value) for key, value in batch if value is not None]
                try:  # the puts in one round trip (put_many), the deletes side by side
                    await asyncio.gather(self.local.put_many(puts),
                                         *(self.local.delete(k) for k, v in batch if v is None))
                except BaseException:
                    for key, value in batch:  # to be written by the next run
                        self.pending.setdefault(key, value)
                    raise
                self.writes += len(batch)
            self.written.set()

    def relist(self) -> None:
        self.position.revision = None

    async def remove(self) -> None:
        """Delete this kind's cache and canary, and forget what was copied."""
        await self.local.delete_prefix(self.cache.base)
        await self.local.delete(self.cache.canary)
        self.copied.clear()
        if self.legacy is not None:
            self.legacy.clear()
        self.pending.clear()
        self.synced = False


class CacheWriter:
    """KVStoreMesh's follower of one remote cluster: every kind, into the local cache, and
    the cluster's config with the ``cached`` capability (what makes agents read the cache)."""

    cached = False  # it reads the remote's own state, never a cache

    def __init__(self, cluster: str, config: ClusterConfig, local_cluster: ClusterInfo,
                 local: KVStore, previous: "CacheWriter | None" = None):
        self.switch_source(config.cached)
        self.cluster = cluster
        self.cluster_id = config.id
        self.config = ClusterConfig(config.id, synced_canaries=True, cached=True,
                                    max_connected_clusters=config.max_connected_clusters
                                    or local_cluster.max_connected_clusters)
        self.local = local
        self.checks = EntryChecks(cluster, config.id, local_cluster, remote=True)
        # a remote that writes sync canaries is copied kind by kind once each is there
        self.canaries = SyncCanaries(cluster) if config.synced_canaries else None
        self.reflectors = [PrefixReflector(self.checks, kind, local, self.canaries)
                           for kind in KINDS]
        self.held: dict[str, int] = {}  # nothing waits: pod CIDRs are the agents' to check
        self._loaded = False
        self._withdrawal: asyncio.Task | None = None
        # the cluster's writer before this one (a new id, or a file removed and added back):
        # its withdrawal must be over before this one writes, or it would delete the new copy
        self._previous = previous

    @property
    def synced(self) -> dict[str, bool]:
        return {r.kind.name: r.synced for r in self.reflectors}

    @property
    def last_event_at(self) -> float | None:
        return max((r.last_event_at for r in self.reflectors if r.last_event_at), default=None)

    @property
    def writes(self) -> int:
        """Keys written to (or deleted from) the cache so far."""
        return sum(r.writes for r in self.reflectors)

    def counts(self) -> dict[str, int]:
        return {r.kind.name: len(r.copied) for r in self.reflectors}

    async def run(self, remote: KVStore, on_synced: Callable[[], None]) -> None:
        if self._previous is not None:
            await self._previous.withdrawn()
            self._previous = None
        if not self._loaded:
            for reflector in self.reflectors:
                await reflector.load()
            self._loaded = True
        key = kvkeys.cluster_config_key(self.cluster)
        current = await self.local.get(key)
        if current is None or current.value != self.config.to_json():
            await self.local.put(key, self.config.to_json())

        def one_synced() -> None:
            if all(r.synced for r in self.reflectors):
                on_synced()
        work = {f"cache:{self.cluster}:{r.kind.name}": r.run(remote, one_synced)
                for r in self.reflectors}
        if self.canaries is not None:
            work[f"cache:{self.cluster}:canaries"] = self.canaries.follow(
                remote, {r.kind: r.remote_canary for r in self.reflectors}, older=True)
        await run_together(work)

    def switch_source(self, cached: bool) -> None:
        """Refuses a cluster whose config says it is a cache: KVStoreMesh copies clusters
        from their own kvstore, never a copy of a copy."""
        if cached:
            raise ClusterConfigError("its cluster config says it is a KVStoreMesh cache:"
                                     " KVStoreMesh reads clusters from their own kvstore")

    def relist(self) -> None:
        if self.canaries is not None:
            self.canaries.clear()
        for reflector in self.reflectors:
            reflector.relist()

    def readmit(self) -> None:
        """Nothing is held back by pod CIDR here."""

    def withdraw(self) -> None:
        """The cluster left the mesh: its config goes first (agents stop reading it), then
        its cache and canaries. Retried in the background until the local kvstore takes it."""
        if self._withdrawal is None or self._withdrawal.done():
            self._withdrawal = asyncio.get_running_loop().create_task(
                self._withdraw(), name=f"cache-withdraw:{self.cluster}")

    async def withdrawn(self) -> None:
        """Returns once a withdrawal begun, if any, is over."""
        if self._withdrawal is not None:
            await asyncio.shield(self._withdrawal)

    async def _withdraw(self) -> None:
        while True:
            try:
                await self.local.delete(kvkeys.cluster_config_key(self.cluster))
                for reflector in self.reflectors:
                    await reflector.remove()
                log.info("kvstoremesh: removed the cache of cluster %s", self.cluster)
                return
            except Exception as exc:
                log.warning("kvstoremesh: cannot remove the cache of cluster %s yet: %s",
                            self.cluster, exc)
                await asyncio.sleep(WITHDRAW_RETRY)
