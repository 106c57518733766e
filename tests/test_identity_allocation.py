"""Identity allocation against a real etcd: race-free across agents, released, collected."""

import asyncio
import time

import pytest

from meshagent.identity.allocator import reserved_identity
from meshagent.kvstore import keys as kvkeys
from meshagent.model.identity import ReservedIdentity, format_labels
from meshagent.testing.identity_contract import labels
from meshagent_dev.etcd import EtcdServer

CLUSTER = ["--cluster-name", "cluster1", "--cluster-id", "101"]


@pytest.fixture
async def etcd_agents(short_tmp, agent_factory):
    server = EtcdServer("ids").start()
    config = server.client_config(short_tmp / "etcd.yaml")
    started = []

    async def start(n: int, *extra: str):
        for _ in range(n):
            started.append(await agent_factory(
                ["--plugins", "etcd", "--etcd-config", str(config), *CLUSTER,
                 "--node-name", f"node{len(started) + 1}", *extra]))
        return started[-n:]

    yield start
    try:
        for running in started:
            if not running.task.done():
                await running.stop()
    finally:
        server.cleanup()


async def test_same_labels_concurrently_get_one_id(etcd_agents):
    agents = [a.agent.identity_allocator for a in await etcd_agents(3)]
    ids = await asyncio.gather(*(alloc.allocate(labels(7)) for alloc in agents * 5))
    assert len({i.id for i in ids}) == 1
    (identity,) = {i.id for i in ids}
    assert identity in range((101 << 16) + 256, (101 << 16) + 0x10000)


async def test_1000_label_sets_by_3_agents_get_1000_distinct_ids(etcd_agents):
    agents = [a.agent.identity_allocator for a in await etcd_agents(3)]
    sets = [labels(i, "race") for i in range(1000)]
    started = time.monotonic()
    results = await asyncio.gather(*(
        asyncio.gather(*(alloc.allocate(s) for s in sets)) for alloc in agents))
    took = time.monotonic() - started
    by_agent = [[i.id for i in result] for result in results]
    assert by_agent[0] == by_agent[1] == by_agent[2]  # every agent agrees per label set
    assert len(set(by_agent[0])) == 1000  # and no two label sets share an id
    print(f"3 agents x 1000 label sets: {took:.1f}s")


async def test_identity_is_in_the_kvstore_and_comes_back_as_an_event(etcd_agents):
    (a1,) = await etcd_agents(1)
    identity = await a1.agent.identity_allocator.allocate(labels(1))
    store = a1.agent.kvstore
    assert (await store.get(kvkeys.identity_key(identity.id))).value.decode() == \
        format_labels(labels(1))
    value = await store.get(f"{kvkeys.IDENTITY_VALUES}{format_labels(labels(1))}/node1")
    assert value.value == str(identity.id).encode() and value.lease is not None
    for _ in range(100):
        if a1.agent.tables.identities.get(identity.id):
            break
        await asyncio.sleep(0.02)
    assert a1.agent.tables.identities.get(identity.id).labels == labels(1)


async def gone(store, key: str) -> None:
    """A released reference is deleted by the publisher: soon (or once the store answers)."""
    async with asyncio.timeout(5):
        while await store.get(key) is not None:
            await asyncio.sleep(0.02)


async def test_release_on_last_user_then_garbage_collection(etcd_agents):
    a1, a2 = await etcd_agents(2)
    alloc1, alloc2 = a1.agent.identity_allocator, a2.agent.identity_allocator
    first = await alloc1.allocate(labels(3))
    again = await alloc1.allocate(labels(3))
    other = await alloc2.allocate(labels(3))
    assert first.id == again.id == other.id
    store = a1.agent.kvstore
    assert await alloc1.release(first) is False  # a local user is left
    assert await alloc1.release(again) is True
    await gone(store, f"{kvkeys.IDENTITY_VALUES}{format_labels(labels(3))}/node1")
    assert await alloc1.collect_garbage() == []  # node2 still uses it
    assert await alloc2.release(other) is True
    await gone(store, f"{kvkeys.IDENTITY_VALUES}{format_labels(labels(3))}/node2")
    assert await alloc1.collect_garbage() == []  # unused once: wait for the grace period
    assert await store.get(kvkeys.identity_key(first.id)) is not None
    assert await alloc1.collect_garbage() == [first.id]  # unused twice: collected
    assert await store.get(kvkeys.identity_key(first.id)) is None


async def test_unused_identity_is_reused_before_collection(etcd_agents):
    (a1,) = await etcd_agents(1)
    alloc = a1.agent.identity_allocator
    first = await alloc.allocate(labels(4))
    await alloc.release(first)
    assert (await alloc.allocate(labels(4))).id == first.id


def test_reserved_labels_need_no_allocation():
    assert reserved_identity(frozenset({"reserved:world"})).id == ReservedIdentity.WORLD == 2
    assert reserved_identity(frozenset({"reserved:host"})).id == 1
    assert reserved_identity(frozenset({"k8s:app=x"})) is None
