"""Policy documents: what is accepted, and how a bad one is refused (document, path, problem)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshagent.model.identity import Identity
from meshagent.policy.api import PolicyError, parse_policies
from meshagent.policy.resolver import PolicyEndpoint, Resolver

HEAD = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"


@pytest.mark.parametrize("text, message", [
    ("", "no policy document found"),
    ("a: [", "not valid YAML/JSON"),
    ("kind: NetworkPolicy\napiVersion: cilium.io/v2\n", "kind: must be CiliumNetworkPolicy"),
    ("kind: CiliumNetworkPolicy\napiVersion: v1\nmetadata: {name: p}\nspec: {}\n",
     "apiVersion: must be 'cilium.io/v2'"),
    ("kind: CiliumNetworkPolicy\napiVersion: cilium.io/v2\nspec: {}\n", "metadata"),
    (HEAD, "spec: is required"),
    (HEAD + "spec: {ingress: []}\n", "spec.endpointSelector: is required"),
    # a null selector is no selector (Kubernetes drops the null), never "every endpoint"
    (HEAD + "spec: {endpointSelector: null, ingress: []}\n",
     "spec.endpointSelector: must be a label selector ({} selects every endpoint), not null"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [null]\n",
     "spec.ingress[0].fromEndpoints[0]: must be a label selector"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - toFQDNs: [{matchName: x.com}]\n",
     "spec.ingress[0].toFQDNs: unknown field (Cilium has toFQDNs in egress rules only"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: '80'}]\n"
            "      rules: {http: [{method: GET}]}\n",
     "spec.ingress[0].toPorts[0].rules.http: HTTP L7 rules are not supported by meshagent"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: http}]}]\n",
     "spec.ingress[0].toPorts[0].ports[0].port: named ports ('http') are not supported"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: '70000'}]}]\n",
     "out of range"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: '80', "
            "endPort: 79}]}]\n", "endPort: must be a number from 80 to 65535"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: '80', "
            "protocol: ICMP}]}]\n", "protocol: must be one of TCP, UDP, SCTP, ANY"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - fromEntities: [moon]\n",
     "spec.ingress[0].fromEntities[0]: unknown entity 'moon'"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - fromCIDR: [10.0.0.0/33]\n",
     "spec.ingress[0].fromCIDR[0]: '10.0.0.0/33' is not a valid IPv4 CIDR"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - fromCIDRSet: [{cidr: 10.0.0.0/8, "
            "except: [192.168.0.0/16]}]\n", "except[0]: 192.168.0.0/16 is not inside 10.0.0.0/8"),
    (HEAD + "spec:\n  endpointSelector:\n    matchExpressions: [{key: app, operator: Maybe}]\n",
     "spec.endpointSelector.matchExpressions[0].operator: must be one of In, NotIn"),
    (HEAD + "spec:\n  endpointSelector:\n    matchExpressions: [{key: app, operator: In}]\n",
     "values: In needs at least one value"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - fromRequires: [{}]\n",
     "fromRequires are not supported"),
    (HEAD + "spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n    toPort: []\n",
     "spec.ingress[0].toPort: unknown field"),
    ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\n"
     "metadata: {name: c, namespace: x}\nspec: {endpointSelector: {}}\n",
     "metadata.namespace: a clusterwide policy has no namespace"),
    (HEAD + "spec:\n  nodeSelector: {}\n", "spec.nodeSelector: host policies are not supported"),
])
def test_invalid_documents_are_refused_with_path_and_reason(text, message):
    with pytest.raises(PolicyError) as info:
        parse_policies(text, "policy.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("policy.yaml")


def test_error_names_the_document_and_policy():
    text = (HEAD + "spec: {endpointSelector: {}}\n---\n"
            + HEAD.replace("name: p", "name: second") + "spec: {endpointSelector: 3}\n")
    with pytest.raises(PolicyError, match=r"^f\.yaml document 2 \(CiliumNetworkPolicy second\):"
                                          r" spec\.endpointSelector: must be a mapping"):
        parse_policies(text, "f.yaml")


def test_json_and_many_documents():
    json_doc = ('{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", '
                '"metadata": {"name": "j", "namespace": "ns1"}, '
                '"spec": {"endpointSelector": {"matchLabels": {"app": "x"}}}}')
    (policy,) = parse_policies(json_doc)
    assert (policy.name, policy.namespace) == ("j", "ns1")
    both = parse_policies(HEAD + "spec: {endpointSelector: {}}\n---\n" + json_doc)
    assert [p.name for p in both] == ["p", "j"]
    assert parse_policies(HEAD + "spec: {endpointSelector: {}}\n")[0].namespace == "default"


# -- property tests ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12)
    | st.sampled_from(["TCP", "In", "world", "10.0.0.0/8", "6379", "app", "cilium.io/v2"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["spec", "ingress", "egress", "fromEndpoints",
                                       "toPorts", "ports", "port", "matchLabels", "kind",
                                       "metadata", "name", "endpointSelector", "fromCIDRSet",
                                       "cidr", "except", "endPort", "protocol", "x"]),
                      children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["apiVersion", "kind", "metadata", "spec", "specs"]),
                       json_values, max_size=5), st.booleans())
def test_parser_raises_nothing_but_policy_errors(document, valid_head):
    if valid_head:
        document.update(apiVersion="cilium.io/v2", kind="CiliumNetworkPolicy",
                        metadata={"name": "fuzz"})
    import json
    try:
        parse_policies(json.dumps(document))
    except PolicyError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parser_on_arbitrary_text(text):
    try:
        parse_policies(text)
    except PolicyError:
        pass


APPS = ["a", "b", "c", "db"]
CLUSTERS = [("cluster1", 101), ("cluster2", 102)]
POLICY_TEXT = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p1}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: a}}, {matchLabels: {app: b, io.cilium.k8s.policy.cluster: cluster2}}]
    toPorts: [{ports: [{port: "6379", protocol: TCP}]}]
  - fromEntities: [world]
  ingressDeny:
  - fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [c]}]}]
  egress:
  - toEndpoints: [{}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cw}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts: [{ports: [{port: "6379", endPort: 6380}]}]
  egressDeny:
  - toCIDR: [10.0.0.0/8]
"""


def identity_for(n: int, app: str, cluster: str, cluster_id: int) -> Identity:
    return Identity((cluster_id << 16) + 256 + n, frozenset({
        f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=default",
        f"k8s:io.cilium.k8s.policy.cluster={cluster}"}), cluster)


identity_events = st.lists(
    st.tuples(st.booleans(), st.integers(0, 11), st.sampled_from(APPS), st.sampled_from(CLUSTERS)),
    max_size=40)


@settings(max_examples=150, deadline=None)
@given(identity_events)
def test_incremental_state_equals_a_full_recompute(events):
    policies = parse_policies(POLICY_TEXT)
    endpoints = [PolicyEndpoint(1, "default", identity_for(900, "db", "cluster1", 101).labels),
                 PolicyEndpoint(2, "default", identity_for(901, "a", "cluster1", 101).labels)]
    live = Resolver("cluster1")
    handed: dict[int, dict] = {1: {}, 2: {}}

    def record(endpoint_id, changes):
        for change in changes:
            if change.verdict is None:
                handed[endpoint_id].pop(change.key)
            else:
                handed[endpoint_id][change.key] = change.verdict

    live.on_change = record
    for policy in policies:
        live.upsert_policy(policy)
    for endpoint in endpoints:
        live.set_endpoint(endpoint)
    present = {}
    for add, n, app, (cluster, cid) in events:
        identity = identity_for(n, app, cluster, cid)
        if add:
            if identity.id in present:
                live.remove_identity(identity.id)
            live.add_identity(identity)
            present[identity.id] = identity
        elif identity.id in present:
            live.remove_identity(identity.id)
            del present[identity.id]
    fresh = Resolver("cluster1")
    for identity in present.values():
        fresh.add_identity(identity)
    for policy in policies:
        fresh.upsert_policy(policy)
    for endpoint in endpoints:
        fresh.set_endpoint(endpoint)
    for endpoint in endpoints:
        assert live.verdicts(endpoint.id) == fresh.verdicts(endpoint.id)
        assert handed[endpoint.id] == fresh.verdicts(endpoint.id)  # what the datapath got


def test_adding_an_identity_does_not_touch_unrelated_endpoints():
    calls = []
    resolver = Resolver("cluster1", on_change=lambda ep, changes: calls.append(ep))
    for policy in parse_policies(POLICY_TEXT):
        resolver.upsert_policy(policy)
    resolver.set_endpoint(PolicyEndpoint(1, "default",
                                         identity_for(900, "db", "cluster1", 101).labels))
    resolver.set_endpoint(PolicyEndpoint(2, "default",
                                         identity_for(901, "a", "cluster1", 101).labels))
    calls.clear()
    resolver.add_identity(identity_for(5, "c", "cluster1", 101))  # db's deny peer only
    assert calls == [1]
    calls.clear()
    resolver.add_identity(identity_for(6, "zzz", "cluster2", 102))  # nobody's peer
    assert calls == []
