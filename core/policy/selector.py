"""Peers of a rule, and which identities each one matches.

A peer is an endpoint selector (with the namespace and cluster requirements the rule implies),
an entity, a CIDR, or "any". The selector cache keeps, for every peer in use, the identities it
matches, and updates it one identity at a time.
"""

import ipaddress
from collections.abc import Iterable

import attrs

from meshagent.identity import CLUSTER_LABEL, Identity, ReservedIdentity
from meshagent.policy.api import CIDRRule, EndpointSelector, Requirement

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


@attrs.frozen
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


@attrs.frozen
class EntityPeer:
    entity: str
    local_cluster: str

    def matches(self, identity: Identity, index) -> bool:
        if self.entity == "world":
            return identity.id == ReservedIdentity.WORLD or "reserved:world" in identity.labels
        if self.entity == "cluster":
            if identity.id in _CLUSTER_RESERVED:
                return True
            return any(v == self.local_cluster for _, v in index.get(CLUSTER_LABEL, ()))
        return identity.id == _ENTITY_IDS[self.entity]

    def describe(self) -> str:
        return f"entity {self.entity}"


@attrs.frozen
class CIDRPeer:
    rule: CIDRRule

    def matches(self, identity: Identity, index) -> bool:
        if identity.id == ReservedIdentity.WORLD:
            return self.rule.cidr.prefixlen == 0
        for label in identity.labels:
            if label.startswith("cidr:"):
                prefix = ipaddress.IPv4Network(label[5:])
                return prefix.subnet_of(self.rule.cidr) and not any(
                    prefix.subnet_of(e) for e in self.rule.excepts)
        return False

    def describe(self) -> str:
        excepts = f" except {', '.join(map(str, self.rule.excepts))}" if self.rule.excepts else ""
        return f"CIDR {self.rule.cidr}{excepts}"


Peer = SelectorPeer | EntityPeer | CIDRPeer


class SelectorCache:
    """For every peer in use, the identities it matches; kept current one identity at a time."""

    def __init__(self) -> None:
        self.identities: dict[int, tuple[Identity, dict]] = {}
        self.matches: dict[Peer, set[int]] = {}

    def add_identity(self, identity: Identity) -> list[Peer]:
        """Remember ``identity``; the peers that now match it (and did not before)."""
        index = label_index(identity.labels)
        self.identities[identity.id] = (identity, index)
        gained = []
        for peer, ids in self.matches.items():
            if identity.id not in ids and peer.matches(identity, index):
                ids.add(identity.id)
                gained.append(peer)
        return gained

    def remove_identity(self, identity_id: int) -> list[Peer]:
        self.identities.pop(identity_id, None)
        lost = []
        for peer, ids in self.matches.items():
            if identity_id in ids:
                ids.discard(identity_id)
                lost.append(peer)
        return lost

    def ids(self, peer: Peer) -> set[int]:
        if peer not in self.matches:
            self.matches[peer] = {i for i, (identity, index) in self.identities.items()
                                  if peer.matches(identity, index)}
        return self.matches[peer]

    def forget(self, peers: Iterable[Peer]) -> None:
        for peer in peers:
            self.matches.pop(peer, None)
