"""KVStoreMesh's cache layout: where a remote cluster's state lives in the local kvstore.

Cilium's layout, so a cache written by either side is read by the other: a remote cluster
``C``'s ``cilium/state/<kind>/v1/...`` is copied, values unchanged, under
``cilium/cache/<kind>/v1/C/...`` of the local kvstore. Keys that name the cluster after
``<kind>/v1/`` (nodes, services, ipcache) keep the rest of the key; identity keys get the
cluster inserted (``cilium/cache/identities/v1/C/id/N``). Each kind gets a sync canary
``cilium/synced/C/cilium/cache/<kind>/v1`` once its first listing is copied, and the remote's
``cilium/cluster-config/C`` is copied with the ``cached`` capability, which tells agents to
read ``C`` from the cache.

An agent reading every remote from the cache (``--clustermesh-read-cache``) reads it through a
:class:`CacheReader`: one watch per kind for all the clusters, each cluster still listing,
waiting for its canaries and withdrawing on its own.
"""

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager

import attrs

from meshagent.kvstore import (
    KeyValue,
    KVStore,
    KVStoreError,
    KVStoreStatus,
    KVStoreUnavailable,
    Lease,
    Listing,
    RevisionCompacted,
    WatchEvent,
)
from meshagent.kvstore import keys as kvkeys

STATE, CACHE = "cilium/state/", "cilium/cache/"


class CacheLayout:
    """The cache keys of one kind (given by its state prefix) of one remote cluster. Its
    prefixes are worked out once: an agent reading the cache maps every key it sees."""

    def __init__(self, state_prefix: str, cluster: str):
        self.state_prefix = state_prefix  # e.g. kvkeys.IDENTITIES
        self.cluster = cluster
        kind, version, *_ = state_prefix[len(STATE):].split("/")
        self._state_base = f"{STATE}{kind}/{version}/"
        # the part of the state prefix past <kind>/v1/: "" when keys name their cluster
        # there (nodes, services, ipcache), "id/" for identities
        self._after_version = state_prefix[len(self._state_base):]
        #: ``cilium/cache/<kind>/v1/C/``: everything of this kind of this cluster
        self.base = f"{CACHE}{kind}/{version}/{cluster}/"
        #: what an agent watches: the state prefix's counterpart (``.../C/id/`` for identities)
        self.prefix = self.base + self._after_version
        self.canary = kvkeys.synced_key(cluster, f"{CACHE}{kind}/{version}/")

    def to_cache(self, state_key: str) -> str:
        """A state key of the cluster as its cache key; ValueError if it is not one."""
        if not state_key.startswith(self.state_prefix):
            raise ValueError(f"key {state_key!r} is not under {self.state_prefix}")
        tail = state_key[len(self._state_base):]
        if self._after_version:
            return self.base + tail
        own, _, rest = tail.partition("/")
        if own == kvkeys.IPCACHE_ADDRESS_SPACE and self.state_prefix == kvkeys.IPCACHE:
            own = self.cluster  # Cilium's ipcache keys name the address space instead
        if own != self.cluster or not rest:
            raise ValueError(f"key {state_key!r} does not name cluster {self.cluster!r}")
        return self.base + rest

    def to_state(self, cache_key: str) -> str:
        """The state key a cache key stands for: what an agent decodes and checks."""
        if not cache_key.startswith(self.base):
            raise ValueError(f"key {cache_key!r} is not under {self.base}")
        tail = cache_key[len(self.base):]
        if self._after_version:
            return self._state_base + tail
        if self.state_prefix == kvkeys.IPCACHE:  # Cilium's address space, not the cluster
            return kvkeys.ipcache_key(tail)
        return f"{self._state_base}{self.cluster}/{tail}"


# -- agents reading the cache ---------------------------------------------------------------------


def shared_root(prefix: str) -> str | None:
    """``cilium/cache/<kind>/<version>/`` for a prefix of one cluster under it (the root whose
    one watch serves every cluster), else None."""
    if not prefix.startswith(CACHE):
        return None
    parts = prefix.split("/", 4)  # cilium, cache, kind, version, "<cluster>/..."
    if len(parts) < 5 or not parts[4].partition("/")[0]:
        return None
    return "/".join(parts[:4]) + "/"


_ALONE = object()  # to a reader: watch your prefix on your own


@attrs.define(eq=False)
class _Reader:
    """One caller's watch of a prefix, served by a :class:`SharedWatch`."""

    prefix: str
    revision: int  # of the last event given, or the one it listed at
    # the keys given at that revision (one transaction writes many); None: all of it (listed)
    given: set[str] | None = None
    queue: asyncio.Queue = attrs.field(factory=asyncio.Queue)  # WatchEvent or an exception

    @property
    def after(self) -> int:
        """It has every change up to this revision."""
        return self.revision if self.given is None else self.revision - 1

    def wants(self, event: WatchEvent) -> bool:
        """Whether ``event`` is new to it (and now given)."""
        if event.revision > self.revision:
            self.revision, self.given = event.revision, {event.key}
            return True
        if event.revision == self.revision and self.given is not None \
                and event.key not in self.given:
            self.given.add(event.key)
            return True
        return False


class SharedWatch:
    """One watch of ``root`` (``cilium/cache/ip/v1/``) standing in for the watches of the
    prefixes under it, one per cluster read from the cache: an event goes only to the readers
    whose cluster (the key's segment after ``root``) and prefix it is under, each event once
    and in order; an event of a cluster nobody reads is counted in ``ignored``.

    A reader that needs history the running watch has passed (it listed before the watch got
    where it is) restarts the watch from there; the others skip what they already had. Where
    the watch cannot start (a compacted history; a store that resumes a watch only from a
    listing of the same prefix, as the Consul client does), the readers it could not serve
    watch their own prefixes: a compacted history then makes only them list again. A failed
    watch fails every reader (each cluster reconnects on its own, resuming from the revision
    it reached)."""

    def __init__(self, store: KVStore, root: str):
        self.store = store
        self.root = root
        self.readers: dict[str, list[_Reader]] = {}  # cluster -> its readers
        self.ignored = 0
        self._task: asyncio.Task | None = None  # the watch, while anyone reads
        self._ending: set[asyncio.Task] = set()  # replaced watches, until they have ended
        self._position = 0  # the last revision the running watch reached

    def _cluster(self, key: str) -> str:
        return key[len(self.root):].partition("/")[0]

    async def watch(self, prefix: str, *, after_revision: int) -> AsyncIterator[WatchEvent]:
        """What :meth:`KVStore.watch` yields for ``prefix`` (which must be under the root)."""
        cluster = self._cluster(prefix)
        reader = _Reader(prefix, after_revision)
        self.readers.setdefault(cluster, []).append(reader)
        if self._task is None or after_revision < self._position:
            self._start()
        try:
            while True:
                item = await reader.queue.get()
                if item is _ALONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._remove(cluster, reader)
        # The shared watch cannot start where this reader is: its own watch then, which goes
        # on or says itself that the history is gone (and the reader lists again).
        async for event in self.store.watch(prefix, after_revision=reader.after):
            yield event

    def _remove(self, cluster: str, reader: _Reader) -> None:
        readers = self.readers.get(cluster, [])
        if reader in readers:
            readers.remove(reader)
            if not readers:
                del self.readers[cluster]
        if not self.readers:
            self._stop()  # nobody reads: the watch goes

    def _start(self) -> None:
        """(Re)start the watch after the earliest revision a reader needs (the others skip
        what they were given). A replaced watch checks before each event that it is still
        the running one: a swallowed cancellation must not make two dispatch."""
        self._stop()
        after = min(r.after for readers in self.readers.values() for r in readers)
        self._position = after
        self._task = asyncio.create_task(self._run(after), name=f"watch:{self.root}")

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._ending.add(self._task)  # held until it has ended
            self._task.add_done_callback(self._ending.discard)
            self._task = None

    async def _run(self, after: int) -> None:
        me = asyncio.current_task()
        try:
            async for event in self.store.watch(self.root, after_revision=after):
                if self._task is not me:
                    return
                self._position = event.revision
                readers = self.readers.get(self._cluster(event.key))
                if not readers:
                    self.ignored += 1
                    continue
                for reader in readers:
                    if event.key.startswith(reader.prefix) and reader.wants(event):
                        reader.queue.put_nowait(event)
        except RevisionCompacted as exc:
            if self._task is me:
                self._compacted(exc)
        except Exception as exc:  # noqa: BLE001 - every reader learns of any failure
            if self._task is me:
                self._fail(exc)

    def _compacted(self, exc: RevisionCompacted) -> None:
        """The shared watch cannot start where the readers behind ``exc.compacted`` are:
        those watch on their own; the rest go on together."""
        readers = [r for rs in self.readers.values() for r in rs]
        behind = [r for r in readers if r.after < exc.compacted] or readers
        for reader in behind:
            reader.queue.put_nowait(_ALONE)
            self._forget(reader)
        self._task = None
        if self.readers:
            self._start()

    def _fail(self, exc: Exception) -> None:
        """Every reader fails as its own watch would have."""
        kind = type(exc) if type(exc) in (KVStoreError, KVStoreUnavailable) else None
        message = str(exc) if kind else f"watch of {self.root} failed: {exc!r}"
        for readers in self.readers.values():
            for reader in readers:
                reader.queue.put_nowait((kind or KVStoreUnavailable)(message))
        self.readers.clear()
        self._task = None

    def _forget(self, reader: _Reader) -> None:
        cluster = self._cluster(reader.prefix)
        self.readers[cluster].remove(reader)
        if not self.readers[cluster]:
            del self.readers[cluster]


class CacheReader:
    """The local kvstore as an agent reading every remote from its cache uses it (a
    :class:`KVStore`): a watch of one cluster's ``cilium/cache/<kind>/v1/<cluster>/...`` is
    served by one :class:`SharedWatch` of ``cilium/cache/<kind>/v1/`` for every cluster, so
    the store holds one watch per kind, not one per kind and cluster. Everything else goes
    to the store as it is."""

    def __init__(self, store: KVStore):
        self.store = store
        self.shared: dict[str, SharedWatch] = {}  # root -> its one watch

    @property
    def ignored(self) -> int:
        """Changes under the cache of clusters no one read from it (not configured here, or
        read directly, or between two listings)."""
        return sum(shared.ignored for shared in self.shared.values())

    def watch(self, prefix: str, *, after_revision: int) -> AsyncIterator[WatchEvent]:
        root = shared_root(prefix)
        if root is None:
            return self.store.watch(prefix, after_revision=after_revision)
        shared = self.shared.get(root)
        if shared is None:
            shared = self.shared[root] = SharedWatch(self.store, root)
        return shared.watch(prefix, after_revision=after_revision)

    # -- the rest of the contract, as the store answers it -------------------------------------

    async def connect(self) -> None:
        await self.store.connect()

    async def get(self, key: str) -> KeyValue | None:
        return await self.store.get(key)

    async def list_prefix(self, prefix: str) -> Listing:
        return await self.store.list_prefix(prefix)

    def list_pages(self, prefix: str, page_size: int | None = None) -> AsyncIterator[Listing]:
        # unsaid, the store's own page size (the etcd plugin's differs from PAGE_SIZE)
        if page_size is None:
            return self.store.list_pages(prefix)
        return self.store.list_pages(prefix, page_size)

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        return await self.store.put(key, value, lease=lease)

    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> bool:
        return await self.store.create(key, value, lease=lease)

    async def update_if(self, key: str, value: bytes, *, mod_revision: int,
                        lease: Lease | None = None) -> bool:
        return await self.store.update_if(key, value, mod_revision=mod_revision, lease=lease)

    async def delete(self, key: str) -> bool:
        return await self.store.delete(key)

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        return await self.store.delete_if(key, mod_revision=mod_revision)

    async def delete_prefix(self, prefix: str) -> int:
        return await self.store.delete_prefix(prefix)

    async def create_many(self, items: Sequence[tuple[str, bytes]], *,
                          lease: Lease | None = None) -> list[KeyValue | None]:
        return await self.store.create_many(items, lease=lease)

    async def put_many(self, items: Sequence[tuple[str, bytes]], *,
                       lease: Lease | None = None) -> int:
        return await self.store.put_many(items, lease=lease)

    async def grant_lease(self, ttl: float) -> Lease:
        return await self.store.grant_lease(ttl)

    async def keepalive(self, lease: Lease) -> None:
        await self.store.keepalive(lease)

    async def revoke(self, lease: Lease) -> None:
        await self.store.revoke(lease)

    def lock(self, name: str) -> AbstractAsyncContextManager[None]:
        return self.store.lock(name)

    def status(self) -> KVStoreStatus:
        return self.store.status()

    async def close(self) -> None:
        await self.store.close()
