"""The KVStoreMesh cache without servers: its key layout both ways, the writer's copy (checked
as agents check, batched, with canaries), and an agent reading a cache holding garbage."""

import asyncio
import uuid

import pytest
from test_hostile_remote import GOOD_LABELS, LOCAL, new_sync

from meshagent.clustermesh.cache import CacheLayout, CacheReader, SharedWatch
from meshagent.clustermesh.sync import KINDS, ClusterSync
from meshagent.kvstore import KVStore, KVStoreUnavailable, RevisionCompacted
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstoremesh.writer import CacheWriter
from meshagent.model.cluster import ClusterConfig
from meshagent.model.identity import format_labels
from meshagent.model.ipcache import IPCache
from meshagent.model.table import Table, Tables
from meshagent.plugins.memory.store import MemoryKVStore, shared_store
from meshagent.testing import eventually

C2 = 102 << 16
LABELS = format_labels(GOOD_LABELS).encode()


def test_cache_keys_follow_cilium_layout_both_ways():
    cases = [(kvkeys.NODES, kvkeys.node_key("cluster2", "n1"),
              "cilium/cache/nodes/v1/cluster2/n1"),
             (kvkeys.IDENTITIES, kvkeys.identity_key(C2 + 300),
              f"cilium/cache/identities/v1/cluster2/id/{C2 + 300}"),
             (kvkeys.IPCACHE, kvkeys.ipcache_key("10.2.1.5"),
              "cilium/cache/ip/v1/cluster2/10.2.1.5"),
             (kvkeys.SERVICES, kvkeys.service_key("cluster2", "default", "db"),
              "cilium/cache/services/v1/cluster2/default/db")]
    for prefix, state, cache in cases:
        layout = CacheLayout(prefix, "cluster2")
        assert layout.to_cache(state) == cache
        assert layout.to_state(cache) == state
        assert cache.startswith(layout.prefix)
    assert CacheLayout(kvkeys.IDENTITIES, "cluster2").prefix == \
        "cilium/cache/identities/v1/cluster2/id/"
    assert CacheLayout(kvkeys.NODES, "cluster2").canary == \
        "cilium/synced/cluster2/cilium/cache/nodes/v1"
    # meshagent before 0.2 wrote its ipcache under the cluster's name: cached the same way
    assert CacheLayout(kvkeys.IPCACHE, "cluster2").to_cache(
        kvkeys.legacy_ipcache_key("cluster2", "10.2.1.5")) == "cilium/cache/ip/v1/cluster2/10.2.1.5"
    with pytest.raises(ValueError):  # another cluster's key is never copied as cluster2's
        CacheLayout(kvkeys.NODES, "cluster2").to_cache(kvkeys.node_key("cluster3", "n1"))
    with pytest.raises(ValueError):
        CacheLayout(kvkeys.NODES, "cluster2").to_state("cilium/cache/nodes/v1/cluster3/n1")


def test_cluster_config_json_is_ciliums():
    config = ClusterConfig(7, synced_canaries=True, cached=True, max_connected_clusters=255)
    assert config.to_json() == (b'{"id": 7, "capabilities": {"syncedCanaries": true,'
                                b' "cached": true, "maxConnectedClusters": 255}}')
    assert ClusterConfig(7).to_json() == b'{"id": 7}'


def remote_store() -> MemoryKVStore:
    return MemoryKVStore(shared_store(f"remote-{uuid.uuid4().hex[:8]}"))


async def run_writer(writer: CacheWriter, remote: MemoryKVStore):
    synced = asyncio.Event()
    task = asyncio.create_task(writer.run(remote, synced.set))
    await asyncio.wait_for(synced.wait(), 5)
    return task


async def test_the_writer_copies_what_agents_accept_and_deletes_what_went(memory_kvstore):
    remote, local = remote_store(), memory_kvstore
    good, bad = kvkeys.identity_key(C2 + 300), kvkeys.identity_key(C2 - 5)
    await remote.put(good, LABELS)
    await remote.put(bad, LABELS)  # outside cluster2's range
    for n in range(600):  # more than one batch
        await remote.put(kvkeys.identity_key(C2 + 1000 + n), LABELS)
    writer = CacheWriter("cluster2", ClusterConfig(102), LOCAL, local)
    task = await run_writer(writer, remote)
    layout = CacheLayout(kvkeys.IDENTITIES, "cluster2")
    # the canary came after the whole listing was written
    assert len((await local.list_prefix(layout.prefix)).items) == 601
    assert (await local.get(layout.to_cache(good))).value == LABELS
    assert await local.get(f"cilium/cache/identities/v1/cluster2/id/{C2 - 5}") is None
    assert writer.checks.rejected["identities"] == 1
    assert writer.counts()["identities"] == 601
    await remote.delete(good)
    await eventually(lambda: writer.counts()["identities"] == 600, 5, "deleted")
    await eventually(lambda: not writer.reflectors[1].pending, 5, "written")
    assert await local.get(layout.to_cache(good)) is None
    task.cancel()
    await remote.close()


async def test_a_restarted_writer_deletes_what_went_and_rewrites_nothing(memory_kvstore):
    remote, local = remote_store(), memory_kvstore
    layout = CacheLayout(kvkeys.IDENTITIES, "cluster2")
    stays, goes = kvkeys.identity_key(C2 + 300), kvkeys.identity_key(C2 + 301)
    for key in (stays, goes):
        await local.put(layout.to_cache(key), LABELS)
    await local.put(layout.prefix + "not-a-number/x", LABELS)  # garbage in our prefix
    before = await local.get(layout.to_cache(stays))
    await remote.put(stays, LABELS)
    writer = CacheWriter("cluster2", ClusterConfig(102), LOCAL, local)
    task = await run_writer(writer, remote)
    await eventually(lambda: not writer.reflectors[1].pending, 5, "written")
    assert await local.get(layout.to_cache(goes)) is None
    assert await local.get(layout.prefix + "not-a-number/x") is None
    assert (await local.get(layout.to_cache(stays))).mod_revision == before.mod_revision
    task.cancel()
    await remote.close()


def test_a_cache_of_a_cache_is_refused():
    from meshagent.clustermesh.mesh import ClusterConfigError
    with pytest.raises(ClusterConfigError, match="KVStoreMesh cache"):
        CacheWriter("cluster2", ClusterConfig(102, cached=True), LOCAL, None)


async def test_an_agent_reading_the_cache_judges_it_as_it_judges_a_cluster(memory_kvstore):
    """A cache holding what KVStoreMesh would never write (a foreign cluster's node, an
    identity outside the range, a key of no kind) widens nothing, and the agent neither lists
    a kind nor is ready before its canary says the copy is complete (as Cilium's watchers)."""
    store = memory_kvstore
    sync, tables = new_sync()
    sync.switch_source(True)
    ids = CacheLayout(kvkeys.IDENTITIES, "cluster2")
    await store.put(ids.to_cache(kvkeys.identity_key(C2 + 300)), LABELS)
    await store.put(ids.to_cache(kvkeys.identity_key(C2 - 5)), LABELS)
    await store.put(ids.prefix + "../../nodes/v1/cluster2/x", LABELS)
    await store.put("cilium/cache/nodes/v1/cluster2/n9", b'{"name": "n9", "cluster": "cluster3"}')
    ready = asyncio.Event()
    task = asyncio.create_task(sync.run(store, ready.set))
    await asyncio.sleep(0.3)
    assert not ready.is_set() and not any(p.synced for p in sync.prefixes)  # no canaries yet
    assert len(tables.identities) == 0
    for kind in KINDS:
        await store.put(CacheLayout(kind.prefix, "cluster2").canary, b"2026-11-30T10:00:00Z")
    await asyncio.wait_for(ready.wait(), 5)
    assert [i.id for i in tables.identities.values()] == [C2 + 300]
    assert tables.nodes.count("cluster2") == 0
    assert sync.checks.rejected["identities"] == 2 and sync.checks.rejected["nodes"] == 1
    task.cancel()


async def test_switching_to_the_cache_keeps_every_row(memory_kvstore):
    """An agent whose remote moves behind KVStoreMesh lists the cache and keeps the rows it
    finds there: no withdrawal in between."""
    store = memory_kvstore
    sync, tables = new_sync()
    state_key = kvkeys.identity_key(C2 + 300)
    await store.put(state_key, LABELS)
    task = asyncio.create_task(sync.run(store, lambda: None))
    await eventually(lambda: tables.identities.get(C2 + 300) is not None, 5, "direct")
    task.cancel()
    deleted = []
    await store.put(CacheLayout(kvkeys.IDENTITIES, "cluster2").to_cache(state_key), LABELS)
    sync.switch_source(True)
    original = tables.identities.delete

    def spy(key, cluster):
        deleted.append(key)
        return original(key, cluster)
    tables.identities.delete = spy
    task = asyncio.create_task(sync.run(store, lambda: None))
    await asyncio.sleep(0.2)  # waiting for the cache's canaries: the rows stay meanwhile
    assert deleted == [] and tables.identities.get(C2 + 300) is not None
    for kind in KINDS:
        await store.put(CacheLayout(kind.prefix, "cluster2").canary, b"2026-11-30T10:00:00Z")
    await eventually(lambda: all(p.synced for p in sync.prefixes), 5, "listed the cache")
    assert deleted == [] and tables.identities.get(C2 + 300) is not None
    task.cancel()


# -- an agent reading every remote from the cache: one watch per kind ------------------------------

C3 = 103 << 16


def cached_sync(name: str, cluster_id: int) -> tuple[ClusterSync, Tables]:
    tables = Tables(nodes=Table("node", lambda k, v: None),
                    identities=Table("identity", lambda k, v: None),
                    ipcache=IPCache("cluster1", lambda k, v: None),
                    services=Table("service", lambda k, v: None))
    return ClusterSync(name, cluster_id, LOCAL, tables, cached=True), tables


def labels_of(cluster: str) -> bytes:
    return format_labels(frozenset({"k8s:app=db", "k8s:io.kubernetes.pod.namespace=default",
                                    f"k8s:io.cilium.k8s.policy.cluster={cluster}"})).encode()


def cached_identity(cluster: str, number: int) -> str:
    return CacheLayout(kvkeys.IDENTITIES, cluster).to_cache(kvkeys.identity_key(number))


async def put_canaries(store, cluster: str) -> None:
    for kind in KINDS:
        await store.put(CacheLayout(kind.prefix, cluster).canary, b"2026-12-07T10:00:00Z")


async def start(sync: ClusterSync, store) -> tuple[asyncio.Task, asyncio.Event]:
    synced = asyncio.Event()
    return asyncio.create_task(sync.run(store, synced.set)), synced


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_every_cached_cluster_is_watched_through_one_watch_per_kind(memory_kvstore):
    """Two clusters read from the cache hold four watches of the store, not eight; each gets
    its own entries and no other's."""
    store, server = memory_kvstore, memory_kvstore.store
    for cluster, base in (("cluster2", C2), ("cluster3", C3)):
        await store.put(cached_identity(cluster, base + 300), labels_of(cluster))
        await put_canaries(store, cluster)
    counts = {}
    for through in ("store", "reader"):
        reader = CacheReader(store)
        assert isinstance(reader, KVStore)  # what a remote's follower is given
        (s2, t2), (s3, t3) = cached_sync("cluster2", 102), cached_sync("cluster3", 103)
        (task2, synced2), (task3, synced3) = [await start(s, reader if through == "reader"
                                                          else store) for s in (s2, s3)]
        await asyncio.wait_for(asyncio.gather(synced2.wait(), synced3.wait()), 5)
        await store.put(cached_identity("cluster3", C3 + 301), labels_of("cluster3"))
        await eventually(lambda t3=t3: t3.identities.get(C3 + 301) is not None, 5, "the change")
        counts[through] = len(server.watchers)
        assert sorted(t2.identities) == [C2 + 300]
        assert sorted(t3.identities) == [C3 + 300, C3 + 301]
        await stop(task2)
        await stop(task3)
        await store.delete(cached_identity("cluster3", C3 + 301))
    assert counts == {"store": 8, "reader": 4}
    await eventually(lambda: not server.watchers, 5, "no reader, no watch")


async def test_with_one_watch_each_cluster_keeps_its_canaries_and_its_withdrawal(memory_kvstore):
    """cluster3's canaries missing: only cluster2's entries are applied, and cluster3 is not
    synced until they come. cluster2 withdrawn: only its entries go, and cluster3's changes
    still arrive. A key naming a cluster nobody reads is applied to no one and counted."""
    store = memory_kvstore
    reader = CacheReader(store)
    (s2, t2), (s3, t3) = cached_sync("cluster2", 102), cached_sync("cluster3", 103)
    await store.put(cached_identity("cluster2", C2 + 300), labels_of("cluster2"))
    await store.put(cached_identity("cluster3", C3 + 300), labels_of("cluster3"))
    await put_canaries(store, "cluster2")
    (task2, synced2), (task3, synced3) = await start(s2, reader), await start(s3, reader)
    await asyncio.wait_for(synced2.wait(), 5)
    await store.put(cached_identity("cluster2", C2 + 301), labels_of("cluster2"))
    await store.put(cached_identity("cluster3", C3 + 301), labels_of("cluster3"))
    await eventually(lambda: t2.identities.get(C2 + 301) is not None, 5, "cluster2's change")
    assert len(t3.identities) == 0 and not synced3.is_set()
    assert not any(s3.synced.values())

    await put_canaries(store, "cluster3")
    await asyncio.wait_for(synced3.wait(), 5)
    assert sorted(t3.identities) == [C3 + 300, C3 + 301]

    # a key of a cluster not read from the cache, and one under cluster2's prefix naming
    # cluster3's identity (which cluster2's checks refuse): neither lands anywhere
    ignored = reader.ignored  # cluster3's change before it read: nobody was reading it
    await store.put(cached_identity("cluster9", (109 << 16) + 300), labels_of("cluster9"))
    await store.put(cached_identity("cluster2", C3 + 302), labels_of("cluster3"))
    await store.put("cilium/cache/ip/v1/cluster9/10.9.0.1", b'{"IP": "10.9.0.1", "ID": 300}')
    await eventually(lambda: s2.checks.rejected["identities"] == 1, 5, "refused by cluster2")
    await eventually(lambda: reader.ignored == ignored + 2, 5, "cluster9's keys counted")
    assert sorted(t2.identities) == [C2 + 300, C2 + 301]
    assert sorted(t3.identities) == [C3 + 300, C3 + 301]
    assert t2.identities.count("cluster9") == 0 and len(t2.ipcache) == 0

    await stop(task2)  # cluster2 leaves the mesh
    s2.withdraw()
    assert len(t2.identities) == 0 and sorted(t3.identities) == [C3 + 300, C3 + 301]
    await store.put(cached_identity("cluster2", C2 + 303), labels_of("cluster2"))
    await store.delete(cached_identity("cluster3", C3 + 300))
    await eventually(lambda: sorted(t3.identities) == [C3 + 301], 5, "cluster3's change")
    assert len(t2.identities) == 0
    await stop(task3)


async def test_a_cluster_listed_behind_the_shared_watch_gets_what_it_passed(memory_kvstore):
    """A reader joining with a revision the running watch has passed gets every change after
    it (the watch starts again from there), and the reader already there gets none twice."""
    store = memory_kvstore
    shared = SharedWatch(store, "cilium/cache/identities/v1/")
    start_revision = await store.put("cilium/cache/identities/v1/cluster2/id/1", b"a")
    got2, got3 = [], []

    async def read(prefix, after, into):
        async for event in shared.watch(prefix, after_revision=after):
            into.append((event.key, event.revision))
    t2 = asyncio.create_task(read("cilium/cache/identities/v1/cluster2/id/", start_revision,
                                  got2))
    await asyncio.sleep(0.05)
    r3 = await store.put("cilium/cache/identities/v1/cluster3/id/7", b"b")
    r2 = await store.put("cilium/cache/identities/v1/cluster2/id/2", b"c")
    await eventually(lambda: len(got2) == 1, 5, "cluster2's change")
    assert shared.ignored == 1  # cluster3's, nobody read it yet
    t3 = asyncio.create_task(read("cilium/cache/identities/v1/cluster3/", start_revision,
                                  got3))
    await eventually(lambda: len(got3) == 1, 5, "the change cluster3 had not seen")
    r4 = await store.put("cilium/cache/identities/v1/cluster3/id/8", b"d")
    await eventually(lambda: len(got3) == 2, 5, "a later change")
    assert got3 == [("cilium/cache/identities/v1/cluster3/id/7", r3),
                    ("cilium/cache/identities/v1/cluster3/id/8", r4)]
    assert got2 == [("cilium/cache/identities/v1/cluster2/id/2", r2)]
    for task in (t2, t3):
        await stop(task)


async def test_one_watch_resumes_after_a_drop_and_lists_again_after_compaction(memory_kvstore):
    """A dropped connection fails every cluster's sync; run again, each resumes where it was
    (a change made meanwhile arrives). Past a compaction, the cluster whose history is gone
    lists again and deletes what did not come back."""
    store, server = memory_kvstore, memory_kvstore.store
    reader = CacheReader(store)
    syncs = {name: cached_sync(name, cid) for name, cid in (("cluster2", 102), ("cluster3", 103))}
    for cluster, base in (("cluster2", C2), ("cluster3", C3)):
        await store.put(cached_identity(cluster, base + 300), labels_of(cluster))
        await put_canaries(store, cluster)
    tasks = {name: (await start(sync, reader))[0] for name, (sync, _) in syncs.items()}
    await eventually(lambda: all(all(s.synced.values()) for s, _ in syncs.values()), 5, "synced")
    t2, t3 = syncs["cluster2"][1], syncs["cluster3"][1]

    server.set_available(False)
    for task in tasks.values():
        with pytest.raises(KVStoreUnavailable):
            await asyncio.wait_for(task, 5)
    server.set_available(True)
    await store.put(cached_identity("cluster2", C2 + 301), labels_of("cluster2"))
    tasks = {name: (await start(sync, reader))[0] for name, (sync, _) in syncs.items()}
    await eventually(lambda: t2.identities.get(C2 + 301) is not None, 5, "resumed")
    assert not any(p.position.revision is None for s, _ in syncs.values() for p in s.prefixes)

    server.set_available(False)
    for task in tasks.values():
        with pytest.raises(KVStoreUnavailable):
            await asyncio.wait_for(task, 5)
    server.set_available(True)
    await store.delete(cached_identity("cluster2", C2 + 300))
    server.compact(server.revision)
    tasks = {name: (await start(sync, reader))[0] for name, (sync, _) in syncs.items()}
    await eventually(lambda: sorted(t2.identities) == [C2 + 301], 5, "listed again")
    await store.put(cached_identity("cluster3", C3 + 301), labels_of("cluster3"))
    await eventually(lambda: sorted(t3.identities) == [C3 + 300, C3 + 301], 5, "watching")
    for task in tasks.values():
        await stop(task)


async def test_a_compacted_history_fails_only_the_reader_that_needed_it(memory_kvstore):
    store = memory_kvstore
    root = "cilium/cache/identities/v1/"
    shared = SharedWatch(store, root)
    old = await store.put(root + "cluster2/id/1", b"a")
    new = await store.put(root + "cluster3/id/1", b"b")
    store.store.compact(new)
    got3 = []

    async def read(prefix, after, into):
        async for event in shared.watch(prefix, after_revision=after):
            into.append(event.revision)
    t3 = asyncio.create_task(read(root + "cluster3/", new, got3))
    await asyncio.sleep(0.05)
    with pytest.raises(RevisionCompacted):
        await asyncio.wait_for(read(root + "cluster2/", old, []), 5)
    later = await store.put(root + "cluster3/id/2", b"c")
    await eventually(lambda: got3 == [later], 5, "cluster3 still watching")
    assert not t3.done()
    await stop(t3)


async def test_on_consul_each_cluster_read_from_the_cache_watches_on_its_own():
    """The Consul client resumes a watch only from a listing of the same prefix: the shared
    watch cannot start, and each cluster watches its own prefixes (as without it), in step."""
    from meshagent.plugins.consul.client import ConsulKVStore
    from meshagent_dev.consul import ConsulStandIn
    server = await ConsulStandIn().start()
    store = ConsulKVStore(server.url)
    await store.connect()
    try:
        reader = CacheReader(store)
        syncs = {name: cached_sync(name, cid) for name, cid in (("cluster2", 102),
                                                                ("cluster3", 103))}
        for cluster, base in (("cluster2", C2), ("cluster3", C3)):
            await store.put(cached_identity(cluster, base + 300), labels_of(cluster))
            await put_canaries(store, cluster)
        tasks = [(await start(sync, reader))[0] for sync, _ in syncs.values()]
        await eventually(lambda: all(all(s.synced.values()) for s, _ in syncs.values()), 10,
                         "synced")
        await store.put(cached_identity("cluster3", C3 + 301), labels_of("cluster3"))
        await store.delete(cached_identity("cluster2", C2 + 300))
        t2, t3 = syncs["cluster2"][1], syncs["cluster3"][1]
        await eventually(lambda: sorted(t3.identities) == [C3 + 300, C3 + 301]
                         and len(t2.identities) == 0, 10, "the changes")
        for task in tasks:
            assert not task.done()
            await stop(task)
    finally:
        await store.close()
        await server.stop()
