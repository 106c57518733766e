"""KVStoreMesh against real etcd servers: the cache process, agents reading through it, the
cache's key layout and canaries, replicas, restarts and a cluster leaving the mesh.

cluster1's KVStoreMesh copies cluster2 into etcd1; cluster1's agent reads cluster2 from etcd1.
"""

import asyncio
import contextlib
import ipaddress
import json
import re
import signal
import ssl
import subprocess
import time
import urllib.request

import pytest
import yaml
from conftest import MESHAGENT, clean_env, run_cli
from test_clustermesh import C2_BASE, Mesh

from meshagent.clustermesh.cache import CacheLayout
from meshagent.clustermesh.sync import KINDS
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstoremesh.command import build
from meshagent.model.cluster import ClusterConfig
from meshagent.model.identity import format_labels
from meshagent.model.ipcache import IPCacheEntry, ipcache_to_json
from meshagent.testing import eventually
from meshagent_dev.etcd import free_port

LABELS = frozenset({"k8s:app=employee", "k8s:io.kubernetes.pod.namespace=istio-space",
                    "k8s:io.cilium.k8s.policy.cluster=cluster2"})
EMPLOYEE = C2_BASE + 300


class KVMesh(Mesh):
    """The two clusters, plus cluster1's KVStoreMesh (in-process or as a process)."""

    def __init__(self, tmp, agent_factory):
        super().__init__(tmp, agent_factory)
        self.kv_dir = tmp / "kvmesh"
        self.kv_dir.mkdir()
        self.etcd[2].client_config(self.kv_dir / "cluster2")  # what KVStoreMesh dials
        self.meshes, self.procs = [], []

    def args(self, n: int = 0) -> list[str]:
        return ["--plugins", "etcd", "--cluster-name", "cluster1", "--cluster-id", "101",
                "--etcd-config", str(self.own_config[1]),
                "--clustermesh-config", str(self.kv_dir),
                "--kvstoremesh-socket-path", str(self.tmp / f"kvmesh{n}.sock")]

    async def kvstoremesh(self, n: int = 0, *extra: str):
        """An in-process replica, running until the test ends."""
        mesh = build(self.args(n) + list(extra), {})
        task = asyncio.create_task(mesh.run(), name=f"kvstoremesh{n}")
        self.meshes.append((mesh, task))
        return mesh, task

    def process(self, n: int = 0, *extra: str) -> subprocess.Popen:
        log = open(self.tmp / f"kvmesh{n}.log", "a")
        proc = subprocess.Popen([MESHAGENT, "kvstoremesh", *self.args(n), *extra], stdout=log,
                                stderr=subprocess.STDOUT, env=clean_env())
        self.procs.append(proc)
        return proc

    def via_cache(self) -> None:
        """cluster1's agent reads cluster2 from its own etcd, as Cilium's agents do with
        KVStoreMesh: the file for cluster2 points at etcd1."""
        self.etcd[1].client_config(self.mesh_dir[1] / "cluster2")

    async def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for mesh, task in self.meshes:
            mesh.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        await super().cleanup()


@pytest.fixture
async def kvmesh(short_tmp, agent_factory):
    m = KVMesh(short_tmp, agent_factory)
    yield m
    await m.cleanup()


async def publish_employee(mesh: KVMesh, ip: str = "10.2.0.7", identity: int = EMPLOYEE):
    writer = await mesh.writer(2)
    await writer.put(kvkeys.identity_key(identity), format_labels(LABELS).encode())
    await writer.put(kvkeys.ipcache_key(ip), ipcache_to_json(IPCacheEntry(
        ipaddress.ip_network(f"{ip}/32"), identity, "cluster2")))
    return writer


def remote(running, name="cluster2"):
    return running.agent.clustermesh.remotes[name]


def remote_ready(running, name="cluster2") -> bool:
    """Whether the agent has the remote and it is ready (an agent started without waiting
    may not have read its clustermesh directory yet)."""
    remotes = running.agent.clustermesh.remotes
    return name in remotes and remotes[name].ready


async def test_an_agent_reads_a_remote_through_the_cache_and_never_dials_it(kvmesh):
    await kvmesh.start(2)
    writer = await publish_employee(kvmesh)
    await kvmesh.kvstoremesh()
    kvmesh.via_cache()
    a1 = await kvmesh.start(1)
    await eventually(lambda: remote_ready(a1), 10, "cluster2 ready through the cache")
    r = remote(a1)
    assert r.source == "cache"
    assert kvmesh.etcd[1].url in r.store.status().summary  # the local etcd, never etcd2
    assert kvmesh.etcd[2].url not in r.store.status().summary
    assert a1.agent.tables.identities.get(EMPLOYEE).labels == LABELS
    # the endpoint waits for the grant of its node's pod CIDR, as from a direct remote
    await eventually(lambda: a1.agent.tables.ipcache.count("cluster2") == 1, 5, "endpoint")

    # Cilium's layout, values unchanged, canaries and the cached cluster config
    local = await kvmesh.writer(1)
    cached = await local.get(f"cilium/cache/identities/v1/cluster2/id/{EMPLOYEE}")
    assert cached.value == format_labels(LABELS).encode()
    assert await local.get("cilium/cache/ip/v1/cluster2/10.2.0.7") is not None
    assert await local.get("cilium/cache/nodes/v1/cluster2/node1") is not None
    for kind in ("nodes", "identities", "ip", "services"):
        assert await local.get(f"cilium/synced/cluster2/cilium/cache/{kind}/v1") is not None
    config = json.loads((await local.get(kvkeys.cluster_config_key("cluster2"))).value)
    assert config == {"id": 102, "capabilities": {"syncedCanaries": True, "cached": True,
                                                  "maxConnectedClusters": 255}}

    status = await a1.client.request("GET", "/status", params={"verbose": "true"})
    section = next(s for s in status["sections"] if s["name"] == "ClusterMesh")
    assert section["summary"].startswith("1/1 remote clusters ready")
    assert "1 through the KVStoreMesh cache" in section["summary"]
    details = "\n".join(section["details"])
    assert "kvstoremesh=true, sync-canaries=true" in details
    assert "└  source: the KVStoreMesh cache" in details

    # changes flow through; a deletion is withdrawn
    await writer.delete(kvkeys.ipcache_key("10.2.0.7"))
    await eventually(lambda: a1.agent.tables.ipcache.count("cluster2") == 0, 5, "withdrawn")
    await writer.close()
    await local.close()


async def test_kvstoremesh_status_and_what_it_refuses(kvmesh):
    await kvmesh.start(2)
    writer = await publish_employee(kvmesh)
    outside = 103 << 16 | 300  # cluster3's range: an agent refuses it, so does the cache
    await writer.put(kvkeys.identity_key(outside), format_labels(LABELS).encode())
    port = free_port()
    proc = kvmesh.process(0, "--prometheus-serve-addr", f"127.0.0.1:{port}")
    sock = str(kvmesh.tmp / "kvmesh0.sock")

    def ready() -> bool:
        result = run_cli("kvstoremesh", "status", "--socket-path", sock)
        return result.returncode == 0 and "1/1 remote clusters ready" in result.stdout
    await eventually(lambda: ready(), 15, "kvstoremesh ready")
    result = run_cli("kvstoremesh", "status", "--verbose", "--socket-path", sock)
    assert "KVStoreMesh:" in result.stdout and "Leader:" in result.stdout, result.stdout
    assert "cluster2: ready, 1 nodes, 1 endpoints, 1 identities, 0 services" in result.stdout
    assert "rejected: 1 identities" in result.stdout
    local = await kvmesh.writer(1)
    assert await local.get(f"cilium/cache/identities/v1/cluster2/id/{outside}") is None
    remotes = json.loads(run_cli("kvstoremesh", "remotes", "--socket-path", sock).stdout)
    assert remotes["leader"] is True and remotes["remotes"][0]["name"] == "cluster2"
    assert remotes["remotes"][0]["writes"] == 3  # node, identity, endpoint (canaries aside)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "meshagent_kvstoremesh_leader 1.0" in metrics
    assert 'meshagent_kvstoremesh_remote_cluster_ready{target_cluster="cluster2"} 1.0' in metrics
    assert ('meshagent_kvstoremesh_cached_entries{kind="identities",target_cluster="cluster2"}'
            ' 1.0') in metrics
    assert ('meshagent_kvstoremesh_rejected_entries_total{kind="identities",'
            'target_cluster="cluster2"} 1.0') in metrics
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    # a clean stop leaves the cache for the agents
    assert await local.get(f"cilium/cache/identities/v1/cluster2/id/{EMPLOYEE}") is not None
    await writer.close()
    await local.close()


async def test_a_killed_cache_process_loses_nothing_and_catches_up(kvmesh):
    await kvmesh.start(2)
    writer = await publish_employee(kvmesh)
    proc = kvmesh.process()
    kvmesh.via_cache()
    a1 = await kvmesh.start(1, wait_ready=False)
    await eventually(lambda: remote_ready(a1), 15, "cluster2 ready through the cache")
    lost = []
    stop = asyncio.Event()

    async def watch():  # the identity must never leave the agent's tables
        while not stop.is_set():
            if a1.agent.tables.identities.get(EMPLOYEE) is None:
                lost.append(time.monotonic())
            await asyncio.sleep(0.01)
    watcher = asyncio.create_task(watch())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # while it is down: one entry goes, one comes
    await writer.delete(kvkeys.ipcache_key("10.2.0.7"))
    await writer.put(kvkeys.identity_key(EMPLOYEE + 1), format_labels(LABELS).encode())
    await asyncio.sleep(1)
    assert a1.agent.tables.ipcache.count("cluster2") == 1  # the cache stays as it was
    kvmesh.process()
    await eventually(lambda: a1.agent.tables.identities.get(EMPLOYEE + 1) is not None, 15,
                     "the new identity, after the restart")
    await eventually(lambda: a1.agent.tables.ipcache.count("cluster2") == 0, 5,
                     "the entry deleted while it was down")
    stop.set()
    await watcher
    assert not lost
    assert remote(a1).ready
    await writer.close()


async def test_the_agent_option_reads_the_cache_and_waits_for_kvstoremesh(kvmesh):
    await kvmesh.start(2)
    writer = await publish_employee(kvmesh)
    kvmesh.connect(1, 2)  # the file names etcd2; the option makes the agent ignore that
    a1 = await kvmesh.start(1, "--clustermesh-read-cache", "true", wait_ready=False)
    await eventually(lambda: "cluster2" in a1.agent.clustermesh.remotes
                     and "is meshagent kvstoremesh running?" in remote(a1).problem(), 10,
                     "waiting for KVStoreMesh")
    await kvmesh.kvstoremesh()
    await eventually(lambda: remote_ready(a1), 15, "ready through the cache")
    assert kvmesh.etcd[1].url in remote(a1).store.status().summary
    assert a1.agent.tables.identities.get(EMPLOYEE) is not None
    await writer.close()


async def test_a_cluster_leaving_the_kvstoremesh_config_is_withdrawn(kvmesh):
    await kvmesh.start(2)
    writer = await publish_employee(kvmesh)
    await kvmesh.kvstoremesh()
    kvmesh.via_cache()
    a1 = await kvmesh.start(1, wait_ready=False)
    await eventually(lambda: remote_ready(a1), 15, "ready through the cache")
    (kvmesh.kv_dir / "cluster2").unlink()
    await eventually(lambda: a1.agent.tables.identities.get(EMPLOYEE) is None
                     and a1.agent.tables.ipcache.count("cluster2") == 0, 15, "withdrawn")
    local = await kvmesh.writer(1)
    assert (await local.list_prefix("cilium/cache/")).items == []
    assert await local.get(kvkeys.cluster_config_key("cluster2")) is None
    # back, and at once gone and back again: the new copy outlives the old one's withdrawal
    kvmesh.etcd[2].client_config(kvmesh.kv_dir / "cluster2")
    await asyncio.sleep(0.3)
    (kvmesh.kv_dir / "cluster2").unlink()
    await asyncio.sleep(0.3)
    kvmesh.etcd[2].client_config(kvmesh.kv_dir / "cluster2")
    await eventually(lambda: a1.agent.tables.identities.get(EMPLOYEE) is not None
                     and remote(a1).ready, 15, "cached again")
    await asyncio.sleep(1)
    assert a1.agent.tables.identities.get(EMPLOYEE) is not None
    assert await local.get(kvkeys.cluster_config_key("cluster2")) is not None
    await writer.close()
    await local.close()


async def test_replicas_elect_one_writer_and_a_standby_takes_over(kvmesh):
    await kvmesh.start(2)
    writer = await publish_employee(kvmesh)
    first, _ = await kvmesh.kvstoremesh(0, "--kvstoremesh-leader-ttl", "2")
    second, _ = await kvmesh.kvstoremesh(1, "--kvstoremesh-leader-ttl", "2")
    await eventually(lambda: first.leader or second.leader, 10, "a leader")
    await asyncio.sleep(1)
    assert first.leader != second.leader  # exactly one
    leader, standby = (first, second) if first.leader else (second, first)
    assert standby.mesh.remotes == {}  # a standby holds no connection to the remote
    assert "standby; leader: " in standby.status(False).sections[-1].summary or any(
        "standby" in s.summary for s in standby.status(False).sections)
    leader.stop()
    await eventually(lambda: standby.leader, 10, "the standby takes over")
    await writer.put(kvkeys.identity_key(EMPLOYEE + 2), format_labels(LABELS).encode())
    local = await kvmesh.writer(1)

    async def copied():
        return await local.get(f"cilium/cache/identities/v1/cluster2/id/{EMPLOYEE + 2}")
    for _ in range(100):
        if await copied() is not None:
            break
        await asyncio.sleep(0.1)
    assert await copied() is not None
    await writer.close()
    await local.close()


def etcd_watchers(server, tmp) -> int:
    """The watchers etcd serves (``etcd_debugging_mvcc_watcher_total``, what
    bench/kvstoremesh.py reports), read over its TLS client port."""
    config = yaml.safe_load(server.client_config(tmp / "metrics-reader").read_text())
    context = ssl.create_default_context(cafile=config["ca-file"])
    context.load_cert_chain(config["cert-file"], config["key-file"])
    text = urllib.request.urlopen(f"{server.url}/metrics", timeout=5,
                                  context=context).read().decode()
    return int(float(re.search(r"^etcd_debugging_mvcc_watcher_total (\S+)$", text,
                               re.M).group(1)))


async def test_one_watch_per_kind_serves_every_cluster_read_from_the_cache(kvmesh):
    """``--clustermesh-read-cache`` with two cached clusters (cluster2 copied by KVStoreMesh,
    cluster3's cache written here as another KVStoreMesh would): the same four watches of the
    local etcd serve both, so cluster3 leaving takes none away and cluster2, the last, takes
    all four. Each cluster still waits for its own canaries and is withdrawn alone, and a key
    of a cluster not configured is applied to no one."""
    await kvmesh.start(2)
    writer = await publish_employee(kvmesh)
    await kvmesh.kvstoremesh()
    local = await kvmesh.writer(1)
    c3, c9 = (103 << 16) + 300, (109 << 16) + 300
    await local.put(kvkeys.cluster_config_key("cluster3"), ClusterConfig(
        103, synced_canaries=True, cached=True, max_connected_clusters=255).to_json())
    for cluster, number in (("cluster3", c3), ("cluster9", c9)):
        labels = {"k8s:app=db", "k8s:io.kubernetes.pod.namespace=default",
                  f"k8s:io.cilium.k8s.policy.cluster={cluster}"}
        await local.put(CacheLayout(kvkeys.IDENTITIES, cluster).to_cache(
            kvkeys.identity_key(number)), format_labels(frozenset(labels)).encode())
    for name in ("cluster2", "cluster3"):  # the files only name the clusters
        (kvmesh.mesh_dir[1] / name).write_text("endpoints: []\n")
    a1 = await kvmesh.start(1, "--clustermesh-read-cache", "true", wait_ready=False)
    identities = a1.agent.tables.identities
    await eventually(lambda: remote_ready(a1), 15, "cluster2 ready through the cache")
    await asyncio.sleep(0.5)
    assert not remote(a1, "cluster3").ready and identities.get(c3) is None  # no canaries yet
    for kind in KINDS:
        await local.put(CacheLayout(kind.prefix, "cluster3").canary, b"2026-12-07T10:00:00Z")
    await eventually(lambda: remote_ready(a1, "cluster3") and identities.get(c3) is not None,
                     15, "cluster3 once its canaries are there")
    assert identities.get(c9) is None and identities.get(EMPLOYEE) is not None
    # changes in one transaction (one revision, as KVStoreMesh writes its batches): every one
    labels3 = format_labels(frozenset({"k8s:app=db", "k8s:io.kubernetes.pod.namespace=default",
                                       "k8s:io.cilium.k8s.policy.cluster=cluster3"})).encode()
    batch = [c3 + n for n in range(1, 20)]
    await local.put_many([(CacheLayout(kvkeys.IDENTITIES, "cluster3").to_cache(
        kvkeys.identity_key(number)), labels3) for number in batch])
    await eventually(lambda: all(identities.get(n) is not None for n in batch), 10,
                     "a transaction's changes")
    await asyncio.sleep(1)
    both = etcd_watchers(kvmesh.etcd[1], kvmesh.tmp)

    (kvmesh.mesh_dir[1] / "cluster3").unlink()
    await eventually(lambda: identities.get(c3) is None and identities.count("cluster3") == 0,
                     15, "cluster3 withdrawn")
    assert identities.get(EMPLOYEE) is not None and remote(a1).ready
    await asyncio.sleep(1)
    assert etcd_watchers(kvmesh.etcd[1], kvmesh.tmp) == both
    (kvmesh.mesh_dir[1] / "cluster2").unlink()
    await eventually(lambda: identities.get(EMPLOYEE) is None, 15, "cluster2 withdrawn")
    await eventually(lambda: etcd_watchers(kvmesh.etcd[1], kvmesh.tmp) == both - len(KINDS),
                     10, "the four shared watches gone with the last reader")
    await writer.close()
    await local.close()
