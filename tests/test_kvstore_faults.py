"""Kvstore faults in one process (memory store, Consul stand-in): a hung store is reported
within 15 s naming it, its return heals in seconds, and a delete made while it was away still
lands. The same faults against real etcd servers, with traffic, are in ``test_faults_lab.py``."""

import asyncio
import ipaddress
import time

from meshagent.kvstore import keys as kvkeys
from meshagent.model.ipcache import IPCacheEntry
from meshagent.plugins.memory.store import shared_store
from meshagent.testing import eventually
from meshagent_dev.consul import ConsulStandIn

CLUSTER1 = ["--cluster-name", "cluster1", "--cluster-id", "101", "--node-name", "node1",
            "--pod-cidr", "10.1.0.0/24"]
CLUSTER2 = ["--cluster-name", "cluster2", "--cluster-id", "102", "--node-name", "node1",
            "--pod-cidr", "10.2.0.0/24"]
DB = frozenset({"k8s:app=db", "k8s:io.kubernetes.pod.namespace=default",
                "k8s:io.cilium.k8s.policy.cluster=cluster1"})
NOTICE_WITHIN = 15.0  # the promise: a hung store is reported this soon
HEAL_WITHIN = 5.0  # ... and back to normal this soon after it answers again


async def section(running, name: str) -> dict:
    status = await running.client.request("GET", "/status", params={"verbose": "1"})
    return next(s for s in status["sections"] if s["name"] == name)


async def section_until(running, name: str, health: str, timeout: float) -> dict:
    """The status section once its health is ``health``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = await section(running, name)
        if found["health"] == health:
            return found
        assert time.monotonic() < deadline, f"{name} not {health} after {timeout}s: {found}"
        await asyncio.sleep(0.1)


async def test_hung_local_store_is_reported_and_its_return_heals_at_once(agent_factory):
    store = shared_store("hang-local")
    running = await agent_factory(["--plugins", "memory", "--memory-store", "hang-local",
                                   *CLUSTER1])
    assert (await section(running, "KVStore"))["health"] == "Ok"
    store.set_hung(True)  # the connection looks fine; nothing answers
    try:
        kvstore = await section_until(running, "KVStore", "Failure", NOTICE_WITHIN)
        assert "no answer for" in kvstore["summary"] and "hang-local" in kvstore["summary"]
    finally:
        store.set_hung(False)
    await section_until(running, "KVStore", "Ok", HEAL_WITHIN)


async def test_a_delete_made_while_the_store_is_down_lands_when_it_returns(agent_factory):
    """Neither an IP→identity entry nor an identity reference may outlive its pod because the
    store was away when the pod went."""
    store = shared_store("down-delete")
    running = await agent_factory(["--plugins", "memory", "--memory-store", "down-delete",
                                   *CLUSTER1])
    agent = running.agent
    identity = await agent.identity_allocator.allocate(DB)
    entry = IPCacheEntry(ipaddress.ip_network("10.1.0.7/32"), identity.id, "cluster1")
    agent.publisher.upsert_ipcache(entry)
    ip_key = kvkeys.ipcache_key("10.1.0.7")
    await eventually(lambda: ip_key in store.data, 5, "entry published")
    ours = [k for k in store.data if k.startswith(kvkeys.IDENTITY_VALUES)]
    assert len(ours) == 1 and ours[0].endswith("/node1")

    store.set_available(False)
    agent.publisher.delete_ipcache(entry)  # the pod is deleted meanwhile
    assert await agent.identity_allocator.release(identity) is True
    await asyncio.sleep(1.5)  # the publisher fails and restarts at least once
    store.set_available(True)
    await eventually(lambda: ip_key not in store.data, HEAL_WITHIN, "entry deleted on return")
    await eventually(lambda: not any(k.startswith(kvkeys.IDENTITY_VALUES) for k in store.data),
                     HEAL_WITHIN, "identity reference deleted on return")
    await section_until(running, "KVStore", "Ok", HEAL_WITHIN)


async def test_hung_remote_is_reported_then_resynced_in_seconds(agent_factory, short_tmp):
    mesh = short_tmp / "mesh"
    mesh.mkdir()
    (mesh / "cluster2").write_text("kvstore: memory\nmemory-store: hang-c2\n")
    await agent_factory(["--plugins", "memory", "--memory-store", "hang-c2", *CLUSTER2])
    a1 = await agent_factory(["--plugins", "memory", "--memory-store", "hang-c1", *CLUSTER1,
                              "--clustermesh-config", str(mesh)])
    remote = a1.agent.clustermesh.remotes["cluster2"]
    await eventually(lambda: remote.ready, 5, "cluster2 ready")
    store = shared_store("hang-c2")
    store.set_hung(True)
    try:
        started = time.monotonic()
        clustermesh = await section_until(a1, "ClusterMesh", "Warning", NOTICE_WITHIN)
        assert "no answer for" in clustermesh["summary"] and "cluster2" in clustermesh["summary"]
        await eventually(lambda: not remote.ready, NOTICE_WITHIN - (time.monotonic() - started),
                         "a silent remote is given up and connected to again")
        assert "cluster2/node1" in {n.full_name for n in a1.agent.tables.nodes.values()}  # kept
    finally:
        store.set_hung(False)
    await eventually(lambda: remote.ready, HEAL_WITHIN, "resynced once it answers")
    assert (await section(a1, "ClusterMesh"))["health"] == "Ok"


async def test_stalled_consul_long_poll_is_noticed(agent_factory, short_tmp):
    """A Consul that stops answering leaves the blocking query hanging; still noticed."""
    consul = await ConsulStandIn().start()
    try:
        await agent_factory(["--plugins", "consul", "--consul-address", consul.url, *CLUSTER2])
        mesh = short_tmp / "mesh"
        mesh.mkdir()
        (mesh / "cluster2").write_text(f"kvstore: consul\naddress: {consul.url}\n")
        a1 = await agent_factory(["--plugins", "memory,consul", "--kvstore", "memory",
                                  "--memory-store", "consul-c1", *CLUSTER1,
                                  "--clustermesh-config", str(mesh)])
        remote = a1.agent.clustermesh.remotes["cluster2"]
        await eventually(lambda: remote.ready, 10, "cluster2 on consul ready")
        consul.stalled = True
        try:
            clustermesh = await section_until(a1, "ClusterMesh", "Warning", NOTICE_WITHIN)
            assert "no answer for" in clustermesh["summary"]
            assert consul.url.split("//")[1].split(":")[0] in clustermesh["summary"]
        finally:
            consul.stalled = False
        await eventually(lambda: remote.ready, HEAL_WITHIN, "ready once consul answers")
        await section_until(a1, "ClusterMesh", "Ok", HEAL_WITHIN)
    finally:
        await consul.stop()
