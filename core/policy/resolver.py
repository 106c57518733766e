"""Resolving policies into per-endpoint map state, incrementally.

For each local endpoint the resolver keeps ``{MapKey → allow|redirect|deny}``: (direction, peer
identity or 0 for any, protocol or 0, port range or 0) — what the datapath looks up. Every key
counts its contributions (how many rule items allow it, redirect it to the DNS proxy, deny it);
deny wins over redirect, redirect over allow. An identity coming or
going touches only the keys of the peers that match it, for the endpoints that use those peers;
a policy or endpoint change recomputes the endpoints concerned. Only differences are handed on.
Replies are the datapath's (conntrack): the resolver emits no reply rules.
"""

from collections.abc import Callable, Iterable, Iterator

import attrs

from meshagent.events import ChangeKind
from meshagent.fqdn.contract import DNSRule, FQDNSelector
from meshagent.model.endpoint import NAMESPACE_LABEL
from meshagent.model.identity import CLUSTER_LABEL, NAMESPACE_LABELS, Identity, ReservedIdentity
from meshagent.policy.api import (
    PROTOCOLS,
    EndpointSelector,
    PeerRule,
    Policy,
    PortProtocol,
    Requirement,
    Rule,
)
from meshagent.policy.contract import MapChange, MapKey, PolicyKey, Verdict
from meshagent.policy.selector import (
    CIDRPeer,
    EntityPeer,
    FQDNPeer,
    Peer,
    SelectorCache,
    SelectorPeer,
    anchor,
    compile_selector,
    compiled_matches,
    label_index,
)

INGRESS, EGRESS = "ingress", "egress"
ANY_PORT = PortProtocol(0, 0, "ANY")


@attrs.frozen
class PolicyEndpoint:
    id: int
    namespace: str
    labels: frozenset[str]


@attrs.frozen
class Contribution:
    """One rule item's effect on an endpoint: this verdict for these peers on these ports."""

    direction: str
    verdict: Verdict
    peer: Peer | None  # None: any peer
    ports: tuple[PortProtocol, ...]
    origin: str  # "CiliumNetworkPolicy default/x spec ingress[0]", or why it is implied
    policy: tuple[str, str, str] | None = None  # the policy's key; None when implied
    dns: tuple[FQDNSelector, ...] = ()  # a REDIRECT's questions the DNS proxy lets through


@attrs.define
class EndpointState:
    endpoint: PolicyEndpoint
    enforced: dict[str, bool]
    rules: list[str]  # the policies that select it, for trace
    by_peer: dict[Peer | None, list[Contribution]]
    # per key, how many rule items allow it, redirect it and deny it (none: not there)
    allows: dict[MapKey, int] = attrs.field(factory=dict)
    denies: dict[MapKey, int] = attrs.field(factory=dict)
    redirects: dict[MapKey, int] = attrs.field(factory=dict)

    def verdict(self, key: MapKey) -> Verdict | None:
        if key in self.denies:
            return Verdict.DENY
        if key in self.redirects:
            return Verdict.REDIRECT
        return Verdict.ALLOW if key in self.allows else None

    def verdicts(self) -> dict[MapKey, Verdict]:
        verdicts = dict.fromkeys(self.allows, Verdict.ALLOW)
        verdicts.update(dict.fromkeys(self.redirects, Verdict.REDIRECT))
        verdicts.update(dict.fromkeys(self.denies, Verdict.DENY))
        return verdicts

    def counts(self, verdict: Verdict) -> dict[MapKey, int]:
        return self.denies if verdict is Verdict.DENY else (
            self.redirects if verdict is Verdict.REDIRECT else self.allows)


class RuleIndex:
    """The rules in force, each indexed by the labels one of which every endpoint it selects
    carries (its endpoint selector's :func:`anchor`), so that an endpoint is checked only
    against the rules that could select it — not against every rule of every policy."""

    def __init__(self) -> None:
        self._places: dict[PolicyKey, int] = {}  # a policy's place among them: dict order
        self._sizes: dict[int, int] = {}  # place -> how many rules the policy there has
        self._next = 0
        self._rules: dict[tuple[int, int], tuple[Policy, int, Rule, tuple]] = {}
        self._anchored: dict[tuple[str, str], set[tuple[int, int]]] = {}
        self._unanchored: set[tuple[int, int]] = set()
        self._anchors: dict[tuple[int, int], list[tuple[str, str]] | None] = {}

    def put(self, policy: Policy) -> None:
        """Index ``policy``'s rules; one of the same key keeps its place, as in a dict."""
        place = self._places.get(policy.key)
        if place is None:
            place = self._places[policy.key] = self._next
            self._next += 1
        else:
            self._drop(place)
        self._sizes[place] = len(policy.rules)
        for i, rule in enumerate(policy.rules):
            at = (place, i)
            compiled = compile_selector(rule.endpoint_selector)
            self._rules[at] = (policy, i, rule, compiled)
            pairs = self._anchors[at] = anchor(compiled)
            if pairs is None:
                self._unanchored.add(at)
            for pair in pairs or ():
                self._anchored.setdefault(pair, set()).add(at)

    def remove(self, key: PolicyKey) -> None:
        place = self._places.pop(key, None)
        if place is not None:
            self._drop(place)

    def _drop(self, place: int) -> None:
        for i in range(self._sizes.pop(place)):
            at = (place, i)
            del self._rules[at]
            pairs = self._anchors.pop(at)
            if pairs is None:
                self._unanchored.discard(at)
            for pair in pairs or ():
                ats = self._anchored[pair]
                ats.discard(at)
                if not ats:
                    del self._anchored[pair]

    def selecting(self, endpoint: PolicyEndpoint, index: dict
                  ) -> list[tuple[Policy, int, Rule]]:
        """The rules selecting ``endpoint`` (whose :func:`label_index` is ``index``), in the
        order of their policies and specs."""
        candidates = set(self._unanchored)
        for key, labels in index.items():
            for _, value in labels:
                candidates.update(self._anchored.get((key, value), ()))
        out = []
        for at in sorted(candidates):
            policy, i, rule, compiled = self._rules[at]
            if policy.namespace is not None and policy.namespace != endpoint.namespace:
                continue
            if compiled_matches(compiled, index):
                out.append((policy, i, rule))
        return out


def reserved_identities() -> list[Identity]:
    return [Identity(int(r), frozenset({r.label})) for r in ReservedIdentity]


class Resolver:
    def __init__(self, local_cluster: str, *, default_local_cluster: bool = True,
                 on_change: Callable[[int, list[MapChange]], None] | None = None):
        self.local_cluster = local_cluster
        self.default_local_cluster = default_local_cluster
        self.on_change = on_change or (lambda endpoint_id, changes: None)
        self.policies: dict[tuple[str, str, str], Policy] = {}
        self.rules = RuleIndex()  # the rules of the policies, indexed by what they select
        self.revision = 0
        self.cache = SelectorCache()
        self.endpoints: dict[int, EndpointState] = {}
        self.users: dict[Peer, set[int]] = {}
        self.handed: dict[int, dict[MapKey, Verdict]] = {}  # what on_change was last told
        self._made: dict[tuple[str, str, str], tuple[Policy, list]] = {}  # per policy key
        self.dirty: set[int] = set()  # endpoints a staged policy change has not reached yet
        self._warmed: set[Peer] = set()
        for identity in reserved_identities():
            self.cache.add_identity(identity)

    # -- inputs ---------------------------------------------------------------------------------

    def upsert_policy(self, policy: Policy) -> int:
        revision = self.stage_policy(policy)
        while self.recompute_pending(len(self.dirty)):
            pass
        return revision  # (nothing was prepared: nothing to forget)

    def delete_policy(self, key: tuple[str, str, str]) -> int:
        revision = self.stage_delete(key)
        while self.recompute_pending(len(self.dirty)):
            pass
        return revision

    # Cooperative use (the policy service): prepare a policy's contributions and its
    # selectors' matches a chunk at a time, stage it, then recompute the endpoints one by one
    # — other events may come in between, each keeping the state consistent.

    def prepare(self, policy: Policy, chunk: int = 500) -> Iterator[None]:
        """Make ``policy``'s contributions and its selectors' matches, yielding after every
        ``chunk`` rule items (see :meth:`forget_unused` for the matches no one uses)."""
        made = []
        done = 0
        for i, rule in enumerate(policy.rules):
            out: list[Contribution] = []
            for contributions in self._item_contributions(policy, i, rule):
                out += contributions
                done += 1
                if done % chunk == 0:
                    yield
            made.append(out)
        self._made[policy.key] = (policy, made)
        peers = [c.peer for spec in made for c in spec if c.peer is not None]
        for n, peer in enumerate(peers, 1):
            self.cache.ids(peer)
            if n % chunk == 0:
                yield
        self._warmed.update(peers)

    def forget_unused(self, chunk: int = 500) -> Iterator[None]:
        """Forget the selectors matched while preparing that no endpoint ended up using,
        yielding after every ``chunk``."""
        unused = [p for p in self._warmed if p not in self.users]
        self._warmed.clear()
        for start in range(0, len(unused), chunk):
            self.cache.forget(unused[start:start + chunk])
            yield

    def stage_policy(self, policy: Policy) -> int:
        """Put ``policy`` in force; endpoints catch up in :meth:`recompute_pending`. A new
        version that selects the same endpoints as the old one (a ``toServices`` policy
        translated again as its Services change) touches only those."""
        old = self.policies.get(policy.key)
        self.policies[policy.key] = policy
        self.rules.put(policy)
        self.revision += 1
        if old is not None and _same_subjects(old, policy):
            display = old.display
            self.dirty.update(endpoint_id for endpoint_id, state in self.endpoints.items()
                              if display in state.rules)
        else:
            self.dirty.update(self.endpoints)
        return self.revision

    def stage_delete(self, key: tuple[str, str, str]) -> int:
        self._made.pop(key, None)
        if self.policies.pop(key, None) is None:
            return self.revision
        self.rules.remove(key)
        self.revision += 1
        self.dirty.update(self.endpoints)
        return self.revision

    def recompute_pending(self, limit: int = 1) -> bool:
        """Recompute up to ``limit`` endpoints a policy change left behind; True if more wait."""
        for _ in range(min(limit, len(self.dirty))):
            endpoint_id = min(self.dirty)
            self.dirty.discard(endpoint_id)
            state = self.endpoints.get(endpoint_id)
            if state is not None:
                self._recompute(state.endpoint)
        return bool(self.dirty)

    def set_endpoint(self, endpoint: PolicyEndpoint) -> None:
        self.dirty.discard(endpoint.id)
        self._recompute(endpoint)

    def remove_endpoint(self, endpoint_id: int) -> None:
        self.dirty.discard(endpoint_id)
        state = self.endpoints.pop(endpoint_id, None)
        self.handed.pop(endpoint_id, None)
        if state is not None:
            self._drop_users(endpoint_id, state)

    def add_identity(self, identity: Identity) -> None:
        gained = self.cache.add_identity(identity)
        self._touch(identity.id, gained, +1)

    def remove_identity(self, identity_id: int) -> None:
        lost = self.cache.remove_identity(identity_id)
        self._touch(identity_id, lost, -1)

    # -- outputs --------------------------------------------------------------------------------

    def verdicts(self, endpoint_id: int) -> dict[MapKey, Verdict]:
        state = self.endpoints.get(endpoint_id)
        return state.verdicts() if state else {}

    # -- machinery ------------------------------------------------------------------------------

    def _touch(self, identity_id: int, peers: list[Peer], delta: int) -> None:
        """An identity joined (delta +1) or left (-1) the peers given: adjust their users."""
        changed: dict[int, set[MapKey]] = {}
        for peer in peers:
            for endpoint_id in self.users.get(peer, ()):
                state = self.endpoints[endpoint_id]
                for contribution in state.by_peer.get(peer, ()):
                    for key in _keys(contribution, (identity_id,)):
                        self._count(state, key, contribution.verdict, delta)
                        changed.setdefault(endpoint_id, set()).add(key)
        for endpoint_id, keys in changed.items():
            self._emit(endpoint_id, keys)

    def _count(self, state: EndpointState, key: MapKey, verdict: Verdict, delta: int) -> None:
        counts = state.counts(verdict)
        count = counts.get(key, 0) + delta
        if count:
            counts[key] = count
        else:
            del counts[key]

    def _recompute(self, endpoint: PolicyEndpoint) -> None:
        old = self.endpoints.get(endpoint.id)
        if old is not None:
            self._drop_users(endpoint.id, old)
        state = self._compute(endpoint)
        self.endpoints[endpoint.id] = state
        for peer in state.by_peer:
            if peer is not None:
                self.users.setdefault(peer, set()).add(endpoint.id)
        self._emit(endpoint.id, set(self.handed.get(endpoint.id, ())).union(
            state.allows, state.redirects, state.denies))

    def _drop_users(self, endpoint_id: int, state: EndpointState) -> None:
        for peer in state.by_peer:
            users = self.users.get(peer)
            if users is not None:
                users.discard(endpoint_id)
                if not users:
                    del self.users[peer]
                    self.cache.forget([peer])

    def _emit(self, endpoint_id: int, keys: Iterable[MapKey]) -> None:
        """Hand on how ``keys`` differ from what was handed on last time."""
        state = self.endpoints.get(endpoint_id)
        handed = self.handed.setdefault(endpoint_id, {})
        changes = []
        for key in sorted(keys, key=_order):
            new = state.verdict(key) if state else None
            if handed.get(key) == new:
                continue
            if new is None:
                del handed[key]
                changes.append(MapChange(ChangeKind.DELETE, key, None))
            else:
                handed[key] = new
                changes.append(MapChange(ChangeKind.UPSERT, key, new))
        if changes:
            self.on_change(endpoint_id, changes)

    def _compute(self, endpoint: PolicyEndpoint) -> EndpointState:
        selecting = self.rules.selecting(endpoint, label_index(endpoint.labels))
        enforced = {d: any(rule.enforces(d) for _, _, rule in selecting) for d in (INGRESS, EGRESS)}
        state = EndpointState(endpoint, enforced,
                              sorted({policy.display for policy, _, _ in selecting}), {})
        contributions = []
        for policy, i, _ in selecting:
            contributions += self._contributions(policy)[i]
        for direction, on in enforced.items():
            if not on:
                contributions.append(Contribution(direction, Verdict.ALLOW, None, (ANY_PORT,),
                                                  f"no policy enforces {direction}"))
        for contribution in contributions:
            state.by_peer.setdefault(contribution.peer, []).append(contribution)
            ids = (0,) if contribution.peer is None else self.cache.ids(contribution.peer)
            for key in _keys(contribution, ids):
                self._count(state, key, contribution.verdict, +1)
        return state

    def _contributions(self, policy: Policy) -> list[list[Contribution]]:
        """Per spec of ``policy``, what it contributes to an endpoint it selects: the same for
        every endpoint, so made once per policy version (a policy of 10,000 rules is not
        rebuilt for each endpoint)."""
        cached = self._made.get(policy.key)
        if cached is not None and cached[0] is policy:
            return cached[1]
        made = [self._rule_contributions(policy, i, rule) for i, rule in enumerate(policy.rules)]
        self._made[policy.key] = (policy, made)
        return made

    def _rule_contributions(self, policy: Policy, i: int, rule: Rule) -> list[Contribution]:
        return [c for item in self._item_contributions(policy, i, rule) for c in item]

    def _item_contributions(self, policy: Policy, i: int, rule: Rule
                            ) -> Iterator[list[Contribution]]:
        """What each rule item of spec ``i`` contributes, item by item."""
        where = f"{policy.display} {'spec' if len(policy.rules) == 1 else f'specs[{i}]'}"
        for section, direction, verdict in (("ingress", INGRESS, Verdict.ALLOW),
                                            ("ingressDeny", INGRESS, Verdict.DENY),
                                            ("egress", EGRESS, Verdict.ALLOW),
                                            ("egressDeny", EGRESS, Verdict.DENY)):
            for j, item in enumerate(getattr(rule, _FIELDS[section])):
                origin = f"{where} {section}[{j}]"
                peers = self._peers(item, policy, rule)
                plain = item.plain_ports
                made = [Contribution(direction, verdict, peer, plain or (ANY_PORT,), origin,
                                     policy.key)
                        for peer in peers if plain or not item.dns]
                # a toPorts item with rules: dns sends its ports to the DNS proxy, for the
                # item's peers, or any peer without (Cilium's implicit L3 allow-all)
                made += [Contribution(direction, Verdict.REDIRECT, peer, dns.ports, origin,
                                      policy.key, dns.rules)
                         for dns in item.dns for peer in peers]
                yield made

    def _peers(self, item: PeerRule, policy: Policy, rule: Rule) -> list[Peer | None]:
        if not item.names_peers:
            return [None] if item.ports else []  # ports alone: from/to any peer
        peers: list[Peer | None] = []
        cluster = self.local_cluster if self.default_local_cluster else None
        for selector in item.endpoints or ():
            peers.append(SelectorPeer(peer_selector(selector, policy.namespace,
                                                    rule.endpoint_selector, cluster)))
        for entity in item.entities or ():
            peers.append(None if entity == "all" else EntityPeer(entity, self.local_cluster))
        peers.extend(CIDRPeer(cidr) for cidr in item.cidrs or ())
        peers.extend(FQDNPeer(selector) for selector in item.fqdns or ())
        peers.extend(SelectorPeer(node_peer_selector(selector, cluster))
                     for selector in item.nodes or ())
        return peers


def _same_subjects(old: Policy, new: Policy) -> bool:
    """Whether two versions of a policy select the same endpoints: the same namespace and
    endpoint selectors, spec by spec."""
    return old.namespace == new.namespace and [r.endpoint_selector for r in old.rules] == [
        r.endpoint_selector for r in new.rules]


def node_peer_selector(selector: EndpointSelector, cluster: str | None) -> EndpointSelector:
    """What a ``fromNodes``/``toNodes`` selector selects: nodes other than this one
    (``reserved:remote-node``), of the local cluster under ``--policy-default-local-cluster``
    unless it names a cluster. Cilium's parseToCiliumIngressCommonRule /
    parseToCiliumEgressCommonRule (pkg/k8s/apis/cilium.io/utils/utils.go): the selector as
    written (any label source, so ``role: worker`` matches ``node:role=worker``), plus
    ``reserved:remote-node`` Exists and addClusterFilterByDefault."""
    selector = selector.with_requirement(Requirement(REMOTE_NODE_KEY, "Exists"))
    if cluster is not None and not selector.has_key(CLUSTER_LABEL):
        selector = selector.with_requirement(Requirement(
            f"k8s:{CLUSTER_LABEL}", "In", frozenset({cluster})))
    return selector


REMOTE_NODE_KEY = "reserved:remote-node"


def peer_selector(selector: EndpointSelector, namespace: str | None,
                  subject: EndpointSelector, cluster: str | None) -> EndpointSelector:
    """What a ``fromEndpoints``/``toEndpoints`` selector of a rule selecting ``subject``, in a
    policy of ``namespace`` (None: clusterwide), selects; ``cluster`` is the local cluster
    under ``--policy-default-local-cluster``, else None.

    Cilium's rules, followed step by step: getEndpointSelector in
    pkg/k8s/apis/cilium.io/utils/utils.go (called by parseToCiliumIngressCommonRule and
    parseToCiliumEgressCommonRule from ParseToCiliumRule; a CiliumClusterwideNetworkPolicy is
    parsed with namespace "" by ParseRules in pkg/k8s/apis/cilium.io/v2/ccnp_types.go; the
    cluster name is "" unless policy-default-local-cluster, LocalClusterNameForPolicies in
    pkg/clustermesh/types/option.go).
    """
    # a selector on a reserved label (reserved:host, any operator) stays as written: no
    # namespace, no cluster (es.HasKeyPrefix(LabelSourceReservedKeyPrefix): return es)
    if selector.has_source("reserved"):
        return selector
    # one that names the namespace (k8s: or no source, any operator) keeps it as written
    if not selector.has_key(NAMESPACE_LABEL):
        if namespace is None:
            # clusterwide: the namespace label must exist, so that even {} or a NotIn selects
            # cluster endpoints only, never world or host; except in a rule selecting init
            # endpoints (matchesPodInit: its endpointSelector has the key reserved:init)
            if not subject.has_key("init", source="reserved"):
                selector = selector.with_requirement(Requirement(
                    f"k8s:{NAMESPACE_LABEL}", "Exists"))
        elif not selector.has_key_prefix(NAMESPACE_LABELS):
            # namespaced: the policy's namespace, unless it selects on namespace labels
            # (io.cilium.k8s.namespace.labels.*, as k8s: or without a source, any operator),
            # which reach other namespaces
            selector = selector.with_requirement(Requirement(
                f"k8s:{NAMESPACE_LABEL}", "In", frozenset({namespace})))
    # then, for every kind of policy, the local cluster unless the selector names a cluster
    # (addClusterFilterByDefault)
    if cluster is not None and not selector.has_key(CLUSTER_LABEL):
        selector = selector.with_requirement(Requirement(
            f"k8s:{CLUSTER_LABEL}", "In", frozenset({cluster})))
    return selector


_FIELDS = {"ingress": "ingress", "ingressDeny": "ingress_deny", "egress": "egress",
           "egressDeny": "egress_deny"}


def _keys(contribution: Contribution, identities: Iterable[int]) -> list[MapKey]:
    direction = contribution.direction
    ports = [(PROTOCOLS[port.protocol], port.port, port.end_port) for port in contribution.ports]
    return [MapKey(direction, identity, protocol, port, end_port)
            for identity in identities for protocol, port, end_port in ports]


def _order(key: MapKey) -> tuple[str, int, int, int, int]:
    """MapKey's own order (its fields in turn), without attrs' comparison per pair."""
    return (key.direction, key.identity, key.protocol, key.port, key.end_port)


#: The protocols with ports: a port entry of any protocol (``ANY``) is one of each of them, as
#: in Cilium's policy map; an ICMP packet's port is its type, which only an ICMP entry names.
PORTED = frozenset({PROTOCOLS["TCP"], PROTOCOLS["UDP"], PROTOCOLS["SCTP"]})


def key_matches(key: MapKey, direction: str, identity: int, protocol: int, port: int) -> bool:
    """Whether a map key covers this packet (the datapath's lookup, in Python). ``port`` is
    the ICMP type for ICMP and ICMPv6, 0 for a packet without one."""
    if key.direction != direction or key.identity not in (0, identity):
        return False
    if key.port == 0:
        return key.protocol in (0, protocol)
    return (key.protocol == protocol or key.protocol == 0 and protocol in PORTED) \
        and key.port <= port <= key.end_port


DENIED_BY_RULE, DENIED_BY_DEFAULT, ALLOWED = "denied by a deny rule", "denied by default", \
    "allowed"
REDIRECTED = "allowed, through the DNS proxy"


def judge(verdicts: dict[MapKey, Verdict], direction: str, identity: int, protocol: int,
          port: int) -> tuple[Verdict, str]:
    """The verdict and why: deny if any matching key denies, redirect (to the DNS proxy) if
    one redirects, allow if one allows, otherwise denied by default. ``port`` is 0 for a
    protocol without ports."""
    matching = {v for k, v in verdicts.items() if key_matches(k, direction, identity, protocol,
                                                               port)}
    if Verdict.DENY in matching:
        return Verdict.DENY, DENIED_BY_RULE
    if Verdict.REDIRECT in matching:
        return Verdict.REDIRECT, REDIRECTED
    if Verdict.ALLOW in matching:
        return Verdict.ALLOW, ALLOWED
    return Verdict.DENY, DENIED_BY_DEFAULT


def decide(verdicts: dict[MapKey, Verdict], direction: str, identity: int, protocol: int,
           port: int) -> Verdict:
    """Deny if any matching key denies, redirect if one redirects, allow if one allows,
    otherwise denied by default."""
    return judge(verdicts, direction, identity, protocol, port)[0]


@attrs.frozen
class Trace:
    verdict: Verdict
    reason: str  # "allowed", "allowed, through the DNS proxy", "denied by a deny rule", ...
    enforced: bool
    matched: tuple[str, ...]  # the contributions (rule items and peers) that matched
    selecting: tuple[str, ...]  # the policies that select the endpoint


def trace(resolver: Resolver, endpoint_id: int, direction: str, peer: Identity, protocol: int,
          port: int) -> Trace:
    """Explain the verdict for ``peer`` talking to (ingress) or from (egress) an endpoint."""
    state = resolver.endpoints[endpoint_id]
    index = label_index(peer.labels)
    allows, redirects, denies = [], [], []
    for peer_key, contributions in state.by_peer.items():
        if peer_key is not None and not peer_key.matches(peer, index):
            continue
        for c in contributions:
            if c.direction != direction:
                continue
            for p in c.ports:
                if not _covers(p, protocol, port):
                    continue
                what = "any peer" if peer_key is None else peer_key.describe()
                ports = "any port" if not p.port else (
                    f"{p.port}-{p.end_port}/{p.protocol}" if p.end_port != p.port
                    else f"{p.port}/{p.protocol}")
                questions = f", DNS questions {', '.join(map(str, c.dns))}" if c.dns else ""
                {Verdict.DENY: denies, Verdict.REDIRECT: redirects,
                 Verdict.ALLOW: allows}[c.verdict].append(
                    f"{c.verdict.value}: {c.origin}: {what} on {ports}{questions}")
                break
    enforced = state.enforced[direction]
    if denies:
        verdict, reason = Verdict.DENY, "denied by a deny rule"
    elif redirects:
        verdict, reason = Verdict.REDIRECT, f"{REDIRECTED}, which answers only the questions" \
                                            " its rules allow"
    elif allows:
        verdict, reason = Verdict.ALLOW, "allowed" if enforced else \
            f"allowed: no policy enforces {direction} for this endpoint"
    else:
        verdict, reason = Verdict.DENY, f"denied by default ({direction} is enforced and no rule" \
                                        " allows it)"
    return Trace(verdict, reason, enforced, tuple(denies + redirects + allows),
                 tuple(state.rules))


def deciding_policies(resolver: Resolver, endpoint_id: int, direction: str, identity: int,
                      protocol: int, port: int, verdict: Verdict, match: int
                      ) -> tuple[tuple[str, str, str], ...]:
    """The policies whose rule items give ``verdict`` to this packet with an entry of the
    level ``match`` names (Cilium's PolicyMatchType: 1 the peer on any protocol, 5 the peer and
    a protocol, 2 the peer and a port; 4 any peer on any protocol, 6 any peer and a protocol,
    3 any peer and a port), sorted; what Hubble's
    policy correlation reports as ``ingress_allowed_by`` and the like. Empty when the
    endpoint is unknown, the verdict implied (nothing enforces the direction) or ``match``
    names no level."""
    state = resolver.endpoints.get(endpoint_id)
    if state is None or match not in _LEVELS:
        return ()
    named_peer, names = _LEVELS[match]
    known = resolver.cache.identities.get(identity)
    peer = known[0] if known else Identity(identity, frozenset())
    index = label_index(peer.labels)
    found = set()
    for peer_key, contributions in state.by_peer.items():
        if (peer_key is not None) != named_peer:
            continue
        if peer_key is not None and not peer_key.matches(peer, index):
            continue
        for c in contributions:
            if c.direction != direction or c.policy is None or not (
                    c.verdict is verdict or verdict is Verdict.ALLOW
                    and c.verdict is Verdict.REDIRECT):  # a redirect allows, too
                continue
            if any(_names(p) == names and _covers(p, protocol, port)
                   for p in c.ports):
                found.add(c.policy)
    return tuple(sorted(found))


#: PolicyMatchType -> (the entry names a peer, what of protocol and port it names)
_LEVELS = {1: (True, "any"), 2: (True, "port"), 3: (False, "port"), 4: (False, "any"),
           5: (True, "protocol"), 6: (False, "protocol")}


def _names(port: PortProtocol) -> str:
    """What an entry of this port names (Cilium's policy map: no protocol, a protocol on
    any port, or a port)."""
    if port.port:
        return "port"
    return "any" if port.protocol == "ANY" else "protocol"


def _covers(port: PortProtocol, protocol: int, number: int) -> bool:
    """Whether a rule's port entry covers a packet: :func:`key_matches` on the entry."""
    key = MapKey("", 0, PROTOCOLS[port.protocol], port.port, port.end_port)
    return key_matches(key, "", 0, protocol, number)


#: What a peer allowed on a redirected port without DNS rules may ask
ANY_NAME = FQDNSelector(match_pattern="*")


def dns_rules(resolver: Resolver, endpoint_id: int) -> tuple[DNSRule, ...]:
    """The DNS proxy's rules for a local endpoint: per port, protocol and peer of its egress
    REDIRECT contributions, the questions allowed (Cilium's per-selector DNS rules of an L4
    filter with a DNS parser, pkg/policy/l4.go). A peer that the endpoint's policy allows on a
    redirected port without DNS rules (an L3-only or L4-only rule) may ask anything of those
    of its servers whose packets are redirected, as Cilium's wildcardL3L4Rule makes it
    (pkg/policy/rule.go): one more rule per port and protocol."""
    state = resolver.endpoints.get(endpoint_id)
    if state is None:
        return ()
    grouped: dict[tuple[int, str, Peer | None], list[FQDNSelector]] = {}
    scope: dict[tuple[int, str], set[int] | None] = {}  # redirected servers (None: any)
    for peer, contributions in state.by_peer.items():
        for c in contributions:
            if c.direction == EGRESS and c.verdict is Verdict.REDIRECT:
                for port in c.ports:
                    at = (port.port, port.protocol)
                    grouped.setdefault((*at, peer), []).extend(c.dns)
                    known = scope.get(at, set())
                    scope[at] = None if peer is None or known is None else \
                        known | resolver.cache.ids(peer)
    wildcard: dict[tuple[int, str], set[int] | None] = {}
    for peer, contributions in state.by_peer.items():
        for c in contributions:
            if c.direction != EGRESS or c.verdict is not Verdict.ALLOW:
                continue
            for (number, protocol), redirected in scope.items():
                for port in c.ports:
                    if port.protocol in ("ICMP", "ICMPv6"):
                        continue  # its port is a type
                    if port.port and not port.port <= number <= port.end_port:
                        continue
                    if "ANY" not in (port.protocol, protocol) and port.protocol != protocol:
                        continue
                    at = (number, protocol if port.protocol == "ANY" else port.protocol)
                    servers = redirected if peer is None else (
                        set(resolver.cache.ids(peer)) if redirected is None
                        else redirected & resolver.cache.ids(peer))
                    if servers is not None and not servers:
                        continue  # none of its packets to this port is redirected
                    known = wildcard.get(at, set())
                    wildcard[at] = None if servers is None or known is None else known | servers
    rules = [DNSRule(port, protocol,
                     None if peer is None else frozenset(resolver.cache.ids(peer)),
                     tuple(dict.fromkeys(patterns)))
             for (port, protocol, peer), patterns in grouped.items()]
    rules += [DNSRule(port, protocol, None if servers is None else frozenset(servers),
                      (ANY_NAME,))
              for (port, protocol), servers in wildcard.items()]
    return tuple(rules)


def fqdn_selectors(resolver: Resolver) -> frozenset[FQDNSelector]:
    """The toFQDNs selectors of the policies in force, whichever endpoints they select: they
    change with the rules only (an endpoint arriving later finds its names labelled)."""
    return frozenset(selector for policy in resolver.policies.values()
                     for rule in policy.rules for item in rule.egress
                     for selector in item.fqdns or ())
