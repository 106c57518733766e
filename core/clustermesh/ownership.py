"""Who may claim which addresses: the pod CIDRs that nodes advertise, accepted or refused.

A remote cluster may route (``--auto-direct-node-routes``) and publish ipcache entries only for
addresses inside pod CIDRs it was granted. A remote node's pod CIDR is granted when it overlaps
no pod CIDR of this cluster and none granted to another cluster (the first cluster to claim a
range keeps it), and covers no node's address and no kvstore server's address — so no remote can
take over this cluster's pods, another cluster's, or the network the agents talk over. This
cluster's own nodes are trusted. Decisions are remade from the node table whenever it changes
(batched), and whoever depends on them hears of it.

Both families are judged the same way; an IPv6 pod CIDR is routed via the node's IPv6 address.
Addresses are compared as integers on one line: IPv4 below ``V6_OFFSET``, IPv6 above it, so
no range of one family ever overlaps one of the other.
"""

import asyncio
import bisect
import ipaddress
import logging
from collections.abc import Callable, Iterable

import attrs

from meshagent import hookimpl
from meshagent.events import ChangeKind
from meshagent.model.net import Address, Network
from meshagent.model.node import Node

log = logging.getLogger(__name__)

RECOMPUTE_DELAY = 0.02  # seconds: a sync's burst of node changes is one recomputation
#: The "node" of the pod CIDRs a clustermesh file grants (no address: not routed by us)
FILE_GRANT = "(clustermesh file)"
V6_OFFSET = 1 << 32  # IPv6 address n sits at V6_OFFSET + n on the line of addresses
LINE_END = V6_OFFSET + (1 << 128)



def _at(address: Address | bytes) -> int:
    """Where an address of either family (or its 4 or 16 bytes) sits on the line."""
    if isinstance(address, bytes):
        return int.from_bytes(address, "big") + (V6_OFFSET if len(address) == 16 else 0)
    return int(address) + (V6_OFFSET if address.version == 6 else 0)


def _address(position: int) -> Address:
    if position >= V6_OFFSET:
        return ipaddress.IPv6Address(position - V6_OFFSET)
    return ipaddress.IPv4Address(position)


@attrs.frozen
class Grant:
    network: Network
    cluster: str
    node: str
    via: Address | None  # the node's address of the CIDR's family, where its pods are routed


class AddressOwnership:
    def __init__(self, local_cluster: str, local_pod_cidrs: Iterable[Network],
                 protected: Callable[[], Iterable[str]] = tuple):
        self.local_cluster = local_cluster
        self.local_pod_cidrs = tuple(local_pod_cidrs)
        self.protected = protected  # addresses no pod CIDR may cover (the kvstore servers)
        self.nodes: dict[tuple[str, str], Node] = {}  # in the order they were first seen
        self.grants: list[Grant] = []
        self.refused: dict[tuple[str, str, Network], str] = {}
        self.listeners: list[Callable[[], None]] = []
        # what clustermesh files say of clusters whose nodes announce no pod CIDR (ENI, Azure
        # or multi-pool IPAM): CIDRs granted to them, and clusters trusted with any address
        # nobody else holds
        self.configured: dict[str, tuple[Network, ...]] = {}
        self.trusted: set[str] = set()
        self._starts: list[int] = []  # sorted starts of the granted ranges, for owner()
        self._ranges: list[tuple[int, int, str]] = []
        self._pending: asyncio.TimerHandle | None = None

    # -- inputs ---------------------------------------------------------------------------------

    @hookimpl
    def meshagent_node_changed(self, kind, node):
        self.node_changed(kind, node)

    def node_changed(self, kind: ChangeKind, node: Node) -> None:
        key = (node.cluster, node.name)
        if kind is ChangeKind.DELETE:
            self.nodes.pop(key, None)
        else:
            self.nodes[key] = node
        self.schedule()

    def configure(self, cluster: str, cidrs: Iterable[Network], trusted: bool) -> None:
        """What ``cluster``'s clustermesh file grants it (nothing: forget it)."""
        cidrs = tuple(cidrs)
        if cidrs != self.configured.get(cluster, ()):
            if cidrs:
                self.configured[cluster] = cidrs
            else:
                self.configured.pop(cluster, None)
            self.schedule()
        if trusted != (cluster in self.trusted):
            if trusted:
                self.trusted.add(cluster)
            else:
                self.trusted.discard(cluster)
            for listener in list(self.listeners):  # held entries may be admitted now
                listener()

    def announces_pod_cidrs(self, cluster: str) -> bool | None:
        """Whether any node of ``cluster`` announces a pod CIDR (None: no node known)."""
        nodes = [n for (c, _), n in self.nodes.items() if c == cluster]
        return any(n.pod_cidrs for n in nodes) if nodes else None

    def schedule(self) -> None:
        """Recompute soon (once for a burst); right away when no loop runs."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.recompute()
            return
        if self._pending is None:
            self._pending = loop.call_later(RECOMPUTE_DELAY, self.recompute)

    # -- decisions ------------------------------------------------------------------------------

    def recompute(self) -> None:
        self._pending = None
        before = (list(self.grants), dict(self.refused))
        node_ips = sorted(_at(a) for n in self.nodes.values() for a in (n.ipv4, n.ipv6)
                          if a is not None)
        protected = sorted(_at(a) for a in _addresses(self.protected()))
        ranges: list[tuple[int, int, str]] = []  # granted, sorted by start, not overlapping
        grants, refused = [], {}
        local = list(self.local_pod_cidrs) + [c for n in self.nodes.values()
                                              if n.cluster == self.local_cluster
                                              for c in n.pod_cidrs]
        for cidr in local:  # trusted: ours
            _insert(ranges, cidr, self.local_cluster)
        # what the operator wrote in clustermesh files, then what nodes announce
        claims = [(Node(FILE_GRANT, cluster, 0), cidr)
                  for cluster, cidrs in sorted(self.configured.items()) for cidr in cidrs]
        claims += [(node, cidr) for node in self.nodes.values()
                   if node.cluster != self.local_cluster for cidr in node.pod_cidrs]
        for node, cidr in claims:
            reason = self._problem(cidr, node, ranges, node_ips, protected)
            if reason:
                refused[(node.cluster, node.name, cidr)] = reason
                continue
            _insert(ranges, cidr, node.cluster)
            grants.append(Grant(cidr, node.cluster, node.name, node.address(cidr.version)))
        for node in self.nodes.values():
            if node.cluster == self.local_cluster:
                grants += [Grant(c, node.cluster, node.name, node.address(c.version))
                           for c in node.pod_cidrs]
        self.grants, self.refused = grants, refused
        self._ranges = ranges
        self._starts = [start for start, _, _ in ranges]
        for (cluster, name, cidr), reason in refused.items():
            if before[1].get((cluster, name, cidr)) != reason:
                log.warning("refusing pod CIDR %s of node %s/%s: %s", cidr, cluster, name, reason)
        if (grants, refused) != before:
            for listener in list(self.listeners):
                listener()

    def _problem(self, cidr: Network, node: Node, ranges, node_ips: list[int],
                 protected: list[int]) -> str:
        start, end = _at(cidr.network_address), _at(cidr.broadcast_address)
        clash = _overlapping(ranges, start, end)
        if clash is not None and clash[2] != node.cluster:
            first, last, owner = clash
            other = _address(first), _address(last)
            whose = "this cluster's" if owner == self.local_cluster else f"cluster {owner}'s"
            return f"overlaps {whose} pod addresses {other[0]}-{other[1]}"
        index = bisect.bisect_left(node_ips, start)
        if index < len(node_ips) and node_ips[index] <= end:
            return f"covers the address of a node ({_address(node_ips[index])})"
        index = bisect.bisect_left(protected, start)
        if index < len(protected) and protected[index] <= end:
            return f"covers a kvstore server's address ({_address(protected[index])})"
        return ""

    # -- answers --------------------------------------------------------------------------------

    def owner(self, address: Address | bytes) -> str | None:
        """The cluster whose granted (or own) pod CIDR holds ``address`` (or its bytes)."""
        value = _at(address)
        index = bisect.bisect_right(self._starts, value) - 1
        if index >= 0:
            start, end, cluster = self._ranges[index]
            if start <= value <= end:
                return cluster
        return None

    def routes(self, node_name: str) -> dict[Network, Grant]:
        """Every granted pod CIDR of another node that has an address: what to route where."""
        return {g.network: g for g in self.grants if g.via is not None
                and (g.cluster, g.node) != (self.local_cluster, node_name)}


def _insert(ranges: list[tuple[int, int, str]], cidr: Network, cluster: str) -> None:
    """Add a range; one of the same cluster overlapping it is merged (same owner)."""
    start, end = _at(cidr.network_address), _at(cidr.broadcast_address)
    while (clash := _overlapping(ranges, start, end)) is not None:
        ranges.remove(clash)
        start, end = min(start, clash[0]), max(end, clash[1])
    bisect.insort(ranges, (start, end, cluster))


def _overlapping(ranges: list[tuple[int, int, str]], start: int, end: int):
    index = bisect.bisect_right(ranges, (start, LINE_END, "")) - 1
    for candidate in ranges[max(index, 0):index + 2]:
        if candidate[0] <= end and start <= candidate[1]:
            return candidate
    return None


def _addresses(texts: Iterable[str]) -> list[Address]:
    out = []
    for text in texts:
        try:
            out.append(ipaddress.ip_address(text))
        except ValueError:
            continue  # a name: not an address to protect by range
    return out
