"""A ``toFQDNs`` rule on both datapaths, through the differential machinery: the datapaths never
see names, only the identities the DNS proxy gives answered addresses (labels
``fqdn:<selector>`` and ``reserved:world``) and the ipcache rows of those addresses. Phase by
phase an address is answered for the allowed name, a second one for a name only another
selector matches, and the first one's identity expires; the kernel must agree with the model
(the resolver's decisions) in every phase, the changes going in as the incremental batches the
agent makes."""

import json

import attrs
import pytest

from meshagent.policy.resolver import EGRESS
from meshagent.testing.datapath_model import FORWARDED, POLICY_DEFAULT
from meshagent.testing.scenarios import (
    ECHO,
    IdentitySpec,
    ResolvedWorld,
    Scenario,
    named_scenario,
    tcp,
)

OUTSIDE_A, OUTSIDE_B = "192.0.2.10", "192.0.2.11"  # api.example.com, www.example.com
API = IdentitySpec((1 << 24) + 0xF200, ("fqdn:api.example.com", "reserved:world"), "")
WWW = IdentitySpec((1 << 24) + 0xF201, ("fqdn:*.example.com", "reserved:world"), "")
SPEC = {"egress": [{"toFQDNs": [{"matchName": "api.example.com"}],
                    "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
                   {"toEndpoints": [{"matchLabels": {"app": "echo"}}]}]}
PROBES = [tcp(OUTSIDE_A, 443), tcp(OUTSIDE_A, 80), tcp(OUTSIDE_B, 443), tcp(ECHO, 8080)]
# per phase: the answered addresses and their identities; what each probe gets
PHASES = [(), ((OUTSIDE_A, API),), ((OUTSIDE_A, API), (OUTSIDE_B, WWW)), ((OUTSIDE_B, WWW),)]
ALLOWED = [{ECHO}, {ECHO, OUTSIDE_A}, {ECHO, OUTSIDE_A}, {ECHO}]


def scenario() -> Scenario:
    base = named_scenario([SPEC], PROBES)
    (first,) = base.phases
    phases = tuple(attrs.evolve(
        first, identities=first.identities + tuple(spec for _, spec in answered),
        ipcache=first.ipcache + tuple((f"{ip}/32", spec.id) for ip, spec in answered))
        for answered in PHASES)
    return attrs.evolve(base, phases=phases)


def test_the_policy_is_the_one_the_documents_say():
    (document,) = scenario().phases[0].policies
    assert json.loads(document)["spec"]["egress"][0]["toFQDNs"] == [
        {"matchName": "api.example.com"}]


def test_each_phase_allows_the_names_addresses_and_nothing_else():
    """The model (the resolver's decisions) over the phases, without a kernel."""
    world = ResolvedWorld(scenario())
    for phase, allowed in zip(world.scenario.phases, ALLOWED):
        world.enter(phase)
        got = [world.model.predict(p.endpoint, p.direction, p.packet.frame()).outcome
               for p in phase.probes]
        want = [FORWARDED if p.packet.dst in allowed
                and (p.packet.dst == ECHO or p.packet.dport == 443)
                else POLICY_DEFAULT for p in phase.probes]
        assert got == want
        assert all(p.direction == EGRESS for p in phase.probes)


@pytest.mark.privileged
def test_the_datapaths_follow_the_answered_addresses_phase_by_phase(kernel_driver):
    assert kernel_driver.run(scenario()) == []
