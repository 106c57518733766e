"""The eBPF datapath's flow events beyond what the contract suite compares: the facts each
record carries (addresses, ports, identities, flags, time), the match type of each kind of
policy entry (Cilium 1.17+'s rule), losses when the perf buffer is full, and drops only when compiled for
``--enable-hubble=false``. The programs run on synthetic frames (BPF_PROG_TEST_RUN)."""

import os
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


def _open(judge, syn: Packet) -> list:
    """SYN, SYN-ACK, ACK between two local pods; the events of the SYN."""
    judge.delivery(1, EGRESS, syn.frame())
    events = judge.events()
    judge.delivery(2, EGRESS, syn.reply().frame())
    judge.delivery(1, EGRESS, attrs.evolve(syn, tcp_flags=ACK).frame())
    judge.events()
    return events


def _close(judge, syn: Packet) -> None:
    """A FIN each way, then the last ACK."""
    judge.delivery(1, EGRESS, attrs.evolve(syn, tcp_flags=FIN | ACK).frame())
    judge.delivery(2, EGRESS, attrs.evolve(syn.reply(), tcp_flags=FIN | ACK).frame())
    judge.delivery(1, EGRESS, attrs.evolve(syn, tcp_flags=ACK).frame())
    judge.events()


def test_a_new_connection_on_a_closed_connections_tuple_is_judged_and_reported_again(judge,
                                                                                    driver):
    """Once both sides sent a FIN, or either an RST, a SYN on the same addresses and ports
    is a new connection (Cilium's CT_REOPENED): judged by policy at both hooks again, and its
    reply reported as a first reply again. One FIN is not a close."""
    driver.start(named_scenario([ALL_EGRESS], []))
    judge.events()
    syn = Packet(CLIENT, ECHO, TCP, 41000, 8080)
    verdicts = [(POLICY_VERDICT, 1, "egress"), (POLICY_VERDICT, 2, "ingress")]
    assert [(e.kind, e.endpoint, e.direction) for e in _open(judge, syn)] == verdicts
    _close(judge, syn)
    assert [(e.kind, e.endpoint, e.direction) for e in _open(judge, syn)] == verdicts
    judge.delivery(2, EGRESS, syn.reply().frame())
    assert judge.events() == []  # the SYN-ACK of the new connection was reported in _open
    # an RST either way closes it too
    judge.delivery(2, EGRESS, attrs.evolve(syn.reply(), tcp_flags=0x04).frame())
    judge.events()
    assert [(e.kind, e.endpoint, e.direction) for e in _open(judge, syn)] == verdicts
    # a FIN one way only: the connection is half closed, a SYN is one of its own
    judge.delivery(1, EGRESS, attrs.evolve(syn, tcp_flags=FIN | ACK).frame())
    judge.events()
    judge.delivery(1, EGRESS, syn.frame())
    assert judge.events() == []


def test_a_closed_connection_is_forgotten_after_the_close_timeout():
    """A closing connection's entries live ``ct_timeout_close`` (Cilium's CT_CLOSE_TIMEOUT),
    not the TCP lifetime: a packet after that is judged as a new connection's."""
    with kernel_judge(ct_timeout_close=0.5) as short:
        driver = ScenarioDriver(short)
        driver.start(named_scenario([ALL_EGRESS], []))
        short.events()
        syn = Packet(CLIENT, ECHO, TCP, 42000, 8080)
        _open(short, syn)
        late_ack = attrs.evolve(syn, tcp_flags=ACK).frame()
        time.sleep(1)  # open, not closing: the TCP lifetime holds
        short.delivery(1, EGRESS, late_ack)
        assert short.events() == []
        _close(short, syn)
        short.delivery(1, EGRESS, late_ack)
        assert short.events() == []  # within the close timeout: still known
        time.sleep(1)
        short.delivery(1, EGRESS, late_ack)
        assert [e.kind for e in short.events()] == [POLICY_VERDICT, POLICY_VERDICT]


def test_a_lone_event_reaches_the_agent_within_100_ms():
    """The kernel wakes the agent only once ``event_wakeup`` records are in a ring; the
    agent's periodic read delivers a lone one, while its loop runs, within 100 ms."""
    import asyncio
    with kernel_judge() as lone:
        driver = ScenarioDriver(lone)
        driver.start(named_scenario([], []))
        lone.events()

        async def delay() -> float:
            await asyncio.sleep(0.2)  # the poll's phase is anywhere
            sent = time.perf_counter()
            assert lone.outcome(1, EGRESS, Packet(ECHO, WORLD, TCP, 1000, 80).frame()) == \
                "spoofed"
            while not lone.reported:
                await asyncio.sleep(0.001)
                assert time.perf_counter() - sent < 1
            return time.perf_counter() - sent
        assert lone.call(delay()) < 0.1
        assert [e.reason for e in lone.reported] == ["spoofed"]


def test_a_ring_holding_event_wakeup_records_wakes_the_agent():
    """With the periodic read an hour away, a burst reaches the sink through the kernel's
    wakeup alone, in the order the program wrote it (one ring per CPU and program)."""
    import asyncio
    with kernel_judge(event_wakeup=16, event_poll=3600) as woken:
        driver = ScenarioDriver(woken)
        driver.start(named_scenario([], []))
        woken.events()

        async def burst() -> None:
            await asyncio.sleep(0)
            cpus = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {min(cpus)})  # one CPU: one ring, whose order is kept
            try:
                for n in range(64):
                    woken.run(1, EGRESS, Packet(ECHO, WORLD, TCP, 1000 + n, 80).frame())
            finally:
                os.sched_setaffinity(0, cpus)
            deadline = time.perf_counter() + 2
            while len(woken.reported) < 16 and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
        woken.call(burst())
        ports = [e.source_port for e in woken.reported]
        assert len(ports) >= 16
        assert ports == sorted(ports)


def test_an_ipv6_connection_reopens_as_an_ipv4_one_does(judge, driver):
    """IPv6 has conntrack maps of its own: the same closing and reopening, at one hook."""
    from meshagent.testing.scenarios import CLIENT6, ECHO6
    driver.start(named_scenario([ALL_EGRESS], []))
    judge.events()
    syn = Packet(CLIENT6, ECHO6, TCP, 43000, 8080)

    def kinds(direction: str, packet: Packet) -> list:
        judge.run(1, direction, packet.frame())
        return [e.kind for e in judge.events()]
    assert kinds(EGRESS, syn) == [POLICY_VERDICT]
    assert kinds(INGRESS, syn.reply()) == [TRACE]
    assert kinds(EGRESS, attrs.evolve(syn, tcp_flags=FIN | ACK)) == [TRACE]
    assert kinds(EGRESS, syn) == []  # half closed: still the same connection
    assert kinds(INGRESS, attrs.evolve(syn.reply(), tcp_flags=FIN | ACK)) == [TRACE]
    assert kinds(EGRESS, syn) == [POLICY_VERDICT]
    assert kinds(INGRESS, syn.reply()) == [TRACE]
