"""meshagent's own toServices documents (tests/policy_corpus/services/): each one's first line
says what the parser must do with it — ``# expect: accepted`` or ``# expect: error: <the
error after the document's name>``. Accepted ones are translated against a small cluster of
Services, and what each item generates is checked."""

from pathlib import Path

import pytest

from corpus import assert_refused, expectation

from meshagent.policy.api import parse_policies
from meshagent.policy.services import translate
from meshagent.service.kubernetes import parse_services

CORPUS = Path(__file__).parent / "policy_corpus" / "services"
DOCUMENTS = sorted(CORPUS.glob("*.yaml"))

# name -> what its items generate against CLUSTER: (selectors as text, CIDRs) per egress item
CLUSTER = parse_services("""
apiVersion: v1
kind: Service
metadata: {name: orders, namespace: shop}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}], selector: {app: orders}}
---
apiVersion: v1
kind: Service
metadata: {name: billing-db, namespace: billing}
spec: {clusterIP: 10.96.0.2, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: billing-db, namespace: billing}
subsets: [{addresses: [{ip: 10.1.7.1}, {ip: 10.1.7.2}], ports: [{port: 5432}]}]
---
apiVersion: v1
kind: Service
metadata: {name: billing-db, namespace: legacy}
spec: {clusterIP: 10.96.0.3, ports: [{port: 5432}], selector: {app: pg}}
---
apiVersion: v1
kind: Service
metadata: {name: redis, namespace: platform, labels: {tier: cache, env: prod}}
spec: {clusterIP: 10.96.0.4, ports: [{port: 6379}], selector: {app: redis}}
---
apiVersion: v1
kind: Service
metadata: {name: redis-test, namespace: platform, labels: {tier: cache, env: test}}
spec: {clusterIP: 10.96.0.5, ports: [{port: 6379}], selector: {app: redis-test}}
---
apiVersion: v1
kind: Service
metadata: {name: vault, namespace: security, labels: {sensitive: "true"}}
spec: {clusterIP: 10.96.0.6, ports: [{port: 8200}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: vault, namespace: security}
subsets: [{addresses: [{ip: 10.1.9.9}], ports: [{port: 8200}]}]
""", "cluster1")
NS = "k8s:io.kubernetes.pod.namespace"
GENERATED = {
    "by-name": [([f"app=orders {NS}=shop"], [])],
    "by-name-with-ports": [([f"app=pg {NS}=legacy"], ["10.1.7.1/32", "10.1.7.2/32"])],
    "by-labels": [([f"app=redis {NS}=platform"], [])],
    "clusterwide-deny": [([], ["10.1.9.9/32"])],
    "several-services": [([], [])],  # users, sessions and metrics are not in the cluster
    "empty-item": [([], []), ([], [])],  # no Service named: nothing generated
}


def test_the_corpus_has_documents_of_both_kinds():
    kinds = {expectation(p) == "accepted" for p in DOCUMENTS}
    assert kinds == {True, False} and len(DOCUMENTS) >= 10


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.stem)
def test_each_document_is_parsed_as_it_says(path):
    expected = expectation(path)
    if expected != "accepted":
        assert_refused(path, expected)
        return
    (policy,) = parse_policies(path.read_text(), path.name)
    translated = translate(policy, CLUSTER)
    got = []
    for rule in translated.rules:
        for item in rule.egress + rule.egress_deny:
            if item.services is None:
                continue
            got.append((
                [" ".join(f"{r.key}={next(iter(r.values))}" for r in s.requirements)
                 for s in item.endpoints or ()],
                [str(c.cidr) for c in item.cidrs or ()]))
    assert got == GENERATED[path.stem]
