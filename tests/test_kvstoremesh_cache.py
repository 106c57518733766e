"""The KVStoreMesh cache without servers: its key layout both ways, the writer's copy (checked
as agents check, batched, with canaries), and an agent reading a cache holding garbage."""

import asyncio
import uuid

import pytest
from test_hostile_remote import GOOD_LABELS, LOCAL, new_sync

from meshagent.clustermesh.cache import CacheLayout
from meshagent.clustermesh.sync import KINDS
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstoremesh.writer import CacheWriter
from meshagent.model.cluster import ClusterConfig
from meshagent.model.identity import format_labels
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
