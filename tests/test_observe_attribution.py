"""Which policies decided a verdict (Hubble's ``ingress_allowed_by`` and the like), as the
default resolver answers through :class:`meshagent.policy.contract.AttributesVerdicts`; the
levels follow Cilium's ``pkg/policy/correlation/correlation.go`` (one map key per
PolicyMatchType)."""

from meshagent.policy.api import parse_policies
from meshagent.policy.resolver import EGRESS, INGRESS, PolicyEndpoint, Resolver, Verdict
from meshagent.policy.resolver import deciding_policies as deciding
from meshagent.testing.policy_cases import DB_SEL, IDS, SEED, TCP, cnp

UDP = 17
L3_ONLY, L3_L4, L4_ONLY, ALL = 1, 2, 3, 4

POLICIES = "---\n".join([
    SEED,  # employee (cluster2 istio-space, or default) on 6379/TCP: L3-L4
    cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee}}]\n",
        name="l3-employee"),
    cnp(DB_SEL + "ingress:\n- toPorts: [{ports: [{port: '6379', protocol: TCP}]}]\n",
        name="l4-any"),
    cnp(DB_SEL + "ingressDeny:\n- fromEndpoints: [{matchLabels: {app: stranger}}]\n",
        name="deny-stranger"),
    cnp(DB_SEL + "egress:\n- toPorts: [{ports: [{port: '53', protocol: UDP}]}]\n",
        name="dns"),
])


def resolver() -> Resolver:
    built = Resolver("cluster1")
    for identity in IDS.values():
        built.add_identity(identity)
    for policy in parse_policies(POLICIES):
        built.upsert_policy(policy)
    built.set_endpoint(PolicyEndpoint(1, "default", IDS["db"].labels))
    return built


def test_each_match_level_names_the_policies_of_that_entry():
    r = resolver()
    employee = IDS["employee"].id
    seed = ("CiliumNetworkPolicy", "default", "clustermesh-ingress-l4-policy")
    assert deciding(r, 1, INGRESS, employee, TCP, 6379, Verdict.ALLOW, L3_L4) == (seed,)
    assert deciding(r, 1, INGRESS, employee, TCP, 6379, Verdict.ALLOW, L3_ONLY) == (
        ("CiliumNetworkPolicy", "default", "l3-employee"),)
    assert deciding(r, 1, INGRESS, employee, TCP, 6379, Verdict.ALLOW, L4_ONLY) == (
        ("CiliumNetworkPolicy", "default", "l4-any"),)
    # the L3-L4 rule does not cover another port; nothing allows any peer on any port
    assert deciding(r, 1, INGRESS, employee, TCP, 80, Verdict.ALLOW, L3_L4) == ()
    assert deciding(r, 1, INGRESS, employee, TCP, 6379, Verdict.ALLOW, ALL) == ()


def test_deny_rules_are_named_for_a_deny_and_never_for_an_allow():
    r = resolver()
    stranger = IDS["stranger"].id
    assert deciding(r, 1, INGRESS, stranger, TCP, 6379, Verdict.DENY, L3_ONLY) == (
        ("CiliumNetworkPolicy", "default", "deny-stranger"),)
    assert deciding(r, 1, INGRESS, stranger, TCP, 6379, Verdict.ALLOW, L3_ONLY) == ()


def test_direction_protocol_and_an_implied_allowance():
    r = resolver()
    world = IDS["world"].id
    assert deciding(r, 1, EGRESS, world, UDP, 53, Verdict.ALLOW, L4_ONLY) == (
        ("CiliumNetworkPolicy", "default", "dns"),)
    assert deciding(r, 1, EGRESS, world, TCP, 53, Verdict.ALLOW, L4_ONLY) == ()
    unenforced = Resolver("cluster1")
    unenforced.set_endpoint(PolicyEndpoint(1, "default", IDS["db"].labels))
    # no policy selects it: the allowance is implied, no policy is named
    assert deciding(unenforced, 1, INGRESS, world, TCP, 80, Verdict.ALLOW, ALL) == ()
    assert deciding(r, 99, INGRESS, world, TCP, 80, Verdict.ALLOW, ALL) == ()  # unknown
