"""Peers of a rule, and which identities each one matches.

A peer is an endpoint selector (with the namespace and cluster requirements the rule implies),
an entity, a CIDR, a ``toFQDNs`` selector, or "any". The selector cache keeps, for every peer
in use, the identities it matches, and updates it one identity at a time.
"""

import ipaddress
from collections.abc import Iterable, Sequence

import attrs

from meshagent.fqdn.contract import FQDN_SOURCE, FQDNSelector
from meshagent.model.identity import (
    CLUSTER_LABEL,
    WORLD_IDENTITIES,
    WORLD_LABELS,
    Identity,
    ReservedIdentity,
)
from meshagent.policy.api import CIDRRule, EndpointSelector, Requirement, split_key

NAMESPACE_KEY = "io.kubernetes.pod.namespace"

#: Entities that are part of "cluster" besides the local cluster's endpoints.
_CLUSTER_RESERVED = {ReservedIdentity.HOST, ReservedIdentity.REMOTE_NODE,
                     ReservedIdentity.HEALTH, ReservedIdentity.INIT, ReservedIdentity.UNMANAGED,
                     ReservedIdentity.KUBE_APISERVER}
_REMOTE_NODE_LABEL = ReservedIdentity.REMOTE_NODE.label
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


#: A requirement in the form matching reads it: (bare key, source or None, operator, values).
Compiled = tuple[str, str | None, str, frozenset[str]]
#: ``{key: [(source, value), ...]}``: what :func:`label_index` makes (the cache's own indexes
#: hold tuples).
LabelIndex = dict[str, Sequence[tuple[str, str]]]


def requirement_matches(req: Requirement, index: LabelIndex) -> bool:
    return _holds(req.bare_key, req.source, req.operator, req.values, index)


def compile_selector(selector: EndpointSelector) -> tuple[Compiled, ...]:
    """The selector's requirements with their keys split once, not at every identity."""
    return tuple((key, source, r.operator, r.values) for r in selector.requirements
                 for source, key in (split_key(r.key),))


def compiled_matches(compiled: tuple[Compiled, ...], index: LabelIndex) -> bool:
    for key, source, operator, values in compiled:
        if not _holds(key, source, operator, values, index):
            return False
    return True


def _holds(key: str, source: str | None, operator: str, values: frozenset[str],
           index: LabelIndex) -> bool:
    found = [v for s, v in index.get(key, ()) if source is None or s == source]
    if operator == "In":
        return any(v in values for v in found)
    if operator == "NotIn":
        return not any(v in values for v in found)
    if operator == "Exists":
        return bool(found)
    return not found  # DoesNotExist


def anchor(compiled: tuple[Compiled, ...]) -> list[tuple[str, str]] | None:
    """(key, value) pairs one of which every set of labels a selector (compiled) matches
    carries: its most selective ``In`` requirement's; None when it has no ``In`` requirement."""
    best = None
    for requirement in compiled:
        if requirement[2] == "In":
            rank = (requirement[0] in _BROAD, len(requirement[3]))
            if best is None or rank < best[0]:
                best = (rank, requirement)
    if best is None:
        return None
    key, _, _, values = best[1]
    return [(key, value) for value in values]


_BROAD = (NAMESPACE_KEY, CLUSTER_LABEL)  # shared by many identities: an anchor's last resort


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
            if identity.id in _CLUSTER_RESERVED or _REMOTE_NODE_LABEL in identity.labels:
                return True
            return any(v == self.local_cluster for _, v in index.get(CLUSTER_LABEL, ()))
        if self.entity == "remote-node":  # a node identity of its labels is one too
            return identity.id == ReservedIdentity.REMOTE_NODE or \
                _REMOTE_NODE_LABEL in identity.labels
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


@attrs.frozen(cache_hash=True)
class FQDNPeer:
    """A ``toFQDNs`` selector: the identities the DNS proxy gave the addresses of names it
    matches, which carry its label ``fqdn:<matchName or matchPattern>`` (Cilium 1.16+)."""

    selector: FQDNSelector

    @property
    def pair(self) -> tuple[str, str]:
        """The (key, value) of its label, as a label index holds it."""
        return self.selector.label.removeprefix(f"{FQDN_SOURCE}:"), ""

    def matches(self, identity: Identity, index) -> bool:
        key, value = self.pair
        return (FQDN_SOURCE, value) in index.get(key, ())

    def describe(self) -> str:
        return f"FQDN {self.selector}"


Peer = SelectorPeer | EntityPeer | CIDRPeer | FQDNPeer


class SelectorCache:
    """For every peer in use, the identities it matches; kept current one identity at a time.

    Indexed both ways so that neither a policy with thousands of selectors nor a mesh with
    thousands of identities makes every change a full scan: identities by label (each distinct
    label split once, with the identities carrying it), and each selector by the (key, value)
    pairs one of which a matching identity must carry (its anchor, see :func:`anchor`). A new
    selector's identities are the intersection of what its ``In`` requirements could match,
    each then checked against every requirement; a peer without an ``In`` requirement is
    checked against every identity.
    """

    def __init__(self) -> None:
        self.identities: dict[int, tuple[Identity, dict]] = {}
        self.matches: dict[Peer, set[int]] = {}
        self._labels: dict[str, _Label] = {}  # every label some identity carries
        self._by_pair: dict[tuple[str, str], list[_Label]] = {}  # (key, value) -> its labels
        self._anchored: dict[tuple[str, str], set[Peer]] = {}
        self._unanchored: set[Peer] = set()
        self._member_of: dict[int, set[Peer]] = {}
        self._anchors: dict[Peer, list[tuple[str, str]] | None] = {}
        self._compiled: dict[SelectorPeer, tuple[Compiled, ...]] = {}

    def _matches(self, peer: Peer, identity: Identity, index: dict) -> bool:
        compiled = self._compiled.get(peer)
        if compiled is None:
            return peer.matches(identity, index)
        return compiled_matches(compiled, index)

    def _label(self, label: str) -> "_Label":
        """A label not carried so far: parsed, then shared by every identity carrying it."""
        source, _, rest = label.partition(":")
        key, _, value = rest.partition("=")
        parsed = self._labels[label] = _Label(key, ((source, value),), (key, value), set())
        self._by_pair.setdefault(parsed.pair, []).append(parsed)
        return parsed

    def add_identity(self, identity: Identity) -> list[Peer]:
        """Remember ``identity``; the peers that now match it (and did not before)."""
        number = identity.id
        # as label_index(identity.labels), its entries shared with every identity carrying
        # the same labels (one dict an identity, not a list per label)
        index: dict[str, tuple[tuple[str, str], ...]] = {}
        self.identities[number] = (identity, index)
        candidates = set(self._unanchored)
        for label in identity.labels:
            parsed = self._labels.get(label) or self._label(label)
            parsed.holders.add(number)
            carried = index.get(parsed.key)
            index[parsed.key] = parsed.entry if carried is None else carried + parsed.entry
            anchored = self._anchored.get(parsed.pair)
            if anchored:
                candidates |= anchored
        gained = []
        for peer in candidates:
            ids = self.matches[peer]
            if number not in ids and self._matches(peer, identity, index):
                ids.add(number)
                self._member_of.setdefault(number, set()).add(peer)
                gained.append(peer)
        return gained

    def remove_identity(self, identity_id: int) -> list[Peer]:
        known = self.identities.pop(identity_id, None)
        if known is not None:
            for label in known[0].labels:
                parsed = self._labels.get(label)
                if parsed is None:
                    continue
                parsed.holders.discard(identity_id)
                if not parsed.holders:
                    del self._labels[label]
                    same = self._by_pair[parsed.pair]
                    same.remove(parsed)
                    if not same:
                        del self._by_pair[parsed.pair]
        lost = list(self._member_of.pop(identity_id, ()))
        for peer in lost:
            self.matches[peer].discard(identity_id)
        return lost

    def _carrying(self, pair: tuple[str, str]) -> set[int] | frozenset[int]:
        """The identities carrying ``pair`` under any source."""
        labels = self._by_pair.get(pair)
        if not labels:
            return _NONE
        if len(labels) == 1:
            return labels[0].holders
        return set().union(*(label.holders for label in labels))

    def ids(self, peer: Peer) -> set[int]:
        matched = self.matches.get(peer)
        if matched is None:
            matched = self.matches[peer] = self._match_all(peer)
            for i in matched:
                self._member_of.setdefault(i, set()).add(peer)
        return matched

    def _match_all(self, peer: Peer) -> set[int]:
        """Start following ``peer``: index it, and find every identity it matches."""
        if isinstance(peer, FQDNPeer):  # only identities carrying its label can match
            self._anchors[peer] = [peer.pair]
            self._anchored.setdefault(peer.pair, set()).add(peer)
            return {i for i in self._carrying(peer.pair) if peer.matches(*self.identities[i])}
        if not isinstance(peer, SelectorPeer):
            self._anchors[peer] = None
            self._unanchored.add(peer)
            return {i for i, known in self.identities.items() if peer.matches(*known)}
        compiled = self._compiled[peer] = compile_selector(peer.selector)
        pairs = self._anchors[peer] = anchor(compiled)
        if pairs is None:
            self._unanchored.add(peer)
        else:
            for pair in pairs:
                self._anchored.setdefault(pair, set()).add(peer)
        # each In requirement bounds the matches to the identities carrying one of its
        # values (under any source); the smallest bound first
        bounds = []
        for key, _, operator, values in compiled:
            if operator == "In":
                found = [self._carrying((key, value)) for value in values]
                bounds.append(found[0] if len(found) == 1 else set().union(*found))
        if not bounds:
            return {i for i, (_, index) in self.identities.items()
                    if compiled_matches(compiled, index)}
        bounds.sort(key=len)
        candidates = bounds[0].intersection(*bounds[1:])
        identities = self.identities
        return {i for i in candidates if compiled_matches(compiled, identities[i][1])}

    def forget(self, peers: Iterable[Peer]) -> None:
        for peer in peers:
            matched = self.matches.pop(peer, None)
            if matched is None:
                continue
            self._compiled.pop(peer, None)
            for i in matched:
                members = self._member_of.get(i)
                if members is not None:
                    members.discard(peer)
                    if not members:
                        del self._member_of[i]
            pairs = self._anchors.pop(peer, None)
            if pairs is None:
                self._unanchored.discard(peer)
            else:
                for pair in pairs:
                    anchored = self._anchored.get(pair)
                    if anchored is not None:
                        anchored.discard(peer)
                        if not anchored:
                            del self._anchored[pair]


_NONE: frozenset[int] = frozenset()


@attrs.define
class _Label:
    """A label some identity carries, split once for all of them."""

    key: str
    entry: tuple[tuple[str, str]]  # ((source, value),): its part of a label index
    pair: tuple[str, str]  # (key, value)
    holders: set[int]  # the identities carrying it
