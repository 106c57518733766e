"""--auto-direct-node-routes, decided without netlink: routes follow the granted pod CIDRs,
never over a directly connected network, never for this node, removed after a grace period
even when no delete event arrives (the route table stands in for the kernel's)."""

import ipaddress

from meshagent.clustermesh.noderoutes import NodeRoutes
from meshagent.clustermesh.ownership import AddressOwnership
from meshagent.events import ChangeKind
from meshagent.model.node import Node

net, ip = ipaddress.IPv4Network, ipaddress.IPv4Address


class FakeRouteTable:
    """The kernel's main table as a dict: our routes, plus the connected networks."""

    def __init__(self, connected=("10.99.0.0/16",)):
        self.ours: dict = {}
        self.connected = [net(c) for c in connected]

    def read(self, protocol):
        return dict(self.ours), list(self.connected)

    def replace(self, network, via, protocol):
        self.ours[network] = via

    def delete(self, network, protocol):
        self.ours.pop(network, None)


def node(name, cluster, address, *cidrs):
    return Node(name, cluster, 101 if cluster == "cluster1" else 102, ip(address),
                tuple(net(c) for c in cidrs))


def setup(grace=30.0):
    ownership = AddressOwnership("cluster1", [net("10.1.1.0/24")])
    table = FakeRouteTable()
    return ownership, table, NodeRoutes(ownership, "node1", grace, table)


async def test_granted_cidrs_are_routed_and_the_own_node_is_not():
    ownership, table, routes = setup()
    ownership.node_changed(ChangeKind.UPSERT, node("node1", "cluster1", "10.99.1.1",
                                                   "10.1.1.0/24"))
    ownership.node_changed(ChangeKind.UPSERT, node("node2", "cluster1", "10.99.1.2",
                                                   "10.1.2.0/24"))
    ownership.node_changed(ChangeKind.UPSERT, node("node1", "cluster2", "10.99.2.1",
                                                   "10.2.1.0/24"))
    ownership.recompute()
    await routes.reconcile()
    assert table.ours == {net("10.1.2.0/24"): ip("10.99.1.2"),
                          net("10.2.1.0/24"): ip("10.99.2.1")}


async def test_no_route_over_the_network_the_nodes_talk_over():
    ownership, table, routes = setup()
    # a remote node announcing a slice of the underlay: granted (it covers no known address)
    # but never routed, since this node is directly connected to it
    ownership.node_changed(ChangeKind.UPSERT, node("evil", "cluster2", "10.98.0.1",
                                                   "10.99.5.0/24"))
    ownership.recompute()
    await routes.reconcile()
    assert table.ours == {}
    assert "directly connected network 10.99.0.0/16" in routes.refused[net("10.99.5.0/24")]


async def test_a_route_goes_after_the_grace_period_without_any_delete_event(monkeypatch):
    ownership, table, routes = setup(grace=5.0)
    gone = node("node1", "cluster2", "10.99.2.1", "10.2.1.0/24")
    ownership.node_changed(ChangeKind.UPSERT, gone)
    ownership.recompute()
    await routes.reconcile()
    assert net("10.2.1.0/24") in table.ours
    ownership.node_changed(ChangeKind.DELETE, gone)
    ownership.recompute()
    now = [1000.0]
    monkeypatch.setattr("meshagent.clustermesh.noderoutes.time.monotonic", lambda: now[0])
    await routes.reconcile()
    assert net("10.2.1.0/24") in table.ours  # within the grace period: kept
    now[0] += 6
    await routes.reconcile()
    assert table.ours == {}


async def test_a_restarted_agent_removes_routes_nothing_grants(monkeypatch):
    ownership, table, routes = setup(grace=0.0)
    table.ours[net("10.7.0.0/16")] = ip("10.99.7.1")  # left by an earlier run, granted no more
    await routes.reconcile()
    assert table.ours == {}


async def test_a_node_out_of_reach_is_not_routed_and_says_why():
    """A dual-stack remote node seen from a node without IPv6: its IPv6 pod CIDR has no
    neighbour to go to (the lab's Cilium peer found this)."""
    ownership, table, routes = setup()
    ownership.node_changed(ChangeKind.UPSERT, Node(
        "worker1", "cluster2", 102, ip("10.99.2.1"),
        (net("10.2.1.0/24"), ipaddress.IPv6Network("fd00:2:1::/64")),
        ipaddress.IPv6Address("fd00:99::2:1")))
    ownership.recompute()
    await routes.reconcile()
    assert table.ours == {net("10.2.1.0/24"): ip("10.99.2.1")}
    assert routes.refused == {ipaddress.IPv6Network("fd00:2:1::/64"): (
        "node cluster2/worker1's address fd00:99::2:1 is on no network this node is directly"
        " connected to")}
