"""IPv6 in ClusterMesh: nodes publish IPv6 addresses and pod CIDRs in Cilium's node JSON,
IPv6 ipcache entries use Cilium's key layout, and a remote's IPv6 endpoints are admitted only
inside IPv6 pod CIDRs granted to it, as IPv4 ones are. Over the memory kvstore (ClusterMesh
only knows the slot)."""

import base64
import ipaddress
import json

from test_clustermesh_memory import mesh_dir, node_names  # noqa: F401 (fixture)

from meshagent.clustermesh.ownership import AddressOwnership
from meshagent.events import ChangeKind
from meshagent.kvstore import keys as kvkeys
from meshagent.model.ipcache import IPCacheEntry, ipcache_from_json, ipcache_to_json
from meshagent.model.node import Node, node_from_json, node_to_json
from meshagent.plugins.memory.store import shared_store
from meshagent.testing import eventually as wait_for

net = ipaddress.ip_network
ip = ipaddress.ip_address

#: a dual-stack node as Cilium writes it (the fields meshagent reads)
CILIUM_NODE = json.dumps({
    "Name": "node7", "Cluster": "cluster2", "ClusterID": 102,
    "IPAddresses": [{"Type": "InternalIP", "IP": "10.99.2.7"},
                    {"Type": "InternalIP", "IP": "fd00:99:2::7"}],
    "IPv4AllocCIDR": {"IP": "10.2.7.0", "Mask": "////AA=="},
    "IPv6AllocCIDR": {"IP": "fd00:2:7::", "Mask": base64.b64encode(
        bytes([255] * 8 + [0] * 8)).decode()},
}).encode()


def test_a_dual_stack_node_round_trips_in_ciliums_json():
    node = node_from_json(CILIUM_NODE)
    assert node.ipv4 == ip("10.99.2.7") and node.ipv6 == ip("fd00:99:2::7")
    assert node.pod_cidrs == (net("10.2.7.0/24"), net("fd00:2:7::/64"))
    doc = json.loads(node_to_json(node))
    assert doc["IPv6AllocCIDR"] == {"IP": "fd00:2:7::", "Mask": "//////////8AAAAAAAAAAA=="}
    assert {a["IP"] for a in doc["IPAddresses"]} == {"10.99.2.7", "fd00:99:2::7"}
    assert node_from_json(node_to_json(node)) == node


def test_ipv6_ipcache_entries_round_trip_with_a_16_byte_mask():
    host = IPCacheEntry(net("fd00:2:7::5/128"), 6684928, "cluster2", ip("fd00:99:2::7"))
    assert host.key_ip == "fd00:2:7::5"
    assert json.loads(ipcache_to_json(host))["Mask"] is None
    assert ipcache_from_json(ipcache_to_json(host), "cluster2") == host
    ranged = IPCacheEntry(net("fd00:2::/48"), 16777217, "cluster2")
    assert json.loads(ipcache_to_json(ranged))["Mask"] == "////////AAAAAAAAAAAAAA=="
    assert ipcache_from_json(ipcache_to_json(ranged), "cluster2") == ranged


def test_ipv6_pod_cidrs_are_granted_and_refused_as_ipv4_ones():
    ownership = AddressOwnership("cluster1", [net("10.1.1.0/24"), net("fd00:1:1::/64")])
    ownership.node_changed(ChangeKind.UPSERT, Node("n1", "cluster2", 102, ip("10.99.2.1"), (
        net("10.2.1.0/24"), net("fd00:2:1::/64")), ip("fd00:99:2::1")))
    ownership.node_changed(ChangeKind.UPSERT, Node("n2", "cluster3", 103, ip("10.99.3.1"), (
        net("fd00:1::/32"),  # covers cluster1's IPv6 pods
        net("fd00:99:2::/64"),  # covers cluster2's node address
        net("fd00:3:1::/64")), ip("fd00:99:3::1")))
    assert {(g.network, g.via) for g in ownership.grants if g.cluster == "cluster2"} == {
        (net("10.2.1.0/24"), ip("10.99.2.1")), (net("fd00:2:1::/64"), ip("fd00:99:2::1"))}
    refused = {cidr: why for (_, _, cidr), why in ownership.refused.items()}
    assert refused[net("fd00:1::/32")].startswith("overlaps this cluster's pod addresses")
    assert refused[net("fd00:99:2::/64")] == "covers the address of a node (fd00:99:2::1)"
    assert ownership.owner(ip("fd00:3:1::9")) == "cluster3"
    assert ownership.owner(ip("fd00:2:1::9")) == "cluster2"
    assert ownership.owner(ip("fd00:1:1::9")) == "cluster1"
    assert ownership.owner(ip("10.2.1.9")) == "cluster2"
    # the families never meet: an IPv4 address is not "inside" an IPv6 range of equal value
    assert ownership.owner(ip("0.0.0.9")) is None and ownership.owner(ip("::9")) is None


async def test_a_remotes_ipv6_endpoints_sync_inside_its_ipv6_pod_cidr_only(agent_factory,
                                                                          mesh_dir):  # noqa: F811
    await agent_factory(["--plugins", "memory", "--memory-store", "cluster2",
                         "--cluster-name", "cluster2", "--cluster-id", "102",
                         "--node-name", "node1", "--node-ip", "10.99.2.1,fd00:99:2::1",
                         "--pod-cidr", "fd00:2:1::/64,10.2.1.0/24"])
    a1 = await agent_factory(["--plugins", "memory", "--memory-store", "cluster1",
                              "--cluster-name", "cluster1", "--cluster-id", "101",
                              "--node-name", "node1", "--node-ip", "fd00:99:1::1,10.99.1.1",
                              "--pod-cidr", "10.1.1.0/24,fd00:1:1::/64",
                              "--clustermesh-config", str(mesh_dir)])
    remote = a1.agent.clustermesh.remotes["cluster2"]
    await wait_for(lambda: remote.ready, 5, "cluster2 ready")
    await wait_for(lambda: "cluster2/node1" in node_names(a1), 5, "cluster2's node")
    nodes = {n.full_name: n for n in a1.agent.tables.nodes.values()}
    assert nodes["cluster2/node1"].ipv6 == ip("fd00:99:2::1")
    assert nodes["cluster2/node1"].pod_cidrs == (net("10.2.1.0/24"), net("fd00:2:1::/64"))
    store = shared_store("cluster2")
    inside = IPCacheEntry(net("fd00:2:1::5/128"), (102 << 16) + 300, "cluster2")
    outside = IPCacheEntry(net("fd00:1:1::5/128"), (102 << 16) + 301, "cluster2")
    for entry in (inside, outside):
        store.write(kvkeys.ipcache_key(entry.key_ip), ipcache_to_json(entry), None)
    await wait_for(lambda: a1.agent.tables.ipcache.get(inside.prefix) is not None, 5,
                   "the IPv6 endpoint inside cluster2's pod CIDR")
    assert a1.agent.tables.ipcache.get(outside.prefix) is None  # it is cluster1's range
    assert remote.sync.held == {"endpoints": 1}

    listing = await a1.client.request("GET", "/nodes")
    row = next(n for n in listing if n["cluster"] == "cluster2")
    assert row["ipv6"] == "fd00:99:2::1" and "fd00:2:1::/64" in row["pod_cidrs"]
