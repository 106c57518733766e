"""Policy semantics, table-driven (the table is :mod:`meshagent.testing.policy_cases`),
through the resolver directly; ``test_resolver_contract.py`` drives the same table through the
policy-resolver contract of a running agent."""

import pytest

from meshagent.policy.api import parse_policies
from meshagent.policy.resolver import (
    EGRESS,
    INGRESS,
    PolicyEndpoint,
    Resolver,
    Verdict,
    decide,
)
from meshagent.testing.policy_cases import (  # noqa: F401 (re-exported for other tests)
    CASES,
    DB_SEL,
    EGRESS_CASES,
    FQDN_CASES,
    FROM_ALL_ENDPOINTS,
    IDS,
    SEED,
    TCP,
    L,
    ccnp,
    cnp,
)


def verdict(text: str, peer: str, port: int = 6379, proto: int = TCP, *,
            direction: str = INGRESS, endpoint: frozenset = IDS["db"].labels,
            namespace: str = "default", default_local_cluster: bool = True) -> str:
    resolver = Resolver("cluster1", default_local_cluster=default_local_cluster)
    for identity in IDS.values():
        resolver.add_identity(identity)
    for policy in parse_policies(text) if text else []:
        resolver.upsert_policy(policy)
    resolver.set_endpoint(PolicyEndpoint(1, namespace, endpoint))
    return decide(resolver.verdicts(1), direction, IDS[peer].id, proto, port).value


@pytest.mark.parametrize("name, text, peer, port, proto, expected", CASES,
                         ids=[c[0] for c in CASES])
def test_ingress_verdicts(name, text, peer, port, proto, expected):
    flat = text.startswith("FLAT:")
    assert verdict(text.removeprefix("FLAT:"), peer, port, proto,
                   default_local_cluster=not flat) == expected


@pytest.mark.parametrize("name, spec, peer, port, expected", EGRESS_CASES,
                         ids=[c[0] for c in EGRESS_CASES])
def test_egress_verdicts(name, spec, peer, port, expected):
    text = cnp("endpointSelector: {matchLabels: {app: employee}}\n" + spec)
    assert verdict(text, peer, port, TCP, direction=EGRESS,
                   endpoint=IDS["employee"].labels) == expected


@pytest.mark.parametrize("name, spec, peer, port, proto, expected", FQDN_CASES,
                         ids=[c[0] for c in FQDN_CASES])
def test_dns_aware_egress_verdicts(name, spec, peer, port, proto, expected):
    text = cnp("endpointSelector: {matchLabels: {app: employee}}\n" + spec)
    assert verdict(text, peer, port, proto, direction=EGRESS,
                   endpoint=IDS["employee"].labels) == expected


def test_replies_are_not_the_resolvers_job():
    """Policy is stateful: no reverse-direction keys are emitted for an allowed connection."""
    resolver = Resolver("cluster1")
    for identity in IDS.values():
        resolver.add_identity(identity)
    for policy in parse_policies(SEED):
        resolver.upsert_policy(policy)
    resolver.set_endpoint(PolicyEndpoint(1, "default", IDS["db"].labels))
    egress = {k: v for k, v in resolver.verdicts(1).items() if k.direction == EGRESS}
    assert set(egress.values()) == {Verdict.ALLOW} and {k.identity for k in egress} == {0}


def test_clusterwide_policy_selects_endpoints_of_any_namespace():
    text = ccnp("endpointSelector: {matchLabels: {app: protected-db}}\ningress:\n- {}\n")
    assert verdict(text, "stranger", endpoint=L("protected-db", "other"),
                   namespace="other") == "deny"
    namespaced = cnp("endpointSelector: {matchLabels: {app: protected-db}}\ningress:\n- {}\n")
    assert verdict(namespaced, "stranger", endpoint=L("protected-db", "other"),
                   namespace="other") == "allow"


def test_clusterwide_rule_for_init_endpoints_does_not_require_a_namespace():
    """Initializing endpoints have no labels but reserved:init, so a clusterwide rule selecting
    them gets no namespace Exists in its peer selectors (Cilium's getEndpointSelector,
    matchesPodInit): ``{}`` is every peer, world too; the local-cluster default still
    applies."""
    init = frozenset({"reserved:init"})
    text = ccnp("endpointSelector: {matchLabels: {'reserved:init': ''}}\n"
                "ingress:\n- fromEndpoints: [{}]\n")
    assert verdict(text, "world", endpoint=init, default_local_cluster=False) == "allow"
    assert verdict(text, "world", endpoint=init) == "deny"
    assert verdict(text, "employee", endpoint=init) == "allow"
    pods = ccnp(FROM_ALL_ENDPOINTS)  # the same, for pods
    assert verdict(pods, "world", default_local_cluster=False) == "deny"


@pytest.mark.parametrize("key", ["reserved:host", "$host", "reserved.host"])
def test_reserved_key_forms_select_reserved_labels_as_written(key):
    """Cilium reads ``$host`` and ``reserved.host`` as ``reserved:host`` (pkg/labels
    ParseSource) and leaves a selector on a reserved label without namespace or cluster."""
    text = cnp(DB_SEL + f"ingress:\n- fromEndpoints: [{{matchLabels: {{'{key}': ''}}}}]\n")
    assert verdict(text, "host") == "allow"
    assert verdict(text, "employee") == "deny"


def test_more_than_40_cases():
    assert len(CASES) + len(EGRESS_CASES) >= 40
