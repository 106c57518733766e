"""DNS-aware egress, the policy half: ``toFQDNs`` and ``rules: dns`` parsed with Cilium's checks
and texts, REDIRECT entries for DNS port rules, fqdn peers following the identities the DNS
proxy allocates, and what the proxy asks of the resolver (:class:`ResolvesDNS`)."""

import pytest

from meshagent.fqdn.contract import DNSRule, FQDNSelector, ResolvesDNS
from meshagent.model.identity import Identity
from meshagent.policy.api import PolicyError, parse_policies
from meshagent.policy.contract import MapKey, Verdict
from meshagent.policy.default import DefaultResolver
from meshagent.policy.resolver import (
    EGRESS,
    PolicyEndpoint,
    Resolver,
    decide,
    deciding_policies,
    dns_rules,
    fqdn_selectors,
    trace,
)
from meshagent.testing.policy_cases import DNS_PAIR, IDS, TCP, UDP, cnp

EMPLOYEE = "endpointSelector: {matchLabels: {app: employee}}\n"
WORLD = frozenset({"reserved:world"})


def egress(rules: str) -> str:
    return cnp(EMPLOYEE + "egress:\n" + rules)


def refused(rules: str) -> str:
    with pytest.raises(PolicyError) as info:
        parse_policies(egress(rules), "p.yaml")
    return str(info.value)


# -- parsing ------------------------------------------------------------------------------------

def test_the_standard_pair_parses():
    """Cilium's documented pair (Documentation/security/dns.rst, examples/policies/l7/dns)."""
    (policy,) = parse_policies(cnp(EMPLOYEE + DNS_PAIR))
    to_dns, to_api = policy.rules[0].egress
    assert to_dns.dns[0].rules == (FQDNSelector(match_pattern="*"),)
    assert [(p.port, p.protocol) for p in to_dns.dns[0].ports] == [(53, "ANY")]
    assert to_dns.plain_ports == ()
    assert to_api.fqdns == (FQDNSelector(match_name="api.example.com"),)
    assert to_api.names_peers and policy.rules[0].enforces("egress")


def test_a_dns_item_may_carry_both_fields():
    """PortRuleDNS: "Both 'MatchName' and 'MatchPattern' can be present" (fqdn.go)."""
    (policy,) = parse_policies(egress(
        "- toPorts: [{ports: [{port: '53'}], rules: {dns: [{matchName: a.com,"
        " matchPattern: '*.b.com'}]}}]\n"))
    assert policy.rules[0].egress[0].dns[0].rules == (FQDNSelector("a.com", "*.b.com"),)


def test_plain_and_dns_items_of_one_rule_keep_their_ports_apart():
    (policy,) = parse_policies(egress(
        "- toPorts:\n  - ports: [{port: '80', protocol: TCP}]\n"
        "  - ports: [{port: '53', protocol: UDP}]\n    rules: {dns: [{matchName: a.com}]}\n"))
    item = policy.rules[0].egress[0]
    assert [p.port for p in item.ports] == [80, 53]
    assert [p.port for p in item.plain_ports] == [80]


@pytest.mark.parametrize("rules, message", [
    # pkg/policy/api/fqdn.go, FQDNSelector.sanitize
    ("- toFQDNs: [{matchName: a.com, matchPattern: '*.a.com'}]\n",
     "spec.egress[0].toFQDNs[0]: only one of MatchName or MatchPattern is allowed in an"
     " FQDNSelector"),
    ("- toFQDNs: [{matchName: 'a*.com'}]\n",
     'spec.egress[0].toFQDNs[0].matchName: Invalid characters in MatchName: "a*.com". Only'
     " 0-9, a-z, A-Z and . and - characters are allowed"),
    ("- toFQDNs: [{matchPattern: 'a?.com'}]\n",
     'spec.egress[0].toFQDNs[0].matchPattern: Invalid characters in MatchPattern: "a?.com".'
     " Only 0-9, a-z, A-Z and ., - and * characters are allowed"),
    # the CRD: exactly one of the two, at most 255 characters
    ("- toFQDNs: [{}]\n", "spec.egress[0].toFQDNs[0]: one of matchName or matchPattern is"
                          " required"),
    ("- toFQDNs: [{matchName: " + "a" * 256 + "}]\n",
     "toFQDNs[0].matchName: Too long: may not be longer than 255"),
    ("- toFQDNs: [{matchName: a.com, port: 1}]\n", "toFQDNs[0].port: unknown field"),
    # pkg/policy/api/rule_validation.go (EgressCommonRule.Validate, L7Rules.Validate,
    # PortRule.Validate, PortProtocol.Validate)
    ("- toFQDNs: [{matchName: a.com}]\n  toEndpoints: [{}]\n",
     "spec.egress[0]: combining ToEndpoints and ToFQDNs is not supported yet"),
    ("- toFQDNs: [{matchName: a.com}]\n  toCIDR: [10.0.0.0/8]\n",
     "spec.egress[0]: combining ToCIDR and ToFQDNs is not supported yet"),
    ("- toPorts: [{rules: {dns: [{matchName: a.com}]}}]\n",
     "spec.egress[0].toPorts[0].ports: port 53 must be specified for DNS rules"),
    ("- toPorts: [{ports: [{port: '53', endPort: 54}], rules: {dns: [{matchName: a.com}]}}]\n",
     "toPorts[0].ports[0].endPort: DNS rules do not support port ranges"),
    ("- toPorts: [{ports: [{port: '0'}], rules: {dns: [{matchName: a.com}]}}]\n",
     "spec.egress[0].toPorts[0].ports: L7 rules can not be used when a port is 0"),
    ("- toPorts: [{ports: [{port: '53'}], rules: {dns: [{matchName: 'a b'}]}}]\n",
     'toPorts[0].rules.dns[0].matchName: Invalid characters in MatchName: "a b"'),
    ("- toPorts: [{ports: [{port: '53'}], rules: {dns: [{}]}}]\n",
     "toPorts[0].rules.dns[0]: one of matchName or matchPattern is required"),
    # meshagent's own: what it does not enforce, by name
    ("- toPorts: [{ports: [{port: '53', protocol: SCTP}], rules: {dns: [{matchName: a}]}}]\n",
     "ports[0].protocol: DNS rules apply to TCP, UDP, ANY (the DNS proxy's), not SCTP"),
    ("- toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET}]}}]\n",
     "spec.egress[0].toPorts[0].rules.http: HTTP L7 rules are not supported by meshagent"),
    ("- toPorts: [{ports: [{port: '9092', protocol: TCP}], rules: {kafka: [{topic: t}]}}]\n",
     "toPorts[0].rules.kafka: Kafka L7 rules are not supported by meshagent"),
    ("- toPorts: [{ports: [{port: '1', protocol: TCP}], rules: {l7proto: x, l7: [{}]}}]\n",
     "toPorts[0].rules.l7proto: generic L7 (l7proto) L7 rules are not supported"),
    ("- toPorts: [{ports: [{port: '53'}], rules: {dns: [{matchName: a}], grpc: []}}]\n",
     "toPorts[0].rules.grpc: unknown field"),
])
def test_refused_with_ciliums_text(rules, message):
    assert message in refused(rules)


@pytest.mark.parametrize("section, rules, message", [
    # Cilium has no toFQDNs but in EgressRule (pkg/policy/api/egress.go): an unknown field
    ("egressDeny", "- toFQDNs: [{matchName: a.com}]\n",
     "spec.egressDeny[0].toFQDNs: unknown field"),
    ("ingress", "- toFQDNs: [{matchName: a.com}]\n", "spec.ingress[0].toFQDNs: unknown field"),
    # PortRule.Validate(ingress=true)
    ("ingress", "- toPorts: [{ports: [{port: '53'}], rules: {dns: [{matchName: a.com}]}}]\n",
     "spec.ingress[0].toPorts[0].rules.dns: DNS rules are not allowed on ingress"),
    # PortDenyRule has no rules
    ("egressDeny", "- toPorts: [{ports: [{port: '53'}], rules: {dns: [{matchName: a}]}}]\n",
     "spec.egressDeny[0].toPorts[0].rules: unknown field"),
])
def test_only_egress_allows_have_them(section, rules, message):
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_policies(cnp(EMPLOYEE + f"{section}:\n" + rules))


# -- resolving ----------------------------------------------------------------------------------

def resolver_with(text: str) -> Resolver:
    resolver = Resolver("cluster1")
    for identity in IDS.values():
        resolver.add_identity(identity)
    for policy in parse_policies(text):
        resolver.upsert_policy(policy)
    resolver.set_endpoint(PolicyEndpoint(1, "default", IDS["employee"].labels))
    return resolver


def test_a_dns_rule_gives_redirect_entries_for_its_peers_on_its_ports():
    resolver = resolver_with(cnp(EMPLOYEE + DNS_PAIR))
    redirects = {k for k, v in resolver.verdicts(1).items() if v is Verdict.REDIRECT}
    assert redirects == {MapKey(EGRESS, IDS["kube-dns"].id, 0, 53, 53)}


def test_fqdn_identities_come_and_go_incrementally():
    """An address the proxy labels for the selector gains an entry; one labelled for another
    selector does not; removing the identity removes exactly its entry, handed on as such."""
    handed = []
    resolver = resolver_with(cnp(EMPLOYEE + DNS_PAIR))
    resolver.on_change = lambda endpoint, changes: handed.extend(changes)
    fresh = Identity((1 << 24) + 77, frozenset({"fqdn:api.example.com"}) | WORLD)
    other = Identity((1 << 24) + 78, frozenset({"fqdn:other.example.com"}) | WORLD)
    resolver.add_identity(fresh)
    resolver.add_identity(other)
    assert [(c.kind.name, c.key.identity, c.verdict) for c in handed] == [
        ("UPSERT", fresh.id, Verdict.ALLOW)]
    assert decide(resolver.verdicts(1), EGRESS, fresh.id, TCP, 443) is Verdict.ALLOW
    assert decide(resolver.verdicts(1), EGRESS, other.id, TCP, 443) is Verdict.DENY
    handed.clear()
    resolver.remove_identity(fresh.id)
    assert [(c.kind.name, c.key.identity) for c in handed] == [("DELETE", fresh.id)]
    assert decide(resolver.verdicts(1), EGRESS, fresh.id, TCP, 443) is Verdict.DENY


def test_an_identity_labelled_for_two_selectors_is_selected_by_both():
    text = cnp(EMPLOYEE + "egress:\n- toFQDNs: [{matchName: api.example.com}]\n"
               "  toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n"
               "- toFQDNs: [{matchPattern: '*.example.com'}]\n"
               "  toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n")
    resolver = resolver_with(text)
    both = Identity((1 << 24) + 90, frozenset({"fqdn:api.example.com", "fqdn:*.example.com"})
                    | WORLD)
    resolver.add_identity(both)
    assert {(k.identity, k.port) for k in resolver.verdicts(1) if k.identity == both.id} == {
        (both.id, 443), (both.id, 80)}


def test_dns_rules_for_the_proxy():
    resolver = resolver_with(cnp(EMPLOYEE + DNS_PAIR))
    # the toFQDNs peer is allowed on every port, 53 too, but none of its packets to port 53
    # is redirected (the redirect is kube-dns's): no wildcard rule for it (below)
    assert dns_rules(resolver, 1) == (
        DNSRule(53, "ANY", frozenset({IDS["kube-dns"].id}), (FQDNSelector(match_pattern="*"),)),)
    assert fqdn_selectors(resolver) == {FQDNSelector(match_name="api.example.com")}
    assert dns_rules(resolver, 99) == ()


def test_dns_rules_merge_per_port_protocol_and_peer_and_any_peer_is_none():
    resolver = resolver_with(egress(
        "- toPorts: [{ports: [{port: '53', protocol: UDP}], rules: {dns: [{matchName: a.com}]}}]\n"
        "- toPorts: [{ports: [{port: '53', protocol: UDP}], rules: {dns: [{matchName: b.com}]}}]\n"
        "- toPorts: [{ports: [{port: '5353', protocol: TCP}],"
        " rules: {dns: [{matchPattern: '*.c.com'}]}}]\n"))
    assert dns_rules(resolver, 1) == (
        DNSRule(53, "UDP", None, (FQDNSelector("a.com"), FQDNSelector("b.com"))),
        DNSRule(5353, "TCP", None, (FQDNSelector(match_pattern="*.c.com"),)))


def test_a_peer_allowed_on_a_redirected_port_without_dns_rules_may_ask_anything():
    """Cilium's wildcardL3L4Rule (pkg/policy/rule.go): an L3-only or L4-only allow of the
    same port gives its peers a wildcard DNS rule, as the entry is a redirect for them."""
    resolver = resolver_with(egress(
        "- toPorts: [{ports: [{port: '53', protocol: ANY}], rules: {dns: [{matchName: a.com}]}}]\n"
        "- toEndpoints: [{matchLabels: {'k8s:io.kubernetes.pod.namespace': kube-system}}]\n"
        "- toEntities: [world]\n  toPorts: [{ports: [{port: '53', protocol: UDP}]}]\n"))
    rules = dns_rules(resolver, 1)
    assert rules[0] == DNSRule(53, "ANY", None, (FQDNSelector("a.com"),))
    anything = (FQDNSelector(match_pattern="*"),)
    kube_system, world = rules[1:]
    assert kube_system == DNSRule(53, "ANY", frozenset({IDS["kube-dns"].id}), anything)
    assert (world.port, world.protocol, world.patterns) == (53, "UDP", anything)
    assert {2, IDS["fqdn-api"].id} <= world.servers and IDS["kube-dns"].id not in world.servers


def test_a_wildcard_covers_only_the_servers_whose_packets_are_redirected():
    """An L3-only allow of every cluster endpoint beside a DNS rule for kube-dns: only
    kube-dns's packets to port 53 reach the proxy, so only kube-dns may be asked anything;
    several allowed peers make one rule per port and protocol."""
    resolver = resolver_with(egress(
        "- toEndpoints: [{matchLabels: {'k8s:io.kubernetes.pod.namespace': kube-system,"
        " 'k8s:k8s-app': kube-dns}}]\n"
        "  toPorts: [{ports: [{port: '53', protocol: UDP}], rules: {dns: [{matchName: a.com}]}}]\n"
        "- toEntities: [cluster]\n- toEntities: [all]\n"))
    assert dns_rules(resolver, 1) == (
        DNSRule(53, "UDP", frozenset({IDS["kube-dns"].id}), (FQDNSelector("a.com"),)),
        DNSRule(53, "UDP", frozenset({IDS["kube-dns"].id}), (FQDNSelector(match_pattern="*"),)))
    assert decide(resolver.verdicts(1), EGRESS, IDS["kube-dns"].id, UDP, 53) is Verdict.REDIRECT


def test_deciding_policies_of_a_redirect():
    """A redirected packet was allowed by the policy with the DNS rule (Hubble's
    egress_allowed_by); asked for the REDIRECT itself, the same."""
    resolver = resolver_with(cnp(EMPLOYEE + DNS_PAIR, name="dns"))
    for verdict in (Verdict.ALLOW, Verdict.REDIRECT):
        assert deciding_policies(resolver, 1, EGRESS, IDS["kube-dns"].id, UDP, 53, verdict,
                                 2) == (("CiliumNetworkPolicy", "default", "dns"),)
    assert deciding_policies(resolver, 1, EGRESS, IDS["fqdn-api"].id, TCP, 443,
                             Verdict.REDIRECT, 1) == ()


def test_trace_explains_a_redirect_and_an_fqdn_peer():
    resolver = resolver_with(cnp(EMPLOYEE + DNS_PAIR))
    dns = trace(resolver, 1, EGRESS, IDS["kube-dns"], UDP, 53)
    assert dns.verdict is Verdict.REDIRECT and "DNS proxy" in dns.reason
    assert any(m.startswith("redirect:") and "53/ANY" in m and "MatchPattern: *" in m
               for m in dns.matched), dns.matched
    api = trace(resolver, 1, EGRESS, IDS["fqdn-api"], TCP, 443)
    assert api.verdict is Verdict.ALLOW
    assert any("FQDN MatchName: api.example.com" in m for m in api.matched), api.matched


async def test_the_default_resolver_answers_the_proxy_and_follows_changes():
    from meshagent.events import ChangeKind
    from meshagent.model.endpoint import Endpoint
    from meshagent.policy.contract import PolicyUpdate
    default = DefaultResolver("cluster1", tables=None, policy_changed=lambda **kw: None,
                              default_local_cluster=True)
    assert isinstance(default, ResolvesDNS)
    for identity in IDS.values():
        if identity.id != IDS["kube-dns"].id:
            default.meshagent_identity_changed(kind=ChangeKind.UPSERT, identity=identity)
    (policy,) = parse_policies(cnp(EMPLOYEE + DNS_PAIR))
    await default.apply(PolicyUpdate(ChangeKind.UPSERT, policy), 1)
    # the policy's selectors before any endpoint it selects: the names are labelled by the
    # time a pod of it asks (the proxy reads them again when the revision moves)
    selectors = default.fqdn_selectors()
    assert selectors == {FQDNSelector("api.example.com")}
    assert default.dns_rules(1) == ()
    default.meshagent_endpoint_changed(kind=ChangeKind.UPSERT, endpoint=Endpoint(
        1, "default", IDS["employee"].labels, None, 0))
    assert default.fqdn_selectors() is selectors  # made once per revision
    assert default.dns_rules(1)[0].servers == frozenset()  # kube-dns not known yet
    assert default.dns_rules(1) is default.dns_rules(1)
    default.meshagent_identity_changed(kind=ChangeKind.UPSERT, identity=IDS["kube-dns"])
    assert default.dns_rules(1)[0].servers == {IDS["kube-dns"].id}
    await default.apply(PolicyUpdate(ChangeKind.DELETE, key=policy.key), 2)
    assert default.dns_rules(1) == () and default.fqdn_selectors() == frozenset()


# -- in a running agent -------------------------------------------------------------------------

async def test_redirects_reach_the_datapath_and_trace_explains_egress(agent_factory, tmp_path):
    """Through the agent: the DNS pair imported, a redirect entry reaches the datapath for
    kube-dns, an fqdn identity arriving later gets its allow, and ``policy trace
    --src-endpoint`` explains both (exit 0: a redirect is allowed)."""
    import asyncio
    import ipaddress
    import json

    from conftest import run_cli

    from meshagent.model.endpoint import Endpoint
    from meshagent.testing import eventually
    from meshagent.testing.resolver_contract import RecordingDatapath, add_endpoint

    datapath = RecordingDatapath()
    running = await agent_factory(
        ["--plugins", "memory", "--cluster-name", "cluster1", "--cluster-id", "101",
         "--memory-store", f"fqdn-{tmp_path.name[-8:]}"],
        extra_plugins=[("recording", datapath)])
    agent = running.agent
    assert isinstance(agent.policy_resolver, ResolvesDNS)
    for name in ("employee", "kube-dns"):
        agent.tables.identities.upsert(IDS[name].id, IDS[name])
    await add_endpoint(agent, Endpoint(3, "default", IDS["employee"].labels,
                                       ipaddress.ip_address("10.1.1.3"), IDS["employee"].id))
    path = tmp_path / "dns.yaml"
    path.write_text(cnp(EMPLOYEE + DNS_PAIR, name="dns"))

    def cli(*args):
        return asyncio.to_thread(run_cli, *args, "--socket-path", str(running.socket_path))

    assert (await cli("policy", "import", str(path))).returncode == 0
    kube_dns = MapKey(EGRESS, IDS["kube-dns"].id, 0, 53, 53)
    await eventually(lambda: datapath.state.get(3, {}).get(kube_dns) is Verdict.REDIRECT)
    fqdn = Identity((1 << 24) + 0xF100, IDS["fqdn-api"].labels)  # clear of the agent's own
    agent.tables.identities.upsert(fqdn.id, fqdn)
    await eventually(lambda: datapath.state[3].get(MapKey(EGRESS, fqdn.id, 0, 0, 0))
                     is Verdict.ALLOW)
    assert agent.policy_resolver.dns_rules(3)[0] == DNSRule(
        53, "ANY", frozenset({IDS["kube-dns"].id}), (FQDNSelector(match_pattern="*"),))

    redirected = await cli("policy", "trace", "--src-endpoint", "3", "--dst-identity",
                           str(IDS["kube-dns"].id), "--dport", "53/UDP")
    assert redirected.returncode == 0, redirected.stderr
    assert "source:      endpoint 3" in redirected.stdout
    assert "port 53/UDP (egress)" in redirected.stdout
    assert "verdict:     REDIRECT: allowed, through the DNS proxy" in redirected.stdout
    assert "DNS questions MatchName: , MatchPattern: *" in redirected.stdout
    allowed = json.loads((await cli("policy", "trace", "--src-endpoint", "3", "--dst-labels",
                                    "fqdn:api.example.com,reserved:world", "--dport", "443",
                                    "-o", "json")).stdout)
    assert allowed["verdict"] == "allow" and allowed["destination"]["identity"] == fqdn.id
    assert any("FQDN MatchName: api.example.com" in m for m in allowed["matched"])
    refused = json.loads((await cli("policy", "trace", "--src-endpoint", "3", "--dst-ip",
                                    "192.0.2.1", "--dport", "53/UDP", "-o", "json")).stdout)
    assert (refused["verdict"], refused["flow_verdict"]) == ("deny", "DROPPED")
    as_json = json.loads((await cli("policy", "trace", "--src-endpoint", "3", "--dst-identity",
                                    str(IDS["kube-dns"].id), "--dport", "53/UDP", "-o",
                                    "json")).stdout)
    assert as_json["flow_verdict"] == "REDIRECTED" and as_json["direction"] == "egress"
    mixed = await cli("policy", "trace", "--src-endpoint", "3", "--dst-endpoint", "3",
                      "--dport", "53")
    assert mixed.returncode != 0
