"""ClusterMesh over the memory kvstore: the same code path as etcd (it only knows the slot),
used here for what is hard to stage with a real server: compaction during an outage, and the
cache TTL."""

import asyncio

import pytest

from meshagent.kvstore import keys as kvkeys
from meshagent.model.node import Node, node_to_json
from meshagent.plugins.memory.store import shared_store
from meshagent.testing import eventually as wait_for


@pytest.fixture
def mesh_dir(short_tmp):
    d = short_tmp / "mesh"
    d.mkdir()
    (d / "cluster2").write_text("kvstore: memory\nmemory-store: cluster2\n")
    return d


async def start_pair(agent_factory, mesh_dir, *extra):
    a2 = await agent_factory(["--plugins", "memory", "--memory-store", "cluster2",
                              "--cluster-name", "cluster2", "--cluster-id", "102",
                              "--node-name", "node1"])
    a1 = await agent_factory(["--plugins", "memory", "--memory-store", "cluster1",
                              "--cluster-name", "cluster1", "--cluster-id", "101",
                              "--node-name", "node1", "--clustermesh-config", str(mesh_dir),
                              *extra])
    remote = a1.agent.clustermesh.remotes["cluster2"]
    await wait_for(lambda: remote.ready, 5, "cluster2 ready")
    return a1, a2, remote


def node_names(running):
    return sorted(n.full_name for n in running.agent.tables.nodes.values())


async def test_compaction_during_an_outage_relists_and_drops_what_is_gone(agent_factory,
                                                                         mesh_dir):
    a1, a2, remote = await start_pair(agent_factory, mesh_dir)
    store = shared_store("cluster2")
    store.write(kvkeys.node_key("cluster2", "node2"),
                node_to_json(Node("node2", "cluster2", 102)), None)
    await wait_for(lambda: "cluster2/node2" in node_names(a1), 5, "node2")
    store.set_available(False)
    await wait_for(lambda: not remote.ready, 5, "outage noticed")
    store.remove(kvkeys.node_key("cluster2", "node2"))  # while nobody watches
    store.compact(store.revision)  # and the history that says so is gone
    store.set_available(True)
    await wait_for(lambda: remote.ready, 10, "back")
    await wait_for(lambda: "cluster2/node2" not in node_names(a1), 5, "relist drops node2")
    assert node_names(a1) == ["cluster1/node1", "cluster2/node1"]


async def test_cache_ttl_drops_entries_after_a_long_outage(agent_factory, mesh_dir):
    a1, a2, remote = await start_pair(agent_factory, mesh_dir, "--clustermesh-cache-ttl", "0.5")
    store = shared_store("cluster2")
    store.set_available(False)
    await wait_for(lambda: not remote.ready, 5, "outage noticed")
    assert "cluster2/node1" in node_names(a1)  # kept at first
    await wait_for(lambda: "cluster2/node1" not in node_names(a1), 5, "dropped after the TTL")
    store.set_available(True)
    await wait_for(lambda: "cluster2/node1" in node_names(a1), 10, "back after the outage")


async def test_without_cache_ttl_entries_are_kept(agent_factory, mesh_dir):
    a1, a2, remote = await start_pair(agent_factory, mesh_dir)
    shared_store("cluster2").set_available(False)
    await wait_for(lambda: not remote.ready, 5, "outage noticed")
    await asyncio.sleep(1.0)
    assert "cluster2/node1" in node_names(a1)


async def test_own_cluster_file_and_certificates_are_ignored(agent_factory, mesh_dir):
    (mesh_dir / "cluster1").write_text("kvstore: memory\nmemory-store: cluster1\n")
    for name in ("cluster2-etcd-client.crt", "cluster2-etcd-client.key", ".hidden", "READ.ME"):
        (mesh_dir / name).write_text("-----BEGIN CERTIFICATE-----\n")
    a1, a2, remote = await start_pair(agent_factory, mesh_dir)
    assert sorted(a1.agent.clustermesh.remotes) == ["cluster2"]


async def test_a_broken_file_is_reported_and_fixing_it_connects(agent_factory, mesh_dir):
    (mesh_dir / "cluster2").write_text("kvstore: memory\n")  # no store named
    await agent_factory(["--plugins", "memory", "--memory-store", "cluster2",
                         "--cluster-name", "cluster2", "--cluster-id", "102"])
    a1 = await agent_factory(["--plugins", "memory", "--memory-store", "cluster1",
                              "--cluster-name", "cluster1", "--cluster-id", "101",
                              "--clustermesh-config", str(mesh_dir)])
    remote = a1.agent.clustermesh.remotes["cluster2"]
    await wait_for(lambda: "needs 'memory-store: NAME'" in remote.last_error, 5, "config error")
    assert a1.agent.ready  # a broken remote does not hold the agent back
    (mesh_dir / "cluster2").write_text("kvstore: memory\nmemory-store: cluster2\n")
    await wait_for(lambda: a1.agent.clustermesh.remotes["cluster2"].ready, 5, "fixed")


async def test_unknown_backend_in_a_file_is_reported(agent_factory, mesh_dir):
    (mesh_dir / "cluster2").write_text("kvstore: consul\n")
    a1 = await agent_factory(["--plugins", "memory", "--cluster-name", "cluster1",
                              "--cluster-id", "101", "--clustermesh-config", str(mesh_dir)])
    remote = a1.agent.clustermesh.remotes["cluster2"]
    await wait_for(lambda: "no loaded plugin offers kvstore 'consul'" in remote.last_error, 5,
                   "backend error")


async def test_a_remote_whose_client_swallows_a_cancellation_still_stops(tmp_path):
    """Shutdown cancels a remote's task again each second: a client library that swallows
    one cancellation (as Python 3.11's asyncio.wait_for can) cannot hold the agent up."""
    import time
    from pathlib import Path

    from meshagent.clustermesh.mesh import STOP_RECANCEL, RemoteCluster, RemoteFile

    swallowed = []

    async def stubborn_run():
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)  # the first cancellation is lost

    remote = RemoteCluster(object(), RemoteFile("cluster2", Path(tmp_path / "cluster2"), ""))
    remote._run = stubborn_run
    remote.start()
    await asyncio.sleep(0)
    started = time.monotonic()
    await remote.stop(withdraw=False)
    assert remote.task.done() and swallowed
    assert time.monotonic() - started < STOP_RECANCEL + 1
