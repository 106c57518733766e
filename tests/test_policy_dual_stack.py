"""IPv6 in policy: CIDRs, CIDR sets with excepts, and ``::/0`` as the IPv6 world, in both
directions; entities cover both families. A CIDR selects addresses of its own family only.

Through the resolver directly (the verdict for an identity), and ``policy trace --src-ip``
with an IPv6 address through a running agent's contract-level API.
"""

import pytest

from meshagent.model.identity import Identity
from meshagent.policy.api import PolicyError, parse_policies
from meshagent.identity.cidr import cidr_identity
from meshagent.policy.cidr import policy_cidrs
from meshagent.policy.resolver import EGRESS, INGRESS, PolicyEndpoint, Resolver, decide
from meshagent.testing.policy_cases import IDS, TCP, cnp

LOCAL = 1 << 24
V6 = {
    "world4": IDS["world"],
    "world6": Identity(10, frozenset({"reserved:world-ipv6"})),
    "doc6": cidr_identity(LOCAL + 100, __import__("ipaddress").ip_network("2001:db8::/32"), ""),
    "doc6-lab": cidr_identity(LOCAL + 101,
                              __import__("ipaddress").ip_network("2001:db8:1::/48"), ""),
    "cidr-10-1": IDS["cidr-10-1"],
    "employee": IDS["employee"],
}

#: The allow-all-egress policy of Cilium's connectivity tests.
ALLOW_ALL_EGRESS = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-all-egress}
spec:
  endpointSelector: {}
  egress:
  - toEndpoints: [{}]
  - toCIDR: [0.0.0.0/0, "::/0"]
"""


def verdict(text: str, peer: str, direction: str = EGRESS, port: int = 443) -> str:
    resolver = Resolver("cluster1")
    for identity in list(IDS.values()) + list(V6.values()):
        resolver.add_identity(identity)
    for policy in parse_policies(text):
        resolver.upsert_policy(policy)
    resolver.set_endpoint(PolicyEndpoint(1, "default", IDS["employee"].labels))
    return decide(resolver.verdicts(1), direction, V6[peer].id, TCP, port).value


def egress(spec: str) -> str:
    return cnp("endpointSelector: {matchLabels: {app: employee}}\n" + spec)


def ingress(spec: str) -> str:
    return cnp("endpointSelector: {matchLabels: {app: employee}}\n" + spec)


def test_the_connectivity_test_allow_all_egress_policy_imports_and_allows_both_worlds():
    (policy,) = parse_policies(ALLOW_ALL_EGRESS)
    assert {str(c) for c in policy_cidrs([policy])} == set()  # both are the world itself
    for peer in ("world4", "world6", "doc6", "cidr-10-1", "employee"):
        assert verdict(ALLOW_ALL_EGRESS, peer) == "allow", peer


@pytest.mark.parametrize("spec, allowed, denied", [
    ("egress: [{toCIDR: ['::/0']}]", {"world6", "doc6", "doc6-lab"}, {"world4", "cidr-10-1"}),
    ("egress: [{toCIDR: ['0.0.0.0/0']}]", {"world4", "cidr-10-1"}, {"world6", "doc6"}),
    ("egress: [{toCIDR: ['2001:db8::/32']}]", {"doc6", "doc6-lab"}, {"world6", "world4"}),
    ("egress: [{toCIDRSet: [{cidr: '2001:db8::/32', except: ['2001:db8:1::/48']}]}]",
     {"doc6"}, {"doc6-lab", "world6"}),
    ("egress: [{toEntities: [world]}]", {"world4", "world6", "doc6", "cidr-10-1"}, {"employee"}),
    ("egress: [{toEntities: [all]}]", {"world4", "world6", "doc6", "employee"}, set()),
])
def test_egress_to_ipv6(spec, allowed, denied):
    for peer in allowed:
        assert verdict(egress(spec), peer) == "allow", (spec, peer)
    for peer in denied:
        assert verdict(egress(spec), peer) == "deny", (spec, peer)


def test_ingress_from_ipv6_and_an_ipv6_deny():
    spec = ("ingress: [{fromCIDR: ['2001:db8::/32']}]\n"
            "ingressDeny: [{fromCIDR: ['2001:db8:1::/48']}]\n")
    assert verdict(ingress(spec), "doc6", INGRESS) == "allow"
    assert verdict(ingress(spec), "doc6-lab", INGRESS) == "deny"
    assert verdict(ingress(spec), "world4", INGRESS) == "deny"
    deny_world6 = "ingress: [{fromEntities: [all]}]\ningressDeny: [{fromCIDR: ['::/0']}]\n"
    assert verdict(ingress(deny_world6), "world6", INGRESS) == "deny"
    assert verdict(ingress(deny_world6), "world4", INGRESS) == "allow"


def test_ipv6_cidrs_become_node_local_identities_of_the_ipv6_world():
    (policy,) = parse_policies(egress(
        "egress: [{toCIDRSet: [{cidr: '2001:db8::/32', except: ['2001:db8:1::/48']}]},"
        " {toCIDR: ['10.1.0.0/16']}]"))
    cidrs = policy_cidrs([policy])
    assert {str(c) for c in cidrs} == {"2001:db8::/32", "2001:db8:1::/48", "10.1.0.0/16"}
    six = cidr_identity(LOCAL + 5, __import__("ipaddress").ip_network("2001:db8::/32"), "c1")
    assert six.labels == {"cidr:2001:db8::/32", "reserved:world-ipv6"}


@pytest.mark.parametrize("spec, message", [
    ("egress: [{toCIDRSet: [{cidr: '2001:db8::/32', except: ['10.0.0.0/8']}]}]",
     "is not of the family of 2001:db8::/32"),
    ("egress: [{toCIDRSet: [{cidr: '2001:db8::/32', except: ['2001:db9::/48']}]}]",
     "is not inside 2001:db8::/32"),
    ("egress: [{toCIDR: ['2001:db8::1/32']}]", "is not a valid IPv6 CIDR"),
    ("egress: [{toCIDR: ['2001:zz8::/32']}]", "is not a valid IPv6 CIDR"),
])
def test_bad_ipv6_cidrs_are_refused_naming_the_field(spec, message):
    with pytest.raises(PolicyError, match=message):
        parse_policies(egress(spec))


async def test_trace_from_an_ipv6_source_and_ipv6_cidr_identities(agent_factory, tmp_path):
    """An IPv6 CIDR gets a node-local identity and ipcache row like an IPv4 one; ``policy
    trace --src-ip`` takes an IPv6 address: inside the CIDR it is that identity, elsewhere the
    IPv6 world (10), never the IPv4 one."""
    import ipaddress
    import json

    from test_policy_service import ARGS, cli

    from meshagent.events import ChangeKind
    from meshagent.model.endpoint import Endpoint
    a1 = await agent_factory(ARGS)
    employee = Endpoint(7, "default", IDS["employee"].labels,
                        ipaddress.ip_address("10.1.1.7"), IDS["employee"].id)
    a1.agent.tables.identities.upsert(IDS["employee"].id, IDS["employee"])
    a1.agent.hooks.endpoint_changed(kind=ChangeKind.UPSERT, endpoint=employee)
    path = tmp_path / "v6.yaml"
    path.write_text(ingress("ingress: [{fromCIDRSet: [{cidr: '2001:db8::/32',"
                            " except: ['2001:db8:1::/48']}]}]"))
    imported = await cli(a1, "policy", "import", str(path))
    assert imported.returncode == 0, imported.stderr
    rows = {str(e.prefix): e.identity for e in a1.agent.tables.ipcache.values()}
    assert rows.keys() >= {"2001:db8::/32", "2001:db8:1::/48"}
    ip_list = await cli(a1, "ip", "list")
    assert "2001:db8::/32" in ip_list.stdout, ip_list.stdout

    async def trace(ip: str) -> dict:
        out = await cli(a1, "policy", "trace", "--src-ip", ip, "--dst-endpoint", "7",
                        "--dport", "443", "-o", "json")
        return json.loads(out.stdout)
    inside = await trace("2001:db8::5")
    assert inside["source"]["identity"] == rows["2001:db8::/32"]
    assert inside["verdict"] == "allow"
    excepted = await trace("2001:db8:1::5")
    assert excepted["source"]["identity"] == rows["2001:db8:1::/48"]
    assert excepted["verdict"] == "deny"
    outside = await trace("2001:db9::1")
    assert outside["source"]["identity"] == 10 and outside["verdict"] == "deny"
    world4 = await trace("192.0.2.1")
    assert world4["source"]["identity"] == 2 and world4["verdict"] == "deny"
    bad = await cli(a1, "policy", "trace", "--src-ip", "2001:db8::zz", "--dst-endpoint", "7",
                    "--dport", "443")
    assert bad.returncode == 1 and "is not an IPv4 or IPv6 address" in bad.stderr
