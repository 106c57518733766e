"""The eBPF datapath's flow events beyond what the contract suite compares: the facts each
record carries (addresses, ports, identities, flags, time), the match type of each kind of
policy entry (Cilium 1.17+'s rule), losses when the perf buffer is full, and drops only when compiled for
``--enable-hubble=false``. The programs run on synthetic frames (BPF_PROG_TEST_RUN)."""

import time

import attrs
import pytest
from test_datapath_differential import kernel_judge

from meshagent.datapath.events import (
    DROP,
    DROPPED,
    FORWARDED,
    MATCH_ALL,
    MATCH_L3_L4,
    MATCH_L3_ONLY,
    MATCH_L3_PROTO,
    MATCH_L4_ONLY,
    MATCH_NONE,
    MATCH_PROTO_ONLY,
    POLICY_VERDICT,
    TRACE,
)
from meshagent.policy.resolver import EGRESS, INGRESS
from meshagent.testing.datapath_contract import ScenarioDriver
from meshagent.testing.packets import SCTP, TCP, UDP, Packet
from meshagent.testing.scenarios import ALL_EGRESS, CLIENT, ECHO, ECHO2, REMOTE, named_scenario
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root and BPF")]

CLIENT_ID, ECHO_ID = (101 << 16) + 257, (101 << 16) + 258
FIN, SYN, ACK = 0x01, 0x02, 0x10
WORLD = "198.18.0.1"


@pytest.fixture(scope="module")
def judge():
    with kernel_judge() as kernel:
        yield kernel


@pytest.fixture
def driver(judge) -> ScenarioDriver:
    return ScenarioDriver(judge)


def test_a_connection_between_two_local_pods_is_reported_once_per_news(judge, driver):
    """The SYN: the client's egress and echo's ingress policy verdicts, with the packet's
    facts; the SYN-ACK: the first reply packet at both hooks; an ACK: nothing; a FIN: new at
    both hooks; the same FIN again: nothing."""
    to_echo = {"egress": [{"toEndpoints": [{"matchLabels": {"app": "echo"}}], "toPorts": [
        {"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}
    driver.start(named_scenario([to_echo], []))
    judge.events()
    syn = Packet(CLIENT, ECHO, TCP, 40000, 8080)
    before = time.time_ns()
    assert judge.delivery(1, EGRESS, syn.frame()) == ("forwarded", True)
    first, second = judge.events()
    assert (first.kind, first.verdict, first.reason, first.endpoint, first.direction,
            first.match) == (POLICY_VERDICT, FORWARDED, "forwarded", 1, "egress", MATCH_L3_L4)
    assert (second.endpoint, second.direction, second.match) == (2, "ingress", MATCH_ALL)
    for event in (first, second):
        assert (event.source_ip, event.source_port, event.destination_ip,
                event.destination_port, event.protocol, event.tcp_flags) == \
            (CLIENT, 40000, ECHO, 8080, TCP, SYN)
        assert (event.source_identity, event.destination_identity) == (CLIENT_ID, ECHO_ID)
        assert not event.is_reply
        assert before - 10**9 < event.time_ns < time.time_ns() + 10**9  # the wall clock
    assert judge.delivery(2, EGRESS, syn.reply().frame())[0] == "forwarded"
    replies = judge.events()
    assert [(e.kind, e.endpoint, e.direction, e.is_reply, e.tcp_flags) for e in replies] == \
        [(TRACE, 2, "egress", True, SYN | ACK), (TRACE, 1, "ingress", True, SYN | ACK)]
    assert (replies[0].source_identity, replies[0].destination_identity) == (ECHO_ID, CLIENT_ID)
    judge.delivery(1, EGRESS, attrs.evolve(syn, tcp_flags=ACK).frame())
    assert judge.events() == []
    fin = attrs.evolve(syn, tcp_flags=FIN | ACK).frame()
    judge.delivery(1, EGRESS, fin)
    assert [(e.kind, e.endpoint, e.is_reply) for e in judge.events()] == \
        [(TRACE, 1, False), (TRACE, 2, False)]
    judge.delivery(1, EGRESS, fin)
    assert judge.events() == []


def test_each_kind_of_policy_entry_reports_its_match_type(judge, driver):
    """Cilium 1.17+'s PolicyMatchType (bpf/lib/policy.h): the longest prefix over (protocol,
    port) of each lookup; a deny of the peer's identity, then of any identity; of two allows
    the peer's unless any identity's is longer. The peer's identity without a protocol is
    L3-Only, with a protocol L3-Proto, with a port L3-L4; any peer: all, Proto-Only, L4-Only;
    a default drop none."""
    rules = {"egress": [{"toEndpoints": [{"matchLabels": {"app": "echo"}}]},
                        {"toEndpoints": [{"matchLabels": {"app": "echo"}}], "toPorts": [
                            {"ports": [{"port": "3000", "protocol": "TCP"}]}]},
                        {"toEndpoints": [{"matchLabels": {"app": "echo2"}}], "toPorts": [
                            {"ports": [{"port": "9090", "protocol": "TCP"}]}]},
                        {"toEndpoints": [{"matchLabels": {"app": "echo2"}}], "toPorts": [
                            {"ports": [{"port": "0", "protocol": "UDP"}]}]},
                        {"toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]},
                        {"toPorts": [{"ports": [{"port": "0", "protocol": "SCTP"}]}]}],
             "egressDeny": [{"toPorts": [{"ports": [{"port": "4096", "endPort": 8191,
                                                     "protocol": "TCP"}]}]}]}
    driver.start(named_scenario([rules], []))
    judge.events()

    def reported(packet: Packet) -> tuple:
        judge.delivery(1, EGRESS, packet.frame())
        event = judge.events()[0]
        return event.kind, event.reason, event.match
    assert reported(Packet(CLIENT, ECHO, TCP, 40000, 80)) == \
        (POLICY_VERDICT, "forwarded", MATCH_L3_ONLY)
    # the peer's any port and its port 3000: the longer prefix
    assert reported(Packet(CLIENT, ECHO, TCP, 40000, 3000)) == \
        (POLICY_VERDICT, "forwarded", MATCH_L3_L4)
    assert reported(Packet(CLIENT, ECHO2, TCP, 40000, 9090)) == \
        (POLICY_VERDICT, "forwarded", MATCH_L3_L4)
    assert reported(Packet(CLIENT, ECHO2, UDP, 40000, 5353)) == \
        (POLICY_VERDICT, "forwarded", MATCH_L3_PROTO)
    assert reported(Packet(CLIENT, REMOTE, UDP, 40000, 53)) == \
        (POLICY_VERDICT, "forwarded", MATCH_L4_ONLY)
    # the peer's any port against any peer's UDP/53: any identity's prefix is longer
    assert reported(Packet(CLIENT, ECHO, UDP, 40000, 53)) == \
        (POLICY_VERDICT, "forwarded", MATCH_L4_ONLY)
    # the peer's UDP against any peer's UDP/53: longer again
    assert reported(Packet(CLIENT, ECHO2, UDP, 40001, 53)) == \
        (POLICY_VERDICT, "forwarded", MATCH_L4_ONLY)
    assert reported(Packet(CLIENT, REMOTE, SCTP, 40000, 80)) == \
        (POLICY_VERDICT, "forwarded", MATCH_PROTO_ONLY)
    assert reported(Packet(CLIENT, ECHO, TCP, 40001, 5000)) == \
        (DROP, "policy_deny", MATCH_L4_ONLY)
    assert reported(Packet(CLIENT, WORLD, TCP, 40000, 80)) == \
        (DROP, "policy_default", MATCH_NONE)
    driver.start(named_scenario([ALL_EGRESS], []))
    judge.events()
    assert reported(Packet(CLIENT, WORLD, TCP, 40000, 80)) == \
        (POLICY_VERDICT, "forwarded", MATCH_ALL)


def test_a_full_buffer_loses_events_and_counts_them_never_the_packets():
    """One page per CPU holds some 40 records: a burst of 300 drops overflows it. The
    programs still drop every packet; every event is either handed over or counted lost."""
    with kernel_judge(event_pages=1) as small:
        driver = ScenarioDriver(small)
        driver.start(named_scenario([], []))
        small.events()
        spoofed = [Packet(ECHO, WORLD, TCP, 1000 + n, 80).frame() for n in range(300)]
        assert {small.outcome(1, EGRESS, frame) for frame in spoofed} == {"spoofed"}
        small.events()  # the kernel reports what it lost with the next event it can write
        assert small.outcome(1, EGRESS, spoofed[0]) == "spoofed"
        handed = small.events()
        assert small.sink.lost_total > 0
        assert small.sink.published_total + small.sink.lost_total == 301
        assert handed and all(e.kind == DROP for e in handed)


def test_without_flow_events_the_programs_report_drops_only():
    """``--enable-hubble=false`` (FLOW_EVENTS 0): no policy verdict, audit or trace; drops
    as ever."""
    with kernel_judge(flow_events=False) as quiet:
        driver = ScenarioDriver(quiet)
        scenario = named_scenario([{"ingress": [{}], "egress": [{}]}], [])
        audited = attrs.evolve(scenario.endpoints[1], policy_audit=True)
        driver.start(attrs.evolve(scenario, endpoints=(scenario.endpoints[0], audited,
                                                       scenario.endpoints[2])))
        quiet.events()
        to_world = Packet(CLIENT, WORLD, TCP, 40000, 80)
        assert quiet.outcome(1, EGRESS, to_world.frame()) == "policy-default"
        assert [(e.kind, e.verdict) for e in quiet.events()] == [(DROP, DROPPED)]
        from_echo = Packet(ECHO, WORLD, TCP, 40000, 80)
        assert quiet.outcome(2, EGRESS, from_echo.frame()) == "forwarded"  # audited
        assert quiet.outcome(2, INGRESS, from_echo.reply().frame()) == "forwarded"
        assert quiet.events() == []


def test_policy_entries_written_before_prefix_lengths_get_theirs_at_the_first_sync(judge,
                                                                                    driver):
    """An earlier agent's policy map holds a match type (or padding) where entries now keep
    their prefix length: the reconcile of the first sync writes it, verdicts unchanged."""
    from meshagent.plugins.ebpf.maps import POLICY_PREFIX_STATIC
    to_echo = {"egress": [{"toEndpoints": [{"matchLabels": {"app": "echo"}}], "toPorts": [
        {"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}
    scenario = named_scenario([ALL_EGRESS, to_echo], [])
    driver.start(scenario)
    table = judge.datapath.maps["policy"]
    written = {bytes(key): value.verdict for key, value in table.items()}
    assert written
    for key, value in table.items():
        value.prefix = 1  # the byte held MATCH_L3_ONLY
        table.put(key, value)
    driver.start(scenario)  # a reconcile, as after a restart
    prefixes = set()
    for key, value in table.items():
        assert value.prefix == key.prefixlen - POLICY_PREFIX_STATIC
        assert value.verdict == written.pop(bytes(key))
        prefixes.add(value.prefix)
    assert not written
    assert prefixes == {0, 24}


def test_a_burst_of_new_connections_fits_the_default_buffer(judge, driver):
    """1,000 new connections between two pods of the node (two policy verdicts each) with
    the agent reading nothing meanwhile: the default buffer (64 pages) loses none."""
    driver.start(named_scenario([ALL_EGRESS], []))
    judge.events()
    lost = judge.sink.lost_total
    for n in range(1000):
        judge.run(1, EGRESS, Packet(CLIENT, ECHO, TCP, 10000 + n, 8080).frame())
    assert len(judge.events()) == 2000
    assert judge.sink.lost_total == lost


def test_icmp_events_carry_type_and_code_where_the_observer_reads_them(judge, driver):
    """ICMP has no ports: an event's source port is the ICMP header's type and code
    (``type << 8 | code``), as meshagent.observe reads it; the destination port stays 0."""
    from meshagent.testing.packets import ICMP, ICMPV6
    from meshagent.testing.scenarios import CLIENT6
    driver.start(named_scenario([ALL_EGRESS], []))
    judge.events()
    judge.delivery(1, EGRESS, Packet(CLIENT, WORLD, ICMP).frame())  # an echo request
    judge.delivery(1, EGRESS, Packet(CLIENT6, "2a00:1::1", ICMPV6, icmp_type=129).frame())
    unreachable = bytearray(Packet(CLIENT, "198.18.0.2", ICMP, icmp_type=3).frame())
    unreachable[14 + 20 + 1] = 1  # code 1, host unreachable (tc checks no ICMP checksum)
    judge.delivery(1, EGRESS, bytes(unreachable))
    assert [(e.protocol, e.source_port, e.destination_port) for e in judge.events()] == \
        [(ICMP, 8 << 8, 0), (ICMPV6, 129 << 8, 0), (ICMP, 3 << 8 | 1, 0)]
