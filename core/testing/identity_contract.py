"""The identity-allocator contract suite: what every allocator must do, through its contract.

Subclass :class:`IdentityAllocatorContract` and say how to load your allocator::

    from meshagent.testing.identity_contract import IdentityAllocatorContract

    class TestMyAllocator(IdentityAllocatorContract):
        agent_args = ("--plugins", "memory,mine", "--identity-allocator", "mine")

Each test starts real agents of one cluster on one fresh memory store (so they race for real)
and uses only ``allocate``, ``release`` and ``lookup``: agreement under concurrent allocation,
distinct ids for distinct labels, ids in the cluster's range, reserved labels, local reference
counting, the same id for an agent started later, and lookups of ids other agents allocated.
"""

import asyncio
import uuid
from collections.abc import Sequence

import pytest

from meshagent.identity import IdentityAllocator
from meshagent.model.identity import ReservedIdentity
from meshagent.testing import eventually

CLUSTER_ID = 101


def labels(i: int, app: str = "app") -> frozenset[str]:
    return frozenset({f"k8s:{app}=x{i}", "k8s:io.kubernetes.pod.namespace=default",
                      "k8s:io.cilium.k8s.policy.cluster=cluster1"})


class IdentityAllocatorContract:
    agent_args: Sequence[str] = ("--plugins", "memory")

    @pytest.fixture
    async def start(self, agent_factory):
        """``await start(n)``: n more agents of cluster1 on this test's store."""
        store = f"ids-{uuid.uuid4().hex[:8]}"
        count = 0

        async def start(n: int = 1):
            nonlocal count
            started = []
            for _ in range(n):
                count += 1
                started.append(await agent_factory([
                    *self.agent_args, "--memory-store", store, "--cluster-name", "cluster1",
                    "--cluster-id", str(CLUSTER_ID), "--node-name", f"node{count}"]))
            return started
        return start

    @staticmethod
    def allocator(running) -> IdentityAllocator:
        return running.agent.identity_allocator

    async def test_same_labels_concurrently_get_one_id_in_the_cluster_range(self, start):
        agents = await start(3)
        allocators = [self.allocator(a) for a in agents]
        ids = await asyncio.gather(*(alloc.allocate(labels(7)) for alloc in allocators * 5))
        assert len({i.id for i in ids}) == 1
        assert ids[0].id in agents[0].agent.cluster.identity_range()
        assert ids[0].labels == labels(7)

    async def test_distinct_labels_get_distinct_ids_and_every_agent_agrees(self, start):
        agents = await start(2)
        a1, a2 = (self.allocator(a) for a in agents)
        first = await asyncio.gather(*(a1.allocate(labels(i)) for i in range(40)),
                                     *(a2.allocate(labels(i)) for i in range(40, 60)))
        assert len({i.id for i in first}) == 60
        in_range = agents[0].agent.cluster.identity_range()
        assert all(i.id in in_range for i in first)
        again = await asyncio.gather(*(a2.allocate(labels(i)) for i in range(40)))
        assert [i.id for i in again] == [i.id for i in first[:40]]

    async def test_reserved_labels_need_no_allocation(self, start):
        (running,) = await start(1)
        allocator = self.allocator(running)
        host = await allocator.allocate(frozenset({"reserved:host"}))
        assert host.id == ReservedIdentity.HOST
        assert await allocator.release(host) is False
        assert allocator.lookup(int(ReservedIdentity.WORLD)) is not None

    async def test_release_counts_local_users(self, start):
        (running,) = await start(1)
        allocator = self.allocator(running)
        one = await allocator.allocate(labels(1))
        two = await allocator.allocate(labels(1))
        assert one.id == two.id
        assert await allocator.release(one) is False  # a local user is left
        assert await allocator.release(two) is True
        again = await allocator.allocate(labels(1))  # not collected yet: the same id back
        assert again.id == one.id

    async def test_other_agents_look_up_what_one_allocated(self, start):
        a1, a2 = await start(2)
        identity = await self.allocator(a1).allocate(labels(3, "web"))
        await eventually(lambda: self.allocator(a2).lookup(identity.id) is not None, 5,
                         "agent 2 knows the identity agent 1 allocated")
        assert self.allocator(a2).lookup(identity.id).labels == labels(3, "web")

    async def test_an_agent_started_later_gets_the_same_id(self, start):
        """The id outlives the agent that allocated it (until it is collected)."""
        (first,) = await start(1)
        before = await self.allocator(first).allocate(labels(5))
        await first.stop()
        (second,) = await start(1)
        after = await self.allocator(second).allocate(labels(5))
        assert after.id == before.id
