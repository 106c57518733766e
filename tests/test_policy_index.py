"""The resolver's indexes (identities by label, selectors and rules by their anchors, compiled
requirements) change nothing: on random worlds and random sequences of changes, its map state,
what it handed on, and the order of each peer's contributions equal those of a straightforward
resolution that checks every rule against every endpoint and every selector against every
identity, label by label. The worlds have DNS-aware egress too: ``toFQDNs`` peers, identities
the DNS proxy labelled ``fqdn:<selector>``, and DNS rules (redirects; deny > redirect >
allow); and node peers (``fromNodes``/``toNodes``) with node identities (``node:`` labels,
``reserved:remote-node``, a cluster)."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent.model.identity import Identity
from meshagent.policy.api import PROTOCOLS, Policy, parse_policies, split_key
from meshagent.policy.contract import MapKey, Verdict
from meshagent.policy.resolver import (
    ANY_PORT,
    EGRESS,
    INGRESS,
    PolicyEndpoint,
    Resolver,
    node_peer_selector,
    peer_selector,
    reserved_identities,
)
from meshagent.policy.selector import CIDRPeer, EntityPeer, FQDNPeer, SelectorPeer

NAMESPACE = "io.kubernetes.pod.namespace"
CLUSTER = "io.cilium.k8s.policy.cluster"
TEAM = "io.cilium.k8s.namespace.labels.team"
VALUES = {"app": ["a", "b"], "tier": ["x", "y"], NAMESPACE: ["default", "other"],
          CLUSTER: ["cluster1", "cluster2"], TEAM: ["a", "b"]}
SOURCES = ["k8s", "container"]

# -- random worlds ----------------------------------------------------------------------------

label = st.sampled_from(sorted(VALUES)).flatmap(
    lambda key: st.tuples(st.sampled_from(SOURCES), st.just(key), st.sampled_from(VALUES[key])))
# mostly a pod's: its namespace and cluster under k8s, then anything
label_sets = st.tuples(
    st.sets(st.sampled_from([("k8s", NAMESPACE, "default"), ("k8s", NAMESPACE, "other")]),
            max_size=1),
    st.sets(st.sampled_from([("k8s", CLUSTER, "cluster1"), ("k8s", CLUSTER, "cluster2")]),
            min_size=1, max_size=1) | st.just(set()),
    st.sets(label, max_size=3)).map(
    lambda parts: frozenset(f"{s}:{k}={v}" for part in parts for s, k, v in part))
#: another node's identity (meshagent.identity.node): reserved:remote-node, its cluster, and
#: its labels under the node source
node_label_sets = st.tuples(
    st.sampled_from(["cluster1", "cluster2"]),
    st.sets(st.sampled_from(sorted(VALUES)).flatmap(
        lambda key: st.tuples(st.just(key), st.sampled_from(VALUES[key]))), max_size=2)).map(
    lambda parts: frozenset({"reserved:remote-node", f"k8s:{CLUSTER}={parts[0]}"}
                            | {f"node:{k}={v}" for k, v in parts[1]}))
#: toFQDNs selectors, and the labels the DNS proxy gives an address of a name they match
FQDNS = [{"matchName": "a.example.com"}, {"matchPattern": "*.example.com"},
         {"matchName": "A.example.com"}]
FQDN_LABELS = ["fqdn:a.example.com", "fqdn:*.example.com", "fqdn:A.example.com"]
# an answered address: world, and the labels of the selectors that matched its name
fqdn_label_sets = st.sets(st.sampled_from(FQDN_LABELS), min_size=1).map(
    lambda labels: frozenset(labels) | {"reserved:world"})


@st.composite
def requirement(draw) -> tuple[str, str, list[str]]:
    key = draw(st.sampled_from(sorted(VALUES)))
    written = draw(st.sampled_from(["", "k8s:", "any:", "container:"])) + key
    operator = draw(st.sampled_from(["In", "In", "NotIn", "Exists", "DoesNotExist"]))
    values = draw(st.lists(st.sampled_from(VALUES[key]), min_size=1, max_size=2, unique=True)) \
        if operator in ("In", "NotIn") else []
    return written, operator, values


@st.composite
def any_selector(draw) -> dict:
    out: dict = {}
    labels = draw(st.dictionaries(st.sampled_from(["app", "k8s:app", "tier", f"k8s:{CLUSTER}",
                                                   NAMESPACE]),
                                  st.sampled_from(["a", "b", "x", "cluster2", "other"]),
                                  max_size=2))
    if labels:
        out["matchLabels"] = labels
    expressions = draw(st.lists(requirement(), max_size=2))
    if expressions:
        out["matchExpressions"] = [{"key": k, "operator": o, **({"values": v} if v else {})}
                                   for k, o, v in expressions]
    return out


# mostly what selects something: {}, or one label
selector = st.one_of(
    st.just({}),
    st.sampled_from(["app", "k8s:app", "container:app", "tier"]).flatmap(
        lambda key: st.sampled_from(VALUES[split_key(key)[1]]).map(
            lambda value: {"matchLabels": {key: value}})),
    any_selector())


@st.composite
def item(draw, prefix: str, section: str = "") -> dict:
    out: dict = {}
    if section == "egress" and draw(st.integers(0, 3)) == 0:
        out["toFQDNs"] = draw(st.lists(st.sampled_from(FQDNS), min_size=1, max_size=2))
        if draw(st.booleans()):
            out["toPorts"] = [{"ports": [{"port": "443", "protocol": "TCP"}]}]
        return out  # alone among the peers, as Cilium wants
    if draw(st.integers(0, 5)) == 0:
        out[f"{prefix}Nodes"] = draw(st.lists(selector, min_size=1, max_size=2))
        if draw(st.booleans()):
            out["toPorts"] = [{"ports": [{"port": "80", "protocol": "TCP"}]}]
        return out  # alone among the peers, as Cilium wants
    if draw(st.booleans()):
        out[f"{prefix}Endpoints"] = draw(st.lists(selector, min_size=1, max_size=2))
    if draw(st.integers(0, 4)) == 0:
        out[f"{prefix}Entities"] = draw(st.lists(st.sampled_from(
            ["world", "cluster", "all", "host"]), min_size=1, max_size=2, unique=True))
    if draw(st.integers(0, 6)) == 0:
        out[f"{prefix}CIDR"] = ["10.0.0.0/8"]
    if draw(st.booleans()):
        out["toPorts"] = [{"ports": [draw(st.sampled_from([
            {"port": "80", "protocol": "TCP"}, {"port": "53", "protocol": "UDP"},
            {"port": "1000", "endPort": 1010}, {"port": "80"}]))]}]
    if section == "egress" and draw(st.integers(0, 2)) == 0:
        out.setdefault("toPorts", []).append({
            "ports": [draw(st.sampled_from([{"port": "53", "protocol": "UDP"},
                                            {"port": "53", "protocol": "ANY"},
                                            {"port": "80"}]))],
            "rules": {"dns": draw(st.lists(st.sampled_from(FQDNS), min_size=1, max_size=2))}})
    return out


@st.composite
def policy(draw, name: int) -> Policy:
    spec: dict = {"endpointSelector": draw(selector)}
    for section, prefix in (("ingress", "from"), ("ingressDeny", "from"), ("egress", "to"),
                            ("egressDeny", "to")):
        if draw(st.booleans()):
            spec[section] = draw(st.lists(item(prefix, section), min_size=1, max_size=2))
    clusterwide = draw(st.integers(0, 3)) == 0
    document = {"apiVersion": "cilium.io/v2",
                "kind": "CiliumClusterwideNetworkPolicy" if clusterwide
                else "CiliumNetworkPolicy",
                "metadata": {"name": f"p{name}"} if clusterwide else
                {"name": f"p{name}", "namespace": draw(st.sampled_from(["default", "other"]))},
                "spec": spec}
    return parse_policies(json.dumps(document))[0]


@st.composite
def world_then_changes(draw) -> list:
    """Some policies and endpoints, then any changes (identities coming and going most)."""
    ops = [("policy+", draw(policy(n))) for n in range(draw(st.integers(1, 4)))]
    ops += [draw(change("endpoint+")) for _ in range(draw(st.integers(1, 3)))]
    return ops + draw(st.lists(change(), min_size=3, max_size=25))


@st.composite
def change(draw, what: str | None = None):
    what = what or draw(st.sampled_from(["identity+", "identity+", "identity+", "identity-",
                                         "policy+", "policy-", "endpoint+", "endpoint-"]))
    if what == "identity+":
        labels = draw(draw(st.sampled_from([label_sets, label_sets, label_sets,
                                            fqdn_label_sets, node_label_sets])))
        return what, Identity(1000 + draw(st.integers(0, 15)), labels, "cluster1")
    if what == "identity-":
        return what, 1000 + draw(st.integers(0, 15))
    if what == "policy+":
        return what, draw(policy(draw(st.integers(0, 5))))
    if what == "policy-":
        n = draw(st.integers(0, 5))
        return what, (draw(st.sampled_from(["CiliumNetworkPolicy",
                                            "CiliumClusterwideNetworkPolicy"])),
                      draw(st.sampled_from(["default", "other", ""])), f"p{n}")
    if what == "endpoint+":
        namespace = draw(st.sampled_from(["default", "other"]))
        return what, PolicyEndpoint(draw(st.integers(1, 4)), namespace, draw(label_sets)
                                    | {f"k8s:{NAMESPACE}={namespace}"})
    return what, draw(st.integers(1, 4))


# -- the straightforward resolution ------------------------------------------------------------

def naive_selects(selector, labels: frozenset[str]) -> bool:
    for requirement in selector.requirements:
        source, key = split_key(requirement.key)
        found = set()
        for text in labels:
            label_source, _, rest = text.partition(":")
            label_key, _, value = rest.partition("=")
            if label_key == key and (source is None or label_source == source):
                found.add(value)
        if requirement.operator == "In" and not found & requirement.values:
            return False
        if requirement.operator == "NotIn" and found & requirement.values:
            return False
        if requirement.operator == "Exists" and not found:
            return False
        if requirement.operator == "DoesNotExist" and found:
            return False
    return True


def naive_peer_matches(peer, identity: Identity) -> bool:
    if isinstance(peer, SelectorPeer):
        return naive_selects(peer.selector, identity.labels)
    if isinstance(peer, FQDNPeer):
        written = peer.selector.match_name or peer.selector.match_pattern
        return f"fqdn:{written}" in identity.labels
    return peer.matches(identity, None if isinstance(peer, CIDRPeer) else _index(identity))


def _index(identity: Identity) -> dict:
    index: dict = {}
    for text in identity.labels:
        source, _, rest = text.partition(":")
        key, _, value = rest.partition("=")
        index.setdefault(key, []).append((source, value))
    return index


def naive(policies: dict, identities: dict, endpoint: PolicyEndpoint, cluster: str):
    """(verdicts, {peer: [origins]}) for one endpoint, every check made in full."""
    contributions = []  # (direction, verdict, peer or None, ports, origin), in policy order
    enforced = {INGRESS: False, EGRESS: False}
    for policy in policies.values():
        for i, rule in enumerate(policy.rules):
            if policy.namespace is not None and policy.namespace != endpoint.namespace:
                continue
            if not naive_selects(rule.endpoint_selector, endpoint.labels):
                continue
            for direction in enforced:
                enforced[direction] |= rule.enforces(direction)
            where = f"{policy.display} {'spec' if len(policy.rules) == 1 else f'specs[{i}]'}"
            for section, field, direction, verdict in (
                    ("ingress", "ingress", INGRESS, Verdict.ALLOW),
                    ("ingressDeny", "ingress_deny", INGRESS, Verdict.DENY),
                    ("egress", "egress", EGRESS, Verdict.ALLOW),
                    ("egressDeny", "egress_deny", EGRESS, Verdict.DENY)):
                for j, peer_rule in enumerate(getattr(rule, field)):
                    peers: list = []
                    if not peer_rule.names_peers:
                        peers = [None] if peer_rule.ports else []
                    for chosen in peer_rule.endpoints or ():
                        peers.append(SelectorPeer(peer_selector(
                            chosen, policy.namespace, rule.endpoint_selector, cluster)))
                    for entity in peer_rule.entities or ():
                        peers.append(None if entity == "all" else EntityPeer(entity, cluster))
                    peers.extend(CIDRPeer(c) for c in peer_rule.cidrs or ())
                    peers.extend(FQDNPeer(s) for s in peer_rule.fqdns or ())
                    peers.extend(SelectorPeer(node_peer_selector(s, cluster))
                                 for s in peer_rule.nodes or ())
                    origin = f"{where} {section}[{j}]"
                    redirected = [p for dns in peer_rule.dns for p in dns.ports]
                    plain = [p for p in peer_rule.ports if p not in redirected or
                             peer_rule.ports.count(p) > redirected.count(p)]
                    for peer in peers:
                        if plain or not peer_rule.dns:
                            contributions.append((direction, verdict, peer,
                                                  tuple(plain) or (ANY_PORT,), origin))
                    for dns in peer_rule.dns:
                        for peer in peers:
                            contributions.append((direction, Verdict.REDIRECT, peer,
                                                  dns.ports, origin))
    for direction, on in enforced.items():
        if not on:
            contributions.append((direction, Verdict.ALLOW, None, (ANY_PORT,),
                                  f"no policy enforces {direction}"))
    verdicts: dict[MapKey, Verdict] = {}
    by_peer: dict = {}
    for direction, verdict, peer, ports, origin in contributions:
        by_peer.setdefault(peer, []).append(origin)
        ids = [0] if peer is None else [n for n, identity in identities.items()
                                        if naive_peer_matches(peer, identity)]
        for n in ids:
            for port in ports:
                key = MapKey(direction, n, PROTOCOLS[port.protocol], port.port, port.end_port)
                if key not in verdicts or RANK[verdict] > RANK[verdicts[key]]:
                    verdicts[key] = verdict
    return verdicts, by_peer


RANK = {Verdict.ALLOW: 0, Verdict.REDIRECT: 1, Verdict.DENY: 2}


# -- the property -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(world_then_changes())
def test_the_indexed_resolver_equals_a_straightforward_resolution(changes):
    handed: dict[int, dict] = {}

    def record(endpoint_id, map_changes):
        mine = handed.setdefault(endpoint_id, {})
        for c in map_changes:
            if c.verdict is None:
                del mine[c.key]
            else:
                mine[c.key] = c.verdict

    resolver = Resolver("cluster1", on_change=record)
    policies: dict = {}
    identities = {identity.id: identity for identity in reserved_identities()}
    endpoints: dict[int, PolicyEndpoint] = {}
    for what, value in changes:
        if what == "identity+":
            if value.id in identities:
                resolver.remove_identity(value.id)
            resolver.add_identity(value)
            identities[value.id] = value
        elif what == "identity-":
            resolver.remove_identity(value)
            identities.pop(value, None)
        elif what == "policy+":
            resolver.upsert_policy(value)
            policies[value.key] = value
        elif what == "policy-":
            resolver.delete_policy(value)
            policies.pop(value, None)
        elif what == "endpoint+":
            resolver.set_endpoint(value)
            endpoints[value.id] = value
        else:
            resolver.remove_endpoint(value)
            endpoints.pop(value, None)
            handed.pop(value, None)
    assert set(resolver.endpoints) == set(endpoints)
    for endpoint in endpoints.values():
        verdicts, by_peer = naive(policies, identities, endpoint, "cluster1")
        assert resolver.verdicts(endpoint.id) == verdicts
        assert handed.get(endpoint.id, {}) == verdicts
        state = resolver.endpoints[endpoint.id]
        assert {peer: [c.origin for c in contributions]
                for peer, contributions in state.by_peer.items()} == by_peer
        assert list(state.by_peer) == list(by_peer)  # the same order: trace's
