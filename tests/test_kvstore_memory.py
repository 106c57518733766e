"""The memory backend passes the kvstore contract, and simulates outages and compaction."""

import uuid

import pytest

from meshagent.kvstore import KVStoreUnavailable, RevisionCompacted
from meshagent.plugins.memory.store import MemoryKVStore, shared_store
from meshagent.testing.kvstore_contract import KVStoreContract, client_factory, next_events


class TestMemoryContract(KVStoreContract):
    lease_ttl = 0.5

    @pytest.fixture
    async def new_client(self):
        store = shared_store(f"contract-{uuid.uuid4().hex[:8]}")
        async with client_factory(lambda: MemoryKVStore(store)) as make:
            yield make


async def test_outage_fails_operations_and_watches(memory_kvstore):
    kv = memory_kvstore
    watch = kv.watch("p/", after_revision=0)
    await kv.put("p/a", b"1")
    await next_events(watch, 1)
    kv.store.set_available(False)
    with pytest.raises(KVStoreUnavailable):
        await next_events(watch, 1)
    with pytest.raises(KVStoreUnavailable):
        await kv.get("p/a")
    assert kv.status().connected is False and "unavailable" in kv.status().summary
    kv.store.set_available(True)
    assert (await kv.get("p/a")).value == b"1"


async def test_watch_below_compaction_asks_for_a_relist(memory_kvstore):
    kv = memory_kvstore
    for i in range(5):
        await kv.put(f"p/{i}", b"x")
    kv.store.compact(3)
    with pytest.raises(RevisionCompacted) as info:
        await next_events(kv.watch("p/", after_revision=1), 1)
    assert info.value.compacted == 3
    events = await next_events(kv.watch("p/", after_revision=3), 2)
    assert [e.key for e in events] == ["p/3", "p/4"]
