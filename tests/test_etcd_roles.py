"""The etcd users and roles of docs/clustermesh.md against a real etcd 3.4 with auth on.

What a remote cluster is given (user ``remote``) reads four ranges and writes nothing; our own
agents, KVStoreMesh and the cache reader (``local``) can do their work as their own users; and
every role grants in etcd exactly what :mod:`meshagent_dev.etcd_roles` says it grants.
"""

import asyncio
import contextlib
import re
from pathlib import Path

import pytest
from conftest import run_cli
from test_services import service_yaml

from meshagent.kvstore import keys as kvkeys
from meshagent.kvstoremesh.command import build as build_kvstoremesh
from meshagent.model.identity import format_labels
from meshagent.plugins.etcd.client import EtcdKVStore
from meshagent.plugins.etcd.config import load_etcd_config
from meshagent.testing import eventually
from meshagent.testing.identity_contract import labels
from meshagent_dev.etcd import EtcdServer
from meshagent_dev.etcd_roles import ROOT, etcdctl_commands, roles

ROOT_DIR = Path(__file__).resolve().parent.parent
SEED_POLICY = ROOT_DIR / "contrib" / "seed" / "l4-policy.yaml"
STATE = [  # cluster1's state, as its agents publish it (and Cilium's, under "default")
    "cilium/state/ip/v1/cluster1/10.1.1.77",
    "cilium/state/ip/v1/default/10.1.1.78",
    "cilium/state/nodes/v1/cluster1/node1",
    "cilium/state/identities/v1/id/6619392",
    "cilium/state/services/v1/cluster1/default/db",
]
# one key of every kind an etcd of cluster1 holds, and the keys next to the granted ones
PROBES = [
    "cilium/.heartbeat",
    "cilium/.heartbeatX",  # Cilium grants the heartbeat as a prefix; here it is one key
    *STATE,
    "cilium/cluster-config/cluster1",
    "cilium/cluster-config/cluster10",
    "cilium/cluster-config/cluster2",
    "cilium/synced/cluster1/cilium/state/nodes/v1",
    "cilium/synced/cluster10/cilium/state/nodes/v1",
    "cilium/synced/cluster2/cilium/cache/nodes/v1",
    "cilium/cache/nodes/v1/cluster2/node1",
    "cilium/stateless",
    "meshagent/policies/v1/CiliumNetworkPolicy/default/p",
    "meshagent/services/v1/default/db",
    "meshagent/identities/v1/gc",
    "meshagent/kvstoremesh/leader",
    "elsewhere",
]
# what a remote cluster may read in cluster1's etcd (Cilium's rangesForRemoteRole), spelled
# out here rather than taken from the module under test
REMOTE_READS = {
    "cilium/.heartbeat",
    *STATE,
    "cilium/cluster-config/cluster1",
    "cilium/synced/cluster1/cilium/state/nodes/v1",
}


@pytest.fixture(scope="module")
def etcd1():
    server = EtcdServer("roles1", tls=True, auth="cluster1").start()
    try:
        for key in PROBES:
            server.etcdctl("put", key, "seeded")
        yield server
    finally:
        server.cleanup()


@contextlib.asynccontextmanager
async def client(server: EtcdServer, path: Path, user: str):
    store = EtcdKVStore(load_etcd_config(server.client_config(path, user=user)))
    try:
        await store.connect()
        yield store
    finally:
        await store.close()


async def denied(call) -> bool:
    """True if etcd refuses ``call`` for want of permission; False if it succeeds."""
    try:
        await call
    except Exception as exc:
        if "permission denied" in str(exc):
            return True
        raise
    return False


async def test_a_remote_reads_four_ranges_and_writes_nothing(etcd1, tmp_path):
    async with client(etcd1, tmp_path / "cluster1", "remote") as remote:
        readable = {key for key in PROBES if not await denied(remote.get(key))}
        assert readable == REMOTE_READS
        for key in PROBES:
            assert await denied(remote.put(key, b"{}")), key
            assert await denied(remote.delete(key)), key
        assert await denied(remote.create("cilium/state/ip/v1/cluster1/10.1.1.99", b"{}"))
        # what an agent of another cluster lists and watches
        listing = await remote.list_prefix("cilium/state/ip/v1/")
        assert [i.key for i in listing.items] == STATE[:2]
        assert len((await remote.list_prefix("cilium/synced/cluster1/")).items) == 1
        for prefix in ("cilium/", "cilium/cache/", "cilium/synced/", "cilium/cluster-config/",
                       "meshagent/"):
            assert await denied(remote.list_prefix(prefix)), prefix
        watch = remote.watch("cilium/state/nodes/v1/", after_revision=listing.revision)
        etcd1.etcdctl("put", "cilium/state/nodes/v1/cluster1/node2", "{}")
        event = await asyncio.wait_for(anext(watch), 5)
        assert event.key == "cilium/state/nodes/v1/cluster1/node2"
        await watch.aclose()


@pytest.mark.parametrize("role", roles("cluster1"), ids=lambda r: r.name)
async def test_etcd_grants_each_role_what_the_role_table_says(etcd1, tmp_path, role):
    async with client(etcd1, tmp_path / role.name, role.name) as store:
        for key in PROBES:
            assert (not await denied(store.get(key))) == role.may_read(key), key
            assert (not await denied(store.put(key, b"seeded"))) == role.may_write(key), key


async def test_leases_are_revoked_only_by_who_may_write_their_keys(etcd1, tmp_path):
    async with (client(etcd1, tmp_path / "agent", "agent") as agent,
                client(etcd1, tmp_path / "kvm", "kvstoremesh") as kvstoremesh,
                client(etcd1, tmp_path / "remote", "remote") as remote):
        lease = await agent.grant_lease(30)
        key = "cilium/state/nodes/v1/cluster1/leased"
        await agent.put(key, b"{}", lease=lease)
        await agent.keepalive(lease)
        assert await denied(remote.revoke(lease))  # a remote cannot wipe our node's keys
        assert await denied(kvstoremesh.revoke(lease))
        leader = await kvstoremesh.grant_lease(30)
        await kvstoremesh.delete(kvkeys.KVSTOREMESH_LEADER)  # the probe's
        assert await kvstoremesh.create(kvkeys.KVSTOREMESH_LEADER, b"me", lease=leader)
        assert await denied(agent.revoke(leader))
        # nor may a key be put on a lease whose keys the writer could not revoke
        assert await denied(agent.put("cilium/state/nodes/v1/cluster1/x", b"{}", lease=leader))
        await kvstoremesh.revoke(leader)
        await agent.revoke(lease)
        assert await agent.get(key) is None
        assert await kvstoremesh.get(kvkeys.KVSTOREMESH_LEADER) is None


async def test_etcd_3_4_checks_neither_lease_grants_nor_keepalives(etcd1, tmp_path):
    """What the docs say a remote can still do: take leases, keep any lease alive."""
    async with (client(etcd1, tmp_path / "agent", "agent") as agent,
                client(etcd1, tmp_path / "remote", "remote") as remote):
        lease = await agent.grant_lease(30)
        await agent.put("cilium/state/nodes/v1/cluster1/kept", b"{}", lease=lease)
        assert (await remote.get("cilium/state/nodes/v1/cluster1/kept")).lease == lease.id
        await remote.keepalive(lease)
        await remote.revoke(await remote.grant_lease(30))  # a lease with no keys: its own
        await agent.revoke(lease)


async def test_agents_and_kvstoremesh_work_as_their_own_users(tmp_path, short_tmp,
                                                             agent_factory, caplog):
    """cluster2's agent publishes into etcd2 as ``agent``; cluster1's KVStoreMesh copies it
    into etcd1 as ``kvstoremesh`` (dialing etcd2 as ``remote``); cluster1's agent reads it
    from the cache as ``local`` and writes its own state, a policy, a service and an identity
    (allocation, release, garbage collection) as ``agent``; both stop and revoke their
    leases."""
    etcd = {n: EtcdServer(f"roles{n}", tls=True, auth=f"cluster{n}",
                          workdir=short_tmp / f"etcd{n}").start() for n in (1, 2)}
    kvm_task = None
    try:
        own = {n: etcd[n].client_config(tmp_path / f"agent{n}.yaml", user="agent")
               for n in (1, 2)}
        mesh = {n: tmp_path / f"mesh{n}" for n in (1, 2)}
        for directory in [*mesh.values(), tmp_path / "kvmesh"]:
            directory.mkdir()
        etcd[2].client_config(tmp_path / "kvmesh" / "cluster2", user="remote")
        etcd[1].client_config(mesh[1] / "cluster2", user="local")  # the cache
        kvstoremesh = build_kvstoremesh([
            "--plugins", "etcd", "--cluster-name", "cluster1", "--cluster-id", "101",
            "--etcd-config", str(etcd[1].client_config(tmp_path / "kvm.yaml",
                                                       user="kvstoremesh")),
            "--clustermesh-config", str(tmp_path / "kvmesh"),
            "--kvstoremesh-socket-path", str(short_tmp / "kvm.sock")], {})
        kvm_task = asyncio.create_task(kvstoremesh.run(), name="kvstoremesh")

        def start(n: int):
            return agent_factory([
                "--plugins", "etcd", "--cluster-name", f"cluster{n}",
                "--cluster-id", str(100 + n), "--node-name", "node1",
                "--node-ip", f"10.{n}.{n}.1", "--pod-cidr", f"10.{n}.0.0/24",
                "--etcd-config", str(own[n]), "--clustermesh-config", str(mesh[n])])
        a2 = await start(2)
        a1 = await start(1)
        await eventually(lambda: a1.agent.clustermesh.remotes["cluster2"].ready, 15,
                         "cluster2 ready through the cache")
        assert a1.agent.clustermesh.remotes["cluster2"].source == "cache"
        assert "cluster2/node1" in {n.full_name for n in a1.agent.tables.nodes.values()}

        result = await asyncio.to_thread(run_cli, "policy", "import", str(SEED_POLICY),
                                         "--socket-path", str(a1.socket_path))
        assert result.returncode == 0, result.stderr
        (tmp_path / "svc.yaml").write_text(service_yaml("10.96.0.10", ["10.1.0.5"]))
        result = await asyncio.to_thread(run_cli, "service", "apply", str(tmp_path / "svc.yaml"),
                                         "--socket-path", str(a1.socket_path))
        assert result.returncode == 0, result.stderr
        allocator = a1.agent.identity_allocator
        identity = await allocator.allocate(labels(5))
        await allocator.release(identity)
        store = a1.agent.kvstore
        reference = f"{kvkeys.IDENTITY_VALUES}{format_labels(labels(5))}/node1"
        async with asyncio.timeout(5):  # the publisher deletes the released reference
            while await store.get(reference) is not None:
                await asyncio.sleep(0.05)
        collected = []
        for _ in range(3):
            collected += await allocator.collect_garbage()
        assert collected == [identity.id]
        assert (await store.list_prefix(kvkeys.POLICIES)).items
        assert (await store.list_prefix(kvkeys.LOCAL_SERVICES)).items

        for running in (a1, a2):
            await running.stop()
        async with client(etcd[1], tmp_path / "check", "agent") as check:
            assert (await check.list_prefix(kvkeys.NODES)).items == []  # lease revoked
            assert (await check.get(kvkeys.cluster_config_key("cluster2"))).value
        kvstoremesh.stop()
        await asyncio.wait_for(kvm_task, 10)
        refused = [r.getMessage() for r in caplog.records if "permission denied" in r.getMessage()]
        assert refused == []
    finally:
        if kvm_task is not None and not kvm_task.done():
            kvm_task.cancel()
            with contextlib.suppress(BaseException):
                await kvm_task
        for server in etcd.values():
            server.cleanup()


def test_docs_give_the_etcdctl_commands_the_tests_run():
    """docs/clustermesh.md shows the commands that set up cluster1's etcd: the same as
    :func:`etcdctl_commands` runs here, so the docs cannot drift from what is tested."""
    doc = (ROOT_DIR / "docs" / "clustermesh.md").read_text()
    block = re.search(r"```sh\n# cluster1's etcd: users and roles\n(.*?)```", doc, re.S)
    assert block, "docs/clustermesh.md lost its etcdctl block"
    shown = [line.removeprefix("etcdctl ").split() for line in block.group(1).splitlines()
             if line.startswith("etcdctl ")]
    assert shown == etcdctl_commands("cluster1")
    assert shown[0][:3] == ["user", "add", ROOT]
