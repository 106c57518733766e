"""``--auto-direct-node-routes``: reach every other node's pods through that node's IP.

Nodes come from the node table (this cluster's and every remote's); each change is queued by
the node event hook and applied by a controller, so netlink work never runs inside a hook.
A node that goes away keeps its route for a grace period: an agent restart revokes its keys and
publishes them again a moment later, and its pods must stay reachable meanwhile.
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


DELETE_GRACE = 30.0
EXPIRE = "expire"


class NodeRoutes:
    def __init__(self, agent: "Agent"):
        self.agent = agent
        self.delete_grace = agent.config.get("node-route-delete-grace")
        self._pending_deletes: dict[ipaddress.IPv4Network, asyncio.TimerHandle] = {}
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
            if kind is EXPIRE:  # the grace period of a gone node's route ran out
                if self._pending_deletes.pop(node, None) is not None:
                    await self._remove(node)
                continue
            if self._is_self(node):
                continue
            for cidr in node.pod_cidrs:
                if kind is ChangeKind.DELETE or node.ipv4 is None:
                    self._remove_later(cidr)
                else:
                    if handle := self._pending_deletes.pop(cidr, None):
                        handle.cancel()  # it came back in time
                    await self._install(cidr, node)

    def _remove_later(self, cidr: ipaddress.IPv4Network) -> None:
        if cidr in self._pending_deletes or cidr not in self.routes:
            self.refused.pop(cidr, None)
            return
        loop = asyncio.get_running_loop()
        self._pending_deletes[cidr] = loop.call_later(
            self.delete_grace, self.queue.put_nowait, (EXPIRE, cidr))

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
