"""Peers of a rule, and which identities each one matches.

A peer is an endpoint selector (with the namespace and cluster requirements the rule implies),
an entity, a CIDR, or "any". The selector cache keeps, for every peer in use, the identities it
matches, and updates it one identity at a time.
"""

import ipaddress
from collections.abc import Iterable

import attrs

from meshagent.model.identity import (
    CLUSTER_LABEL,
    WORLD_IDENTITIES,
    WORLD_LABELS,
    Identity,
    ReservedIdentity,
)
from meshagent.policy.api import CIDRRule, EndpointSelector, Requirement

NAMESPACE_KEY = "io.kubernetes.pod.namespace"

#: Entities that are part of "cluster" besides the local cluster's endpoints.
_CLUSTER_RESERVED = {ReservedIdentity.HOST, ReservedIdentity.REMOTE_NODE,
                     ReservedIdentity.HEALTH, ReservedIdentity.INIT, ReservedIdentity.UNMANAGED,
                     ReservedIdentity.KUBE_APISERVER}
_ENTITY_IDS = {"host": ReservedIdentity.HOST, "remote-node": ReservedIdentity.REMOTE_NODE,
               "health": ReservedIdentity.HEALTH, "init": ReservedIdentity.INIT,
               "unmanaged": ReservedIdentity.UNMANAGED,
               "kube-apiserver": ReservedIdentity.KUBE_APISERVER}


def label_index(labels: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """``{key: [(source, value), ...]}`` of ``source:key=value`` labels."""
    index: dict[str, list[tuple[str, str]]] = {}
    for label in labels:
        source, _, rest = label.partition(":")
        key, _, value = rest.partition("=")
        index.setdefault(key, []).append((source, value))
    return index


def requirement_matches(req: Requirement, index: dict[str, list[tuple[str, str]]]) -> bool:
    source = req.source
    values = [v for s, v in index.get(req.bare_key, ()) if source is None or s == source]
    if req.operator == "In":
        return any(v in req.values for v in values)
    if req.operator == "NotIn":
        return not any(v in req.values for v in values)
    if req.operator == "Exists":
        return bool(values)
    return not values  # DoesNotExist


@attrs.frozen(cache_hash=True)
class SelectorPeer:
    selector: EndpointSelector

    def matches(self, identity: Identity, index) -> bool:
        return all(requirement_matches(r, index) for r in self.selector.requirements)

    def describe(self) -> str:
        parts = []
        for r in self.selector.requirements:
            if r.operator == "In" and len(r.values) == 1:
                parts.append(f"{r.key}={next(iter(r.values))}")
            else:
                parts.append(f"{r.key} {r.operator} {sorted(r.values)}".rstrip(" []"))
        return "{" + ", ".join(parts) + "}"


@attrs.frozen(cache_hash=True)
class EntityPeer:
    entity: str
    local_cluster: str

    def matches(self, identity: Identity, index) -> bool:
        if self.entity == "world":  # both families, as Cilium's dual-stack world
            return identity.id in WORLD_IDENTITIES or not WORLD_LABELS.isdisjoint(identity.labels)
        if self.entity == "cluster":
            if identity.id in _CLUSTER_RESERVED:
                return True
            return any(v == self.local_cluster for _, v in index.get(CLUSTER_LABEL, ()))
        return identity.id == _ENTITY_IDS[self.entity]

    def describe(self) -> str:
        return f"entity {self.entity}"


@attrs.frozen(cache_hash=True)
class CIDRPeer:
    rule: CIDRRule

    def matches(self, identity: Identity, index) -> bool:
        """A CIDR selects the addresses of its own family only: ``::/0`` is the IPv6 world,
        never the IPv4 one."""
        cidr = self.rule.cidr
        if identity.id in (ReservedIdentity.WORLD, ReservedIdentity.WORLD_IPV4):
            return cidr.prefixlen == 0 and cidr.version == 4
        if identity.id == ReservedIdentity.WORLD_IPV6:
            return cidr.prefixlen == 0 and cidr.version == 6
        for label in identity.labels:
            if label.startswith("cidr:"):
                try:
                    prefix = ipaddress.ip_network(label[5:])
                except ValueError:
                    return False
                return prefix.version == cidr.version and prefix.subnet_of(cidr) and not any(
                    prefix.subnet_of(e) for e in self.rule.excepts)
        return False

    def describe(self) -> str:
        excepts = f" except {', '.join(map(str, self.rule.excepts))}" if self.rule.excepts else ""
        return f"CIDR {self.rule.cidr}{excepts}"


Peer = SelectorPeer | EntityPeer | CIDRPeer


class SelectorCache:
    """For every peer in use, the identities it matches; kept current one identity at a time.

    Indexed both ways so that neither a policy with thousands of selectors nor a mesh with
    thousands of identities makes every change a full scan: identities by their labels, and
    each selector by the labels one of which a matching identity must carry (its most
    selective ``In`` requirement, its anchor). A peer without an anchor is checked against
    every identity.
    """

    def __init__(self) -> None:
        self.identities: dict[int, tuple[Identity, dict]] = {}
        self.matches: dict[Peer, set[int]] = {}
        self._by_label: dict[tuple[str, str], set[int]] = {}
        self._anchored: dict[tuple[str, str], set[Peer]] = {}
        self._unanchored: set[Peer] = set()
        self._member_of: dict[int, set[Peer]] = {}
        self._anchors: dict[Peer, list[tuple[str, str]] | None] = {}

    @staticmethod
    def _anchor(peer: Peer) -> list[tuple[str, str]] | None:
        """(key, value) pairs one of which every identity the peer matches carries."""
        if not isinstance(peer, SelectorPeer):
            return None
        ins = [r for r in peer.selector.requirements if r.operator == "In"]
        if not ins:
            return None
        broad = (NAMESPACE_KEY, CLUSTER_LABEL)  # shared by many identities: last resort
        best = min(ins, key=lambda r: (r.bare_key in broad, len(r.values), r.key))
        return [(best.bare_key, value) for value in sorted(best.values)]

    @staticmethod
    def _pairs(identity: Identity) -> set[tuple[str, str]]:
        pairs = set()
        for label in identity.labels:
            key, _, value = label.partition(":")[2].partition("=")
            pairs.add((key, value))
        return pairs

    def add_identity(self, identity: Identity) -> list[Peer]:
        """Remember ``identity``; the peers that now match it (and did not before)."""
        index = label_index(identity.labels)
        self.identities[identity.id] = (identity, index)
        pairs = self._pairs(identity)
        candidates = set(self._unanchored)
        for pair in pairs:
            self._by_label.setdefault(pair, set()).add(identity.id)
            candidates |= self._anchored.get(pair, set())
        gained = []
        for peer in candidates:
            ids = self.matches[peer]
            if identity.id not in ids and peer.matches(identity, index):
                ids.add(identity.id)
                self._member_of.setdefault(identity.id, set()).add(peer)
                gained.append(peer)
        return gained

    def remove_identity(self, identity_id: int) -> list[Peer]:
        known = self.identities.pop(identity_id, None)
        if known is not None:
            for pair in self._pairs(known[0]):
                ids = self._by_label.get(pair)
                if ids is not None:
                    ids.discard(identity_id)
                    if not ids:
                        del self._by_label[pair]
        lost = list(self._member_of.pop(identity_id, ()))
        for peer in lost:
            self.matches[peer].discard(identity_id)
        return lost

    def ids(self, peer: Peer) -> set[int]:
        if peer not in self.matches:
            anchor = self._anchors[peer] = self._anchor(peer)
            if anchor is None:
                self._unanchored.add(peer)
                candidates = set(self.identities)
            else:
                candidates = set()
                for pair in anchor:
                    self._anchored.setdefault(pair, set()).add(peer)
                    candidates |= self._by_label.get(pair, set())
            matched = {i for i in candidates if peer.matches(*self.identities[i])}
            self.matches[peer] = matched
            for i in matched:
                self._member_of.setdefault(i, set()).add(peer)
        return self.matches[peer]

    def forget(self, peers: Iterable[Peer]) -> None:
        for peer in peers:
            matched = self.matches.pop(peer, None)
            if matched is None:
                continue
            for i in matched:
                members = self._member_of.get(i)
                if members is not None:
                    members.discard(peer)
                    if not members:
                        del self._member_of[i]
            anchor = self._anchors.pop(peer, None)
            if anchor is None:
                self._unanchored.discard(peer)
            else:
                for pair in anchor:
                    anchored = self._anchored.get(pair)
                    if anchored is not None:
                        anchored.discard(peer)
                        if not anchored:
                            del self._anchored[pair]
