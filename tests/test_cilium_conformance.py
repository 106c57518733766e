"""Cilium conformance, against real etcd servers (issue 29, item 4).

Both directions are judged by Cilium's side, built from Cilium's source (tests/cilium/):
- Cilium -> meshagent: ``meshagent_dev.cilium`` puts cluster2 (id 102) into etcd exactly as Cilium
  1.17 writes it; a meshagent agent of cluster1 (id 101) must import what a Cilium agent would.
- meshagent -> Cilium: ``cilium.reader`` decodes what meshagent writes with Go encoding/json's
  rules, Cilium's structs and validators, and reads only what Cilium reads, in its order.
- KVStoreMesh both ways, and the upgrade from meshagent's older ipcache layout.

Key names the implementation must match are the constants just below.
"""

import asyncio
import ipaddress
import json
import time

import pytest
import yaml
from cilium import reader as R
from meshagent_dev import cilium as W
from conftest import run_cli

from meshagent.model.ipcache import IPCacheEntry
from meshagent.plugins.etcd.client import EtcdKVStore
from meshagent.plugins.etcd.config import load_etcd_config
from meshagent_dev.etcd import EtcdServer

# -- what the implementation must match -------------------------------------------------------------
#: clustermesh-file key: the pod CIDRs of a remote whose nodes announce none (ENI, Azure,
#: multi-pool IPAM); its endpoints inside them are admitted, others stay held
POD_CIDRS_KEY = "pod-cidrs"
#: clustermesh-file key: admit the remote's endpoints without any pod CIDR
TRUST_ENDPOINTS_KEY = "trust-endpoints"
#: the status summary of a mesh with its one remote ready
READY = "1/1 remote clusters ready"

LOCAL, LOCAL_ID = "cluster1", 101
LOCAL_NODE_IP, LOCAL_POD_CIDR = "10.1.1.1", "10.1.0.0/24"
SETTLE = 1.0  # seconds given to something that must NOT happen


# -- servers, shared by the module; wiped before every test -------------------------------------------

@pytest.fixture(scope="module")
def servers():
    started = {}
    try:
        for n in (1, 2, 3):
            started[n] = EtcdServer(f"conf{n}").start()
        yield started
    finally:
        for server in started.values():
            server.cleanup()


class World:
    """etcd1: cluster1's own etcd (and its KVStoreMesh cache); etcd2: cluster2's, written as
    Cilium writes it; etcd3: cluster2's etcd after it moved (a reconnect to other contents)."""

    def __init__(self, servers, tmp, agent_factory):
        self.servers, self.tmp, self.agent_factory = servers, tmp, agent_factory
        self.clients: dict[int, EtcdKVStore] = {}
        self.mesh_dir = tmp / "mesh1"
        self.mesh_dir.mkdir()
        self.own = servers[1].client_config(tmp / "etcd1.yaml")
        self.tasks = []

    async def client(self, n: int) -> EtcdKVStore:
        if n not in self.clients:
            client = EtcdKVStore(load_etcd_config(
                self.servers[n].client_config(self.tmp / f"client{n}.yaml")))
            await client.connect()
            self.clients[n] = client
        return self.clients[n]

    async def wipe(self) -> None:
        for n in self.servers:  # everything meshagent and Cilium write lives under these
            for prefix in ("cilium/", "meshagent/"):
                await (await self.client(n)).delete_prefix(prefix)

    async def write(self, n: int, entries) -> None:
        await W.write(await self.client(n), entries)

    def connect(self, server: int = 2, **extra) -> None:
        """cluster1's clustermesh file for cluster2, pointing at etcd ``server``, with
        ``extra`` keys (underscores in names become dashes)."""
        path = self.mesh_dir / W.CLUSTER
        tmp = self.tmp / "cluster2.tmp"
        self.servers[server].client_config(tmp)
        data = yaml.safe_load(tmp.read_text())
        data.update({k.replace("_", "-"): v for k, v in extra.items()})
        tmp.write_text(yaml.safe_dump(data))
        tmp.replace(path)  # one change the watcher sees whole

    async def agent(self, *extra: str, wait_ready: bool = False):
        return await self.agent_factory([
            "--plugins", "etcd", "--cluster-name", LOCAL, "--cluster-id", str(LOCAL_ID),
            "--node-name", "node1", "--node-ip", LOCAL_NODE_IP, "--pod-cidr", LOCAL_POD_CIDR,
            "--etcd-config", str(self.own), "--clustermesh-config", str(self.mesh_dir), *extra],
            wait_ready=wait_ready)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for client in self.clients.values():
            await client.close()


@pytest.fixture
async def world(servers, short_tmp, agent_factory):
    w = World(servers, short_tmp, agent_factory)
    await w.wipe()
    yield w
    await w.close()


# -- reading the agent through its API ------------------------------------------------------------------

async def api(running, path: str):
    return await running.client.request("GET", path)


async def ipcache(running) -> dict[str, dict]:
    return {e["prefix"]: e for e in await api(running, "/ipcache")}


async def identities(running) -> dict[int, dict]:
    return {i["id"]: i for i in await api(running, "/identities")}


async def nodes(running) -> dict[str, dict]:
    return {f"{n['cluster']}/{n['name']}": n for n in await api(running, "/nodes")}


async def remote(running, name: str = W.CLUSTER) -> dict:
    mesh = await api(running, "/clustermesh")
    return next((r for r in mesh["remotes"] if r["name"] == name), {})


async def summary(running) -> str:
    status = await api(running, "/status")
    return next(s for s in status["sections"] if s["name"] == "ClusterMesh")["summary"]


async def until(fetch, predicate, timeout: float, what: str):
    """Poll ``await fetch()`` until ``predicate`` holds of it; fails naming ``what`` and showing
    the last value (and the remote's status) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen:"
                                 f" {json.dumps(value, default=str)[:1500]}")
        await asyncio.sleep(0.05)


async def explain(running) -> str:
    """The remote's state, for failure messages: rejections, held entries, errors."""
    r = await remote(running)
    keep = ("ready", "last_error", "synced", "rejected", "last_rejected", "held",
            "refused_pod_cidrs", "nodes", "endpoints", "identities", "services")
    return json.dumps({k: r.get(k) for k in keep}, default=str)


async def imported(world: World, *, timeout: float = 10):
    """An agent of cluster1 with the file for cluster2 (etcd2), once cluster2's node is in."""
    world.connect()
    a1 = await world.agent()
    try:
        await until(lambda: nodes(a1), lambda n: "cluster2/worker1" in n, timeout,
                    "cluster2's node worker1")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; remote: {await explain(a1)}") from None
    return a1


# ==== the fixture itself: Cilium's writer and Cilium's reader agree ===================================

async def test_the_reader_takes_ciliums_golden_cluster_and_its_variants(world):
    """Both sides come from Cilium's source; a Cilium agent would import all of this."""
    await world.write(2, {**W.golden(), **W.go_json_spellings(), **W.dual_stack_service(),
                          **W.range_start_identities(), **W.namespace_label_identities(),
                          **W.external_ip_node()[1]})
    view = await R.read_cluster(await world.client(2), W.CLUSTER, local_cluster_id=LOCAL_ID)
    assert view.problems == []
    assert str(R.node_ip(view.nodes["worker1"])) == W.NODE_IPV4
    assert R.pod_cidrs(view.nodes["worker1"]) == list(W.NODE_POD_CIDRS)
    assert str(R.node_ip(view.nodes["worker2"])) == W.external_ip_node()[0]
    assert view.identities[W.IDENTITY_ID] == W.IDENTITY_LABELS
    assert W.RANGE_START in view.identities and W.IDENTITY_ID + 1 in view.identities
    assert view.ipcache["10.2.1.5"]["K8sPodName"] == "employee-0"
    backends = view.services[(W.SERVICE_NAMESPACE, W.SERVICE_NAME)]["backends"]
    assert set(backends) == {"10.2.1.5", "fd00:2:1::5"}
    # what Cilium refuses, the reader refuses too
    await world.write(2, {W.identity_key(W.RANGE_START - 1): W.IDENTITY,  # cluster 101's
                          W.node_key("worker9"): W.NODE,  # named worker1 under worker9's key
                          f"{W.STATE}/ip/v1/default/10.2.1.99": W.IP})  # 10.2.1.5's value
    view = await R.read_cluster(await world.client(2), W.CLUSTER, local_cluster_id=LOCAL_ID)
    assert len(view.problems) == 3, view.problems
    assert R.validate_remote_config(view.config, 511) == (
        "mismatched MaxConnectedClusters; local=511, remote=255")
    await world.write(2, {W.canary_key("ip"): None})
    view = await R.read_cluster(await world.client(2), W.CLUSTER, local_cluster_id=LOCAL_ID)
    assert view.ipcache == {} and view.watched["ip"] is False


# ==== a. Cilium -> meshagent ===========================================================================

async def test_golden_cluster_is_imported_whole(world):
    await world.write(2, W.golden())
    a1 = await imported(world)
    await until(lambda: summary(a1), lambda s: s.startswith(READY), 10, "cluster2 ready")
    node = (await nodes(a1))["cluster2/worker1"]
    assert (node["ipv4"], node["ipv6"]) == (W.NODE_IPV4, W.NODE_IPV6), node
    assert node["pod_cidrs"] == list(W.NODE_POD_CIDRS), node
    assert node["cluster_id"] == W.CLUSTER_ID, node
    ident = (await identities(a1)).get(W.IDENTITY_ID)
    assert ident is not None, f"identity {W.IDENTITY_ID} not imported: {await explain(a1)}"
    assert set(ident["labels"]) == W.IDENTITY_LABELS and ident["cluster"] == W.CLUSTER, ident
    entries = await until(lambda: ipcache(a1), lambda e: "10.2.1.5/32" in e, 5,
                          "ipcache 10.2.1.5 (the golden endpoint)")
    entry = entries["10.2.1.5/32"]
    assert (entry["identity"], entry["cluster"], entry["host_ip"], entry["namespace"],
            entry["pod_name"]) == (W.IDENTITY_ID, W.CLUSTER, W.NODE_IPV4, "istio-space",
                                   "employee-0"), entry
    r = await remote(a1)
    assert r["rejected"] == {}, f"Cilium's golden values were rejected: {r['last_rejected']}"
    listing = (await asyncio.to_thread(run_cli, "node", "list", "--socket-path",
                                       str(a1.socket_path))).stdout
    assert ["cluster2/worker1", W.NODE_IPV4, "10.2.1.0/24", W.NODE_IPV6, "fd00:2:1::/64"] in [
        line.split() for line in listing.splitlines()], listing


def local_service(ports: list[dict], backends: list[str] = (), backend_ports=None) -> str:
    """cluster1's protected-db: a global Service (Cilium's annotation) with named ports, and
    its Endpoints."""
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": W.SERVICE_NAME, "namespace": W.SERVICE_NAMESPACE,
                            "annotations": {"service.cilium.io/global": "true"}},
               "spec": {"clusterIP": W.SERVICE_VIP, "ports": ports}}
    endpoints = {"apiVersion": "v1", "kind": "Endpoints",
                 "metadata": {"name": W.SERVICE_NAME, "namespace": W.SERVICE_NAMESPACE},
                 "subsets": [{"addresses": [{"ip": ip} for ip in backends],
                              "ports": backend_ports or [
                                  {"name": p["name"], "port": p["port"],
                                   "protocol": p.get("protocol", "TCP")} for p in ports]}]
                 if backends else []}
    return json.dumps(service) + "\n---\n" + json.dumps(endpoints)


REDIS_PORT = [{"name": "redis", "port": 6379, "protocol": "TCP", "targetPort": 6379}]


async def apply_service(world: World, running, text: str) -> None:
    path = world.tmp / "svc.yaml"
    path.write_text(text)
    result = await asyncio.to_thread(run_cli, "service", "apply", str(path), "--socket-path",
                                     str(running.socket_path))
    assert result.returncode == 0, result.stderr


async def merged_backends(running) -> set[tuple[str, int, str]]:
    services = await api(running, "/services")
    found = next((m for m in services if m["service"]["name"] == W.SERVICE_NAME), None)
    return {(b["ip"], b["port"], b["cluster"]) for b in (found or {}).get("backends", [])}


async def test_golden_service_backend_joins_the_local_global_service(world):
    await world.write(2, W.golden())
    a1 = await imported(world)
    await apply_service(world, a1, local_service(REDIS_PORT))
    await until(lambda: merged_backends(a1), lambda b: ("10.2.1.5", 6379, "cluster2") in b, 10,
                "cluster2's backend 10.2.1.5:6379 (port 'redis') in the local protected-db")


async def test_remote_backends_are_matched_by_port_name_not_number(world):
    """Cilium ignores a remote ClusterService's frontends; each backend port is used for the
    local frontend port of the same NAME (pkg/clustermesh/store/store.go PortConfiguration is
    keyed by port name; the load-balancer picks backend.Ports[frontend port name])."""
    doc = json.loads(W.SERVICE)
    doc["frontends"] = {"10.97.0.10": {"redis": {"Protocol": "TCP", "Port": 6380}}}
    doc["backends"] = {"10.2.1.5": {"redis": {"Protocol": "TCP", "Port": 16379}}}
    key = W.service_key(W.SERVICE_NAMESPACE, W.SERVICE_NAME)
    await world.write(2, {**W.golden(), key: json.dumps(doc).encode()})
    a1 = await imported(world)
    await apply_service(world, a1, local_service(REDIS_PORT))
    await until(lambda: merged_backends(a1), lambda b: ("10.2.1.5", 16379, "cluster2") in b, 10,
                "10.2.1.5:16379 (remote port named 'redis', other numbers) in protected-db")
    # the same numbers under another name: not a backend of the 'redis' port
    doc["frontends"] = json.loads(W.SERVICE)["frontends"]
    doc["backends"] = {"10.2.1.5": {"memcache": {"Protocol": "TCP", "Port": 6379}}}
    await world.write(2, {key: json.dumps(doc).encode()})
    await until(lambda: merged_backends(a1),
                lambda b: not any(c == "cluster2" for _, _, c in b), 10,
                "no cluster2 backend for 'redis' once its port is named 'memcache'")


async def test_a_node_with_only_an_external_ip_is_reached_there(world):
    address, entries = W.external_ip_node()
    await world.write(2, {**W.golden(), **entries})
    a1 = await imported(world)
    found = await until(lambda: nodes(a1), lambda n: "cluster2/worker2" in n, 5,
                        f"cluster2/worker2 (ExternalIP only); {W.node_key('worker2')}")
    assert found["cluster2/worker2"]["ipv4"] == address, (
        "Cilium's ExtractNodeIP falls back to the ExternalIP when a node lists no InternalIP"
        f" (pkg/node/addressing/addresstype.go); meshagent has {found['cluster2/worker2']}")


async def test_identities_from_the_very_start_of_the_clusters_range(world):
    await world.write(2, {**W.golden(), **W.range_start_identities()})
    a1 = await imported(world)
    await until(lambda: summary(a1), lambda s: s.startswith(READY), 10, "cluster2 ready")
    known = await identities(a1)
    missing = [n for n in range(W.RANGE_START, W.RANGE_START + 256) if n not in known]
    assert not missing, (
        f"{len(missing)} of cluster2's identities {W.RANGE_START}..{W.RANGE_START + 255} refused"
        f" (first {missing[:3]}): for a cluster id > 0 Cilium's range starts at id<<16"
        f" (MinimalAllocationIdentity); {await explain(a1)}")
    entries = await until(lambda: ipcache(a1), lambda e: "10.2.1.6/32" in e, 5,
                          f"ipcache 10.2.1.6 -> {W.RANGE_START}; {await explain(a1)}")
    assert entries["10.2.1.6/32"]["identity"] == W.RANGE_START


async def test_a_dual_stack_service_is_used_for_its_ipv4_part(world):
    await world.write(2, {**W.golden(), **W.dual_stack_service()})
    a1 = await imported(world)
    await apply_service(world, a1, local_service(REDIS_PORT))
    try:
        await until(lambda: merged_backends(a1),
                    lambda b: ("10.2.1.5", 6379, "cluster2") in b, 10,
                    "the IPv4 backend 10.2.1.5:6379 of cluster2's dual-stack protected-db")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; remote: {await explain(a1)}") from None
    assert (await remote(a1))["rejected"].get("services", 0) == 0, await explain(a1)


async def test_go_json_spellings_unknown_and_absent_fields_are_read(world):
    await world.write(2, {**W.golden(), **W.go_json_spellings()})
    a1 = await imported(world)
    await apply_service(world, a1, local_service(REDIS_PORT))
    try:
        await until(lambda: ipcache(a1), lambda e: e.get("10.2.1.5/32", {}).get("pod_name")
                    == "employee-0", 5, "10.2.1.5 (lower-case field names) with its pod")
        await until(lambda: merged_backends(a1),
                    lambda b: ("10.2.1.5", 6379, "cluster2") in b, 5,
                    "the backend of a service written with \"port\"/\"protocol\"")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; remote: {await explain(a1)}") from None
    node = (await nodes(a1))["cluster2/worker1"]
    assert (node["ipv4"], node["pod_cidrs"], node["cluster_id"]) == (
        W.NODE_IPV4, list(W.NODE_POD_CIDRS), W.CLUSTER_ID), node
    assert (await remote(a1))["rejected"] == {}, await explain(a1)


async def test_identities_with_long_namespace_label_keys_are_accepted(world):
    await world.write(2, {**W.golden(), **W.namespace_label_identities()})
    a1 = await imported(world)
    await until(lambda: summary(a1), lambda s: s.startswith(READY), 10, "cluster2 ready")
    known = await identities(a1)
    for number in (W.IDENTITY_ID + 1, W.IDENTITY_ID + 2):
        assert number in known, (
            f"identity {number} with labels {W.namespace_label_identities()[W.identity_key(number)]!r}"
            f" refused; Cilium takes any label key: {await explain(a1)}")


async def test_a_remote_without_pod_cidrs_waits_for_the_clustermesh_file(world):
    outside = "10.77.0.9"  # an endpoint outside the CIDRs the file will give
    await world.write(2, {**W.golden(), **W.no_pod_cidr_node(),
                          W.ip_key(outside): W.ip_pair(outside, W.IDENTITY_ID, pod="far-away")})
    a1 = await imported(world)
    await until(lambda: identities(a1), lambda i: W.IDENTITY_ID in i, 5, "the identity")
    await asyncio.sleep(SETTLE)
    assert "10.2.1.5/32" not in await ipcache(a1), (
        "an endpoint of a node announcing no pod CIDR was admitted before the clustermesh file"
        " gave its CIDRs")
    status = await a1.client.request("GET", "/status", params={"verbose": "1"})
    mesh = next(s for s in status["sections"] if s["name"] == "ClusterMesh")
    assert "endpoints held, no pod CIDRs announced or configured: cluster2" in mesh["summary"]
    assert any(f"'{POD_CIDRS_KEY}:'" in line for line in mesh["details"]), mesh["details"]
    world.connect(**{POD_CIDRS_KEY: ["10.2.0.0/16"]})
    try:
        await until(lambda: ipcache(a1), lambda e: "10.2.1.5/32" in e, 10,
                    f"10.2.1.5 admitted once the file says {POD_CIDRS_KEY}: [10.2.0.0/16]")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; remote: {await explain(a1)}") from None
    assert (await ipcache(a1))["10.2.1.5/32"]["identity"] == W.IDENTITY_ID
    assert f"{outside}/32" not in await ipcache(a1), f"{outside} is outside {POD_CIDRS_KEY}"


async def test_a_remote_without_pod_cidrs_trusted_by_the_clustermesh_file(world):
    await world.write(2, {**W.golden(), **W.no_pod_cidr_node()})
    world.connect(**{TRUST_ENDPOINTS_KEY: True})
    a1 = await world.agent()
    try:
        await until(lambda: ipcache(a1), lambda e: "10.2.1.5/32" in e, 10,
                    f"10.2.1.5 admitted with {TRUST_ENDPOINTS_KEY}: true")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; remote: {await explain(a1)}") from None


async def test_an_absent_ip_canary_keeps_the_ipcache_unused_and_unsynced(world):
    """pkg/kvstore/store/watchstoremgr.go: with syncedCanaries, a kind's watcher starts only
    once cilium/synced/<cluster>/cilium/state/<kind>/v1 exists."""
    await world.write(2, W.golden(canaries=("nodes", "services", "identities")))
    a1 = await imported(world)
    await until(lambda: identities(a1), lambda i: W.IDENTITY_ID in i, 5, "the identity")
    await asyncio.sleep(SETTLE)
    assert "10.2.1.5/32" not in await ipcache(a1), (
        f"ipcache entries used although {W.canary_key('ip')} is absent")
    r = await remote(a1)
    assert r["synced"].get("endpoints") is False, f"endpoints counted as synced: {r['synced']}"
    assert not (await summary(a1)).startswith(READY), "ready without the ip canary"
    await world.write(2, {W.canary_key("ip"): W.rfc3339()})
    await until(lambda: ipcache(a1), lambda e: "10.2.1.5/32" in e, 10,
                "10.2.1.5 once the ip canary exists")
    await until(lambda: summary(a1), lambda s: s.startswith(READY), 10, "ready with the canary")


async def test_stale_entries_stay_until_the_canary_says_the_new_listing_is_complete(world):
    """cluster2's etcd moves (its file changes): the new one lacks the ip canary, so the
    entries from the earlier listing stay, and the new ones wait; then the canary appears."""
    await world.write(2, W.golden())
    a1 = await imported(world)
    await until(lambda: ipcache(a1), lambda e: "10.2.1.5/32" in e, 10, "10.2.1.5")
    moved = W.golden(canaries=("nodes", "services", "identities"))
    del moved[W.ip_key(W.ENDPOINT_IP)]  # went away meanwhile
    moved[W.ip_key("10.2.1.6")] = W.ip_pair("10.2.1.6", W.IDENTITY_ID, pod="employee-1")
    marker = W.IDENTITY_ID + 3  # shows that the new etcd was listed
    moved[W.identity_key(marker)] = W.labels_value(W.endpoint_labels("marker"))
    await world.write(3, moved)
    world.connect(3)
    await until(lambda: identities(a1), lambda i: marker in i, 10,
                "the identity only the moved etcd holds")
    await asyncio.sleep(SETTLE)
    entries = await ipcache(a1)
    assert "10.2.1.5/32" in entries, (
        "an entry of the earlier listing was deleted before the ip canary said the new listing"
        " was complete")
    assert "10.2.1.6/32" not in entries, "a new entry was used before the ip canary exists"
    await world.write(3, {W.canary_key("ip"): W.rfc3339()})
    await until(lambda: ipcache(a1), lambda e: "10.2.1.6/32" in e and "10.2.1.5/32" not in e,
                10, "the new listing applied once the canary exists")


# ==== b. meshagent -> Cilium ============================================================================

PUBLISHED_POD = ("10.1.0.5", "default", "protected-db-0")
POD_LABELS = frozenset({"k8s:app=protected-db", "k8s:io.kubernetes.pod.namespace=default",
                        f"k8s:io.cilium.k8s.policy.cluster={LOCAL}"})


async def published(world: World):
    """cluster1's agent with a pod (its identity allocated, its ipcache entry published, as the
    endpoint manager does) and a global service with the port named 'redis'; then Cilium's
    view of etcd1 as cluster2's agents read it."""
    a1 = await world.agent(wait_ready=True)
    ident = await a1.agent.identity_allocator.allocate(POD_LABELS)
    ip, namespace, pod = PUBLISHED_POD
    a1.agent.publisher.upsert_ipcache(IPCacheEntry(
        ipaddress.ip_network(f"{ip}/32"), ident.id, LOCAL, ipaddress.ip_address(LOCAL_NODE_IP),
        namespace, pod))
    await apply_service(world, a1, local_service(REDIS_PORT, [ip]))
    etcd1 = await world.client(1)

    async def exported():
        return await etcd1.get(f"cilium/state/services/v1/{LOCAL}/default/protected-db")

    async def published_ip():
        return [kv.key for kv in (await etcd1.list_prefix("cilium/state/ip/v1/")).items]
    await until(exported, lambda e: e is not None, 10, "the exported global service")
    await until(published_ip, lambda keys: any(k.endswith("/" + ip) for k in keys), 10,
                f"{ip}'s ipcache key")
    view = await R.read_cluster(etcd1, LOCAL, local_cluster_id=W.CLUSTER_ID)
    return a1, ident, view, etcd1


async def test_published_ipcache_is_in_ciliums_address_space_with_pod_metadata(world):
    _, ident, view, etcd1 = await published(world)
    keys = [kv.key for kv in (await etcd1.list_prefix("cilium/state/ip/v1/")).items]
    assert "cilium/state/ip/v1/default/10.1.0.5" in keys, (
        f"Cilium watches only cilium/state/ip/v1/default/ (pkg/ipcache/kvstore.go); got {keys}")
    assert view.watched.get("ip"), view.problems
    pair = view.ipcache.get("10.1.0.5")
    assert pair is not None, f"Cilium's agent does not see 10.1.0.5: {view.problems}"
    assert (pair["ID"], pair["K8sNamespace"], pair["K8sPodName"], str(pair["HostIP"])) == (
        ident.id, "default", "protected-db-0", LOCAL_NODE_IP), pair
    assert not [p for p in view.problems if p.startswith("ip")], view.problems


async def test_published_canaries_heartbeat_and_cluster_config(world):
    _, _, view, etcd1 = await published(world)
    assert view.config is not None, view.problems
    capabilities = view.config["capabilities"]
    assert view.config["id"] == LOCAL_ID and capabilities["syncedCanaries"] is True, view.config
    assert capabilities["maxConnectedClusters"] == 255, view.config
    bad = {kind: value for kind, value in view.canaries.items() if not R.is_rfc3339(value)}
    assert not bad, (f"sync canaries absent or not RFC 3339 (Cilium's syncstore writes"
                     f" time.Now().Format(time.RFC3339)): {bad}")
    heartbeat = await etcd1.get(W.HEARTBEAT_KEY)
    assert heartbeat is not None and R.is_rfc3339(heartbeat.value), (
        f"{W.HEARTBEAT_KEY} must hold an RFC 3339 time (pkg/kvstore/heartbeat/heartbeat.go):"
        f" {heartbeat and heartbeat.value!r}")


async def test_published_node_and_identities_decode_as_ciliums(world):
    _, ident, view, _ = await published(world)
    assert not [p for p in view.problems if p.startswith(("nodes", "identities"))], view.problems
    node = view.nodes.get("node1")
    assert node is not None, view.problems
    assert (str(R.node_ip(node)), R.pod_cidrs(node), node["ClusterID"], node["Cluster"]) == (
        LOCAL_NODE_IP, [LOCAL_POD_CIDR], LOCAL_ID, LOCAL), node
    assert view.identities.get(ident.id) == POD_LABELS, view.identities
    cilium_range = R.identity_range(LOCAL_ID)
    assert all(n in cilium_range for n in view.identities), (
        f"identities outside {cilium_range}: {sorted(view.identities)}")


async def test_exported_service_keeps_the_services_port_names(world):
    _, _, view, _ = await published(world)
    svc = view.services.get((W.SERVICE_NAMESPACE, W.SERVICE_NAME))
    assert svc is not None, view.problems
    expected = {"redis": {"Protocol": "TCP", "Port": 6379}}
    assert svc["frontends"] == {W.SERVICE_VIP: expected}, (
        f"frontends must be keyed by the Service's port names: {svc['frontends']}")
    assert svc["backends"] == {"10.1.0.5": expected}, (
        f"backends must be keyed by the port names: {svc['backends']}")
    assert (svc["includeExternal"], svc["shared"], svc["clusterID"]) == (True, True, LOCAL_ID)


# ==== c. KVStoreMesh ==================================================================================

async def test_meshagent_kvstoremesh_caches_a_cilium_cluster_as_ciliums_kvstoremesh(world):
    from meshagent.kvstoremesh.command import build
    golden = W.golden()
    await world.write(2, golden)
    kv_dir = world.tmp / "kvmesh"
    kv_dir.mkdir()
    world.servers[2].client_config(kv_dir / W.CLUSTER)
    mesh = build(["--plugins", "etcd", "--cluster-name", LOCAL, "--cluster-id", str(LOCAL_ID),
                  "--etcd-config", str(world.own), "--clustermesh-config", str(kv_dir),
                  "--kvstoremesh-socket-path", str(world.tmp / "kvmesh.sock")], {})
    task = asyncio.create_task(mesh.run())
    try:
        etcd1 = await world.client(1)

        async def canaries():
            return [await etcd1.get(W.canary_key(k, cache=True)) for k in W.KINDS]
        await until(canaries, lambda c: all(c), 15, "the four cache canaries in etcd1")
        # what Cilium's KVStoreMesh would have copied, byte for byte
        expected = (await R.read_as_kvstoremesh(await world.client(2), W.CLUSTER)).copied
        cache = {kv.key: kv.value for kv in (await etcd1.list_prefix("cilium/cache/")).items}
        assert cache == expected, (
            f"missing: {sorted(expected.keys() - cache.keys())}, extra:"
            f" {sorted(cache.keys() - expected.keys())}, changed:"
            f" {sorted(k for k in expected.keys() & cache.keys() if cache[k] != expected[k])}")
        # a Cilium agent of cluster1, behind KVStoreMesh, reads cluster2 from etcd1
        view = await R.read_cluster(etcd1, W.CLUSTER, local_cluster_id=LOCAL_ID)
        assert view.config and view.config["capabilities"]["cached"], view.problems
        assert view.problems == [], view.problems
        direct = await R.read_cluster(await world.client(2), W.CLUSTER, local_cluster_id=LOCAL_ID)
        assert (view.nodes, view.identities, view.ipcache, view.services) == (
            direct.nodes, direct.identities, direct.ipcache, direct.services)
        assert view.config["capabilities"]["maxConnectedClusters"] == 255, view.config
        bad = {k: v for k, v in view.canaries.items() if not R.is_rfc3339(v)}
        assert not bad, f"cache canaries not RFC 3339: {bad}"
    finally:
        mesh.stop()
        await asyncio.wait_for(task, 10)


async def test_meshagent_agent_reads_a_cache_in_ciliums_kvstoremesh_layout(world):
    golden = W.golden()
    cache = W.kvstoremesh_cache(golden)
    # KVStoreMesh copies identities/v1 whole: the per-node value keys too
    # (pkg/allocator: "<prefix>/value/<labels>/<node suffix>" holding the id)
    cache[f"{W.CACHE}/identities/v1/{W.CLUSTER}/value/{W.IDENTITY.decode()}/{W.NODE_IPV4}"] = (
        str(W.IDENTITY_ID).encode())
    await world.write(1, cache)
    world.connect(1)  # cluster1's agents read cluster2 from their own etcd
    a1 = await world.agent()
    try:
        await until(lambda: summary(a1), lambda s: s.startswith(READY), 10,
                    "cluster2 ready through the cache")
        await until(lambda: ipcache(a1), lambda e: "10.2.1.5/32" in e, 5, "10.2.1.5")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; remote: {await explain(a1)}") from None
    assert "cluster2/worker1" in await nodes(a1)
    assert W.IDENTITY_ID in await identities(a1)
    r = await remote(a1)
    assert r["kvstoremesh"] is True and r["rejected"] == {}, await explain(a1)


# ==== d. upgrade from meshagent's older ipcache layout ===================================================

def old_key(ip: str) -> str:
    """meshagent before it followed Cilium: cilium/state/ip/v1/<cluster>/<ip>."""
    return f"{W.STATE}/ip/v1/{W.CLUSTER}/{ip}"


async def test_the_older_meshagent_ipcache_layout_is_still_read(world):
    await world.write(2, {**W.golden(),
                          old_key("10.2.1.7"): W.ip_pair("10.2.1.7", W.IDENTITY_ID, pod="old-0")})
    a1 = await imported(world)
    entries = await until(lambda: ipcache(a1), lambda e: "10.2.1.7/32" in e, 10,
                          f"10.2.1.7 from {old_key('10.2.1.7')}")
    assert entries["10.2.1.7/32"]["pod_name"] == "old-0"


async def test_the_default_key_wins_over_the_older_layout_and_outlives_its_deletion(world):
    other = W.IDENTITY_ID + 4
    await world.write(2, {**W.golden(),
                          W.identity_key(other): W.labels_value(W.endpoint_labels("old")),
                          old_key(W.ENDPOINT_IP): W.ip_pair(W.ENDPOINT_IP, other, pod="old-0")})
    a1 = await imported(world)
    await until(lambda: ipcache(a1), lambda e: "10.2.1.5/32" in e, 10, "10.2.1.5")
    await asyncio.sleep(SETTLE)
    assert (await ipcache(a1))["10.2.1.5/32"]["identity"] == W.IDENTITY_ID, (
        "the old-layout key's identity is in force over cilium/state/ip/v1/default/")
    # written again, the old key still does not win
    await world.write(2, {old_key(W.ENDPOINT_IP): W.ip_pair(W.ENDPOINT_IP, other, pod="old-1")})
    await asyncio.sleep(SETTLE)
    assert (await ipcache(a1))["10.2.1.5/32"]["identity"] == W.IDENTITY_ID, (
        "an update of the old-layout key replaced the default entry")
    await world.write(2, {old_key(W.ENDPOINT_IP): None})
    await asyncio.sleep(SETTLE)
    entry = (await ipcache(a1)).get("10.2.1.5/32")
    assert entry is not None and entry["identity"] == W.IDENTITY_ID, (
        f"deleting the old-layout key took the default entry with it: {entry}")
