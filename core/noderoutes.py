"""``--auto-direct-node-routes``: reach every other node's pods through that node's IP.

Nodes come from the node table (this cluster's and every remote's); each change is queued by
the node event hook and applied by a controller, so netlink work never runs inside a hook.
"""

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING

from meshagent import podnet
from meshagent.controller import ControllerHandle
from meshagent.events import ChangeKind
from meshagent.node import Node

if TYPE_CHECKING:
    from meshagent.agent import Agent

log = logging.getLogger(__name__)


class NodeRoutes:
    def __init__(self, agent: "Agent"):
        self.agent = agent
        self.queue: asyncio.Queue[tuple[ChangeKind, Node]] = asyncio.Queue()
        self.routes: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
        self.refused: dict[ipaddress.IPv4Network, str] = {}

    def node_changed(self, kind: ChangeKind, node: Node) -> None:
        self.queue.put_nowait((kind, node))

    def _is_self(self, node: Node) -> bool:
        return (node.cluster, node.name) == (self.agent.cluster.name,
                                             self.agent.config.node_name)

    async def run(self, handle: ControllerHandle) -> None:
        handle.ready()
        while True:
            kind, node = await self.queue.get()
            if self._is_self(node):
                continue
            for cidr in node.pod_cidrs:
                if kind is ChangeKind.DELETE or node.ipv4 is None:
                    await self._remove(cidr)
                else:
                    await self._install(cidr, node)

    async def _install(self, cidr: ipaddress.IPv4Network, node: Node) -> None:
        own = [c for c in self.agent.config.get("pod-cidr") if c.overlaps(cidr)]
        if own:
            reason = f"node {node.full_name}'s pod CIDR {cidr} overlaps this node's {own[0]}"
            if self.refused.get(cidr) != reason:
                log.error("not routing %s: %s", cidr, reason)
            self.refused[cidr] = reason
            return
        if self.routes.get(cidr) == node.ipv4:
            return
        await asyncio.to_thread(podnet.replace_route, str(cidr), str(node.ipv4))
        self.routes[cidr] = node.ipv4
        log.info("route %s via %s (node %s)", cidr, node.ipv4, node.full_name)

    async def _remove(self, cidr: ipaddress.IPv4Network) -> None:
        self.refused.pop(cidr, None)
        if self.routes.pop(cidr, None) is not None:
            await asyncio.to_thread(podnet.delete_route, str(cidr))
            log.info("route %s removed", cidr)
