"""meshagent's own node-peer and rule-label documents (tests/policy_corpus/nodes/ and
tests/policy_corpus/labels/): each one's first line says what the parser must do with it —
``# expect: accepted`` or ``# expect: error: <the error after the document's name>``.
Accepted node documents are resolved against the policy table's identities (nodes, pods,
host, world), and accepted label documents give the rule labels Cilium's CNP parser gives.
Both datapaths enforce node peers through the table's node cases
(meshagent.testing.policy_cases, run by the datapath contract suites)."""

from pathlib import Path

import pytest

from corpus import assert_refused, expectation

from meshagent.policy.api import NODE_SELECTOR_LABELS_OFF, PolicyError, parse_policies
from meshagent.policy.resolver import EGRESS, INGRESS, PolicyEndpoint, Resolver, decide
from meshagent.testing.policy_cases import IDS, TCP

CORPUS = Path(__file__).parent / "policy_corpus"
NODES = sorted((CORPUS / "nodes").glob("*.yaml"))
LABELS = sorted((CORPUS / "labels").glob("*.yaml"))

# node document -> (direction, port, the table identities allowed, those denied)
RESOLVED = {
    "from-worker-nodes": (INGRESS, 9121, {"node-worker"},
                          {"node-infra", "node-worker-c2", "pod-role-worker", "host", "world"}),
    "from-any-node": (INGRESS, 1, {"node-worker", "node-infra"},
                      {"node-worker-c2", "host", "employee"}),
    "to-nodes-expressions": (EGRESS, 10250, {"node-worker"}, {"node-infra", "world", "db"}),
    "deny-from-infra-nodes": (INGRESS, 1, {"node-worker", "world", "host"}, {"node-infra"}),
    "clusterwide-other-cluster": (INGRESS, 1, {"node-worker-c2"}, {"node-worker", "employee"}),
}

# label document -> per rule, its labels as source:key=value (Cilium's order: by key)
DERIVED = "k8s:io.cilium.k8s.policy.derived-from"
RULE_LABELS = {
    "objects": [[f"{DERIVED}=CiliumNetworkPolicy", "k8s:io.cilium.k8s.policy.name="
                 "db-owned-by-payments", "k8s:io.cilium.k8s.policy.namespace=shop",
                 "k8s:io.cilium.k8s.policy.uid=5e0c2a4e-1111-4222-8333-944455556666",
                 "unspec:reviewed", "k8s:team=payments", "unspec:ticket=SEC-1042"]],
    "short-form": [["unspec:audit", f"{DERIVED}=CiliumNetworkPolicy",
                    "k8s:io.cilium.k8s.policy.name=short-labels",
                    "k8s:io.cilium.k8s.policy.namespace=default",
                    "k8s:io.cilium.k8s.policy.uid", "unspec:owner=sre", "k8s:team=payments"]],
    "specs-each-their-own": [
        [f"{DERIVED}=CiliumClusterwideNetworkPolicy", "k8s:io.cilium.k8s.policy.name=two-rules",
         "k8s:io.cilium.k8s.policy.uid", f"unspec:rule={rule}"] for rule in ("web", "api")],
    "top-level-description": [[f"{DERIVED}=CiliumNetworkPolicy",
                               "k8s:io.cilium.k8s.policy.name=l3-ingress-qa",
                               "k8s:io.cilium.k8s.policy.namespace=default",
                               "k8s:io.cilium.k8s.policy.uid"]],
}


@pytest.mark.parametrize("documents", [NODES, LABELS], ids=["nodes", "labels"])
def test_the_corpus_has_documents_of_both_kinds(documents):
    kinds = {expectation(p) == "accepted" for p in documents}
    assert kinds == {True, False} and len(documents) >= 10


@pytest.mark.parametrize("path", NODES + LABELS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_document_is_parsed_as_it_says(path):
    expected = expectation(path)
    if expected != "accepted":
        assert_refused(path, expected)
        return
    (policy,) = parse_policies(path.read_text(), path.name)
    table = RESOLVED if path.parent.name == "nodes" else RULE_LABELS
    assert path.stem in table, f"{path.name}: say what it must give"


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_node_documents_need_the_option_as_in_cilium(name):
    (policy,) = parse_policies((CORPUS / "nodes" / f"{name}.yaml").read_text(), name)
    with pytest.raises(PolicyError) as caught:
        policy.check_node_peers(False)
    assert str(caught.value) == f"{policy.display}: {NODE_SELECTOR_LABELS_OFF}"
    assert NODE_SELECTOR_LABELS_OFF == ('FromNodes/ToNodes rules can only be applied when the'
                                        ' "enable-node-selector-labels" flag is set')
    policy.check_node_peers(True)


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_node_documents_select_the_nodes_they_name(name):
    direction, port, allowed, denied = RESOLVED[name]
    (policy,) = parse_policies((CORPUS / "nodes" / f"{name}.yaml").read_text(), name)
    subject = "db" if direction == INGRESS else "employee"
    resolver = Resolver("cluster1")
    for identity in IDS.values():
        resolver.add_identity(identity)
    resolver.upsert_policy(policy)
    resolver.set_endpoint(PolicyEndpoint(1, "default", IDS[subject].labels))
    verdicts = resolver.verdicts(1)
    got = {peer: decide(verdicts, direction, IDS[peer].id, TCP, port).value
           for peer in allowed | denied}
    assert got == {**dict.fromkeys(allowed, "allow"), **dict.fromkeys(denied, "deny")}


@pytest.mark.parametrize("name", sorted(RULE_LABELS))
def test_label_documents_give_cilium_rule_labels(name):
    (policy,) = parse_policies((CORPUS / "labels" / f"{name}.yaml").read_text(), name)
    assert [[str(label) for label in policy.rule_labels(rule)] for rule in policy.rules] == \
        RULE_LABELS[name]
    for rule, shown in zip(policy.rules, policy.rules_json(), strict=True):
        assert [label["key"] for label in shown["labels"]] == \
            [label.key for label in policy.rule_labels(rule)]
        assert shown.get("description", "") == rule.description


def test_descriptions_are_kept_where_they_were_written():
    (top,) = parse_policies((CORPUS / "labels" / "top-level-description.yaml").read_text())
    assert top.description == "L3 ingress from env=qa" and top.rules[0].description == ""
    (specs,) = parse_policies((CORPUS / "labels" / "specs-each-their-own.yaml").read_text())
    assert [r.description for r in specs.rules] == ["web tier from the outside",
                                                    "api tier from the web tier"]
    assert specs.description == ""


def test_the_policy_tables_identities_have_numbers_of_their_own():
    numbers = [identity.id for identity in IDS.values()]
    assert len(set(numbers)) == len(numbers)
