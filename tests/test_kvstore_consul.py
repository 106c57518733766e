"""The consul backend passes the kvstore contract against the Consul stand-in (or, with
MESHAGENT_TEST_CONSUL=http://host:8500, a real Consul), and ClusterMesh works with a remote
cluster on Consul."""

import os

import pytest

from meshagent.plugins.consul.client import ConsulKVStore
from meshagent.testing import eventually
from meshagent.testing.kvstore_contract import KVStoreContract, client_factory
from meshagent_dev.consul import ConsulStandIn


@pytest.fixture
async def consul_address():
    real = os.environ.get("MESHAGENT_TEST_CONSUL")
    if real:
        yield real
        return
    server = await ConsulStandIn().start()
    yield server.url
    await server.stop()


class TestConsulContract(KVStoreContract):
    lease_ttl = 10.0  # Consul's minimum session TTL
    watch_keeps_every_change = False

    @pytest.fixture
    async def new_client(self, consul_address):
        async with client_factory(lambda: ConsulKVStore(consul_address)) as make:
            yield make


async def test_unreachable_consul_is_unavailable():
    from meshagent.kvstore import KVStoreUnavailable
    from meshagent_dev.etcd import free_port
    client = ConsulKVStore(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(KVStoreUnavailable):
        await client.connect()
    assert not client.status().connected
    await client.close()


async def test_clustermesh_with_a_remote_cluster_on_consul(agent_factory, consul_address,
                                                           short_tmp):
    """cluster2 keeps its state in Consul; cluster1 (etcd-free, memory) meshes with it."""
    cluster2 = await agent_factory(["--plugins", "consul", "--consul-address", consul_address,
                                    "--cluster-name", "cluster2", "--cluster-id", "102",
                                    "--node-name", "node1", "--pod-cidr", "10.2.1.0/24"])
    mesh = short_tmp / "mesh"
    mesh.mkdir()
    (mesh / "cluster2").write_text(f"kvstore: consul\naddress: {consul_address}\n")
    cluster1 = await agent_factory(["--plugins", "memory,consul", "--kvstore", "memory",
                                    "--cluster-name", "cluster1", "--cluster-id", "101",
                                    "--clustermesh-config", str(mesh)])
    remote = cluster1.agent.clustermesh.remotes["cluster2"]
    await eventually(lambda: remote.ready, 10, "cluster2 on consul ready")
    assert "cluster2/node1" in {n.full_name for n in cluster1.agent.tables.nodes.values()}
    assert "consul: connected" in remote.status_lines(0)[1]
    await cluster2.stop()  # its session is destroyed: its node goes away
    await eventually(lambda: "cluster2/node1" not in {
        n.full_name for n in cluster1.agent.tables.nodes.values()}, 15, "node withdrawn")
