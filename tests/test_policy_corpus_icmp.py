"""meshagent's own ICMP documents (tests/policy_corpus/icmp/): each one's first line says what the
parser must do with it — ``# expect: accepted`` or ``# expect: error: <the error after the
document's name>``. An accepted one carries ``# verdict: <direction> <peer> <port>/<protocol>
<verdict>`` lines (for ICMP and ICMPv6 the port is the type): what the resolver gives the
table's employee endpoint for that peer of :data:`meshagent.testing.policy_cases.IDS`; and
both datapaths do the same with the packets those lines describe."""

import json
from pathlib import Path

import pytest

import corpus
from corpus import assert_refused, expectation

from meshagent.policy.api import PROTOCOLS, parse_policies
from meshagent.policy.resolver import decide
from meshagent.testing.datapath_contract import ScenarioDriver
from meshagent.testing.datapath_model import FORWARDED, INGRESS
from meshagent.testing.packets import ICMP, ICMPV6, Packet
from meshagent.testing.policy_cases import IDS
from meshagent.testing.scenarios import EndpointSpec, IdentitySpec, Phase, Probe, Scenario

CORPUS = Path(__file__).parent / "policy_corpus" / "icmp"
DOCUMENTS = sorted(CORPUS.glob("*.yaml"))
ACCEPTED = [p for p in DOCUMENTS if p.read_text().startswith("# expect: accepted")]
ENDPOINT = "employee"
POD4, POD6 = "10.9.0.1", "fd00:9::1"


def verdict_lines(path: Path) -> list[tuple[str, str, int, str, str]]:
    """``# verdict: <direction> <peer> <type>/<protocol> <verdict>`` lines."""
    return [(direction, peer, int(port.split("/")[0]), port.split("/")[1], verdict)
            for direction, peer, port, verdict in corpus.verdict_lines(path)]


def test_the_corpus_has_documents_of_both_kinds():
    kinds = {expectation(p) == "accepted" for p in DOCUMENTS}
    assert kinds == {True, False} and len(DOCUMENTS) >= 12


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.stem)
def test_each_document_is_parsed_and_resolved_as_it_says(path):
    expected = expectation(path)
    if expected != "accepted":
        assert_refused(path, expected)
        return
    resolver = corpus.resolve(path, IDS.values(), IDS[ENDPOINT].labels)
    wanted = verdict_lines(path)
    assert wanted, f"{path.name}: an accepted document says what it resolves to"
    got = [(direction, peer, port, protocol,
            decide(resolver.verdicts(1), direction, IDS[peer].id, PROTOCOLS[protocol],
                   port).value)
           for direction, peer, port, protocol, _ in wanted]
    assert got == wanted


# -- through both datapaths ----------------------------------------------------------------------

def addresses(peer: str) -> tuple[str, str]:
    """A peer's IPv4 and IPv6 address in the scenario (the CIDR peer is in 10.1.0.0/16)."""
    pods = sorted(n for n, i in IDS.items() if not i.reserved and not n.startswith("cidr"))
    if peer in pods:
        n = pods.index(peer) + 1
        return f"10.9.1.{n}", f"fd00:9:1::{n:x}"
    return {"world": ("198.18.0.1", "2a00:1::1"), "cidr-10-1": ("10.1.200.1", "2a00:1::2")}[peer]


def corpus_scenario(path: Path) -> Scenario:
    """The document in force for the employee pod (dual stack), one packet per verdict line:
    an ICMP message of that type, or a TCP SYN to that port."""
    pods = {n: i for n, i in IDS.items() if not i.reserved and not n.startswith("cidr")}
    ipcache = [(f"{addresses(n)[0]}/32", i.id) for n, i in pods.items() if n != ENDPOINT]
    ipcache += [(f"{addresses(n)[1]}/128", i.id) for n, i in pods.items() if n != ENDPOINT]
    ipcache += [(f"{POD4}/32", IDS[ENDPOINT].id), (f"{POD6}/128", IDS[ENDPOINT].id)]
    probes = []
    for direction, peer, port, protocol, _ in verdict_lines(path):
        number = PROTOCOLS[protocol]
        v4, v6 = addresses(peer)
        mine, theirs = (POD6, v6) if number == ICMPV6 else (POD4, v4)
        src, dst = (theirs, mine) if direction == INGRESS else (mine, theirs)
        if number in (ICMP, ICMPV6):
            packet = Packet(src, dst, number, 7, icmp_type=port)
        else:
            packet = Packet(src, dst, number, 40000, port)
        probes.append(Probe(1, direction, packet))
    documents = tuple(json.dumps(p.document)
                      for p in parse_policies(path.read_text(), path.name))
    return Scenario((EndpointSpec(1, POD4, "default", IDS[ENDPOINT].id, ipv6=POD6),),
                    (Phase(tuple(IdentitySpec(i.id, tuple(sorted(i.labels)), i.cluster)
                                 for i in pods.values()), tuple(ipcache), documents,
                           tuple(probes)),))


def check(driver: ScenarioDriver, path: Path) -> None:
    """The datapath agrees with the model (and so the resolver) on every packet, and each
    passes or is dropped as its verdict line says."""
    scenario = corpus_scenario(path)
    differences = driver.run(scenario)
    assert not differences, "\n".join(differences)
    driver.start(scenario)
    got = [driver.judge.delivery(p.endpoint, p.direction, p.packet.frame())[0] == FORWARDED
           for p in scenario.phases[0].probes]
    assert got == [verdict == "allow" for *_, verdict in verdict_lines(path)]


@pytest.mark.privileged
@pytest.mark.parametrize("path", ACCEPTED, ids=lambda p: p.stem)
def test_each_accepted_document_on_both_datapaths(kernel_driver, path):
    check(kernel_driver, path)
