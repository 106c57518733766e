"""A ``toServices`` rule on both datapaths, through the differential machinery: the datapaths
never see ``toServices``, only the translated rules (a selector for a Service with one, the
backends' /32s for one without), so each phase's policy is the translation of the same rule
for that phase's Services. The kernel must agree with the model in every phase, the changes
between phases going in as the incremental batches the agent makes (a backend added, one
removed, a selector changed)."""

import json

import attrs
import pytest

from meshagent.policy.api import parse_document
from meshagent.policy.resolver import EGRESS
from meshagent.policy.services import translate
from meshagent.service.kubernetes import parse_services
from meshagent.testing.datapath_model import FORWARDED, POLICY_DEFAULT
from meshagent.testing.scenarios import ECHO, ECHO2, ResolvedWorld, Scenario, named_scenario, tcp

OUTSIDE_A, OUTSIDE_B = "192.0.2.10", "192.0.2.11"
RULE = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "client-to-services", "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                 "egress": [{"toServices": [{"k8sService": {"serviceName": "echo"}},
                                            {"k8sService": {"serviceName": "outside",
                                                            "namespace": "default"}}],
                             "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}}
PROBES = [tcp(ECHO, 8080), tcp(ECHO2, 8080), tcp(ECHO, 9090), tcp(OUTSIDE_A, 8080),
          tcp(OUTSIDE_B, 8080), tcp(OUTSIDE_B, 9090)]
# per phase: echo's pod selector, the outside Service's backends; what each probe gets
PHASES = [("echo", [OUTSIDE_A]), ("echo", [OUTSIDE_A, OUTSIDE_B]), ("echo2", [OUTSIDE_B])]
ALLOWED = [{ECHO, OUTSIDE_A}, {ECHO, OUTSIDE_A, OUTSIDE_B}, {ECHO2, OUTSIDE_B}]


def phase_services(app: str, outside: list[str]):
    addresses = ", ".join(f"{{ip: {ip}}}" for ip in outside)
    return parse_services(f"""
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{clusterIP: 10.96.0.10, ports: [{{port: 8080}}], selector: {{app: {app}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: outside, namespace: default}}
spec: {{clusterIP: 10.96.0.11, ports: [{{port: 8080}}]}}
---
apiVersion: v1
kind: Endpoints
metadata: {{name: outside, namespace: default}}
subsets: [{{addresses: [{addresses}], ports: [{{port: 8080}}]}}]
""", "cluster1")


def generated_document(services) -> str:
    """The rule as Cilium's translation leaves it for these Services (``toServices`` replaced
    by the generated ``toEndpoints``/``toCIDRSet``), checked against :func:`translate`."""
    item = RULE["spec"]["egress"][0]
    translated = translate(parse_document(RULE, "rule"), services).rules[0].egress[0]
    generated = {"toPorts": item["toPorts"]}
    if translated.endpoints:
        generated["toEndpoints"] = [{"matchExpressions": [
            {"key": r.key, "operator": r.operator, "values": sorted(r.values)}
            for r in selector.requirements]} for selector in translated.endpoints]
    if translated.cidrs:
        generated["toCIDRSet"] = [{"cidr": str(c.cidr)} for c in translated.cidrs]
    doc = {**RULE, "spec": {**RULE["spec"], "egress": [generated]}}
    again = parse_document(doc, "generated").rules[0].egress[0]
    assert (again.ports, again.cidrs) == (translated.ports, translated.cidrs)
    assert set(again.endpoints or ()) == set(translated.endpoints or ())
    return json.dumps(doc)


def scenario() -> Scenario:
    base = named_scenario([], PROBES)
    (first,) = base.phases
    phases = tuple(attrs.evolve(first, policies=(generated_document(phase_services(*p)),))
                   for p in PHASES)
    return attrs.evolve(base, phases=phases)


def test_each_phase_allows_the_services_backends_and_nothing_else():
    """The model (the resolver's decisions) over the phases, without a kernel."""
    world = ResolvedWorld(scenario())
    for phase, allowed in zip(world.scenario.phases, ALLOWED):
        world.enter(phase)
        got = [world.model.predict(p.endpoint, p.direction, p.packet.frame()).outcome
               for p in phase.probes]
        want = [FORWARDED if p.packet.dst in allowed and p.packet.dport == 8080
                else POLICY_DEFAULT for p in phase.probes]
        assert got == want
        assert all(p.direction == EGRESS for p in phase.probes)


@pytest.mark.privileged
def test_the_datapaths_follow_the_translation_phase_by_phase(kernel_driver):
    assert kernel_driver.run(scenario()) == []
