"""Services across clusters (control plane): apply, export, merge by the annotations, list."""

import asyncio
import ipaddress
import json

import pytest
from conftest import run_cli

import meshagent
from meshagent.events import ChangeKind
from meshagent.model.ipcache import IPCacheEntry
from meshagent.model.service import ServiceUpdate
from meshagent.service.kubernetes import ServiceError, parse_services
from meshagent.testing import eventually


def service_yaml(cluster_ip: str, backends: list[str], *, port: int = 6379,
                 annotations: dict | None = None, name: str = "protected-db",
                 slice_: bool = False, port_name: str | None = None) -> str:
    notes = annotations if annotations is not None else {"io.cilium/global-service": "true"}
    doc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default", "annotations": notes},
           "spec": {"clusterIP": cluster_ip, "ports": [{"port": port, "protocol": "TCP"}]}}
    named = {"name": port_name} if port_name is not None else {}
    doc["spec"]["ports"][0].update(named)
    if slice_:
        endpoints = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"{name}-abc", "namespace": "default",
                                  "labels": {"kubernetes.io/service-name": name}},
                     "endpoints": [{"addresses": [ip]} for ip in backends],
                     "ports": [{"port": 6379, "protocol": "TCP", **named}]}
    else:
        endpoints = {"apiVersion": "v1", "kind": "Endpoints",
                     "metadata": {"name": name, "namespace": "default"},
                     "subsets": [{"addresses": [{"ip": ip} for ip in backends],
                                  "ports": [{"port": 6379, "protocol": "TCP", **named}]}]}
    return json.dumps(doc) + "\n---\n" + json.dumps(endpoints)


@pytest.fixture
async def mesh(agent_factory, short_tmp):
    agents = {}
    for n, other in ((1, 2), (2, 1)):
        directory = short_tmp / f"mesh{n}"
        directory.mkdir()
        (directory / f"cluster{other}").write_text(f"kvstore: memory\nmemory-store: c{other}\n")
        agents[n] = await agent_factory([
            "--plugins", "memory", "--memory-store", f"c{n}", "--cluster-name", f"cluster{n}",
            "--cluster-id", str(100 + n), "--pod-cidr", f"10.{n}.1.0/24",
            "--clustermesh-config", str(directory)])
    for n, other in ((1, 2), (2, 1)):
        await eventually(lambda n=n, other=other: agents[n].agent.clustermesh.remotes[
            f"cluster{other}"].ready, 5, "mesh ready")
    # the backends' endpoints: a backend is used only while its endpoint exists
    for n, ips in ((1, ("10.1.1.5",)), (2, ("10.2.1.7", "10.2.1.8"))):
        for i, ip in enumerate(ips):
            agents[n].agent.publisher.upsert_ipcache(IPCacheEntry(
                ipaddress.ip_network(f"{ip}/32"), ((100 + n) << 16) + 300 + i, f"cluster{n}"))
    await eventually(lambda: len(agents[1].agent.tables.ipcache) == 3, 5, "endpoints known")
    return agents


async def apply(running, text, tmp_path, name="svc.yaml"):
    path = tmp_path / name
    path.write_text(text)
    result = await asyncio.to_thread(run_cli, "service", "apply", str(path), "--socket-path",
                                     str(running.socket_path))
    return result


def merged(running, name="protected-db"):
    found = running.agent.services.merged.get(("default", name))
    return sorted((str(b.ip), b.cluster) for b in found.backends) if found else None


async def test_global_service_backends_merge_across_clusters(mesh, tmp_path):
    assert (await apply(mesh[1], service_yaml("10.96.0.10", ["10.1.1.5"]), tmp_path)
            ).returncode == 0
    assert (await apply(mesh[2], service_yaml("10.97.0.10", ["10.2.1.7", "10.2.1.8"]),
                        tmp_path)).returncode == 0
    await eventually(lambda: merged(mesh[1]) == [("10.1.1.5", "cluster1"),
                                                 ("10.2.1.7", "cluster2"),
                                                 ("10.2.1.8", "cluster2")], 5, "merge")
    # exported as Cilium's ClusterService, and counted in status
    exported = await mesh[2].agent.kvstore.get(
        "cilium/state/services/v1/cluster2/default/protected-db")
    assert json.loads(exported.value)["shared"] is True
    status = await mesh[1].client.request("GET", "/status")
    summary = next(s for s in status["sections"] if s["name"] == "ClusterMesh")["summary"]
    assert summary == "1/1 remote clusters ready, 1 global-services"
    listing = (await asyncio.to_thread(run_cli, "service", "list", "--socket-path",
                                       str(mesh[1].socket_path))).stdout
    assert "default/protected-db  global" in listing
    assert "10.96.0.10:6379/TCP" in listing and "10.2.1.7:6379 (cluster2)" in listing


async def test_not_shared_keeps_backends_home_and_file_removal_withdraws(mesh, tmp_path,
                                                                         short_tmp):
    await apply(mesh[1], service_yaml("10.96.0.10", ["10.1.1.5"]), tmp_path)
    await apply(mesh[2], service_yaml("10.97.0.10", ["10.2.1.7"], annotations={
        "service.cilium.io/global": "true", "service.cilium.io/shared": "false"}), tmp_path)
    await asyncio.sleep(0.3)
    assert merged(mesh[1]) == [("10.1.1.5", "cluster1")]
    await apply(mesh[2], service_yaml("10.97.0.10", ["10.2.1.7"]), tmp_path)  # shared again
    await eventually(lambda: ("10.2.1.7", "cluster2") in merged(mesh[1]), 5, "shared")
    (short_tmp / "mesh1" / "cluster2").unlink()
    await eventually(lambda: merged(mesh[1]) == [("10.1.1.5", "cluster1")], 5, "withdrawn")


async def test_affinity_local_prefers_local_backends_while_any(mesh, tmp_path):
    notes = {"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}
    await apply(mesh[1], service_yaml("10.96.0.10", ["10.1.1.5"], annotations=notes), tmp_path)
    await apply(mesh[2], service_yaml("10.97.0.10", ["10.2.1.7"]), tmp_path)
    await eventually(lambda: mesh[1].agent.services.merged[("default", "protected-db")]
                     .remote_backends == 1, 5, "remote backend known")
    assert merged(mesh[1]) == [("10.1.1.5", "cluster1")]
    await apply(mesh[1], service_yaml("10.96.0.10", [], annotations=notes), tmp_path)
    await eventually(lambda: merged(mesh[1]) == [("10.2.1.7", "cluster2")], 5, "failover")


async def test_a_backend_follows_its_endpoint(mesh, tmp_path):
    await apply(mesh[1], service_yaml("10.96.0.10", ["10.1.1.5"]), tmp_path)
    await apply(mesh[2], service_yaml("10.97.0.10", ["10.2.1.7", "10.2.1.8"]), tmp_path)
    await eventually(lambda: len(merged(mesh[1])) == 3, 5, "merge")
    mesh[2].agent.publisher.delete_ipcache(IPCacheEntry(
        ipaddress.ip_network("10.2.1.8/32"), (102 << 16) + 301, "cluster2"))
    await eventually(lambda: ("10.2.1.8", "cluster2") not in merged(mesh[1]), 5, "backend gone")


async def test_port_names_differing_between_clusters_are_reported(mesh, tmp_path):
    """Backends serve the frontend port of their port's name (Cilium's rule), whatever the
    other cluster's frontend port numbers."""
    await apply(mesh[1], service_yaml("10.96.0.10", ["10.1.1.5"], port_name="redis"), tmp_path)
    await apply(mesh[2], service_yaml("10.97.0.10", ["10.2.1.7"], port=6380, port_name="redis"),
                tmp_path)
    await eventually(lambda: len(merged(mesh[1])) == 2, 5, "merge by port name")
    await apply(mesh[2], service_yaml("10.97.0.10", ["10.2.1.7"], port_name="db"), tmp_path)
    await eventually(lambda: mesh[1].agent.services.merged[("default", "protected-db")]
                     .conflicts, 5, "conflict")
    assert merged(mesh[1]) == [("10.1.1.5", "cluster1")]
    status = await mesh[1].client.request("GET", "/status", params={"verbose": "1"})
    section = next(s for s in status["sections"] if s["name"] == "Services")
    assert section["health"] == "Warning"
    assert any("cluster2: backend port names 'db' match no port of this service ('redis')" in d
               for d in section["details"])


async def test_backend_outside_every_pod_cidr_is_refused(mesh, tmp_path):
    result = await apply(mesh[1], service_yaml("10.96.0.10", ["192.0.2.9"]), tmp_path)
    assert result.returncode == 1
    assert "backend 192.0.2.9 is outside every pod CIDR of cluster cluster1" in result.stderr
    assert mesh[1].agent.services.merged == {}


def test_parsing_endpointslices_and_bad_documents():
    (service,) = parse_services(service_yaml("10.96.0.10", ["10.1.1.5", "10.1.1.6"],
                                             slice_=True), "cluster1")
    assert [str(b.ip) for b in service.backends] == ["10.1.1.5", "10.1.1.6"]
    assert service.global_ and service.shared and service.affinity == "none"
    for text, message in [
        (service_yaml("nope", []), "spec.clusterIP 'nope' is not an IP address"),
        (service_yaml("10.96.0.1", ["10.1.1.300"]), "backend address '10.1.1.300' is not an IP"
                                                   " address"),
        (service_yaml("10.96.0.1", [], annotations={"service.cilium.io/affinity": "near"}),
         "affinity='near' must be local, remote or none"),
        (service_yaml("10.96.0.1", [], annotations={"service.cilium.io/shared": "maybe"}),
         "must be \"true\" or \"false\""),
        ("kind: Deployment\nmetadata: {name: x}\n", "is not Service, Endpoints or EndpointSlice"),
    ]:
        with pytest.raises(ServiceError, match=message.replace("(", r"\(")):
            parse_services(text, "cluster1", "svc.yaml")


class ServiceFeed:
    """A service source plugin, as the k8s plugin will be (meshagent_service_source)."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    @meshagent.hookimpl
    def meshagent_service_source(self, agent):
        async def updates():
            while True:
                yield await self.queue.get()
        return updates()


async def test_service_source_hook_feeds_local_services(agent_factory):
    feed = ServiceFeed()
    running = await agent_factory(["--plugins", "memory", "--cluster-name", "cluster1",
                                   "--cluster-id", "101", "--pod-cidr", "10.1.1.0/24"],
                                  extra_plugins=[("k8s-like", feed)])
    (service,) = parse_services(service_yaml("10.96.0.10", []), "cluster1")
    await feed.queue.put(ServiceUpdate(ChangeKind.UPSERT, service))
    await eventually(lambda: ("default", "protected-db") in running.agent.services.merged, 5,
                     "sourced service")
    assert running.agent.services.global_count() == 1
    await feed.queue.put(ServiceUpdate(ChangeKind.DELETE, service))
    await eventually(lambda: running.agent.services.merged == {}, 5, "removed")


async def test_export_prefix_holds_exactly_the_clusters_global_shared_services(
        agent_factory, memory_kvstore):
    """Sourced services are exported like applied ones; a key left from a service deleted while
    every agent was down is withdrawn once the agent is synced."""
    from meshagent.kvstore import keys as kvkeys
    feed = ServiceFeed()
    stale = kvkeys.service_key("cluster1", "default", "gone")
    await memory_kvstore.put(stale, b'{"cluster":"cluster1","namespace":"default"}')
    running = await agent_factory(["--plugins", "memory", "--cluster-name", "cluster1",
                                   "--cluster-id", "101", "--pod-cidr", "10.1.1.0/24",
                                   "--memory-store", memory_kvstore.store.name],
                                  extra_plugins=[("k8s-like", feed)])
    store = running.agent.kvstore
    (service,) = parse_services(service_yaml("10.96.0.10", []), "cluster1")
    await feed.queue.put(ServiceUpdate(ChangeKind.UPSERT, service))
    key = kvkeys.service_key("cluster1", "default", "protected-db")
    listing = None
    for _ in range(100):
        listing = {kv.key for kv in (await store.list_prefix(
            kvkeys.service_key("cluster1", "", "")[:-1])).items}
        if listing == {key}:
            break
        await asyncio.sleep(0.05)
    assert listing == {key}
    exported = json.loads((await store.get(key)).value)
    assert (exported["clusterID"], exported["includeExternal"]) == (101, True)
    await feed.queue.put(ServiceUpdate(ChangeKind.DELETE, service))
    for _ in range(100):
        if await store.get(key) is None:
            break
        await asyncio.sleep(0.05)
    assert await store.get(key) is None


async def test_agents_without_the_source_do_not_undo_its_exports(agent_factory, memory_kvstore):
    """Agent A is fed a global service by a source; agent B of the same cluster has no source
    and must leave A's export alone. A key deleted behind A's back is written again."""
    from meshagent.kvstore import keys as kvkeys
    feed = ServiceFeed()
    args = ["--plugins", "memory", "--cluster-name", "cluster1", "--cluster-id", "101",
            "--memory-store", memory_kvstore.store.name]
    a = await agent_factory(args + ["--node-name", "a", "--pod-cidr", "10.1.1.0/24"],
                            extra_plugins=[("k8s-like", feed)])
    (service,) = parse_services(service_yaml("10.96.0.10", []), "cluster1")
    await feed.queue.put(ServiceUpdate(ChangeKind.UPSERT, service))
    key = kvkeys.service_key("cluster1", "default", "protected-db")

    async def present():
        return await memory_kvstore.get(key) is not None

    for _ in range(100):
        if await present():
            break
        await asyncio.sleep(0.05)
    await agent_factory(args + ["--node-name", "b", "--pod-cidr", "10.1.2.0/24"])
    await asyncio.sleep(0.5)
    assert await present()
    await memory_kvstore.delete(key)  # someone else's mistake
    for _ in range(100):
        if await present():
            break
        await asyncio.sleep(0.05)
    assert await present()
    assert a.agent.services.exports.keys() == {key}
