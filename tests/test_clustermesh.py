"""ClusterMesh against real etcd servers with TLS client certificates (made by the tests).

Two clusters as in the seed: cluster1 (id 101) and cluster2 (id 102), each with its own etcd,
each agent with a clustermesh directory laid out like the seed's.
"""

import asyncio
import ipaddress
import json
import time
from pathlib import Path

import pytest
import trustme
import yaml
from conftest import run_cli

from meshagent.events import ChangeKind
from meshagent.kvstore import keys as kvkeys
from meshagent.model.identity import format_labels
from meshagent.model.ipcache import IPCacheEntry, ipcache_to_json
from meshagent.model.node import Node, node_to_json
from meshagent.plugins.etcd.client import EtcdKVStore
from meshagent.plugins.etcd.config import load_etcd_config
from meshagent.testing import eventually as wait_for
from meshagent_dev.etcd import EtcdServer

C2_BASE = 102 << 16
#: cluster2's node whose pod CIDR holds the endpoints the tests publish for cluster2
POD_NODE = Node("node1", "cluster2", 102, ipaddress.ip_address("10.2.2.1"),
                (ipaddress.ip_network("10.2.0.0/24"),))


class Mesh:
    """Two etcd servers and helpers to start the agents of the two clusters."""

    def __init__(self, tmp, agent_factory):
        self.tmp = tmp
        self.agent_factory = agent_factory
        self.agents = []
        self.etcd = {1: EtcdServer("etcd1", tls=True).start(),
                     2: EtcdServer("etcd2", tls=True).start()}
        self.mesh_dir = {n: tmp / f"mesh{n}" for n in (1, 2)}
        for d in self.mesh_dir.values():
            d.mkdir()
        self.own_config = {n: self.etcd[n].client_config(tmp / f"etcd{n}.yaml") for n in (1, 2)}

    def connect(self, local: int, remote: int, **kwargs):
        """Write the seed's files for ``remote`` into ``local``'s clustermesh directory."""
        return self.etcd[remote].client_config(self.mesh_dir[local] / f"cluster{remote}", **kwargs)

    async def start(self, n: int, *extra: str, cluster_id: int | None = None, **kwargs):
        running = await self.agent_factory([
            "--plugins", "etcd", "--cluster-name", f"cluster{n}",
            "--cluster-id", str(cluster_id or 100 + n), "--node-name", "node1",
            "--node-ip", f"10.{n}.{n}.1", "--pod-cidr", f"10.{n}.0.0/24",
            "--etcd-config", str(self.own_config[n]),
            "--clustermesh-config", str(self.mesh_dir[n]), *extra], **kwargs)
        self.agents.append(running)
        return running

    async def writer(self, n: int) -> EtcdKVStore:
        """A plain client of cluster ``n``'s etcd, to play a misbehaving peer."""
        client = EtcdKVStore(load_etcd_config(
            self.etcd[n].client_config(self.tmp / f"writer{n}.yaml")))
        await client.connect()
        return client

    async def cleanup(self):
        try:
            for running in self.agents:  # agents first, while their etcd still answers
                if not running.task.done():
                    await running.stop()
        finally:  # a stuck agent must not leave etcd servers running for the next test
            for server in self.etcd.values():
                server.cleanup()


@pytest.fixture
async def mesh(short_tmp, agent_factory):
    m = Mesh(short_tmp, agent_factory)
    yield m
    await m.cleanup()


def remote(running, name):
    return running.agent.clustermesh.remotes[name]


def nodes(running):
    return sorted(n.full_name for n in running.agent.tables.nodes.values())


async def test_two_clusters_see_each_other_within_5s(mesh):
    mesh.connect(1, 2)
    mesh.connect(2, 1)
    started = time.monotonic()
    a1, a2 = await asyncio.gather(mesh.start(1), mesh.start(2))
    for agent in (a1, a2):
        await wait_for(lambda a=agent: a.agent.clustermesh.status(False).summary.startswith(
            "1/1 remote clusters ready"), 5 - (time.monotonic() - started), "1/1 ready")
    assert nodes(a1) == nodes(a2) == ["cluster1/node1", "cluster2/node1"]
    status = await a1.client.request("GET", "/status", params={"verbose": "true"})
    section = next(s for s in status["sections"] if s["name"] == "ClusterMesh")
    assert section["health"] == "Ok"
    assert section["summary"] == "1/1 remote clusters ready, 0 global-services"
    details = "\n".join(section["details"])
    assert "cluster2: ready, 1 nodes, 0 endpoints, 0 identities, 0 services, 0 failures" in details
    assert f"└  etcd: 1/1 connected, leases=0, has-quorum=true: {mesh.etcd[2].url} - 3.4." in details
    assert "└  remote configuration: expected=true, retrieved=true, cluster-id=102" in details
    assert ("└  synchronization status: nodes=true, endpoints=true, identities=true,"
            " services=true") in details
    assert "└  sync lag: " in details

    sock = ["--socket-path", str(a1.socket_path)]
    node_list = (await asyncio.to_thread(run_cli, "node", "list", *sock)).stdout.splitlines()
    assert node_list[0].split() == ["Name", "IPv4", "Address", "Endpoint", "CIDR", "IPv6",
                                    "Address", "Endpoint", "CIDR"]
    assert [line.split() for line in node_list[1:]] == [
        ["cluster1/node1", "10.1.1.1", "10.1.0.0/24"], ["cluster2/node1", "10.2.2.1", "10.2.0.0/24"]]
    as_json = json.loads((await asyncio.to_thread(run_cli, "node", "list", "-o", "json",
                                                  *sock)).stdout)
    assert {n["cluster"] for n in as_json} == {"cluster1", "cluster2"}
    text = (await asyncio.to_thread(run_cli, "status", "--verbose", *sock)).stdout
    assert "ClusterMesh: Ok        1/1 remote clusters ready, 0 global-services" in text


async def test_remote_identities_and_ips_flow_as_events(mesh, hook_recorder):
    mesh.connect(1, 2)
    w2 = await mesh.writer(2)
    labels = frozenset({"k8s:app=employee", "k8s:io.kubernetes.pod.namespace=istio-space",
                        "k8s:io.cilium.k8s.policy.cluster=cluster2"})
    await w2.put(kvkeys.identity_key(C2_BASE + 256), format_labels(labels).encode())
    entry = IPCacheEntry(ipaddress.ip_network("10.2.0.5/32"), C2_BASE + 256, "cluster2",
                         ipaddress.ip_address("10.2.2.1"), "istio-space", "employee-0")
    await w2.put(kvkeys.ipcache_key("10.2.0.5"), ipcache_to_json(entry))
    await w2.put(kvkeys.node_key("cluster2", "node1"), node_to_json(POD_NODE))  # grants 10.2.0.x
    await w2.put(kvkeys.cluster_config_key("cluster2"), b'{"id": 102}')
    a1 = await mesh.start(1, extra_plugins=[("rec", hook_recorder)])
    await wait_for(lambda: remote(a1, "cluster2").ready, 10, "cluster2 ready")
    assert [(k, i.id, i.cluster) for k, i in hook_recorder.of("identity")] == [
        (ChangeKind.UPSERT, C2_BASE + 256, "cluster2")]
    assert hook_recorder.of("ipcache") == [(ChangeKind.UPSERT, entry)]
    ip_list = (await asyncio.to_thread(run_cli, "ip", "list", "--socket-path",
                                       str(a1.socket_path))).stdout
    row = next(line.split() for line in ip_list.splitlines() if line.startswith("10.2.0.5/32"))
    assert row == ["10.2.0.5/32", str(C2_BASE + 256), "cluster2", "10.2.2.1",
                   "istio-space/employee-0"]
    ids = json.loads((await asyncio.to_thread(run_cli, "identity", "list", "-o", "json",
                                              "--socket-path", str(a1.socket_path))).stdout)
    assert [(i["id"], i["cluster"]) for i in ids] == [(C2_BASE + 256, "cluster2")]
    # a deletion on the remote is a delete event here
    await w2.delete(kvkeys.ipcache_key("10.2.0.5"))
    await wait_for(lambda: len(hook_recorder.of("ipcache")) == 2, 5, "ipcache delete")
    assert hook_recorder.of("ipcache")[-1] == (ChangeKind.DELETE, entry)
    await w2.close()


async def test_adding_and_removing_the_file_connects_and_withdraws(mesh, hook_recorder):
    a2 = await mesh.start(2)
    a1 = await mesh.start(1, extra_plugins=[("rec", hook_recorder)])
    assert a1.agent.clustermesh.status(False).summary.startswith("0/0 remote clusters ready")
    assert nodes(a1) == ["cluster1/node1"]
    mesh.connect(1, 2)  # no restart: the directory is watched
    await wait_for(lambda: "cluster2" in a1.agent.clustermesh.remotes
                   and remote(a1, "cluster2").ready, 5, "connect on file add")
    assert nodes(a1) == ["cluster1/node1", "cluster2/node1"]
    (mesh.mesh_dir[1] / "cluster2").unlink()
    await wait_for(lambda: "cluster2" not in a1.agent.clustermesh.remotes, 5, "disconnect")
    assert nodes(a1) == ["cluster1/node1"]
    deleted = [n.full_name for k, n in hook_recorder.of("node") if k is ChangeKind.DELETE]
    assert deleted == ["cluster2/node1"]
    assert a2.agent.ready


async def test_changing_the_file_reconnects(mesh):
    await mesh.start(2)
    mesh.connect(1, 2, ca=trustme.CA())  # wrong CA first
    a1 = await mesh.start(1)
    await wait_for(lambda: "TLS verification" in remote(a1, "cluster2").last_error, 10,
                   "a TLS error")
    r = remote(a1, "cluster2")
    assert not r.ready and r.failures >= 1
    status = a1.agent.clustermesh.status(True)
    assert status.health.value == "Warning" and "0/1 remote clusters ready" in status.summary
    assert any("└  error: " in d and "TLS verification" in d for d in status.details)
    mesh.connect(1, 2)  # fixed: right CA and certificates
    await wait_for(lambda: remote(a1, "cluster2").ready, 10, "reconnect after the fix")
    assert nodes(a1) == ["cluster1/node1", "cluster2/node1"]


async def test_a_rotated_ca_file_is_picked_up_without_touching_the_config(mesh):
    """The CA lives outside the clustermesh directory (as a mounted secret may): replacing it
    alone reconnects, with the new CA."""
    await mesh.start(2)
    config = mesh.connect(1, 2)
    certs = mesh.tmp / "certs"
    certs.mkdir()
    settings = yaml.safe_load(config.read_text())
    ca_file = certs / "ca.crt"
    ca_file.write_bytes(Path(settings["ca-file"]).read_bytes())
    right_ca = ca_file.read_bytes()
    settings["ca-file"] = str(ca_file)
    config.write_text(yaml.safe_dump(settings))
    a1 = await mesh.start(1)
    await wait_for(lambda: remote(a1, "cluster2").ready, 10, "ready")

    trustme.CA().cert_pem.write_to_path(str(ca_file))  # rotated to a CA etcd's cert is not from
    await wait_for(lambda: "TLS verification" in remote(a1, "cluster2").last_error, 15,
                   "reconnect with the new CA file")
    ca_file.write_bytes(right_ca)
    await wait_for(lambda: remote(a1, "cluster2").ready, 15, "ready with the right CA again")


async def test_remote_outage_keeps_entries_then_resyncs(mesh):
    mesh.connect(1, 2)
    w2 = await mesh.writer(2)
    await w2.put(kvkeys.cluster_config_key("cluster2"), b'{"id": 102}')
    for i, ip in enumerate(("10.2.0.7", "10.2.0.8")):
        entry = IPCacheEntry(ipaddress.ip_network(f"{ip}/32"), C2_BASE + 300 + i, "cluster2")
        await w2.put(kvkeys.ipcache_key(ip), ipcache_to_json(entry))
    await w2.put(kvkeys.node_key("cluster2", "node9"),
                 node_to_json(Node("node9", "cluster2", 102)))
    await w2.put(kvkeys.node_key("cluster2", "node1"), node_to_json(POD_NODE))
    await w2.close()
    a1 = await mesh.start(1)
    await wait_for(lambda: remote(a1, "cluster2").ready, 10, "ready")
    # endpoints wait for the grant of their node's pod CIDR (a debounced recompute)
    await wait_for(lambda: len(a1.agent.tables.ipcache) == 2, 5, "endpoints admitted")

    mesh.etcd[2].stop()
    await wait_for(lambda: not remote(a1, "cluster2").ready, 30, "outage noticed")
    r = remote(a1, "cluster2")
    assert r.failures >= 1 and r.last_error
    assert len(a1.agent.tables.ipcache) == 2 and "cluster2/node9" in nodes(a1)  # kept
    summary = a1.agent.clustermesh.status(False).summary
    assert summary.startswith("0/1 remote clusters ready") and "cluster2" in summary

    mesh.etcd[2].start()
    w2 = await mesh.writer(2)
    await w2.delete(kvkeys.ipcache_key("10.2.0.8"))  # deleted meanwhile
    await w2.delete(kvkeys.node_key("cluster2", "node9"))
    await w2.close()
    await wait_for(lambda: remote(a1, "cluster2").ready, 40, "resync")
    await wait_for(lambda: len(a1.agent.tables.ipcache) == 1, 5, "deleted entry gone")
    assert [str(e.prefix) for e in a1.agent.tables.ipcache.values()] == ["10.2.0.7/32"]
    assert "cluster2/node9" not in nodes(a1)


async def test_foreign_and_malformed_entries_are_rejected_and_counted(mesh):
    mesh.connect(1, 2)
    w2 = await mesh.writer(2)
    good_labels = format_labels(frozenset({"k8s:app=ok",
                                           "k8s:io.cilium.k8s.policy.cluster=cluster2"}))
    bad = {
        kvkeys.identity_key((101 << 16) + 300): good_labels,  # cluster1's range
        kvkeys.identity_key(5): "reserved:init;",  # reserved
        kvkeys.identity_key(C2_BASE + 400): format_labels(frozenset(
            {"k8s:app=x", "k8s:io.cilium.k8s.policy.cluster=cluster3"})),  # foreign label
        kvkeys.identity_key(C2_BASE + 401): "",  # no labels
        kvkeys.node_key("cluster3", "n1"): node_to_json(Node("n1", "cluster3", 103)).decode(),
        kvkeys.node_key("cluster2", "n2"): node_to_json(Node("n2", "cluster3", 103)).decode(),
        kvkeys.ipcache_key("10.2.1.9"): ipcache_to_json(IPCacheEntry(
            ipaddress.ip_network("10.2.1.9/32"), (101 << 16) + 256, "cluster2")).decode(),
        kvkeys.service_key("cluster2", "default", "broken"): "{not json",
    }
    for key, value in bad.items():
        await w2.put(key, value.encode())
    await w2.put(kvkeys.identity_key(C2_BASE + 256), good_labels.encode())
    a1 = await mesh.start(1)
    await mesh.start(2)
    await wait_for(lambda: remote(a1, "cluster2").ready, 10, "ready")
    sync = remote(a1, "cluster2").sync
    assert dict(sync.checks.rejected) == {"identities": 4, "nodes": 2, "endpoints": 1, "services": 1}
    assert "outside cluster2's range" in sync.checks.last_reject["endpoints"]
    assert "malformed JSON" in sync.checks.last_reject["services"]
    # nothing else from that remote is lost
    assert [i.id for i in a1.agent.tables.identities.values()] == [C2_BASE + 256]
    assert nodes(a1) == ["cluster1/node1", "cluster2/node1"]
    details = "\n".join(a1.agent.clustermesh.status(True).details)
    assert "└  rejected: 1 endpoints, 4 identities, 2 nodes, 1 services" in details
    # a bad update later is rejected too, and the agent carries on
    await w2.put(kvkeys.identity_key(C2_BASE + 257), b"\xff\xfe")
    await wait_for(lambda: sync.checks.rejected["identities"] == 5, 5, "a later rejection")
    assert remote(a1, "cluster2").ready
    await w2.close()


async def test_cluster_id_conflicts_are_refused_and_shown(mesh):
    mesh.connect(1, 2)
    await mesh.start(2, cluster_id=101)  # cluster2 claims cluster1's id
    a1 = await mesh.start(1)
    await wait_for(lambda: "conflicts with the local cluster" in remote(a1, "cluster2").last_error,
                   10, "local id conflict")
    r = remote(a1, "cluster2")
    assert not r.ready and nodes(a1) == ["cluster1/node1"]
    assert "cluster id 101 conflicts with the local cluster 'cluster1'" in \
        a1.agent.clustermesh.status(False).summary


async def test_two_remotes_with_one_id_second_is_refused(mesh, short_tmp):
    etcd3 = EtcdServer("etcd3", tls=True).start()
    try:
        w3 = EtcdKVStore(load_etcd_config(etcd3.client_config(short_tmp / "w3.yaml")))
        await w3.put(kvkeys.cluster_config_key("cluster3"), b'{"id": 102}')
        await w3.close()
        await mesh.start(2)
        mesh.connect(1, 2)
        a1 = await mesh.start(1)
        await wait_for(lambda: remote(a1, "cluster2").ready, 10, "cluster2 ready")
        etcd3.client_config(mesh.mesh_dir[1] / "cluster3")
        await wait_for(lambda: "cluster3" in a1.agent.clustermesh.remotes and
                       "conflicts with remote cluster 'cluster2'" in
                       remote(a1, "cluster3").last_error, 10, "remote id conflict")
        assert remote(a1, "cluster2").ready
    finally:
        etcd3.cleanup()


async def test_clean_shutdown_revokes_the_lease(mesh):
    a2 = await mesh.start(2)
    w2 = await mesh.writer(2)
    assert await w2.get(kvkeys.node_key("cluster2", "node1")) is not None
    assert await w2.get(kvkeys.cluster_config_key("cluster2")) is not None
    assert await w2.get(kvkeys.synced_key("cluster2", kvkeys.NODES)) is not None
    await a2.stop()
    assert await w2.get(kvkeys.node_key("cluster2", "node1")) is None  # gone at once
    assert await w2.get(kvkeys.cluster_config_key("cluster2")) is not None  # config stays
    await w2.close()


async def test_published_ipcache_entries_reach_the_other_cluster(mesh):
    mesh.connect(1, 2)
    a2 = await mesh.start(2)
    a1 = await mesh.start(1)
    await wait_for(lambda: remote(a1, "cluster2").ready, 10, "ready")
    entry = IPCacheEntry(ipaddress.ip_network("10.2.0.20/32"), C2_BASE + 999, "cluster2",
                         ipaddress.ip_address("10.2.2.1"), "istio-space", "employee-0")
    a2.agent.publisher.upsert_ipcache(entry)
    await wait_for(lambda: a1.agent.tables.ipcache.get(entry.prefix) == entry, 5, "propagation")
    a2.agent.publisher.delete_ipcache(entry)
    await wait_for(lambda: a1.agent.tables.ipcache.get(entry.prefix) is None, 5, "withdrawal")
