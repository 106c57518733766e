"""--auto-direct-node-routes decisions that need no netlink: self and overlapping CIDRs."""

import ipaddress

from meshagent.events import ChangeKind
from meshagent.node import Node
from meshagent.noderoutes import NodeRoutes


class _Config(dict):
    def get(self, name):
        return self[name]


class _Agent:
    def __init__(self):
        self.config = _Config({"pod-cidr": (ipaddress.ip_network("10.1.1.0/24"),),
                               "node-name": "node1", "node-route-delete-grace": 30.0})
        self.config.node_name = "node1"

        class cluster:
            name = "cluster1"
        self.cluster = cluster


async def test_overlapping_pod_cidr_is_refused_and_reported(caplog):
    routes = NodeRoutes(_Agent())
    clash = Node("node9", "cluster2", 102, ipaddress.ip_address("10.99.0.19"),
                 (ipaddress.ip_network("10.1.0.0/16"),))
    await routes._install(clash.pod_cidrs[0], clash)
    assert routes.routes == {}
    assert "overlaps this node's 10.1.1.0/24" in routes.refused[clash.pod_cidrs[0]]
    assert "not routing 10.1.0.0/16" in caplog.text


def test_own_node_is_never_routed():
    routes = NodeRoutes(_Agent())
    assert routes._is_self(Node("node1", "cluster1", 101))
    assert not routes._is_self(Node("node1", "cluster2", 102))  # same name, other cluster
    routes.node_changed(ChangeKind.UPSERT, Node("node1", "cluster1", 101))
    assert routes.queue.qsize() == 1
