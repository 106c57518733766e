"""The nftables datapath against the datapath contract, packets
sent through veths in a private network namespace (BPF_PROG_TEST_RUN does not apply)."""

import asyncio
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import attrs
import pytest

from meshagent.datapath.feed import BatchFeed
from meshagent.testing import datapath_model as model
from meshagent.testing.datapath_contract import DatapathContract, ScenarioDriver
from meshagent.testing.packets import KERNEL_WALK
from meshagent.testing.scenarios import (
    ALL_EGRESS,
    CLIENT,
    CLIENT6,
    ECHO,
    ECHO2,
    ECHO6,
    REMOTE,
    named_scenario,
    tcp,
)
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not can_run(), reason="needs root")]

REASONS = {"forwarded": model.FORWARDED, "policy_deny": model.POLICY_DENY,
           "policy_default": model.POLICY_DEFAULT, "spoofed": model.SPOOFED,
           "frag_tiny": model.FRAG_TINY, "frag_unknown": model.FRAG_UNKNOWN,
           "malformed": model.MALFORMED_PACKET, "unsupported_l3": model.UNSUPPORTED_L3,
           "redirected": model.REDIRECTED, "proxy_lookup": "proxy-lookup-failed",
           "proxy_unsupported": model.PROXY_UNSUPPORTED}


class NamespaceJudge:
    """The nftables datapath in a private netns with a veth pair per endpoint (h<ifindex> on
    the host side, p<ifindex> in the "pod"); frames are sent on one end and judged by the
    reason counters. Its events are every one the table logged: the suite needs them all, so
    the rates are high (the limits have tests of their own)."""

    #: the contract's judge: every event logged
    UNLIMITED = dict(event_rate=1_000_000, drop_rate=1_000_000)

    def __init__(self, settings=None):
        from pyroute2 import netns as pynetns

        from meshagent.plugins.nftables.datapath import NftablesDatapath, NftablesSettings
        self.name = f"ma-nft-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        # no IPv6 of its own on the veths (router solicitations, MLD): only the test's frames
        subprocess.run(["ip", "netns", "exec", self.name, "sysctl", "-q", "-w",
                        "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        for ifindex in range(101, 104):
            subprocess.run(["ip", "-n", self.name, "link", "add", f"h{ifindex}", "type", "veth",
                            "peer", "name", f"p{ifindex}"], check=True)
            for dev in (f"h{ifindex}", f"p{ifindex}"):
                subprocess.run(["ip", "-n", self.name, "link", "set", dev, "up"], check=True)
        self.sockets: dict[str, socket.socket] = {}
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)
        pynetns.setns(self.name)
        self.loop = asyncio.new_event_loop()
        self.datapath = NftablesDatapath(settings or NftablesSettings(**self.UNLIMITED),
                                         device_of=lambda ifindex: f"h{ifindex}")
        self.feed = BatchFeed(self.datapath)
        self.reported: list = []
        self.datapath.events.subscribe(self.reported.append)
        try:
            self.call(self.datapath.start())
        except BaseException:  # no namespace left behind by a datapath that did not start
            self.close()
            raise

    def close(self) -> None:
        from pyroute2 import netns as pynetns
        for sock in self.sockets.values():
            sock.close()
        if self.datapath.started:
            self.call(self.datapath.stop())
        self.loop.close()
        pynetns.setns(self.home)
        os.close(self.home)
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def call(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def forget_connections(self) -> None:
        """No fragment records (the reply sets went with the endpoints' chains: the driver
        removed every endpoint first)."""
        import nftables
        t = self.datapath.rules.ref
        rc, _, err = nftables.Nftables().cmd("\n".join(
            f"flush map {t} {name}{sfx}" for name in ("fsm", "fdm", "fsc", "fdc")
            for sfx in ("", "6")))
        assert rc == 0, err

    def events(self) -> list:
        """The events logged since the last call. A packet's log rule runs before the counter
        its judgement moves, and the table's NFLOG messages are sent one by one as they are
        logged, so once :meth:`delivery` returned its events are in the socket: read out."""
        async def drain():
            self.datapath.read_events()
        self.call(drain())
        out = list(self.reported)
        self.reported.clear()
        return out

    def delivery(self, endpoint_id: int, direction: str, frame: bytes) -> tuple[str, bool]:
        ifindex = 100 + endpoint_id
        device = f"p{ifindex}" if direction == model.EGRESS else f"h{ifindex}"
        before = self.datapath.counters()
        if device not in self.sockets:  # kept open: closing a packet socket waits for RCU
            self.sockets[device] = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            self.sockets[device].bind((device, 0))
        try:
            self.sockets[device].send(frame)
        except OSError:  # ENOBUFS: the egress hook dropped it
            pass
        deadline = time.monotonic() + 1.0
        while True:  # a frame sent into a veth is judged on the other end, a moment later
            after = self.datapath.counters()
            moved = [REASONS[name] for name in after if after[name] != before.get(name)]
            if moved or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        return (moved[0] if len(moved) == 1 else f"counters moved: {moved}"), False


@pytest.fixture(scope="module")
def judge():
    judge = NamespaceJudge()
    yield judge
    judge.close()


@pytest.fixture
def driver(judge):
    return ScenarioDriver(judge, local_delivery=False, walk=KERNEL_WALK)


class TestNftablesDatapathContract(DatapathContract):
    expects_local_delivery = False
    ipv6_walk = KERNEL_WALK
    kept_cases = Path(__file__).parent / "datapath_cases"


def _names(table: str) -> set[str]:
    """Every chain, map, set and limit of the table."""
    import json

    import nftables
    nft = nftables.Nftables()
    nft.set_json_output(True)
    names = set()
    for what in ("chains", "maps", "sets", "limits"):
        rc, out, err = nft.cmd(f"list {what} netdev")
        assert rc == 0, err
        for item in json.loads(out)["nftables"]:
            for kind in ("chain", "map", "set", "limit"):
                if kind in item and item[kind]["table"] == table:
                    names.add(item[kind]["name"])
    return names


def test_removing_an_endpoint_leaves_nothing_of_it(judge, driver):
    import re

    from meshagent.plugins.nftables import ruleset
    driver.start(named_scenario([ALL_EGRESS], [tcp(ECHO, 80)]))
    before = _names(judge.datapath.rules.table)
    mine = {n for n in before if re.search(r"_1(_|$)", n) and n != ruleset.LAYOUT}
    assert {"ep_1_ingress", "ep_1_egress", "spec4_1_out", "rep6_1_in", "fsn4_1_out",
            "ev_1_in"} <= mine
    endpoint = driver.endpoints[1]
    driver.replay([lambda feed: feed.endpoint_removed(endpoint)])
    assert _names(judge.datapath.rules.table) == before - mine
    driver.replay([lambda feed: feed.endpoint_added(endpoint)])
    assert _names(judge.datapath.rules.table) == before


def test_an_endpoint_changed_in_place_keeps_its_policy(judge, driver):
    """An endpoint handed over again under its id on its device (a relabel: a new identity)
    keeps its chains and policy maps; its policy entries are still in force."""
    import attrs
    deny = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [{"port": "6379",
                                                                   "protocol": "TCP"}]}]}]}
    scenario = named_scenario([deny], [tcp(ECHO, 80), tcp(ECHO, 6379)])
    driver.start(scenario)
    relabelled = attrs.evolve(driver.endpoints[1], identity=driver.endpoints[1].identity + 7)
    driver.replay([lambda feed: feed.endpoint_added(relabelled)])
    got = [judge.delivery(p.endpoint, p.direction, p.packet.frame())[0]
           for p in scenario.phases[0].probes]
    assert got == [model.FORWARDED, model.POLICY_DENY]


def test_a_restarted_agent_keeps_enforcing_and_keeps_replies(judge, driver):
    """The table outlives the agent: a new one adopts it, changes nothing until its first
    sync (the old verdicts and reply entries hold), then enforces the new state."""
    from meshagent.events import ChangeKind
    from meshagent.plugins.nftables.datapath import NftablesDatapath, NftablesSettings
    from meshagent.policy.contract import MapChange, MapKey, Verdict
    deny = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [{"port": "6379",
                                                                   "protocol": "TCP"}]}]}]}
    scenario = named_scenario([deny], [tcp(ECHO, 80), tcp(ECHO, 6379)])
    world = driver.start(scenario)
    (d80, syn80), (d6379, syn6379) = [(p.direction, p.packet.frame())
                                      for p in scenario.phases[0].probes]
    reply = scenario.phases[0].probes[0].packet.reply()
    verdict = lambda direction, frame: judge.delivery(1, direction, frame)[0]  # noqa: E731
    assert verdict(d80, syn80) == model.FORWARDED
    assert verdict(model.INGRESS, reply.frame()) == model.FORWARDED

    judge.call(judge.datapath.stop())
    judge.datapath = NftablesDatapath(NftablesSettings(**NamespaceJudge.UNLIMITED),
                                      device_of=lambda ifindex: f"h{ifindex}")
    judge.datapath.events.subscribe(judge.reported.append)
    judge.feed = BatchFeed(judge.datapath)
    judge.call(judge.datapath.start())
    assert judge.datapath.adopted
    assert verdict(d6379, syn6379) == model.POLICY_DENY  # before any endpoint is restored
    driver.replay([lambda feed, e=e: feed.endpoint_added(e) for e in driver.endpoints.values()])
    deny80 = MapChange(ChangeKind.UPSERT, MapKey(model.EGRESS, 0, 6, 80, 80), Verdict.DENY)
    driver.replay([lambda feed: feed.policy_changed({1: [deny80]})])  # waits for the sync
    assert verdict(d80, syn80) == model.FORWARDED
    assert verdict(d6379, syn6379) == model.POLICY_DENY
    assert verdict(model.INGRESS, reply.frame()) == model.FORWARDED

    nothing = {1: {}, **{e: world.verdicts().get(e, {}) for e in driver.endpoints if e != 1}}
    judge.call(judge.feed.reconcile(nothing, list(world.ipcache.values()), ()))
    driver.replay([])
    assert verdict(d80, syn80) == model.POLICY_DEFAULT  # endpoint 1 now allows nothing
    assert verdict(model.INGRESS, reply.frame()) == model.FORWARDED  # its reply entry kept


def test_a_batchs_ipcache_and_policy_changes_are_one_transaction(judge, driver):
    """The contract's middle step (policy and ipcache, no packet both states deny passing)
    is met by atomicity here: both in one libnftables transaction."""
    import ipaddress

    from meshagent.events import ChangeKind
    from meshagent.model.ipcache import IPCacheEntry
    from meshagent.policy.contract import MapChange, MapKey, Verdict
    driver.start(named_scenario([ALL_EGRESS], [tcp(ECHO, 80)]))
    entry = IPCacheEntry(ipaddress.ip_network("10.2.0.5/32"), 4242, "cluster1")
    deny = MapChange(ChangeKind.UPSERT, MapKey(model.EGRESS, 4242, 6, 80, 80), Verdict.DENY)
    nft, sent = judge.datapath.nft, []
    real = nft.json_cmd
    nft.json_cmd = lambda doc: (sent.append(doc), real(doc))[1]
    try:
        driver.replay([lambda feed: feed.ipcache_changed(ChangeKind.UPSERT, entry),
                       lambda feed: feed.policy_changed({1: [deny]})])
    finally:
        del nft.json_cmd
    assert len(sent) == 1
    maps = {command[verb]["element"]["name"] for command in sent[0]["nftables"]
            for verb in command if "element" in command[verb]}
    assert "ipcache4" in maps and any(name.startswith("spec4_1") for name in maps), maps
    # and every endpoint's connections are judged again under the new state (the ipcache
    # changed): the sets of judged connections are flushed in the same transaction
    flushed = {command["flush"]["set"]["name"] for command in sent[0]["nftables"]
               if "flush" in command}
    assert {f"fsn4_{e}_out" for e in driver.endpoints} <= flushed, flushed


def test_drops_are_noticed_with_reason_endpoint_and_addresses(judge, driver):
    deny = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [{"port": "6379",
                                                                   "protocol": "TCP"}]}]}]}
    scenario = named_scenario([deny], [tcp(ECHO, 6379)])
    driver.start(scenario)
    feed = judge.datapath.events  # a FlowEvents when the test built the datapath without one
    seen = len(feed.recent)
    probe = scenario.phases[0].probes[0]
    assert judge.delivery(probe.endpoint, probe.direction, probe.packet.frame())[0] == \
        model.POLICY_DENY
    deadline = time.monotonic() + 2
    while len(feed.recent) == seen and time.monotonic() < deadline:
        judge.loop.run_until_complete(asyncio.sleep(0.01))  # the NFLOG reader runs here
    event = feed.recent[-1]
    assert (event.kind, event.verdict, event.reason) == ("drop", "dropped", "policy_deny")
    assert (event.endpoint, event.direction) == (probe.endpoint, "egress")
    assert (event.source_ip, event.destination_ip) == (probe.packet.src, ECHO)
    assert event.destination_port == 6379 and event.tcp_flags == 0x02
    assert event.source_identity == driver.endpoints[probe.endpoint].identity


def test_a_refused_write_is_healed_by_the_next_reconcile(judge, driver):
    """Someone wrote into the agent's table; the agent's next write collides and is refused
    (the feed then reconciles): the reconcile rewrites the maps whole, the intruder's range
    goes and the agent's state is all there."""
    import ipaddress

    import nftables

    from meshagent.events import ChangeKind
    from meshagent.model.ipcache import IPCacheEntry
    from meshagent.plugins.nftables.datapath import NftablesError
    world = driver.start(named_scenario([ALL_EGRESS], [tcp(ECHO, 80)]))
    t = judge.datapath.rules.ref
    nft = nftables.Nftables()
    assert nft.cmd(f"add element {t} ipcache4 {{ 10.9.0.0-10.9.255.255 : 99 }}")[0] == 0
    entry = IPCacheEntry(ipaddress.ip_network("10.9.1.1/32"), 4242, "cluster1")
    with pytest.raises(NftablesError, match="refused"):
        driver.replay([lambda feed: feed.ipcache_changed(ChangeKind.UPSERT, entry)])
    rows = list(world.ipcache.values()) + [entry]
    judge.call(judge.feed.reconcile(world.verdicts(), rows, ()))
    listed = nft.cmd(f"list map {t} ipcache4")[1]
    assert "10.9.0.0" not in listed and "10.9.1.1 : 0x00001092" in listed, listed


def test_events_from_hostile_log_lines_are_refused_or_bounded(judge):
    """The NFLOG group may carry another program's lines, or packets cut anywhere: an event
    is made only of what was read, never an exception in the agent's loop."""
    from meshagent.testing.packets import Packet
    describe = judge.datapath.describe
    for prefix in ("", "ma", "ma:1:in", "ma:1:in:policy_default", "ma:x:in:drop:malformed:0",
                   "ma:1:up:drop:malformed:0", "ma:1:in:drop:nosuch:0", "xx:1:in:drop:malformed:0",
                   "ma:1:in:drop:forwarded:0", "ma:1:in:verdict:policy_deny:2",
                   "ma:1:in:audit:spoofed:0", "ma:1:in:audit:forwarded:0",
                   "ma:1:in:drop:malformed:7",
                   "ma:1:in:drop:malformed:", "ma:\u00b2:in:drop:malformed:0",
                   "ma:12345678901:in:drop:malformed:0", "ma:1:in:bogus:forwarded:0",
                   "ma:1:in:drop:malformed:0:extra"):
        assert describe(prefix, b"\x45" * 40) is None, prefix
    frame = Packet("10.1.1.9", "10.1.1.1", 6, 1234, 80).frame()[14:]
    for cut in range(len(frame) + 1):
        event = describe("ma:1:in:drop:policy_default:0 ", frame[:cut])
        assert event is not None and event.reason == "policy_default"
    assert describe("ma:1:in:drop:policy_default:0", frame).source_port == 1234
    ping = Packet("10.1.1.9", "10.1.1.1", ICMP).frame()[14:]  # an echo request: type 8, code 0
    assert [describe("ma:1:in:drop:policy_default:0", ping[:cut]).source_port
            for cut in (21, 22, len(ping))] == [0, 8 << 8, 8 << 8]
    event = describe("ma:1:in:audit:policy_deny:3", frame)
    assert (event.kind, event.verdict, event.reason, event.match, event.is_reply) == \
        ("policy-verdict", "audit", "policy_deny", 3, False)
    event = describe("ma:1:out:reply:forwarded:0", frame)
    assert (event.kind, event.verdict, event.direction, event.is_reply) == \
        ("trace", "forwarded", "egress", True)


# -- flow events and policy audit mode ---------------------------------------------------------

ECHO_ID = (101 << 16) + 258  # named_scenario's identities
FIN, RST, ICMP = 0x01, 0x04, 1
TO_ECHO_80 = {"egress": [{"toEndpoints": [{"matchLabels": {"app": "echo"}}],
                          "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}


def judged(judge, endpoint: int, direction: str, packet):
    """The outcome of one packet at an endpoint's hook, and the events it was reported by as
    ``(kind, verdict, reason, direction, is_reply, match)``."""
    judge.events()
    outcome = judge.delivery(endpoint, direction, packet.frame())[0]
    return outcome, [(e.kind, e.verdict, e.reason, e.direction, e.is_reply, e.match)
                     for e in judge.events()]


def verdict(direction, match, verdict="forwarded", reason="forwarded"):
    return ("policy-verdict", verdict, reason, direction, False, match)


def trace(direction, is_reply):
    return ("trace", "forwarded", "forwarded", direction, is_reply, 0)


def drop(direction, reason, match):
    return ("drop", "dropped", reason, direction, False, match)


def test_a_connection_is_reported_once_then_its_first_reply_and_new_tcp_flags(judge, driver):
    """Hubble's view of one TCP connection: the policy verdict of its first packet (match
    L3+L4: the peer's identity and a port), the first reply, each of SYN/FIN/RST once per
    direction; nothing else of it."""
    from meshagent.testing.packets import ACK, Packet
    driver.start(named_scenario([TO_ECHO_80], []))
    syn = Packet(CLIENT, ECHO, 6, 40000, 80)
    out, into = model.EGRESS, model.INGRESS
    steps = [
        (out, syn, [verdict("egress", 2)]),
        (out, syn, []),  # a retransmitted SYN: judged, nothing new
        (into, syn.reply(), [trace("ingress", True)]),  # SYN|ACK: the first reply
        (into, attrs.evolve(syn.reply(), tcp_flags=ACK), []),
        (out, attrs.evolve(syn, tcp_flags=ACK), []),
        (out, attrs.evolve(syn, tcp_flags=FIN | ACK), [trace("egress", False)]),
        (out, attrs.evolve(syn, tcp_flags=FIN | ACK), []),
        (into, attrs.evolve(syn.reply(), tcp_flags=RST), [trace("ingress", True)]),
        (into, attrs.evolve(syn.reply(), tcp_flags=RST | ACK), []),
    ]
    for n, (direction, packet, expected) in enumerate(steps):
        assert judged(judge, 1, direction, packet) == (model.FORWARDED, expected), n
    judge.events()
    judge.delivery(1, out, Packet(CLIENT, ECHO, 6, 40001, 80).frame())
    event, = judge.events()
    assert (event.source_ip, event.source_port, event.destination_ip, event.destination_port,
            event.protocol, event.tcp_flags) == (CLIENT, 40001, ECHO, 80, 6, 0x02)
    assert (event.endpoint, event.source_identity, event.destination_identity) == \
        (1, driver.endpoints[1].identity, ECHO_ID)


def test_policy_verdicts_name_the_match_type_as_hubble_numbers_it(judge, driver):
    """As Cilium 1.17+ (bpf/lib/policy.h) and the contract's model: the deciding entry is the
    longest prefix over (protocol, port) of each lookup; of two allows the peer's unless any
    identity's is longer. The peer's identity: L3-Only 1 (any protocol), L3-Proto 5 (a
    protocol), L3-L4 2 (a port); any identity: all 4, Proto-Only 6, L4-Only 3. IPv6 and
    portless protocols alike."""
    from meshagent.testing.packets import Packet
    l3 = {"egress": [{"toEndpoints": [{"matchLabels": {"app": "echo2"}}]}]}
    l3l4 = {"egress": [{"toEndpoints": [{"matchLabels": {"app": "echo2"}}],
                        "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}
    l4 = {"egress": [{"toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]}
    l3proto = {"egress": [{"toEndpoints": [{"matchLabels": {"app": "echo"}}],
                           "toPorts": [{"ports": [{"port": "0", "protocol": "UDP"}]}]}]}
    proto = {"egress": [{"toPorts": [{"ports": [{"port": "0", "protocol": "SCTP"}]}]}]}
    worlds = [([TO_ECHO_80, l3, l3l4, l4, l3proto, proto],
               [(Packet(CLIENT, ECHO2, 6, 40000, 9000), 1),
                (Packet(CLIENT, ECHO2, 6, 40000, 8080), 2),  # the peer's port beats its any
                (Packet(CLIENT, ECHO2, 6, 40000, 443), 3),  # any peer's port beats the peer's any
                (Packet(CLIENT, ECHO, 6, 40000, 80), 2),
                (Packet(CLIENT, ECHO, 6, 40000, 443), 3),
                (Packet(CLIENT, ECHO, 17, 40000, 5353), 5),
                (Packet(CLIENT, REMOTE, 132, 40000, 80), 6),
                (Packet(CLIENT6, ECHO6, 6, 40000, 80), 2),
                (Packet(CLIENT, ECHO2, ICMP, 0, 0), 1)]),
              ([ALL_EGRESS, l4], [(Packet(CLIENT, REMOTE, 17, 40000, 53), 4),
                                  (Packet(CLIENT, ECHO, 6, 40000, 443), 3),  # the longer
                                  (Packet(CLIENT, REMOTE, ICMP, 0, 0), 4)])]
    for policies, cases in worlds:
        driver.start(named_scenario(policies, []))
        for packet, match in cases:
            assert judged(judge, 1, model.EGRESS, packet) == \
                (model.FORWARDED, [verdict("egress", match)]), packet


def test_drops_by_a_deny_rule_and_by_default_are_told_apart(judge, driver):
    """A deny rule's drop is ``policy_deny`` with the deny entry's match type (Hubble's
    POLICY_DENY, 181); no entry is ``policy_default`` with none (POLICY_DENIED, 133)."""
    from meshagent.testing.packets import Packet
    l3 = {"egress": [{"toEndpoints": [{"matchLabels": {"app": "echo"}}]}]}
    deny_l4 = {"egressDeny": [{"toPorts": [{"ports": [{"port": "6379", "protocol": "TCP"}]}]}]}
    deny_l3l4 = {"egressDeny": [{"toEndpoints": [{"matchLabels": {"app": "echo"}}],
                                 "toPorts": [{"ports": [{"port": "22", "protocol": "TCP"}]}]}]}
    deny_l3proto = {"egressDeny": [{"toEndpoints": [{"matchLabels": {"app": "echo2"}}],
                                    "toPorts": [{"ports": [{"port": "0", "protocol": "UDP"}]}]}]}
    driver.start(named_scenario([l3, deny_l4, deny_l3l4, deny_l3proto], []))
    cases = [(Packet(CLIENT, ECHO, 6, 40000, 6379), drop("egress", "policy_deny", 3)),
             (Packet(CLIENT, ECHO, 6, 40000, 22), drop("egress", "policy_deny", 2)),
             (Packet(CLIENT, ECHO2, 17, 40000, 53), drop("egress", "policy_deny", 5)),
             (Packet(CLIENT, ECHO2, 6, 40000, 80), drop("egress", "policy_default", 0))]
    for packet, event in cases:
        outcome = model.POLICY_DENY if event[2] == "policy_deny" else model.POLICY_DEFAULT
        assert judged(judge, 1, model.EGRESS, packet) == (outcome, [event]), packet
        assert judged(judge, 1, model.EGRESS, packet) == (outcome, [event]), "every drop"


def test_audit_mode_passes_what_policy_would_drop_and_turning_it_off_cuts_it(judge, driver):
    """An endpoint in audit mode: a packet policy would drop passes, is tracked (its reply
    passes) and is reported once as AUDIT with the reason and match it would have been
    dropped with; a packet dropped for another reason is still dropped. Audit mode off: the
    audited connection is judged again and dropped."""
    from meshagent.testing.packets import ACK, Packet
    deny = {"egressDeny": [{"toPorts": [{"ports": [{"port": "6379", "protocol": "TCP"}]}]}]}
    driver.start(named_scenario([TO_ECHO_80, deny], []))
    client = driver.endpoints[1]
    driver.replay([lambda feed: feed.endpoint_added(attrs.evolve(client, policy_audit=True))])
    default, denied = Packet(CLIENT, ECHO2, 6, 40000, 80), Packet(CLIENT, ECHO, 6, 40000, 6379)
    out, into = model.EGRESS, model.INGRESS
    audit = "audit"
    assert judged(judge, 1, out, default) == \
        (model.FORWARDED, [verdict("egress", 0, audit, "policy_default")])
    assert judged(judge, 1, out, attrs.evolve(default, tcp_flags=ACK)) == (model.FORWARDED, [])
    assert judged(judge, 1, into, default.reply()) == \
        (model.FORWARDED, [trace("ingress", True)])
    assert judged(judge, 1, out, denied) == \
        (model.FORWARDED, [verdict("egress", 3, audit, "policy_deny")])
    assert judged(judge, 1, out, Packet(CLIENT, ECHO, 6, 40000, 80)) == \
        (model.FORWARDED, [verdict("egress", 2)])  # allowed is allowed
    spoofed = Packet(ECHO2, ECHO, 6, 40000, 80)
    assert judged(judge, 1, out, spoofed) == \
        (model.SPOOFED, [drop("egress", "spoofed", 0)])  # never audited

    driver.replay([lambda feed: feed.endpoint_added(attrs.evolve(client, policy_audit=False))])
    assert judged(judge, 1, out, attrs.evolve(default, tcp_flags=ACK)) == \
        (model.POLICY_DEFAULT, [drop("egress", "policy_default", 0)])
    reply = attrs.evolve(default.reply(), tcp_flags=ACK)  # its reply entry is still there
    assert judged(judge, 1, into, reply) == (model.FORWARDED, [])
    assert judged(judge, 1, out, denied) == \
        (model.POLICY_DENY, [drop("egress", "policy_deny", 3)])


def test_a_policy_change_reports_known_connections_again(judge, driver):
    """A connection allowed before a policy change is judged again: its next packet is a
    policy verdict again (or a drop, if the change denies it)."""
    from meshagent.events import ChangeKind
    from meshagent.policy.contract import MapChange, MapKey, Verdict
    from meshagent.testing.packets import ACK, Packet
    driver.start(named_scenario([TO_ECHO_80], []))
    syn = Packet(CLIENT, ECHO, 6, 40000, 80)
    ack = attrs.evolve(syn, tcp_flags=ACK)
    assert judged(judge, 1, model.EGRESS, syn)[1] == [verdict("egress", 2)]
    assert judged(judge, 1, model.EGRESS, ack)[1] == []
    other = MapChange(ChangeKind.UPSERT, MapKey(model.EGRESS, ECHO_ID, 17, 53, 53), Verdict.ALLOW)
    driver.replay([lambda feed: feed.policy_changed({1: [other]})])
    assert judged(judge, 1, model.EGRESS, ack)[1] == [verdict("egress", 2)]
    assert judged(judge, 1, model.EGRESS, ack)[1] == []
    deny = MapChange(ChangeKind.UPSERT, MapKey(model.EGRESS, 0, 6, 80, 80), Verdict.DENY)
    driver.replay([lambda feed: feed.policy_changed({1: [deny]})])
    assert judged(judge, 1, model.EGRESS, ack) == \
        (model.POLICY_DENY, [drop("egress", "policy_deny", 3)])


def set_elements(judge, name: str) -> dict[tuple, int]:
    """One of the table's sets: each element's key, and the seconds until it expires."""
    import json

    import nftables
    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, err = nft.cmd(f"list set {judge.datapath.rules.ref} {name}")
    assert rc == 0, err
    found, = (o["set"] for o in json.loads(out)["nftables"] if "set" in o)
    elements = {}
    for element in found.get("elem", []):
        key = element["elem"]["val"]["concat"]
        elements[tuple(k if isinstance(k, (int, str)) else json.dumps(k) for k in key)] = \
            element["elem"].get("expires", 0)
    return elements


def test_a_known_connection_passes_by_its_established_entry_until_a_change(judge, driver):
    """After a packet found its connection judged (or its reply seen), the connection's later
    packets without SYN, FIN or RST pass at the top of the hook by one set lookup: with its
    judged entry gone, the next packet is still not judged again. A policy change empties
    the established sets with the judged ones: the next packet is judged again."""
    import nftables

    from meshagent.events import ChangeKind
    from meshagent.policy.contract import MapChange, MapKey, Verdict
    from meshagent.testing.packets import ACK, Packet
    driver.start(named_scenario([TO_ECHO_80], []))
    syn = Packet(CLIENT, ECHO, 6, 40000, 80)
    ack, reply = attrs.evolve(syn, tcp_flags=ACK), attrs.evolve(syn.reply(), tcp_flags=ACK)
    out, into = model.EGRESS, model.INGRESS
    assert judged(judge, 1, out, syn)[1] == [verdict("egress", 2)]
    assert set_elements(judge, "est4_1_out") == {}  # a first packet is not established yet
    assert judged(judge, 1, into, attrs.evolve(syn.reply(), tcp_flags=0x12))[1] == \
        [trace("ingress", True)]
    assert judged(judge, 1, out, ack) == (model.FORWARDED, [])
    assert judged(judge, 1, into, reply) == (model.FORWARDED, [])
    assert set(set_elements(judge, "est4_1_out")) == {(CLIENT, ECHO, "tcp", 40000, 80)}
    assert set(set_elements(judge, "est4_1_in")) == {(ECHO, CLIENT, "tcp", 80, 40000)}
    t = judge.datapath.rules.ref
    rc, _, err = nftables.Nftables().cmd(f"flush set {t} fsn4_1_out")
    assert rc == 0, err
    assert judged(judge, 1, out, ack) == (model.FORWARDED, [])  # not judged: established
    deny = MapChange(ChangeKind.UPSERT, MapKey(model.EGRESS, 0, 6, 80, 80), Verdict.DENY)
    driver.replay([lambda feed: feed.policy_changed({1: [deny]})])
    assert set_elements(judge, "est4_1_out") == {}
    assert judged(judge, 1, out, ack) == \
        (model.POLICY_DENY, [drop("egress", "policy_deny", 3)])


def test_a_closing_connection_leaves_the_sets_soon(judge, driver):
    """Once both directions of a TCP connection sent a FIN, or either an RST, its elements
    expire 10 s later (Cilium's CT_CLOSE_TIMEOUT), not after the flow timeout: closed
    connections do not fill the sets. Until then it is still known (no event)."""
    from meshagent.plugins.nftables.ruleset import CLOSE_TIMEOUT
    from meshagent.testing.packets import ACK, Packet
    driver.start(named_scenario([TO_ECHO_80], []))
    out, into = model.EGRESS, model.INGRESS
    syn = Packet(CLIENT, ECHO, 6, 40000, 80)
    for direction, packet in ((out, syn), (into, attrs.evolve(syn.reply(), tcp_flags=0x12)),
                              (out, attrs.evolve(syn, tcp_flags=ACK)),
                              (into, attrs.evolve(syn.reply(), tcp_flags=ACK)),
                              (out, attrs.evolve(syn, tcp_flags=FIN | ACK))):
        assert judged(judge, 1, direction, packet)[0] == model.FORWARDED
    names = ("fsn4_1_out", "rep4_1_in", "rsn4_1_in", "est4_1_out", "est4_1_in", "fin4_1_out")
    half = {name: set_elements(judge, name) for name in names}
    assert all(len(v) == 1 and min(v.values()) > CLOSE_TIMEOUT for v in half.values()), \
        half  # one FIN: half closed, not closing
    assert judged(judge, 1, into, attrs.evolve(syn.reply(), tcp_flags=FIN | ACK)) == \
        (model.FORWARDED, [trace("ingress", True)])
    closing = {name: set_elements(judge, name) for name in names + ("fin4_1_in",)}
    assert all(len(v) == 1 and max(v.values()) <= CLOSE_TIMEOUT
               for v in closing.values()), closing
    assert judged(judge, 1, out, attrs.evolve(syn, tcp_flags=ACK)) == (model.FORWARDED, [])
    reset = Packet(CLIENT, ECHO, 6, 40001, 80)
    for direction, packet in ((out, reset), (out, attrs.evolve(reset, tcp_flags=ACK)),
                              (out, attrs.evolve(reset, tcp_flags=RST))):
        assert judged(judge, 1, direction, packet)[0] == model.FORWARDED
    key = (CLIENT, ECHO, "tcp", 40001, 80)
    assert set_elements(judge, "est4_1_out")[key] <= CLOSE_TIMEOUT


def test_events_the_socket_could_not_take_are_counted_exactly(judge, driver):
    """A burst the agent does not read in time overflows the NFLOG socket: the kernel's
    numbering tells how many were lost, so every event is either delivered or counted."""
    from meshagent.testing.packets import Packet
    driver.start(named_scenario([ALL_EGRESS], []))
    feed, sock = judge.datapath.events, judge.datapath._log_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    got = []
    stop = feed.subscribe(got.append)
    lost = feed.lost_total
    try:
        judge.call(asyncio.sleep(0.1))  # nothing from earlier tests left
        got.clear()
        lost = feed.lost_total
        for port in range(200):  # 200 new connections, none read until all were sent
            judge.delivery(1, model.EGRESS, Packet(CLIENT, REMOTE, 17, 1000 + port, 53).frame())
        judge.delivery(1, model.EGRESS, Packet(CLIENT, REMOTE, 17, 999, 53).frame())
        judge.call(asyncio.sleep(0.2))
        judge.delivery(1, model.EGRESS, Packet(CLIENT, REMOTE, 17, 998, 53).frame())
        judge.call(asyncio.sleep(0.2))  # the last one arrives: the gap before it is known
    finally:
        stop()
        from meshagent.plugins.nftables import netlink
        sock.setsockopt(socket.SOL_SOCKET, netlink.SO_RCVBUFFORCE, netlink.RECEIVE_BUFFER)
    assert feed.lost_total - lost > 0, "the burst fit: the test proves nothing"
    assert len(got) + feed.lost_total - lost == 202
    assert got[-1].source_port == 998


@pytest.fixture
def other_judge():
    """A judge of its own, for a datapath built with other settings."""
    made = []

    def make(settings):
        made.append(NamespaceJudge(settings))
        return made[-1]
    yield make
    for other in reversed(made):
        other.close()


def test_with_hubble_disabled_only_drops_are_logged(other_judge):
    from meshagent.plugins.nftables.datapath import NftablesSettings
    from meshagent.testing.packets import Packet
    judge = other_judge(NftablesSettings(table="meshagent_drops", flows=False))
    driver = ScenarioDriver(judge, local_delivery=False, walk=KERNEL_WALK)
    driver.start(named_scenario([TO_ECHO_80], []))
    syn = Packet(CLIENT, ECHO, 6, 40000, 80)
    assert judged(judge, 1, model.EGRESS, syn) == (model.FORWARDED, [])
    assert judged(judge, 1, model.INGRESS, syn.reply()) == (model.FORWARDED, [])
    assert judged(judge, 1, model.EGRESS, Packet(CLIENT, ECHO2, 6, 40000, 80)) == \
        (model.POLICY_DEFAULT, [drop("egress", "policy_default", 0)])


def test_events_over_the_rate_are_counted_as_lost(other_judge):
    """A flood of new connections cannot flood the agent: past the rate the table counts
    instead of logging, and the agent reports those as lost."""
    from meshagent.plugins.nftables.datapath import NftablesSettings
    from meshagent.testing.packets import Packet
    judge = other_judge(NftablesSettings(table="meshagent_rate", event_rate=5))
    driver = ScenarioDriver(judge, local_delivery=False, walk=KERNEL_WALK)
    driver.start(named_scenario([ALL_EGRESS], []))
    feed = judge.datapath.events
    got = []
    stop = feed.subscribe(got.append)
    try:
        for port in range(40):
            judge.delivery(1, model.EGRESS, Packet(CLIENT, REMOTE, 17, 1000 + port, 53).frame())
        judge.call(asyncio.sleep(1.5))  # the count of those over the rate follows in a second
    finally:
        stop()
    assert 5 <= len(got) < 40
    assert len(got) + feed.lost_total == 40

