"""Identity allocation against a real etcd: race-free across agents, released, collected."""

import asyncio
import time

import pytest

from meshagent.identity.allocator import IDLE, chain_start, pinned_ids, reserved_identity
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
    assert identity in range(101 << 16, (101 << 16) + 0x10000)


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


async def test_collection_waits_for_another_collectors_round(etcd_agents):
    (a1,) = await etcd_agents(1)
    alloc, store = a1.agent.identity_allocator, a1.agent.kvstore
    identity = await alloc.allocate(labels(11))
    await alloc.release(identity)
    await gone(store, f"{kvkeys.IDENTITY_VALUES}{format_labels(labels(11))}/node1")
    assert await alloc.collect_garbage() == []  # seen unused once
    await store.put(kvkeys.IDENTITY_GC, b"running elsewhere")
    assert await alloc.collect_garbage() == []  # due, but another round runs
    assert await store.get(kvkeys.identity_key(identity.id)) is not None
    await store.put(kvkeys.IDENTITY_GC, IDLE)
    assert await alloc.collect_garbage() == [identity.id]
    gate = await store.get(kvkeys.IDENTITY_GC)
    assert gate.value == IDLE and gate.lease is None  # the round ended: idle, on no lease


async def test_unused_identity_is_reused_before_collection(etcd_agents):
    (a1,) = await etcd_agents(1)
    alloc = a1.agent.identity_allocator
    first = await alloc.allocate(labels(4))
    await alloc.release(first)
    assert (await alloc.allocate(labels(4))).id == first.id


def colliding_label_sets() -> tuple[frozenset[str], frozenset[str]]:
    """Two label sets whose probe chains start at the same id of cluster 101."""
    allowed = range(101 << 16, (101 << 16) + 0x10000)
    seen = {}
    for i in range(5000):
        start = chain_start(format_labels(labels(i, "pin")), allowed)
        if start in seen:
            return labels(seen[start], "pin"), labels(i, "pin")
        seen[start] = i
    raise AssertionError("no collision found")


async def test_collection_keeps_an_id_that_another_label_sets_id_lies_behind(etcd_agents):
    """L2's chain passes L1's id: were it deleted, L2 would get a second id."""
    a1, a2 = await etcd_agents(2)
    alloc1, alloc2 = a1.agent.identity_allocator, a2.agent.identity_allocator
    first, second = colliding_label_sets()
    one = await alloc1.allocate(first)
    two = await alloc1.allocate(second)
    assert two.id == one.id + 1 or (one.id, two.id) == ((101 << 16) + 0xFFFF, 101 << 16)
    store = a1.agent.kvstore
    await alloc1.release(one)
    await gone(store, f"{kvkeys.IDENTITY_VALUES}{format_labels(first)}/node1")
    for _ in range(3):
        assert await alloc1.collect_garbage() == []  # unused, but pinned by the second
    assert (await alloc2.allocate(second)).id == two.id
    await alloc1.release(two)
    await alloc2.release(two)
    for key in (f"{kvkeys.IDENTITY_VALUES}{format_labels(second)}/node1",
                f"{kvkeys.IDENTITY_VALUES}{format_labels(second)}/node2"):
        await gone(store, key)
    assert await alloc1.collect_garbage() == []  # both unused, seen once
    assert await alloc1.collect_garbage() == [two.id]  # the first was pinned until now
    assert await alloc1.collect_garbage() == []  # so its grace period starts now
    assert await alloc1.collect_garbage() == [one.id]


async def test_allocation_waits_while_a_collection_round_runs(etcd_agents):
    (a1,) = await etcd_agents(1)
    alloc, store = a1.agent.identity_allocator, a1.agent.kvstore
    await store.put(kvkeys.IDENTITY_GC, b"running elsewhere")
    alloc.gate.last = None  # as if this agent had never read the gate
    allocating = asyncio.create_task(alloc.allocate(labels(8)))
    await asyncio.sleep(0.5)
    assert not allocating.done()
    assert await store.get(kvkeys.identity_key(chain_of(labels(8)))) is None
    await store.put(kvkeys.IDENTITY_GC, IDLE)
    async with asyncio.timeout(5):
        identity = await allocating
    assert identity.id == chain_of(labels(8))


def chain_of(label_set: frozenset[str]) -> int:
    """The first id of a label set's chain in cluster 101."""
    allowed = range(101 << 16, (101 << 16) + 0x10000)
    return allowed[chain_start(format_labels(label_set), allowed)]


async def test_a_round_that_overlaps_an_allocation_makes_it_start_over(etcd_agents):
    """A round deletes the id between the walk and the second gate read: the allocation must
    not return an id that is gone."""
    (a1,) = await etcd_agents(1)
    alloc, store = a1.agent.identity_allocator, a1.agent.kvstore
    checked = alloc.gate.unchanged
    rounds = []

    async def round_first(before):
        if not rounds:
            rounds.append(before)
            await store.put(kvkeys.IDENTITY_GC, b"running elsewhere")
            await store.delete(kvkeys.identity_key(chain_of(labels(9))))
            await store.put(kvkeys.IDENTITY_GC, IDLE)
        return await checked(before)

    alloc.gate.unchanged = round_first
    identity = await alloc.allocate(labels(9))
    assert len(rounds) == 1
    current = await store.get(kvkeys.identity_key(identity.id))
    assert current is not None and current.value.decode() == format_labels(labels(9))
    value = await store.get(f"{kvkeys.IDENTITY_VALUES}{format_labels(labels(9))}/node1")
    assert value.value == str(identity.id).encode()


async def test_local_callers_of_one_label_set_share_one_allocation(etcd_agents):
    (a1,) = await etcd_agents(1)
    alloc = a1.agent.identity_allocator
    one, two = await asyncio.gather(alloc.allocate(labels(10)), alloc.allocate(labels(10)))
    assert one.id == two.id
    assert await alloc.release(one) is False  # the other caller still uses it
    assert await alloc.release(two) is True


def test_an_id_pins_the_ids_in_front_of_it_in_its_chain_even_across_the_wrap():
    allowed = range(1000, 1010)
    texts = {}
    for i in range(200):  # one label set hashing to each position
        texts.setdefault(chain_start(f"k8s:app={i};", allowed), f"k8s:app={i};")
    assert pinned_ids({1003: texts[3]}, allowed) == set()  # at its chain's start
    assert pinned_ids({1005: texts[3]}, allowed) == {1003, 1004}
    assert pinned_ids({1001: texts[8]}, allowed) == {1008, 1009, 1000}  # wrapped
    assert pinned_ids({1005: texts[3], 1001: texts[8], 1009: texts[9]}, allowed) == \
        {1003, 1004, 1008, 1009, 1000}


def test_reserved_labels_need_no_allocation():
    assert reserved_identity(frozenset({"reserved:world"})).id == ReservedIdentity.WORLD == 2
    assert reserved_identity(frozenset({"reserved:host"})).id == 1
    assert reserved_identity(frozenset({"k8s:app=x"})) is None
