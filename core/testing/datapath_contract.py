"""The conformance suite of the datapath slot: packets get exactly the resolver's verdicts.

Random worlds (policies, identities, ipcache rows, endpoints, packets from
:mod:`meshagent.testing.scenarios`) are resolved by the real default resolver; the datapath
under test is fed through its contract only, by the core's feed as in the agent
(:class:`~meshagent.datapath.feed.BatchFeed`: a ``reconcile`` for a world's first phase,
batches after that); every packet's outcome must equal the reference model's
(:mod:`meshagent.testing.datapath_model`: the resolver's decision plus the packet rules), and
the flow events reported for it must be one of the lists the model predicts. The
changes of a later phase go into the feed as raw streams with repeated keys (:func:`raw_stream`:
deleted then re-added, added then deleted, ownership hand-overs, an endpoint removed while its
policy changes are pending, then added again), which the feed folds into net changes. The
policy-semantics table runs through it too.

A datapath plugin's tests subclass :class:`DatapathContract` and provide a ``judge`` fixture
(class or module scope) returning a :class:`DatapathJudge`: its started datapath, the feed
that is its only caller, a way to run one frame through it, and the events it reported. The
eBPF plugin's judge runs its tc programs with ``BPF_PROG_TEST_RUN``.
"""

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import attrs
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshagent.datapath import Datapath
from meshagent.datapath.events import (
    AUDIT,
    DROP,
    DROPPED,
    FORWARDED,
    MATCH_L3_L4,
    MATCH_L4_ONLY,
    POLICY_VERDICT,
    TRACE,
    FlowEvent,
)
from meshagent.datapath.feed import BatchFeed
from meshagent.events import ChangeKind
from meshagent.model.endpoint import Endpoint
from meshagent.model.ipcache import IPCacheEntry
from meshagent.policy.contract import MapChange, MapKey, Verdict
from meshagent.policy.resolver import EGRESS, INGRESS
from meshagent.policy.resolver import judge as judge_verdicts
from meshagent.testing import datapath_model as model
from meshagent.testing.packets import (
    ACK,
    CILIUM_WALK,
    ICMP,
    ICMPV6,
    SCTP,
    TCP,
    UDP,
    Packet,
    parse,
)
from meshagent.testing.policy_cases import CASES, EGRESS_CASES, IDS, cnp
from meshagent.testing.scenarios import (
    CLIENT,
    CLIENT6,
    ECHO,
    ECHO6,
    REMOTE,
    REMOTE6,
    EndpointSpec,
    IdentitySpec,
    Phase,
    Probe,
    ResolvedWorld,
    Scenario,
    minimize,
    named_scenario,
    scenarios,
)

T = TypeVar("T")
IP_TRANSPARENT = 19  # linux/in.h
IPV6_TRANSPARENT = 75  # linux/in6.h
#: every kind and verdict of flow event the random run must have seen reported
EVENT_KINDS = ("event drop dropped", "event policy-verdict forwarded",
               "event policy-verdict audit", "event trace forwarded")
#: ICMP messages judged by an entry of their type (an ``icmps`` rule): allowed, and denied
ICMP_KINDS = ("icmp by type policy-verdict forwarded", "icmp by type drop dropped")


def icmp_by_type(frame: bytes, walk: str) -> bool:
    """Whether ``frame`` is an ICMP or ICMPv6 message that shows its type (so that policy can
    judge it by an entry of its type)."""
    parsed = parse(frame, walk)
    return parsed.protocol in (ICMP, ICMPV6) and parsed.icmp_type is not None
#: every outcome a judge may report (the model's names)
OUTCOMES = (model.FORWARDED, model.POLICY_DENY, model.POLICY_DEFAULT, model.SPOOFED,
            model.FRAG_TINY, model.FRAG_UNKNOWN, model.MALFORMED_PACKET, model.UNSUPPORTED_L3)


@runtime_checkable
class DatapathJudge(Protocol):
    """A started datapath, its feed, and how to ask it what happens to one frame."""

    datapath: Datapath
    feed: BatchFeed  # ``BatchFeed(datapath)``: the suite calls the datapath through it only

    def call(self, coroutine: Awaitable[T]) -> T:
        """Run one of the datapath's coroutines to its end (on the judge's event loop)."""

    def forget_connections(self) -> None:
        """Drop every tracked connection: the next scenario starts with none."""

    def delivery(self, endpoint_id: int, direction: str, frame: bytes) -> tuple[str, bool]:
        """What the datapath does with ``frame`` (Ethernet) at the endpoint's hook: one of
        :data:`OUTCOMES` (or a description of what is wrong), and whether it delivered the
        frame straight into a local pod (a datapath that never does says False)."""

    def events(self) -> list[FlowEvent]:
        """The flow events the datapath reported since the last call, in order: all of those
        of the frames run so far (the judge waits for them, or reads them out)."""


def endpoint_of(spec: EndpointSpec) -> Endpoint:
    """The endpoint a scenario's spec stands for, as the agent would hand it over."""
    macs = dict(pod_mac=f"02:00:00:00:01:{spec.id:02x}",
                host_mac=f"02:00:00:00:02:{spec.id:02x}") if spec.local_delivery else {}
    ipv6 = ipaddress.IPv6Address(spec.ipv6) if spec.ipv6 else None
    return Endpoint(spec.id, spec.namespace, frozenset(), ipaddress.IPv4Address(spec.ip),
                    spec.identity, ifindex=100 + spec.id, ipv6=ipv6,
                    policy_audit=spec.policy_audit, **macs)


#: What a raw stream is made of: one call into the feed (an endpoint's returns its future).
Step = Callable[[BatchFeed], "asyncio.Future | None"]
GHOST_PREFIX = ipaddress.ip_network("198.18.255.254/32")  # in no scenario: added, then deleted
GHOST_KEY = MapKey(INGRESS, 4242, 6, 4242, 4242)  # likewise for a policy key
GHOST_ID = 9  # an endpoint id no scenario has: added, given entries, and removed


def raw_stream(world: ResolvedWorld, ipcache_before: dict, ipcache_changes: list,
               policy_changes: dict[int, list[MapChange]], verdicts_before: dict[int, dict],
               endpoints: dict[int, Endpoint]) -> list[Step]:
    """Raw changes with repeated keys that come to the net changes a phase brings.

    ipcache: a changed prefix is deleted, then upserted with its new entry (an address
    reused: the batch that lost it); a new one first goes to another identity (an ownership
    hand-over); a deleted one is handed over, then deleted; every unchanged one is deleted
    and added back; a prefix of no scenario is added, then deleted. Policy: each change is
    preceded by an upsert of its key with the other verdict; every unchanged key is deleted
    and put back; a key of no policy is put, then deleted. Endpoints: one that never was is
    added, gets entries and goes; with two endpoints or more, the last is removed while its
    changes are pending, then added again (a new pod under its id, with its whole map state:
    the model forgets its connections, as the datapath must).
    """
    steps: list[Step] = []

    def ipcache(kind: ChangeKind, entry: IPCacheEntry) -> Step:
        return lambda feed: feed.ipcache_changed(kind, entry)

    def other(entry: IPCacheEntry) -> IPCacheEntry:
        return IPCacheEntry(entry.prefix, entry.identity + 1, entry.cluster)

    for kind, entry in ipcache_changes:
        old = ipcache_before.get(entry.prefix)
        if kind is ChangeKind.DELETE:
            steps += [ipcache(ChangeKind.UPSERT, other(entry)), ipcache(kind, entry)]
        elif old is not None:
            steps += [ipcache(ChangeKind.DELETE, old), ipcache(kind, entry)]
        else:
            steps += [ipcache(ChangeKind.UPSERT, other(entry)), ipcache(kind, entry)]
    for prefix, entry in world.ipcache.items():
        if ipcache_before.get(prefix) == entry:
            steps += [ipcache(ChangeKind.DELETE, entry), ipcache(ChangeKind.UPSERT, entry)]
    ghost = IPCacheEntry(GHOST_PREFIX, 4242, "cluster1")
    steps += [ipcache(ChangeKind.UPSERT, ghost), ipcache(ChangeKind.DELETE, ghost)]

    flip = {Verdict.ALLOW: Verdict.DENY, Verdict.DENY: Verdict.ALLOW,
            Verdict.REDIRECT: Verdict.ALLOW, None: Verdict.ALLOW}
    for endpoint_id in sorted(endpoints):
        changes = policy_changes.get(endpoint_id, [])
        raw = []
        for change in changes:
            raw += [MapChange(ChangeKind.UPSERT, change.key, flip[change.verdict]), change]
        touched = {change.key for change in changes}
        for key, verdict in verdicts_before.get(endpoint_id, {}).items():
            if key not in touched:
                raw += [MapChange(ChangeKind.DELETE, key, None),
                        MapChange(ChangeKind.UPSERT, key, verdict)]
        raw += [MapChange(ChangeKind.UPSERT, GHOST_KEY, Verdict.ALLOW),
                MapChange(ChangeKind.DELETE, GHOST_KEY, None)]
        steps.append(lambda feed, e=endpoint_id, raw=raw: feed.policy_changed({e: raw}))

    never = Endpoint(GHOST_ID, "default", frozenset(), ipaddress.IPv4Address("10.9.9.9"), 4242,
                     ifindex=100 + GHOST_ID)
    steps += [lambda feed: feed.endpoint_added(never),
              lambda feed: feed.policy_changed({GHOST_ID: [
                  MapChange(ChangeKind.UPSERT, GHOST_KEY, Verdict.ALLOW)]}),
              lambda feed: feed.endpoint_removed(never)]
    if len(endpoints) >= 2:
        last = endpoints[max(endpoints)]
        state = [MapChange(ChangeKind.UPSERT, key, verdict)
                 for key, verdict in world.resolver.verdicts(last.id).items()]
        steps += [lambda feed: feed.endpoint_removed(last),
                  lambda feed: feed.endpoint_added(last),
                  lambda feed: feed.policy_changed({last.id: state})]
        world.model.forget_endpoint(last.id)
    return steps


class ScenarioDriver:
    """Feeds scenarios to a judge's datapath through its feed alone, as the agent does."""

    def __init__(self, judge: DatapathJudge, local_delivery: bool = True,
                 walk: str = CILIUM_WALK):
        self.judge = judge
        self.local_delivery = local_delivery  # False: every packet takes the node's stack
        self.walk = walk  # how the datapath walks IPv6 extension headers (packets.py)
        self.endpoints: dict[int, Endpoint] = {}

    @property
    def feed(self) -> BatchFeed:
        return self.judge.feed

    def replay(self, steps: list[Step]) -> None:
        """Raw changes into the feed, then every batch they make into the datapath; raises
        what the datapath raised."""
        async def run():
            waiters = [future for step in steps if (future := step(self.feed)) is not None]
            await self.feed.flush()
            await asyncio.gather(*waiters)
        self.judge.call(run())

    def load(self, scenario: Scenario) -> None:
        """Forget what the datapath holds (endpoints, connections); add this one's."""
        self.replay([lambda feed, e=e: feed.endpoint_removed(e)
                     for e in self.feed.endpoints.values()])
        self.judge.forget_connections()
        self.judge.events()
        self.endpoints = {spec.id: endpoint_of(spec) for spec in scenario.endpoints}
        self.replay([lambda feed, e=e: feed.endpoint_added(e) for e in self.endpoints.values()])

    def enter(self, world: ResolvedWorld, phase: Phase, first: bool) -> None:
        """The world moves to ``phase``: a reconcile the first time, then raw changes."""
        ipcache_before, verdicts_before = dict(world.ipcache), world.verdicts()
        ipcache_changes = world.enter(phase)
        changes = world.take_changes()
        if first:
            self.judge.call(self.feed.reconcile(world.verdicts(), list(world.ipcache.values()),
                                                ()))
            self.replay([])
            return
        self.replay(raw_stream(world, ipcache_before, ipcache_changes, changes,
                               verdicts_before, self.endpoints))

    def start(self, scenario: Scenario) -> ResolvedWorld:
        """Load ``scenario`` and enter its first phase; the resolved world it is in."""
        world = ResolvedWorld(scenario, self.walk)
        self.load(scenario)
        self.enter(world, scenario.phases[0], first=True)
        return world

    def run(self, scenario: Scenario, tally: dict | None = None) -> list[str]:
        """Every probe through the datapath and the model; the differences (outcomes, then
        events), described."""
        world = ResolvedWorld(scenario, self.walk)
        self.load(scenario)
        differences = []
        for n, phase in enumerate(scenario.phases):
            self.enter(world, phase, first=n == 0)
            self.judge.events()
            for i, probe in enumerate(phase.probes):
                frame = probe.packet.frame()
                expected = world.model.predict(probe.endpoint, probe.direction, frame,
                                               self.local_delivery)
                got = self.judge.delivery(probe.endpoint, probe.direction, frame)
                reported = tuple(model.ExpectedEvent.of(e) for e in self.judge.events())
                if tally is not None:
                    tally[got[0]] = tally.get(got[0], 0) + 1
                    tally["delivered"] = tally.get("delivered", 0) + got[1]
                    if probe.packet.family == 6:
                        tally[f"{got[0]} ipv6"] = tally.get(f"{got[0]} ipv6", 0) + 1
                    for event in reported:
                        kind = f"event {event.kind} {event.verdict}"
                        tally[kind] = tally.get(kind, 0) + 1
                    if icmp_by_type(frame, self.walk):  # decided by an entry of its type
                        for event in reported:
                            if event.match in (MATCH_L3_L4, MATCH_L4_ONLY):
                                kind = f"icmp by type {event.kind} {event.verdict}"
                                tally[kind] = tally.get(kind, 0) + 1
                where = f"phase {n} probe {i}: endpoint {probe.endpoint} {probe.direction}" \
                        f" {probe.packet}"
                if got != (expected.outcome, expected.delivered):
                    differences.append(f"{where}: datapath {got}, resolver/model"
                                       f" {(expected.outcome, expected.delivered)}")
                elif reported not in expected.events:
                    differences.append(
                        f"{where}: events reported [{', '.join(map(str, reported))}], model"
                        f" expects " + " or ".join(f"[{', '.join(map(str, events))}]"
                                                   for events in expected.events))
        return differences

    def fail_with(self, scenario: Scenario, differences: list[str]) -> None:
        """Save the smallest failing scenario found, and fail showing where it is."""
        def fails(candidate: Scenario) -> bool:
            try:
                return bool(self.run(candidate))
            except Exception:
                return False
        if self.run(scenario):  # the datapath disagrees (not the resolver's self-check)
            scenario = minimize(scenario, fails)
            differences = self.run(scenario)
        path = Path(tempfile.mkdtemp(prefix="ma-diff-case-")) / "case.json"
        path.write_text(scenario.to_json())
        shown = "\n".join(differences[:10])
        raise AssertionError(f"{len(differences)} verdicts differ; scenario saved to {path}"
                             f" (keep it as a regression case):\n{shown}")


def resolver_self_check(scenario: Scenario) -> list[str]:
    """The incremental map state agrees with ``policy trace``'s explanation from the rules."""
    world = ResolvedWorld(scenario)
    problems = []
    for phase in scenario.phases:
        world.enter(phase)
        for probe in phase.probes[:20]:
            p = probe.packet
            peer = p.src if probe.direction == INGRESS else p.dst
            identity = world.model.identity_of(peer)
            port = parse(p.frame()).dport
            explained = world.explained(probe.endpoint, probe.direction, identity, p.protocol,
                                        port)
            decided = world.decision(probe.endpoint, probe.direction, identity, p.protocol,
                                     port)[0]
            if explained is not None and explained != decided:
                problems.append(f"{probe}: map state {decided}, trace {explained}")
    return problems


# -- the policy-semantics table as scenarios ----------------------------------------------------

def table_scenario(text: str, peer: str, port: int, proto: int, direction: str,
                   endpoint: str, flat: bool) -> Scenario:
    """One table case as a scenario: the table's identities at addresses of their own, its
    endpoint at 10.9.0.1, one packet between them."""
    pods = {name: i for name, i in IDS.items() if not i.reserved and not name.startswith("cidr")}
    addresses = {name: f"10.9.1.{n + 1}" for n, name in enumerate(pods)}
    addresses.update({"world": "198.18.0.1", "host": "10.9.0.254", "remote-node": "10.9.0.253",
                      "cidr-10-1": "10.1.200.1", "cidr-10-1-5": "10.1.5.1"})
    addresses[endpoint] = "10.9.0.1"
    ipcache = [(f"{addresses[name]}/32", i.id) for name, i in pods.items()]
    ipcache += [("10.9.0.254/32", 1), ("10.9.0.253/32", 6)]
    peer_ip = addresses[peer]
    src, dst = (peer_ip, "10.9.0.1") if direction == INGRESS else ("10.9.0.1", peer_ip)
    documents = tuple(json.dumps(d) for d in yaml.safe_load_all(text) if d)
    namespace = next(label.split("=", 1)[1] for label in IDS[endpoint].labels
                     if "io.kubernetes.pod.namespace=" in label)
    return Scenario(
        (EndpointSpec(1, "10.9.0.1", namespace, IDS[endpoint].id),),
        (Phase(tuple(IdentitySpec(i.id, tuple(sorted(i.labels)), i.cluster)
                     for i in pods.values()), tuple(ipcache), documents,
               (Probe(1, direction, Packet(src, dst, proto, 40000, port,
                                           icmp_type=port if proto == ICMP else None)),)),),
        default_local_cluster=not flat)


def table_cases() -> Iterator[Any]:
    """Every case of :mod:`meshagent.testing.policy_cases`, ingress and egress, as params."""
    for name, text, peer, port, proto, expected in CASES:
        flat = text.startswith("FLAT:")
        yield pytest.param(text.removeprefix("FLAT:"), peer, port, proto, INGRESS, "db", flat,
                           expected, id=name)
    for name, spec, peer, port, expected in EGRESS_CASES:
        text = cnp("endpointSelector: {matchLabels: {app: employee}}\n" + spec)
        yield pytest.param(text, peer, port, TCP, EGRESS, "employee", False, expected, id=name)


# -- the suite -----------------------------------------------------------------------------------

EXAMPLES = int(os.environ.get("MESHAGENT_DIFF_EXAMPLES", "120"))
PROBES_PER_PHASE = 80


class DatapathContract:
    """Subclass it in a datapath plugin's tests and provide a ``judge`` fixture.

    ``probes_run`` and ``outcomes_seen`` add up over the random run; the last test checks
    the run was big enough and saw every outcome (``expected_outcomes``), so no path of the
    datapath went untested. The REDIRECT tests open the DNS proxy's sockets (TCP and UDP,
    both families, IP_TRANSPARENT, on one free port) in the test's network namespace, where
    the judge's datapath must look for them.
    """

    min_probes = 10_000
    expected_outcomes: tuple[str, ...] = OUTCOMES
    expected_events: tuple[str, ...] = EVENT_KINDS
    expects_local_delivery = True
    redirects = True  # False: the datapath does not deliver REDIRECT entries to the proxy
    ipv6_walk = CILIUM_WALK  # or KERNEL_WALK (meshagent.testing.packets)
    # scenarios a random run once failed on (as ``fail_with`` saved them), replayed every
    # run on every datapath: a bug one datapath had, another must not have either
    kept_cases: Path | None = None
    probes_run = 0
    outcomes_seen: dict[str, int] = {}

    @pytest.fixture
    def driver(self, judge: DatapathJudge) -> ScenarioDriver:
        assert isinstance(judge, DatapathJudge), "the judge fixture must meet DatapathJudge"
        return ScenarioDriver(judge, self.expects_local_delivery, self.ipv6_walk)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture,
                                     # one run per datapath's subclass (database=None)
                                     HealthCheck.differing_executors])
    @given(scenario=scenarios(probes_per_phase=PROBES_PER_PHASE))
    def test_verdicts_equal_the_resolvers_on_random_worlds(self, driver, dns_proxy, scenario):
        """Every world's DNS rules redirect to the test's DNS proxy sockets (worlds with DNS
        rules are left out for a datapath that does not redirect)."""
        if dns_proxy is None:
            assume(not any('"dns"' in doc for phase in scenario.phases
                           for doc in phase.policies))
        elif driver.feed.proxy_port != dns_proxy:
            driver.replay([lambda feed: feed.proxy_port_changed(dns_proxy)])
        cls = type(self)
        if "outcomes_seen" not in vars(cls):  # each datapath's tally of its own
            cls.outcomes_seen = {}
        differences = driver.run(scenario, cls.outcomes_seen) + resolver_self_check(scenario)
        cls.probes_run += scenario.probe_count
        if differences:
            driver.fail_with(scenario, differences)

    def test_the_random_run_was_big_enough(self):
        cls = type(self)
        if cls.probes_run == 0:
            pytest.skip("the random differential test did not run")
        assert cls.probes_run >= min(cls.min_probes, EXAMPLES * 2 * PROBES_PER_PHASE), \
            cls.probes_run
        seen = cls.outcomes_seen
        assert set(cls.expected_outcomes) <= set(seen), seen
        ipv6 = {f"{o} ipv6" for o in cls.expected_outcomes if o != model.UNSUPPORTED_L3}
        assert ipv6 <= set(seen), f"IPv6 outcomes never seen: {ipv6 - set(seen)}"
        if cls.expects_local_delivery:
            assert seen.get("delivered", 0) > 0, seen
        if cls.redirects:  # the worlds' DNS rules sent packets to the proxy (both families:
            # test_redirect_precedence_and_tracking, every run)
            assert model.REDIRECTED in seen, seen
        assert set(cls.expected_events) <= set(seen), \
            f"events never reported: {set(cls.expected_events) - set(seen)}"
        assert set(ICMP_KINDS) <= set(seen), \
            f"ICMP never judged by type: {set(ICMP_KINDS) - set(seen)}"

    def test_kept_cases(self, driver):
        if self.kept_cases is None:
            pytest.skip("no kept cases given (kept_cases)")
        paths = sorted(self.kept_cases.glob("*.json"))
        assert paths, f"no case in {self.kept_cases}"
        for path in paths:
            differences = driver.run(Scenario.from_json(path.read_text()))
            assert not differences, f"{path.name}:\n" + "\n".join(differences[:10])

    def test_audit_mode_passes_what_policy_drops_until_it_is_turned_off(self, driver):
        """An endpoint in audit mode: what its policy would drop passes, reported as an audit
        with the reason it would have been dropped, and is tracked (its reply passes). Turned
        off (the endpoint handed over again), the audited connection is judged again: cut.
        Drops that are not policy's are never audited."""
        judge = driver.judge
        closed = {"ingress": [{}], "egress": [{}], "egressDeny": [{"toPorts": [{"ports": [
            {"port": "443", "protocol": "TCP"}]}]}]}
        scenario = named_scenario([closed], [])
        client = attrs.evolve(scenario.endpoints[0], policy_audit=True)
        driver.start(attrs.evolve(scenario, endpoints=(client, *scenario.endpoints[1:])))
        judge.events()

        def reported() -> list[tuple]:
            return [(e.kind, e.verdict, e.reason, e.is_reply) for e in judge.events()]
        syn = Packet(CLIENT, "198.18.0.1", TCP, 40000, 80)  # world: no local delivery
        assert judge.delivery(1, EGRESS, syn.frame()) == (model.FORWARDED, False)
        assert reported() == [(POLICY_VERDICT, AUDIT, "policy_default", False)]
        assert judge.delivery(1, INGRESS, syn.reply().frame())[0] == model.FORWARDED
        assert reported() == [(TRACE, FORWARDED, "forwarded", True)]
        https = Packet(CLIENT, "198.18.0.1", TCP, 40001, 443)
        assert judge.delivery(1, EGRESS, https.frame())[0] == model.FORWARDED
        assert reported() == [(POLICY_VERDICT, AUDIT, "policy_deny", False)]
        spoofed = Packet(ECHO, "198.18.0.1", TCP, 40002, 80)
        assert judge.delivery(1, EGRESS, spoofed.frame())[0] == model.SPOOFED
        assert reported() == [(DROP, DROPPED, "spoofed", False)]
        driver.replay([lambda feed: feed.endpoint_added(
            attrs.evolve(driver.endpoints[1], policy_audit=False))])
        ack = attrs.evolve(syn, tcp_flags=0x10)
        assert judge.delivery(1, EGRESS, ack.frame())[0] == model.POLICY_DEFAULT
        assert reported() == [(DROP, DROPPED, "policy_default", False)]

    @pytest.mark.parametrize("text, peer, port, proto, direction, endpoint, flat, expected",
                             list(table_cases()))
    def test_policy_semantics_table(self, driver, text, peer, port, proto, direction,
                                    endpoint, flat, expected):
        scenario = table_scenario(text, peer, port, proto, direction, endpoint, flat)
        assert not driver.run(scenario)
        driver.start(scenario)
        probe = scenario.phases[0].probes[0]
        got, _ = driver.judge.delivery(1, direction, probe.packet.frame())
        assert (got == model.FORWARDED) == (expected == "allow"), got


    # -- REDIRECT: packets for the DNS proxy ----------------------------------------------------

    @pytest.fixture
    def dns_proxy(self) -> Iterator[int | None]:
        """The DNS proxy's port, its sockets listening, for the random worlds; None for a
        datapath that does not redirect."""
        if not self.redirects:
            yield None
            return
        with proxy_sockets() as port:
            yield port

    @pytest.fixture
    def proxy_port(self) -> Iterator[int]:
        """The DNS proxy's port, with its four sockets listening as the proxy's do."""
        if not self.redirects:
            pytest.skip("this datapath does not redirect to the DNS proxy (redirects = False)")
        with proxy_sockets() as port:
            yield port

    def test_redirect_precedence_and_tracking(self, driver, proxy_port):
        """deny > redirect > allow, within a group and across the peer's and any identity's
        (a DNS rule for any peer redirects where an L3 allow covers the peer); a redirected
        connection's later packets go to the proxy too, its replies pass; a redirect entry
        for a packet entering the pod, or neither TCP nor UDP, drops it."""
        echo, remote = _named_identities()
        verdicts = {
            MapKey(EGRESS, 0, UDP, 53, 53): Verdict.REDIRECT,
            MapKey(EGRESS, 0, TCP, 53, 53): Verdict.REDIRECT,
            MapKey(EGRESS, 0, 0, 53, 53): Verdict.REDIRECT,  # any protocol: SCTP too
            MapKey(EGRESS, echo, 0, 0, 0): Verdict.ALLOW,
            MapKey(EGRESS, remote, UDP, 50, 60): Verdict.DENY,
            MapKey(EGRESS, 0, TCP, 80, 80): Verdict.ALLOW,
            MapKey(INGRESS, 0, UDP, 53, 53): Verdict.REDIRECT,
        }
        world = RedirectWorld(driver, proxy_port)
        world.enter(verdicts)
        udp = Packet(CLIENT, ECHO, UDP, 40000, 53)
        syn = Packet(CLIENT, ECHO, TCP, 40001, 53)
        checks = [
            (EGRESS, udp, model.REDIRECTED),  # any identity's redirect over echo's L3 allow
            (INGRESS, udp.reply(), model.FORWARDED),  # the proxy's answer: a reply
            (EGRESS, udp, model.REDIRECTED),  # known: still to the proxy
            (EGRESS, syn, model.REDIRECTED),
            (INGRESS, syn.reply(), model.FORWARDED),
            (EGRESS, attrs.evolve(syn, tcp_flags=ACK), model.REDIRECTED),
            (EGRESS, Packet(CLIENT, ECHO, TCP, 40002, 80), model.FORWARDED),
            (EGRESS, Packet(CLIENT, "198.18.0.1", UDP, 40003, 53), model.REDIRECTED),
            (EGRESS, Packet(CLIENT, REMOTE, UDP, 40004, 53), model.POLICY_DENY),
            (EGRESS, Packet(CLIENT, ECHO, SCTP, 40005, 53), model.PROXY_UNSUPPORTED),
            (INGRESS, Packet(ECHO, CLIENT, UDP, 40006, 53), model.PROXY_UNSUPPORTED),
            (EGRESS, Packet(CLIENT6, "2001:db8::1", UDP, 40007, 53), model.REDIRECTED),
        ]
        for direction, packet, outcome in checks:
            differences = world.probe(1, direction, packet)
            assert differences == [], differences
            assert world.last == outcome, (direction, packet, world.last)

    @settings(max_examples=max(10, EXAMPLES // 4), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture,
                                     HealthCheck.differing_executors])
    @given(data=st.data())
    def test_redirect_verdicts_equal_the_models(self, driver, proxy_port, data):
        """Random map states of allows, denies and redirects (two phases: the second through
        the feed's changes), random TCP, UDP, SCTP and ICMP packets of both families and
        their replies and later packets: every outcome and event as the model says."""
        echo, remote = _named_identities()
        world = RedirectWorld(driver, proxy_port)
        differences = []
        for _ in range(2):
            world.enter(data.draw(redirect_verdicts(echo, remote)))
            for packet, direction in data.draw(st.lists(redirect_packets(), min_size=4,
                                                        max_size=12)):
                differences += world.probe(1, direction, packet)
                if direction == EGRESS:
                    differences += world.probe(1, INGRESS, packet.reply())
                    differences += world.probe(1, EGRESS, attrs.evolve(packet, tcp_flags=ACK))
        assert not differences, "\n".join(differences[:10])


@contextlib.contextmanager
def proxy_sockets() -> Iterator[int]:
    """TCP and UDP, IPv4 and IPv6 sockets on one free port of the wildcard addresses, with
    IP_TRANSPARENT as a transparent proxy has them; yields the port."""
    for _ in range(20):
        opened: list[socket.socket] = []
        try:
            for family, kind in ((socket.AF_INET, socket.SOCK_STREAM),
                                 (socket.AF_INET, socket.SOCK_DGRAM),
                                 (socket.AF_INET6, socket.SOCK_STREAM),
                                 (socket.AF_INET6, socket.SOCK_DGRAM)):
                sock = socket.socket(family, kind)
                opened.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                port = opened[0].getsockname()[1] if len(opened) > 1 else 0
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(16)
        except OSError:
            for sock in opened:
                sock.close()
            continue
        try:
            yield opened[0].getsockname()[1]
        finally:
            for sock in opened:
                sock.close()
        return
    raise RuntimeError("no free port for the proxy's sockets")


def _named_identities() -> tuple[int, int]:
    """The identities of echo and of the remote employee in the named scenario."""
    phase = named_scenario([], []).phases[0]
    by_ip = {prefix.split("/")[0]: identity for prefix, identity in phase.ipcache}
    return by_ip[ECHO], by_ip[REMOTE]


class RedirectWorld:
    """The named scenario's endpoints (client 1, echo 2, echo2 3) and ipcache, without
    policy; endpoint 1's map state then set by hand (the resolver does not take part), the
    DNS proxy's port given to the datapath, and the model judging with those states."""

    def __init__(self, driver: ScenarioDriver, proxy_port: int):
        self.driver = driver
        scenario = named_scenario([], [])
        world = driver.start(scenario)
        self.states: dict[int, dict[MapKey, Verdict]] = world.verdicts()
        self.model = model.DatapathModel(self.decision, driver.walk)
        self.model.endpoints = {e.id: model.ModelEndpoint(e.id, e.ip, e.local_delivery, e.ipv6)
                                for e in scenario.endpoints}
        for prefix, identity in scenario.phases[0].ipcache:
            self.model.ipcache[ipaddress.ip_network(prefix)] = identity
        driver.replay([lambda feed: feed.proxy_port_changed(proxy_port)])
        driver.judge.events()
        self.last = ""

    def decision(self, endpoint_id: int, direction: str, identity: int, protocol: int,
                 port: int) -> tuple[Verdict, str, int]:
        verdicts = self.states.get(endpoint_id, {})
        verdict, why = judge_verdicts(verdicts, direction, identity, protocol, port)
        return verdict, why, model.match_type(verdicts, direction, identity, protocol, port)

    def enter(self, verdicts: dict[MapKey, Verdict]) -> None:
        """Endpoint 1's map state becomes ``verdicts``, through the feed."""
        changes = [MapChange(ChangeKind.DELETE, key, None) for key in self.states.get(1, {})
                   if key not in verdicts]
        changes += [MapChange(ChangeKind.UPSERT, key, verdict)
                    for key, verdict in verdicts.items()]
        self.driver.replay([lambda feed: feed.policy_changed({1: changes})])
        self.states[1] = dict(verdicts)
        self.model.next_phase()
        self.driver.judge.events()

    def probe(self, endpoint_id: int, direction: str, packet: Packet) -> list[str]:
        """One packet through the datapath and the model: what differs, described."""
        frame = packet.frame()
        expected = self.model.predict(endpoint_id, direction, frame,
                                      self.driver.local_delivery)
        got = self.driver.judge.delivery(endpoint_id, direction, frame)
        self.last = got[0]
        reported = tuple(model.ExpectedEvent.of(e) for e in self.driver.judge.events())
        where = f"endpoint {endpoint_id} {direction} {packet}"
        if got != (expected.outcome, expected.delivered):
            return [f"{where}: datapath {got}, model {(expected.outcome, expected.delivered)}"]
        if reported not in expected.events:
            return [f"{where}: events [{', '.join(map(str, reported))}], model expects "
                    + " or ".join(f"[{', '.join(map(str, e))}]" for e in expected.events)]
        return []


def redirect_verdicts(echo: int, remote: int) -> st.SearchStrategy[dict[MapKey, Verdict]]:
    """Map states of one endpoint over a few identities, protocols and ports around 53."""
    keys = st.builds(
        MapKey, st.sampled_from((EGRESS, EGRESS, EGRESS, INGRESS)),
        st.sampled_from((0, echo, remote, 2, 10)), st.sampled_from((0, TCP, UDP, SCTP)),
        st.sampled_from(((0, 0), (53, 53), (50, 60), (48, 63), (80, 80)))
    ).map(lambda k: MapKey(k.direction, k.identity, k.protocol, *k.port))
    return st.dictionaries(keys, st.sampled_from(tuple(Verdict)), max_size=7)


def redirect_packets() -> st.SearchStrategy[tuple[Packet, str]]:
    """A packet leaving or entering endpoint 1 (client), to or from echo, the remote
    employee or the world, of either family."""
    def packet(six: bool, peer: str, protocol: int, sport: int, dport: int, leaving: bool):
        me = CLIENT6 if six else CLIENT
        other = {ECHO: ECHO6, REMOTE: REMOTE6, "198.18.0.1": "2001:db8::1"}[peer] if six \
            else peer
        if protocol == ICMP and six:
            protocol = 58
        src, dst = (me, other) if leaving else (other, me)
        ports = (0, 0) if protocol in (ICMP, 58) else (sport, dport)
        return Packet(src, dst, protocol, *ports), EGRESS if leaving else INGRESS
    return st.builds(packet, st.booleans(), st.sampled_from((ECHO, REMOTE, "198.18.0.1")),
                     st.sampled_from((TCP, UDP, UDP, SCTP, ICMP)),
                     st.integers(40000, 40100), st.sampled_from((53, 55, 80, 53)),
                     st.sampled_from((True, True, False)))
