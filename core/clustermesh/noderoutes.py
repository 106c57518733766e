"""``--auto-direct-node-routes``: reach every other node's pods through that node's IP.

Routes are derived state, reconciled from what is granted (meshagent.clustermesh.ownership): a pod CIDR is
routed only once granted to its node's cluster, never when it overlaps a network this node is
directly connected to (where the node and kvstore addresses live), and a route whose grant is
gone is removed after a grace period (an agent restart revokes its keys and publishes them
again a moment later, and its pods must stay reachable meanwhile). The routes carry their own
protocol number, so the kernel's table says which are ours: a restarted agent, or one that lost
its kvstore, reconciles from that table and the grants alone — no delete event is needed to
take a route away.
"""

import asyncio
import ipaddress
import logging
import time
from socket import AF_INET, AF_INET6

from meshagent import hookimpl
from meshagent.clustermesh.ownership import AddressOwnership, Grant
from meshagent.model.net import Address, Network, family_order
from meshagent.runtime.controller import Controller, ControllerHandle

log = logging.getLogger(__name__)

ROUTE_PROTOCOL = 77  # "meshagent" in the route's protocol field: only these are ours
RECONCILE_INTERVAL = 10.0  # seconds between reconciles when nothing asks for one
RT_SCOPE_LINK = 253
RTPROT_KERNEL = 2


class NodeRoutes:
    def __init__(self, ownership: AddressOwnership, node_name: str, delete_grace: float,
                 netlink: "RouteTable | None" = None):
        self.ownership = ownership
        self.node_name = node_name
        self.delete_grace = delete_grace
        self.netlink = netlink or RouteTable()
        self.routes: dict[Network, Address] = {}  # as installed
        self.refused: dict[Network, str] = {}
        self.missing_since: dict[Network, float] = {}
        self._wake = asyncio.Event()
        ownership.listeners.append(self._wake.set)

    @hookimpl
    def meshagent_controllers(self):
        return [Controller("node-routes", self.run)]

    async def run(self, handle: ControllerHandle) -> None:
        handle.ready()
        while True:
            await self.reconcile()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._next_wait())
            except TimeoutError:
                pass

    def _next_wait(self) -> float:
        if not self.missing_since:
            return RECONCILE_INTERVAL
        due = min(self.missing_since.values()) + self.delete_grace - time.monotonic()
        return max(0.05, min(RECONCILE_INTERVAL, due))

    async def reconcile(self) -> None:
        """Make our routes in the kernel what the grants say (minus refusals), adding and
        replacing first, removing last."""
        installed, connected = await asyncio.to_thread(self.netlink.read, ROUTE_PROTOCOL)
        wanted: dict[Network, Grant] = {}
        refused = {}
        for network, grant in self.ownership.routes(self.node_name).items():
            clash = next((c for c in connected if c.overlaps(network)), None)
            if clash is not None:
                refused[network] = (f"node {grant.cluster}/{grant.node}'s pod CIDR {network}"
                                    f" overlaps this node's directly connected network {clash}")
                continue
            if not any(grant.via in c for c in connected if c.version == grant.via.version):
                # direct routing needs the node next to us: e.g. a dual-stack remote node
                # seen from a node without IPv6
                refused[network] = (f"node {grant.cluster}/{grant.node}'s address {grant.via} is"
                                    " on no network this node is directly connected to")
                continue
            wanted[network] = grant
        for network, reason in refused.items():
            if self.refused.get(network) != reason:
                log.error("not routing %s: %s", network, reason)
        self.refused = refused
        for network, grant in sorted(wanted.items(), key=lambda item: family_order(item[0])):
            self.missing_since.pop(network, None)
            if installed.get(network) != grant.via:
                await asyncio.to_thread(self.netlink.replace, network, grant.via,
                                        ROUTE_PROTOCOL)
                log.info("route %s via %s (node %s/%s)", network, grant.via, grant.cluster,
                         grant.node)
        now = time.monotonic()
        for network in sorted(set(installed) - set(wanted), key=family_order):
            if network in refused:
                self.missing_since.pop(network, None)  # never keep a refused route
            else:
                since = self.missing_since.setdefault(network, now)
                if now - since < self.delete_grace:
                    continue
                self.missing_since.pop(network, None)
            await asyncio.to_thread(self.netlink.delete, network, ROUTE_PROTOCOL)
            log.info("route %s removed", network)
        for network in set(self.missing_since) - set(installed):
            self.missing_since.pop(network, None)
        self.routes, _ = await asyncio.to_thread(self.netlink.read, ROUTE_PROTOCOL)


class RouteTable:
    """The node's main routing table through netlink (pyroute2), blocking: call in a thread."""

    def read(self, protocol: int) -> tuple[dict[Network, Address], list[Network]]:
        """Our routes (dst -> gateway) and the directly connected networks (not ours), both
        families."""
        from pyroute2 import IPRoute
        ours, connected = {}, []
        with IPRoute() as ipr:
            for family in (AF_INET, AF_INET6):
                for route in ipr.get_routes(family=family, table=254):
                    dst = route.get_attr("RTA_DST")
                    if dst is None:
                        continue
                    network = ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False)
                    gateway = route.get_attr("RTA_GATEWAY")
                    if route["proto"] == protocol:
                        if gateway:
                            ours[network] = ipaddress.ip_address(gateway)
                    elif network.prefixlen < network.max_prefixlen and not gateway and (
                            route["scope"] == RT_SCOPE_LINK if family == AF_INET
                            else route["proto"] == RTPROT_KERNEL):
                        connected.append(network)  # IPv6's connected routes are the kernel's
        return ours, connected

    def replace(self, network: Network, via: Address, protocol: int) -> None:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            ipr.route("replace", dst=str(network), gateway=str(via), proto=protocol,
                      family=AF_INET6 if network.version == 6 else AF_INET)

    def delete(self, network: Network, protocol: int) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        with IPRoute() as ipr:
            try:
                ipr.route("del", dst=str(network), proto=protocol,
                          family=AF_INET6 if network.version == 6 else AF_INET)
            except NetlinkError as exc:
                if exc.code != 3:  # ESRCH: already gone
                    raise

