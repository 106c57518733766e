"""Random worlds for differential datapath tests: policies, identities, ipcache, packets.

A :class:`Scenario` is a fixed set of local endpoints and a list of phases; each phase sets
the identities, the ipcache and the policies in force, then sends probes (a packet at one
endpoint, in one direction). :class:`ResolvedWorld` follows the phases with the real
:class:`~meshagent.policy.resolver.Resolver` (and CIDR identities made as the policy service
makes them) and hands on exactly what the agent hands a datapath: a reconcile for the first
phase, incremental policy and ipcache changes after that. :func:`scenarios` is the hypothesis
strategy; a scenario round-trips through JSON so that a failing one can be kept as a
regression case. Needs the test extras (hypothesis).
"""

import ipaddress
import json
import random
import time
from collections.abc import Callable, Iterable

import attrs
from hypothesis import strategies as st

from meshagent.events import ChangeKind
from meshagent.model.endpoint import NAMESPACE_LABEL
from meshagent.model.identity import CLUSTER_LABEL, Identity, ReservedIdentity
from meshagent.model.ipcache import IPCacheEntry
from meshagent.policy.api import parse_document
from meshagent.identity.cidr import CIDRIdentities
from meshagent.policy import icmp
from meshagent.policy.cidr import policy_cidrs
from meshagent.policy.resolver import (
    EGRESS,
    INGRESS,
    MapChange,
    PolicyEndpoint,
    Resolver,
    Verdict,
    judge,
    trace,
)
from meshagent.testing.datapath_model import DatapathModel, ModelEndpoint, match_type
from meshagent.testing.packets import (
    AUTH,
    CILIUM_WALK,
    DEST_OPTIONS,
    ETH_ARP,
    ETH_EXPERIMENTAL,
    ETH_IPV4,
    ETH_IPV6,
    HOP_BY_HOP,
    ICMP,
    ICMPV6,
    MLD_TYPES,
    ND_TYPES,
    ROUTING,
    SCTP,
    TCP,
    TRANSPORT_HEADER,
    UDP,
    Packet,
)

LOCAL, REMOTE = "cluster1", "cluster2"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _order(network: Network) -> tuple:
    """Networks of both families in one order (they do not compare across families)."""
    return (network.version, network)


@attrs.frozen
class IdentitySpec:
    id: int
    labels: tuple[str, ...]
    cluster: str

    def identity(self) -> Identity:
        return Identity(self.id, frozenset(self.labels), self.cluster)


@attrs.frozen
class EndpointSpec:
    id: int
    ip: str
    namespace: str
    identity: int  # one of the first phase's identities, of the local cluster
    local_delivery: bool = True  # its MACs are known: local pods' packets go straight in
    ipv6: str | None = None  # dual stack
    policy_audit: bool = False  # policy audit mode: what policy would drop passes, reported

    def address(self, family: int) -> str | None:
        return self.ipv6 if family == 6 else self.ip


@attrs.frozen
class Probe:
    endpoint: int
    direction: str  # "ingress": entering the pod; "egress": leaving it
    packet: Packet


@attrs.frozen
class Phase:
    identities: tuple[IdentitySpec, ...]
    ipcache: tuple[tuple[str, int], ...]  # (prefix, identity): the world's rows, not CIDR ones
    policies: tuple[str, ...]  # one JSON document each
    probes: tuple[Probe, ...]


@attrs.frozen
class Scenario:
    endpoints: tuple[EndpointSpec, ...]
    phases: tuple[Phase, ...]
    default_local_cluster: bool = True

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Scenario":
        doc = json.loads(text)
        return cls(
            tuple(EndpointSpec(**e) for e in doc["endpoints"]),
            tuple(Phase(tuple(IdentitySpec(i["id"], tuple(i["labels"]), i["cluster"])
                              for i in p["identities"]),
                        tuple((prefix, identity) for prefix, identity in p["ipcache"]),
                        tuple(p["policies"]),
                        tuple(Probe(q["endpoint"], q["direction"], Packet(**q["packet"]))
                              for q in p["probes"]))
                  for p in doc["phases"]),
            doc.get("default_local_cluster", True))

    @property
    def probe_count(self) -> int:
        return sum(len(p.probes) for p in self.phases)


# -- following a scenario with the real resolver ------------------------------------------------

class ResolvedWorld:
    """The resolver's view of a scenario, phase by phase, and what a datapath is handed."""

    def __init__(self, scenario: Scenario, walk: str = CILIUM_WALK):
        self.scenario = scenario
        self.changes: dict[int, list[MapChange]] = {}
        self.resolver = Resolver(LOCAL, default_local_cluster=scenario.default_local_cluster,
                                 on_change=lambda ep, c: self.changes.setdefault(ep, []).extend(c))
        self.identities: dict[int, Identity] = {}
        self.cidr = CIDRIdentities(LOCAL)  # numbered as the agent's repository does
        self.ipcache: dict[Network, IPCacheEntry] = {}
        self.policies: dict[tuple, object] = {}
        self.model = DatapathModel(self.decision, walk)
        self.model.endpoints = {e.id: ModelEndpoint(e.id, e.ip, e.local_delivery, e.ipv6,
                                                    e.policy_audit)
                                for e in scenario.endpoints}

    def decision(self, endpoint_id: int, direction: str, identity: int, protocol: int,
                 port: int) -> tuple[Verdict, str, int]:
        """The resolver's verdict, why, and the match type of the entry that decided."""
        verdicts = self.resolver.verdicts(endpoint_id)
        verdict, why = judge(verdicts, direction, identity, protocol, port)
        return verdict, why, match_type(verdicts, direction, identity, protocol, port)

    def explained(self, endpoint_id: int, direction: str, identity: int, protocol: int,
                  port: int) -> Verdict | None:
        """The verdict ``policy trace`` explains, from the rules themselves (None for an
        identity the resolver does not know: no selector can name it)."""
        known = self.resolver.cache.identities.get(identity)
        if known is None:
            return None
        return trace(self.resolver, endpoint_id, direction, known[0], protocol, port).verdict

    def enter(self, phase: Phase) -> list[tuple[ChangeKind, IPCacheEntry]]:
        """Apply a phase; the ipcache changes (map changes collect in ``changes``)."""
        before = dict(self.ipcache)
        self.model.next_phase()
        wanted = {i.id: i.identity() for i in phase.identities}
        for number, identity in wanted.items():
            if self.identities.get(number) != identity:
                self.identities[number] = identity
                self.resolver.add_identity(identity)
        policies = {}
        for text in phase.policies:
            policy = parse_document(json.loads(text), "scenario")
            policies[policy.key] = policy
        # the new rules' CIDRs before they are resolved, the old ones' gone after (as the
        # agent's repository does)
        cidrs = policy_cidrs(policies.values())
        added, _ = self.cidr.want(cidrs | set(self.cidr.identities))
        for _, identity in added:
            self.resolver.add_identity(identity)
        if not self.resolver.endpoints:
            for e in self.scenario.endpoints:
                labels = self.identities[e.identity].labels
                self.resolver.set_endpoint(PolicyEndpoint(e.id, e.namespace, labels))
        for key, policy in policies.items():
            if self.policies.get(key) != policy:
                self.resolver.upsert_policy(policy)
        for key in set(self.policies) - set(policies):
            self.resolver.delete_policy(key)
        self.policies = policies
        for _, identity in self.cidr.want(cidrs)[1]:
            self.resolver.remove_identity(identity.id)
        for number in set(self.identities) - set(wanted):
            del self.identities[number]
            self.resolver.remove_identity(number)
        self.ipcache = {}
        for prefix, number in phase.ipcache:
            network = ipaddress.ip_network(prefix)
            self.ipcache[network] = IPCacheEntry(network, number, LOCAL)
        for prefix, identity in self.cidr.identities.items():
            self.ipcache[prefix] = IPCacheEntry(prefix, identity.id, LOCAL)
        self.model.ipcache = {p: e.identity for p, e in self.ipcache.items()}
        changes = [(ChangeKind.DELETE, e) for p, e in before.items() if p not in self.ipcache]
        changes += [(ChangeKind.UPSERT, e) for p, e in self.ipcache.items() if before.get(p) != e]
        return changes

    def take_changes(self) -> dict[int, list[MapChange]]:
        changes, self.changes = self.changes, {}
        return changes

    def verdicts(self) -> dict[int, dict]:
        return {e.id: self.resolver.verdicts(e.id) for e in self.scenario.endpoints}


# -- hypothesis strategies ------------------------------------------------------------------------

APPS = ("a", "b", "db")
NAMESPACES = ("default", "other")
CIDRS4 = ("10.2.0.0/16", "10.2.3.0/24", "10.1.0.0/16", "10.0.0.0/8", "192.0.2.0/24",
          "198.51.100.0/24", "198.51.100.128/25", "203.0.113.7/32", "0.0.0.0/0")
CIDRS6 = ("fd00:2::/32", "fd00:2:3::/48", "fd00:1::/32", "fd00::/8", "2001:db8::/32",
          "2001:db8:1::/48", "2001:db8:1:8000::/49", "2001:db8:1::7/128", "::/0")
CIDRS = CIDRS4 + CIDRS6
#: where a CIDRSet's cidr is drawn from: no host prefixes
SET_CIDRS = tuple(c for c in CIDRS if not c.endswith(("/32", "/128")))
ENTITIES = ("world", "cluster", "host", "remote-node", "all")
#: other nodes under --enable-node-selector-labels (meshagent.identity.node), in some worlds
NODE_IDENTITIES = tuple(
    IdentitySpec((2 << 24) + n, tuple(sorted({"reserved:remote-node",
                                               f"k8s:{CLUSTER_LABEL}={cluster}",
                                               f"node:role={role}"})), LOCAL)
    for n, (cluster, role) in enumerate(((LOCAL, "worker"), (LOCAL, "infra"),
                                         (REMOTE, "worker")), 1))
PORTS = (1, 22, 53, 80, 443, 1023, 1024, 4095, 4096, 6379, 8080, 8191, 8192, 30000, 31000,
         32767, 32768, 65534, 65535)
PROTOCOLS = ("TCP", "UDP", "SCTP", "ANY", None)
#: ICMP types rules name and probes carry, per family: echo both ways, errors, others. No
#: ICMPv6 type 0 (reserved): a datapath may track it with a later fragment's (typeless) tuple.
ICMP_TYPES = {4: (8, 0, 3, 11, 13, 14, 5, 42), 6: (128, 129, 1, 2, 3, 4, 135, 160)}
ICMP_NAMES = {4: ("EchoRequest", "Echo", "DestinationUnreachable", "TimeExceeded",
                  "Timestamp"),
              6: ("EchoRequest", "EchoReply", "PacketTooBig", "DestinationUnreachable",
                  "NeighborSolicitation")}


def labels_of(app: str, namespace: str, cluster: str, tier: str | None) -> tuple[str, ...]:
    labels = [f"k8s:app={app}", f"k8s:{NAMESPACE_LABEL}={namespace}",
              f"k8s:{CLUSTER_LABEL}={cluster}"]
    if tier:
        labels.append(f"k8s:tier={tier}")
    return tuple(sorted(labels))


@st.composite
def identity_specs(draw) -> tuple[IdentitySpec, ...]:
    shapes = draw(st.lists(st.tuples(st.sampled_from(APPS), st.sampled_from(NAMESPACES),
                                     st.sampled_from((LOCAL, LOCAL, REMOTE)),
                                     st.sampled_from((None, "web"))),
                           min_size=2, max_size=6, unique=True))
    out = []
    for n, (app, namespace, cluster, tier) in enumerate(shapes):
        base = (101 if cluster == LOCAL else 102) << 16
        out.append(IdentitySpec(base + 256 + n, labels_of(app, namespace, cluster, tier),
                                cluster))
    return tuple(out)


@st.composite
def selectors(draw) -> dict:
    kind = draw(st.sampled_from(("empty", "app", "app-cluster", "app-ns", "expr")))
    app = draw(st.sampled_from(APPS))
    if kind == "empty":
        return {}
    if kind == "app":
        return {"matchLabels": {"app": app}}
    if kind == "app-cluster":
        return {"matchLabels": {"app": app, CLUSTER_LABEL: draw(st.sampled_from((LOCAL, REMOTE)))}}
    if kind == "app-ns":
        return {"matchLabels": {"app": app,
                                f"k8s:{NAMESPACE_LABEL}": draw(st.sampled_from(NAMESPACES))}}
    operator = draw(st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")))
    key = draw(st.sampled_from(("app", "tier")))
    expr = {"key": key, "operator": operator}
    if operator in ("In", "NotIn"):
        expr["values"] = draw(st.lists(st.sampled_from(APPS + ("web",)), min_size=1, max_size=2,
                                       unique=True))
    return {"matchExpressions": [expr]}


@st.composite
def node_selectors(draw) -> dict:
    kind = draw(st.sampled_from(("empty", "role", "role-cluster", "not-infra")))
    if kind == "empty":
        return {}
    role = draw(st.sampled_from(("worker", "infra")))
    if kind == "role":
        return {"matchLabels": {"role": role}}
    if kind == "role-cluster":
        return {"matchLabels": {"role": role, CLUSTER_LABEL: draw(st.sampled_from((LOCAL,
                                                                                   REMOTE)))}}
    return {"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["infra"]}]}


#: Ranges that overlap one another in every way (nested, crossing, equal, adjacent), so deny
#: and allow rules meet at different specificities.
RANGES = ((80, 80), (443, 443), (6379, 6379), (8080, 8080), (4096, 8191), (8000, 8100),
          (8191, 8192), (30000, 32767), (31000, 31000), (1024, 65535), (1, 65535), (53, 53),
          (1, 1023), (65535, 65535))


@st.composite
def port_rules(draw) -> list:
    ports = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 9)) < 7:
            port, end = draw(st.sampled_from(RANGES))
        else:
            port = draw(st.one_of(st.sampled_from(PORTS), st.integers(1, 65535)))
            end = draw(st.one_of(st.just(port), st.integers(port, min(65535, port + 64)),
                                 st.integers(port, 65535)))
        entry = {"port": str(port)}
        if end != port or draw(st.integers(0, 4)) == 0:
            entry["endPort"] = end
        protocol = draw(st.sampled_from(PROTOCOLS))
        if protocol:
            entry["protocol"] = protocol
        ports.append(entry)
    return [{"ports": ports}]


@st.composite
def icmp_rules(draw) -> list:
    """An ``icmps`` item: one to three fields, by number or name, either family (type 0,
    which Cilium would read as every type, is refused, so never drawn)."""
    fields = []
    for _ in range(draw(st.integers(1, 3))):
        family = draw(st.sampled_from((4, 4, 6)))
        kind = draw(st.one_of(st.sampled_from([t for t in ICMP_TYPES[family] if t]),
                              st.sampled_from(ICMP_NAMES[family])))
        field: dict = {"type": kind}
        if family == 6:
            field["family"] = "IPv6"
        elif draw(st.booleans()):
            field["family"] = "IPv4"
        fields.append(field)
    return [{"fields": fields}]


@st.composite
def icmp_policy(draw, index: int) -> str:
    """A clusterwide policy of ``icmps`` rules for every local pod, allow and deny sections
    in either direction: the random policies alone rarely have an ICMP rule select the pod
    an ICMP packet of the rule's type is probed at."""
    spec: dict = {"endpointSelector": {}}
    for section in ("ingress", "egress", "ingressDeny", "egressDeny"):
        if draw(st.booleans()):
            item: dict = {"icmps": draw(icmp_rules())}
            if draw(st.integers(0, 3)) == 0:
                prefix = "from" if section.startswith("ingress") else "to"
                item[f"{prefix}Entities"] = [draw(st.sampled_from(ENTITIES))]
            spec[section] = [item]
    return json.dumps({"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                       "metadata": {"name": f"icmp{index}"}, "spec": spec}, sort_keys=True)


@st.composite
def peer_rules(draw, direction: str) -> dict:
    prefix = "from" if direction == INGRESS else "to"
    item: dict = {}
    kind = draw(st.sampled_from(("endpoints", "entities", "cidr", "cidrset", "none", "none",
                                 "nodes")))
    if kind == "nodes":
        item[f"{prefix}Nodes"] = draw(st.lists(node_selectors(), min_size=1, max_size=2))
    elif kind == "endpoints":
        item[f"{prefix}Endpoints"] = draw(st.lists(selectors(), min_size=1, max_size=2))
    elif kind == "entities":
        item[f"{prefix}Entities"] = draw(st.lists(st.sampled_from(ENTITIES), min_size=1,
                                                  max_size=2, unique=True))
    elif kind == "cidr":
        item[f"{prefix}CIDR"] = draw(st.lists(st.sampled_from(CIDRS), min_size=1, max_size=2,
                                              unique=True))
    elif kind == "cidrset":
        cidr = draw(st.sampled_from(SET_CIDRS))
        network = ipaddress.ip_network(cidr)
        inside = [c for c in CIDRS if ipaddress.ip_network(c).version == network.version
                  and ipaddress.ip_network(c).subnet_of(network) and c != cidr]
        entry = {"cidr": cidr}
        if inside and draw(st.booleans()):
            entry["except"] = draw(st.lists(st.sampled_from(inside), min_size=1, max_size=2,
                                            unique=True))
        item[f"{prefix}CIDRSet"] = [entry]
    if kind.startswith("none") or draw(st.booleans()):
        if kind.startswith("none") and draw(st.integers(0, 4)) == 0:
            return item  # {}: selects nothing, but the direction is enforced
        if draw(st.integers(0, 2)) == 0:
            item["icmps"] = draw(icmp_rules())
        else:
            item["toPorts"] = draw(port_rules())
    return item


@st.composite
def policies(draw, index: int) -> str:
    clusterwide = draw(st.integers(0, 4)) == 0
    spec: dict = {"endpointSelector": draw(st.one_of(
        st.just({}), st.builds(lambda a: {"matchLabels": {"app": a}}, st.sampled_from(APPS))))}
    for section, direction in (("ingress", INGRESS), ("ingressDeny", INGRESS),
                               ("egress", EGRESS), ("egressDeny", EGRESS)):
        count = draw(st.sampled_from((0, 0, 1, 1, 2) if "Deny" not in section else (0, 0, 1)))
        if count:
            spec[section] = [draw(peer_rules(direction)) for _ in range(count)]
            if section == "egress" and draw(st.integers(0, 2)) == 0:
                # a DNS rule: its port goes to the DNS proxy (REDIRECT entries), for its peers
                # or (as kube-dns rules often are written) for any
                protocol = draw(st.sampled_from(("UDP", "TCP", "ANY")))
                if draw(st.booleans()):
                    spec[section][0] = {}
                spec[section][0].pop("icmps", None)  # no toPorts beside icmps (Cilium)
                spec[section][0]["toPorts"] = [{"ports": [{"port": "53", "protocol": protocol}],
                                                "rules": {"dns": [{"matchPattern": "*"}]}}]
    if draw(st.integers(0, 5)) == 0:
        spec["enableDefaultDeny"] = {d: draw(st.booleans()) for d in
                                     draw(st.sets(st.sampled_from(("ingress", "egress")),
                                                  min_size=1))}
    metadata = {"name": f"p{index}"}
    if not clusterwide:
        metadata["namespace"] = draw(st.sampled_from(("default", "default", "other")))
    document = {"apiVersion": "cilium.io/v2",
                "kind": "CiliumClusterwideNetworkPolicy" if clusterwide
                else "CiliumNetworkPolicy", "metadata": metadata, "spec": spec}
    return json.dumps(document, sort_keys=True)


@st.composite
def scenarios(draw, probes_per_phase: int = 80, phases: int = 2) -> Scenario:
    identities = draw(identity_specs())
    local = [i for i in identities if i.cluster == LOCAL]
    if not local:
        identities += (IdentitySpec((101 << 16) + 300, labels_of("db", "default", LOCAL, None),
                                    LOCAL),)
        local = [identities[-1]]
    if draw(st.integers(0, 2)) == 0:  # a third of the worlds: their cost is the suite's
        identities += NODE_IDENTITIES  # never an endpoint's
    endpoints = []
    for n in range(draw(st.integers(1, 3))):
        spec = draw(st.sampled_from(local))
        namespace = dict(label.split(":", 1)[1].split("=", 1) for label in spec.labels)[
            NAMESPACE_LABEL]
        ipv6 = f"fd00:1:1::{n + 1:x}" if draw(st.integers(0, 3)) > 0 else None
        endpoints.append(EndpointSpec(n + 1, f"10.1.1.{n + 1}", namespace, spec.id,
                                      draw(st.integers(0, 3)) > 0, ipv6,
                                      draw(st.integers(0, 4)) == 0))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    out, history = [], []
    for phase_index in range(phases):
        phase_identities = identities
        if phase_index and draw(st.booleans()):  # identity churn between phases
            keep = {e.identity for e in endpoints}
            phase_identities = tuple(i for i in identities
                                     if i.id in keep or draw(st.integers(0, 3)) > 0)
        docs = tuple(draw(policies(n)) for n in range(draw(st.integers(0, 4))))
        if draw(st.integers(0, 2)) == 0:  # ICMP by type, allowed and denied, for every pod
            docs += (draw(icmp_policy(len(docs))),)
        if phase_index and out and draw(st.booleans()):
            docs = out[-1].policies[:draw(st.integers(0, len(out[-1].policies)))] + docs[:1]
        ipcache = world_ipcache(rng, identities, endpoints, phase_index)
        draft = Phase(phase_identities, ipcache, docs, ())
        probes = make_probes(rng, draft, endpoints, probes_per_phase, history)
        history.extend(probes)
        out.append(attrs.evolve(draft, probes=tuple(probes)))
    return Scenario(tuple(endpoints), tuple(out), draw(st.integers(0, 5)) > 0)


def world_ipcache(rng: random.Random, identities: Iterable[IdentitySpec],
                  endpoints: list[EndpointSpec], phase_index: int) -> tuple:
    """Endpoints' own rows, pods of both clusters, reserved and unknown identities; a later
    phase moves or drops a few rows."""
    rows = {f"{e.ip}/32": e.identity for e in endpoints}
    rows.update({f"{e.ipv6}/128": e.identity for e in endpoints if e.ipv6})
    for n, identity in enumerate(identities):
        local = identity.cluster == LOCAL
        rows[f"10.1.2.{n + 1}/32" if local else f"10.2.3.{n + 1}/32"] = identity.id
        rows[f"fd00:1:2::{n + 1:x}/128" if local else f"fd00:2:3::{n + 1:x}/128"] = identity.id
        rows[f"10.2.{n + 5}.9/32"] = identity.id
    rows["10.1.0.1/32"] = rows["fd00:1::1/128"] = int(ReservedIdentity.HOST)
    rows["10.2.0.1/32"] = rows["fd00:2::1/128"] = int(ReservedIdentity.REMOTE_NODE)
    # a range of a remote cluster, unknown identity
    rows["10.3.0.0/16"] = rows["fd00:3::/48"] = (102 << 16) + 999
    rows["192.0.2.200/32"] = rows["2001:db8::c8/128"] = 777  # an identity nobody knows
    if phase_index:
        movable = sorted(p for p in rows if not p.startswith(("10.1.1.", "fd00:1:1:")))
        for prefix in rng.sample(movable, k=min(2, len(movable))):
            if rng.random() < 0.5:
                del rows[prefix]
            else:
                rows[prefix] = rng.choice(list(rows.values()))
    return tuple(sorted(rows.items()))


def _addresses(rng: random.Random, phase: Phase) -> list[str]:
    """Addresses worth probing: every ipcache row's, and the edges and insides of every CIDR
    the phase's policies and ipcache name."""
    out = set()
    prefixes = {p for p, _ in phase.ipcache} | set(CIDRS)
    for text in phase.policies:
        out.update(c for c in CIDRS if c in text)
    for prefix in prefixes:
        network = ipaddress.ip_network(prefix)
        out.add(str(network.network_address))
        out.add(str(network.broadcast_address))
        if network.num_addresses > 2:
            out.add(str(network.network_address + rng.randrange(1, network.num_addresses - 1)))
    out.difference_update({"0.0.0.0", "255.255.255.255", "::"})
    out.add(f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}")
    out.add(f"2a00:{rng.randrange(1, 0xFFFF):x}::{rng.randrange(1, 0xFFFF):x}")
    return sorted(a for a in out if "/" not in a)


def _ports(rng: random.Random, phase: Phase) -> list[int]:
    edges = {0, 1, 65535, rng.randrange(1, 65536)}
    for text in phase.policies:
        for rule in _port_entries(json.loads(text)):
            start = int(rule["port"])
            end = rule.get("endPort", start)
            edges.update({start - 1, start, start + 1, end - 1, end, end + 1,
                          rng.randrange(start, end + 1)})
    return sorted(p for p in edges if 0 <= p <= 65535)


def _icmp_types(phase: Phase) -> dict[int, list[int]]:
    """Per family, the ICMP types the phase's ``icmps`` rules name."""
    out: dict[int, list[int]] = {4: [], 6: []}
    for text in phase.policies:
        spec = json.loads(text)["spec"]
        for section in ("ingress", "ingressDeny", "egress", "egressDeny"):
            for item in spec.get(section, []):
                for rule in item.get("icmps", []):
                    for field in rule["fields"]:
                        family = 6 if field.get("family") == "IPv6" else 4
                        kind = field["type"]
                        names = icmp.TYPES[icmp.IPV6 if family == 6 else icmp.IPV4]
                        out[family].append(kind if isinstance(kind, int) else names[kind])
    return out


def _port_entries(document: dict) -> list[dict]:
    spec = document["spec"]
    out = []
    for section in ("ingress", "ingressDeny", "egress", "egressDeny"):
        for item in spec.get(section, []):
            for rule in item.get("toPorts", []):
                out.extend(rule["ports"])
    return out


def make_probes(rng: random.Random, phase: Phase, endpoints: list[EndpointSpec], count: int,
                history: list[Probe]) -> list[Probe]:
    addresses, ports = _addresses(rng, phase), _ports(rng, phase)
    named = _icmp_types(phase)
    probes: list[Probe] = []
    firsts: list[Probe] = []
    own = [a for e in endpoints for a in (e.ip, e.ipv6) if a]
    for _ in range(count):
        endpoint = rng.choice(endpoints)
        direction = rng.choice((INGRESS, EGRESS))
        peer = rng.choice(addresses + own)
        family = 6 if ":" in peer else 4
        icmp_protocol = ICMPV6 if family == 6 else ICMP
        protocol = rng.choice((TCP, TCP, UDP, UDP, SCTP, icmp_protocol, icmp_protocol, 47))
        mine = endpoint.address(family) or "fd00:1:1::ff"  # not its own: an IPv4-only pod
        src, dst = (peer, mine) if direction == INGRESS else (mine, peer)
        packet = Packet(src, dst, protocol, rng.choice(ports + [rng.randrange(1024, 65536)]),
                        rng.choice(ports), ip_id=rng.randrange(65536), payload=rng.randrange(64))
        if protocol in (ICMP, ICMPV6):  # a type of the rules or another; fragmentation needed
            kind = rng.choice(named[family] * 6 + list(ICMP_TYPES[family])
                              + [rng.randrange(256)])
            if family == 6 and kind == 0:
                kind = 128
            packet = attrs.evolve(packet, icmp_type=kind, icmp_code=rng.choice(
                (0, 0, 4) if kind == 3 else (0,)))
        roll = rng.random()
        earlier = history + probes
        if roll < 0.12 and earlier:  # the reply of an earlier packet
            old = rng.choice(earlier)
            probe = Probe(old.endpoint, EGRESS if old.direction == INGRESS else INGRESS,
                          old.packet.reply())
        elif roll < 0.20 and earlier:  # an earlier packet again (judged anew after a change)
            probe = rng.choice(earlier)
        elif roll < 0.26:  # a first fragment, whole or tiny
            need = TRANSPORT_HEADER.get(protocol, 8)
            short = rng.random() < 0.3
            probe = Probe(endpoint.id, direction, attrs.evolve(
                packet, more_fragments=True, payload=rng.randrange(8, 64),
                transport_bytes=rng.randrange(0, need) if short else None))
            firsts.append(probe)
        elif roll < 0.32:  # a later fragment: of a first one, of none, or overlapping
            if firsts and rng.random() < 0.7:
                first = rng.choice(firsts)
                probe = Probe(first.endpoint, first.direction, attrs.evolve(
                    first.packet, more_fragments=rng.random() < 0.5, transport_bytes=None,
                    frag_offset=rng.choice((8, 16, 24, 64, 1480)), payload=rng.randrange(1, 64)))
            else:
                probe = Probe(endpoint.id, direction, attrs.evolve(
                    packet, frag_offset=rng.choice((8, 24, 1480)), payload=16))
        elif roll < 0.37:  # leaving the pod with someone else's address
            others = [a for a in own + addresses if (":" in a) == (family == 6) and a != mine]
            probe = Probe(endpoint.id, EGRESS, attrs.evolve(packet, src=rng.choice(others),
                                                            dst=peer))
        elif roll < 0.43 and family == 4:  # broken or unusual headers
            change = rng.choice(("ihl", "version", "length", "truncated", "options", "options"))
            broken = {"ihl": dict(ihl=rng.choice((0, 3, 4))), "version": dict(version=6),
                      "length": dict(length_excess=rng.randrange(1, 40)),
                      "truncated": dict(transport_bytes=rng.randrange(0, 8)),
                      "options": dict(ihl=rng.choice((6, 10, 15)))}[change]
            probe = Probe(endpoint.id, direction, attrs.evolve(packet, **broken))
        elif roll < 0.43:  # IPv6: extension headers, broken or not
            probe = Probe(endpoint.id, direction, attrs.evolve(packet, **ipv6_variant(rng)))
        elif roll < 0.45 and family == 6:  # the link's ICMPv6 control messages, or look-alikes
            probe = Probe(endpoint.id, direction, link_control_probe(rng, packet, direction))
        elif roll < 0.47:  # neither IPv4 nor IPv6, or the wrong ethertype for the family
            probe = Probe(endpoint.id, direction, attrs.evolve(
                packet, ethertype=rng.choice((ETH_ARP, ETH_EXPERIMENTAL,
                                              ETH_IPV4 if family == 6 else ETH_IPV6))))
        else:
            probe = Probe(endpoint.id, direction, packet)
        probes.append(probe)
    return probes


def ipv6_variant(rng: random.Random) -> dict:
    """Packet fields for an IPv6 packet with extension headers: a legal chain, one too long,
    one cut short, or a broken IPv6 header."""
    chain = tuple(rng.choice((HOP_BY_HOP, DEST_OPTIONS, ROUTING, AUTH))
                  for _ in range(rng.randrange(1, 4)))
    change = rng.choice(("chain", "chain", "chain", "too-many", "cut", "version", "length",
                         "truncated"))
    if change == "too-many":
        return dict(ext_headers=chain + (DEST_OPTIONS,) * (5 - len(chain)))
    if change == "cut":
        return dict(ext_headers=chain, truncate=rng.randrange(1, 120))
    if change == "version":
        return dict(version=rng.choice((0, 4, 7)))
    if change == "length":
        return dict(ext_headers=chain, length_excess=rng.randrange(1, 40))
    if change == "truncated":
        return dict(transport_bytes=rng.randrange(0, 8))
    return dict(ext_headers=chain)


def link_control_probe(rng: random.Random, packet: Packet, direction: str) -> Packet:
    """An ICMPv6 neighbour discovery or MLD message, to the link or not, with its hop limit
    or not, whole or fragmented: what passes as the link's own and what is judged."""
    kind = rng.choice(sorted(ND_TYPES | MLD_TYPES) + [128, 129, 1])
    hop_limit = rng.choice((255, 1, 64, 254))
    within = rng.choice(("fe80::1", "ff02::1", "ff02::1:ff00:1", "ff02::16", None))
    fields = dict(protocol=ICMPV6, icmp_type=kind, hop_limit=hop_limit,
                  ext_headers=(HOP_BY_HOP,) if kind in MLD_TYPES else ())
    if within is not None:
        fields["dst" if direction == EGRESS else "src"] = within
    if direction == EGRESS and rng.random() < 0.4:  # from its link-local address, or none
        fields["src"] = rng.choice(("fe80::2", "::"))
    if rng.random() < 0.15:
        fields["more_fragments"] = True
    return attrs.evolve(packet, **fields)


def minimize(scenario: Scenario, fails: Callable[[Scenario], bool],
             budget: float = 60.0) -> Scenario:
    """A smaller scenario that still ``fails``: drop probes, policies and whole phases one at
    a time while it keeps failing (greedy; stops after ``budget`` seconds)."""
    deadline = time.monotonic() + budget
    changed = True
    while changed and time.monotonic() < deadline:
        changed = False
        for index in range(len(scenario.phases)):
            for field in ("probes", "policies"):
                items = list(getattr(scenario.phases[index], field))
                position = 0
                while position < len(items) and time.monotonic() < deadline:
                    trial = items[:position] + items[position + 1:]
                    phases = list(scenario.phases)
                    phases[index] = attrs.evolve(phases[index], **{field: tuple(trial)})
                    candidate = attrs.evolve(scenario, phases=tuple(phases))
                    if fails(candidate):
                        scenario, items, changed = candidate, trial, True
                    else:
                        position += 1
        for index in range(len(scenario.phases)):
            candidate = attrs.evolve(scenario, phases=scenario.phases[:index]
                                     + scenario.phases[index + 1:])
            if candidate.phases and fails(candidate):
                scenario, changed = candidate, True
                break
    return scenario


# -- a small named world, for tests that name their packets -----------------------------------

CLIENT, ECHO, ECHO2, REMOTE = "10.1.1.1", "10.1.1.2", "10.1.1.3", "10.2.1.5"
CLIENT6, ECHO6, ECHO26, REMOTE6 = "fd00:1:1::1", "fd00:1:1::2", "fd00:1:1::3", "fd00:2:1::5"
SIX = {CLIENT: CLIENT6, ECHO: ECHO6, ECHO2: ECHO26, REMOTE: REMOTE6}
ALL_EGRESS = {"egress": [{"toEntities": ["all"]}]}


def named_scenario(specs: list[dict], probes: list[tuple]) -> Scenario:
    """client, echo and echo2 in cluster1 (endpoints 1-3), an employee of cluster2; policies
    given as specs (the client's when they name no endpointSelector); probes as (direction,
    packet) at the endpoint whose address the packet carries, or (direction, packet, endpoint)."""
    apps = {"client": (CLIENT, 1), "echo": (ECHO, 2), "echo2": (ECHO2, 3)}
    identities = [IdentitySpec((101 << 16) + 256 + n, labels_of(app, "default", "cluster1", None),
                               "cluster1") for app, (_, n) in apps.items()]
    identities.append(IdentitySpec((102 << 16) + 256, labels_of("employee", "default", "cluster2",
                                                                None), "cluster2"))
    endpoints = tuple(EndpointSpec(n, ip, "default", identities[n - 1].id, ipv6=SIX[ip])
                      for ip, n in apps.values())
    ipcache = tuple((f"{ip}/32", identities[n - 1].id) for ip, n in apps.values()) + (
        (f"{REMOTE}/32", identities[-1].id),)
    ipcache += tuple((f"{SIX[ip]}/128", identities[n - 1].id) for ip, n in apps.values()) + (
        (f"{REMOTE6}/128", identities[-1].id),)
    documents = []
    for n, spec in enumerate(specs):
        spec = {"endpointSelector": {"matchLabels": {"app": "client"}}, **spec}
        documents.append(json.dumps({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                                     "metadata": {"name": f"p{n}"}, "spec": spec}))
    endpoint_of = {ip: n for ip, n in apps.values()}
    endpoint_of.update({SIX[ip]: n for ip, n in apps.values()})
    phase_probes = []
    for direction, packet, *at in probes:
        local = packet.src if direction == EGRESS else packet.dst
        phase_probes.append(Probe(at[0] if at else endpoint_of.get(local, 1), direction, packet))
    return Scenario(endpoints, (Phase(tuple(identities), ipcache, tuple(documents),
                                      tuple(phase_probes)),))


def tcp(dst: str, port: int, src: str = CLIENT) -> tuple[str, Packet]:
    return (EGRESS if src in (CLIENT, CLIENT6) else INGRESS, Packet(src, dst, TCP, 40000, port))
