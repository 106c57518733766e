"""Flows in the agent: flow events (the datapath's contract, fed in directly) enriched into
Hubble flows, kept in the ring buffer, served by GetFlows/ServerStatus and counted in Hubble's
metrics. Expected fields follow Cilium's ``pkg/hubble/parser/threefour/parser.go``."""

import asyncio
import ipaddress
import json
import pathlib
import uuid

import pytest
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, generate_latest

from meshagent.datapath.events import (
    AUDIT,
    DROP,
    DROPPED,
    FORWARDED,
    MATCH_L3_L4,
    MATCH_L3_ONLY,
    MATCH_L4_ONLY,
    MATCH_NONE,
    POLICY_VERDICT,
    TRACE,
    FlowEvent,
)
from meshagent.events import ChangeKind
from meshagent.model.endpoint import Endpoint
from meshagent.model.identity import Identity
from meshagent.model.ipcache import IPCache, IPCacheEntry
from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.api.observer import observer_pb2
from meshagent.observe.flows import FlowMaker
from meshagent.observe.jsonformat import response_json
from meshagent.observe.metrics import HubbleCollector
from meshagent.observe.names import Names
from meshagent.observe.observer import FOLLOW_QUEUE, Observer, response
from meshagent.policy.api import parse_policies
from meshagent.policy.resolver import PolicyEndpoint, Resolver, Verdict, deciding_policies
from meshagent.testing.policy_cases import DB_SEL, IDS, SEED, cnp

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "hubble"
T0 = 1_700_000_000_123_456_789
DB = IDS["db"]  # protected-db, cluster1
EMPLOYEE_C2 = IDS["employee-c2"]  # employee in cluster2, namespace istio-space
STRANGER = IDS["stranger"]
DB_V4, DB_V6 = "10.1.0.9", "fd00:1::9"
REMOTE_POD = "10.2.0.5"
ENDPOINT = Endpoint(7, "default", DB.labels, ipaddress.IPv4Address(DB_V4), DB.id,
                    pod_name="db-0", ipv6=ipaddress.IPv6Address(DB_V6))


def world() -> tuple[Names, Resolver]:
    identities = {i.id: i for i in IDS.values()}
    ipcache = IPCache("cluster1", lambda kind, entry: None)
    ipcache.upsert(ipaddress.ip_network(f"{REMOTE_POD}/32"), IPCacheEntry(
        ipaddress.ip_network(f"{REMOTE_POD}/32"), EMPLOYEE_C2.id, "cluster2",
        host_ip="192.168.0.2", namespace="istio-space", pod_name="employee-7f"))
    names = Names("cluster1", identities.get, ipcache.get)
    names.meshagent_endpoint_changed(kind=ChangeKind.UPSERT, endpoint=ENDPOINT)
    resolver = Resolver("cluster1")
    for identity in IDS.values():
        resolver.add_identity(identity)
    text = "---\n".join([SEED, cnp(DB_SEL + "ingressDeny:\n- fromEndpoints: [{matchLabels:"
                                   " {app: stranger}}]\n", name="no-strangers")])
    for policy in parse_policies(text):
        resolver.upsert_policy(policy)
    resolver.set_endpoint(PolicyEndpoint(ENDPOINT.id, "default", DB.labels))
    return names, resolver


def maker(node: str = "cluster1/node1") -> FlowMaker:
    names, resolver = world()

    def attribute(endpoint, direction, identity, protocol, port, allowed, match):
        return deciding_policies(resolver, endpoint, direction, identity, protocol, port,
                                 Verdict.ALLOW if allowed else Verdict.DENY, match)
    return FlowMaker(node, names, attribute, lambda: 12)


def event(kind=DROP, verdict=DROPPED, reason="policy_default", *, direction="ingress",
          src=(REMOTE_POD, 40000), dst=(DB_V4, 6379), protocol=6, flags=0x02,
          identities=(EMPLOYEE_C2.id, DB.id), is_reply=False, match=MATCH_NONE,
          time_ns=T0, endpoint=ENDPOINT.id) -> FlowEvent:
    return FlowEvent(time_ns, kind, verdict, reason, endpoint, direction, src[0], src[1],
                     dst[0], dst[1], protocol, flags, identities[0], identities[1], is_reply,
                     match)


# -- enrichment ---------------------------------------------------------------------------------


def test_a_default_deny_is_a_policy_verdict_and_a_drop_with_both_ends_named():
    verdict, drop = maker().flows(event())
    for flow in (verdict, drop):
        assert flow.verdict == flow_pb2.DROPPED
        assert flow.drop_reason == 133 and flow.drop_reason_desc == flow_pb2.POLICY_DENIED
        assert (flow.time.seconds, flow.time.nanos) == (1_700_000_000, 123_456_789)
        assert flow.Type == flow_pb2.L3_L4 and flow.node_name == "cluster1/node1"
        assert (flow.IP.source, flow.IP.destination, flow.IP.ipVersion) == (
            REMOTE_POD, DB_V4, flow_pb2.IPv4)
        assert (flow.l4.TCP.source_port, flow.l4.TCP.destination_port) == (40000, 6379)
        assert flow.l4.TCP.flags.SYN and not flow.l4.TCP.flags.ACK
        assert flow.traffic_direction == flow_pb2.INGRESS
        assert not flow.HasField("is_reply")  # Cilium does not know for a drop
        assert flow.Summary == "TCP Flags: SYN"
        assert len(flow.uuid) == 36
        # the remote pod: named from its ipcache entry and its identity
        assert flow.source.ID == 0 and flow.source.identity == EMPLOYEE_C2.id
        assert (flow.source.namespace, flow.source.pod_name, flow.source.cluster_name) == (
            "istio-space", "employee-7f", "cluster2")
        assert list(flow.source.labels) == sorted(EMPLOYEE_C2.labels)
        # the local endpoint: from the endpoint itself
        assert (flow.destination.ID, flow.destination.identity) == (7, DB.id)
        assert (flow.destination.namespace, flow.destination.pod_name) == ("default", "db-0")
        assert flow.destination.cluster_name == "cluster1"
        assert list(flow.destination.labels) == sorted(DB.labels)
    assert (verdict.event_type.type, verdict.event_type.sub_type) == (5, 0)
    assert (drop.event_type.type, drop.event_type.sub_type) == (1, 133)
    assert verdict.policy_match_type == 0
    # no policy denied it: a default deny names none (Cilium's correlation does the same)
    assert not verdict.ingress_denied_by and not drop.ingress_denied_by
    assert verdict.uuid != drop.uuid


def test_a_deny_rule_is_named_on_the_policy_verdict_only():
    verdict, drop = maker().flows(event(reason="policy_deny", match=MATCH_L3_ONLY,
                                        identities=(STRANGER.id, DB.id)))
    assert verdict.drop_reason_desc == drop.drop_reason_desc == flow_pb2.POLICY_DENY
    assert drop.event_type.sub_type == 181
    assert verdict.policy_match_type == MATCH_L3_ONLY
    [policy] = verdict.ingress_denied_by
    assert (policy.kind, policy.namespace, policy.name, policy.revision) == (
        "CiliumNetworkPolicy", "default", "no-strangers", 12)
    assert list(policy.labels) == [
        "k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy",
        "k8s:io.cilium.k8s.policy.name=no-strangers",
        "k8s:io.cilium.k8s.policy.namespace=default"]
    assert not drop.ingress_denied_by and not verdict.ingress_allowed_by


def test_a_forwarded_policy_verdict_names_the_allowing_policy():
    [flow] = maker().flows(event(POLICY_VERDICT, FORWARDED, "forwarded", match=MATCH_L3_L4))
    assert flow.verdict == flow_pb2.FORWARDED and flow.drop_reason == 0
    assert (flow.event_type.type, flow.event_type.sub_type) == (5, 0)
    assert flow.HasField("is_reply") and flow.is_reply.value is False
    assert flow.policy_match_type == MATCH_L3_L4
    assert [p.name for p in flow.ingress_allowed_by] == ["clustermesh-ingress-l4-policy"]
    assert not flow.egress_allowed_by


def test_an_icmp_verdict_names_the_policy_of_its_type():
    """An ICMP event carries its type in the source port (``type << 8 | code``): the policy
    whose icmps rule has that type is the one named."""
    names, resolver = world()
    for policy in parse_policies(cnp(DB_SEL + "ingress:\n- icmps: [{fields: [{type: 8}]}]\n",
                                     name="ping")):
        resolver.upsert_policy(policy)

    def attribute(endpoint, direction, identity, protocol, port, allowed, match):
        return deciding_policies(resolver, endpoint, direction, identity, protocol, port,
                                 Verdict.ALLOW if allowed else Verdict.DENY, match)
    icmp = FlowMaker("cluster1/node1", names, attribute, lambda: 12)

    def echo(kind: int):
        return icmp.flows(event(POLICY_VERDICT, FORWARDED, "forwarded",
                                src=(REMOTE_POD, kind << 8),
                                dst=(DB_V4, 0), protocol=1, flags=0,
                                identities=(EMPLOYEE_C2.id, DB.id), match=MATCH_L4_ONLY))[0]
    assert [p.name for p in echo(8).ingress_allowed_by] == ["ping"]
    assert not echo(13).ingress_allowed_by


def test_an_audit_passes_unattributed_with_no_drop_reason():
    [flow] = maker().flows(event(POLICY_VERDICT, AUDIT, "policy_default",
                                 identities=(STRANGER.id, DB.id)))
    assert flow.verdict == flow_pb2.AUDIT
    assert flow.drop_reason == 0 and flow.drop_reason_desc == 0
    assert flow.is_reply.value is False and flow.HasField("is_reply")
    assert not flow.ingress_allowed_by and not flow.ingress_denied_by


def test_an_ipv6_flow_to_the_world_over_udp():
    [flow] = maker().flows(event(POLICY_VERDICT, FORWARDED, "forwarded", direction="egress",
                                 src=(DB_V6, 5353), dst=("2001:db8::1", 53), protocol=17,
                                 flags=0, identities=(DB.id, 10), match=MATCH_L4_ONLY))
    assert flow.IP.ipVersion == flow_pb2.IPv6
    assert (flow.l4.UDP.source_port, flow.l4.UDP.destination_port) == (5353, 53)
    assert flow.Summary == "UDP"
    assert flow.traffic_direction == flow_pb2.EGRESS
    assert (flow.source.ID, flow.source.pod_name) == (7, "db-0")  # found by its IPv6 address
    world_end = flow.destination
    assert (world_end.identity, list(world_end.labels)) == (10, ["reserved:world-ipv6"])
    assert (world_end.ID, world_end.cluster_name, world_end.pod_name) == (0, "", "")
    assert not flow.egress_allowed_by  # the resolver has no egress rule for it


def test_a_reply_trace_is_reported_in_the_connection_direction():
    # the reply of a connection db-0 opened, entering db-0 (its ingress hook)
    [flow] = maker().flows(event(TRACE, FORWARDED, "forwarded", src=("2001:db8::1", 443),
                                 dst=(DB_V6, 50000), flags=0x12, identities=(10, DB.id),
                                 is_reply=True))
    assert (flow.event_type.type, flow.event_type.sub_type) == (4, 0)
    assert flow.trace_observation_point == flow_pb2.TO_ENDPOINT
    assert flow.trace_reason == flow_pb2.REPLY
    assert flow.is_reply.value is True and flow.reply is True
    assert flow.traffic_direction == flow_pb2.EGRESS
    assert flow.Summary == "TCP Flags: SYN, ACK"
    [out] = maker().flows(event(TRACE, FORWARDED, "forwarded", direction="egress",
                                src=(DB_V4, 50000), dst=(REMOTE_POD, 80), flags=0x11,
                                identities=(DB.id, EMPLOYEE_C2.id)))
    assert out.trace_observation_point == flow_pb2.FROM_ENDPOINT
    assert (out.event_type.sub_type, out.trace_reason) == (5, flow_pb2.ESTABLISHED)
    assert out.traffic_direction == flow_pb2.EGRESS and out.is_reply.value is False
    assert out.l4.TCP.flags.FIN and out.l4.TCP.flags.ACK


def test_other_drops_carry_ciliums_closest_reasons_and_no_policy_verdict():
    cases = {"spoofed": 132, "malformed": 134, "frag_tiny": 135, "frag_unknown": 175,
             "unsupported_l3": 139}
    for reason, code in cases.items():
        [flow] = maker().flows(event(reason=reason))
        assert (flow.drop_reason, flow.event_type.type, flow.event_type.sub_type) == (
            code, 1, code), reason
    [bare] = maker().flows(event(reason="unsupported_l3", src=("", 0), dst=("", 0),
                                 protocol=0, flags=0))
    assert not bare.HasField("IP") and not bare.HasField("l4")
    assert bare.Summary == "Ethernet"


def test_icmp_type_and_code():
    [ping] = maker().flows(event(POLICY_VERDICT, FORWARDED, "forwarded", protocol=1,
                                 src=(REMOTE_POD, 8 << 8), dst=(DB_V4, 0), flags=0))
    assert (ping.l4.ICMPv4.type, ping.l4.ICMPv4.code) == (8, 0)
    assert ping.Summary == "ICMPv4 EchoRequest"
    [unreachable] = maker().flows(event(protocol=58, src=(DB_V6, (1 << 8) | 4),
                                        dst=("2001:db8::1", 0), reason="policy_default"))[1:]
    assert unreachable.Summary == "ICMPv6 DestinationUnreachable(PortUnreachable)"


def test_the_hubble_fixture_lines_fields_are_what_we_make_of_that_drop():
    """tests/fixtures/hubble/observe-jsonpb.jsonl: a policy drop printed by hubble observe.
    Every field it shows, we fill the same (we show more: Cilium's parser fills event_type,
    Type, traffic_direction, Summary, identities and labels for a drop too — the quoted line
    is shortened)."""
    line = (FIXTURES / "observe-jsonpb.jsonl").read_text().strip()
    theirs = json.loads(line)
    names = Names("kind-kind", {}.get, lambda key: None)
    names.meshagent_endpoint_changed(kind=ChangeKind.UPSERT, endpoint=Endpoint(
        3, "default", frozenset(), ipaddress.IPv4Address("10.244.1.5"), 0,
        pod_name="deathstar-7848d6c4d5-th9v2"))
    names.meshagent_endpoint_changed(kind=ChangeKind.UPSERT, endpoint=Endpoint(
        9, "default", frozenset(), ipaddress.IPv4Address("10.244.1.60"), 0, pod_name="xwing"))
    made = FlowMaker("kind-kind/kind-worker", names).flows(
        event(src=("10.244.1.60", 44916), dst=("10.244.1.5", 80), identities=(0, 0),
              time_ns=1692619938510175415))
    ours = json.loads(response_json(response(made[-1])))
    assert _subset(theirs, ours) == []
    assert ours["flow"]["event_type"] == {"type": 1, "sub_type": 133}


def _subset(theirs, ours, path="") -> list[str]:
    """Where ``theirs`` has something ``ours`` lacks or differs in."""
    if isinstance(theirs, dict):
        if not isinstance(ours, dict):
            return [path]
        return [p for k, v in theirs.items() for p in _subset(v, ours.get(k), f"{path}.{k}")]
    return [] if theirs == ours else [f"{path}: {theirs!r} != {ours!r}"]


def test_an_identity_is_named_anew_after_it_changed():
    identities = {EMPLOYEE_C2.id: EMPLOYEE_C2}
    names = Names("cluster1", identities.get, lambda key: None)
    assert names.endpoint(REMOTE_POD, EMPLOYEE_C2.id).cluster_name == "cluster2"
    moved = Identity(EMPLOYEE_C2.id, IDS["employee"].labels, "cluster1")  # id reused
    identities[moved.id] = moved
    names.meshagent_identity_changed(kind=ChangeKind.UPSERT, identity=moved)
    assert names.endpoint(REMOTE_POD, moved.id).labels == sorted(moved.labels)
    assert names.endpoint(REMOTE_POD, 99999).labels == []  # unknown: no labels


def test_an_end_the_datapath_gave_no_identity_takes_the_ipcaches():
    names, _ = world()
    remote = names.endpoint(REMOTE_POD, 0)
    assert (remote.identity, remote.cluster_name) == (EMPLOYEE_C2.id, "cluster2")
    assert names.endpoint(DB_V4, 0).identity == DB.id  # a local one: the endpoint's


def test_a_deleted_endpoint_is_no_longer_named_as_local():
    names, _ = world()
    names.meshagent_endpoint_changed(kind=ChangeKind.DELETE, endpoint=ENDPOINT)
    assert names.endpoint(DB_V4, DB.id).ID == 0
    assert names.endpoint(DB_V4, DB.id).cluster_name == "cluster1"  # from its labels


async def test_a_flow_is_named_as_the_tables_were_when_it_happened():
    """The ring keeps events, not flows: the names they are read with are the ones of the
    moment they happened, whatever changed since; a later event takes the new names."""
    identities = {i.id: i for i in IDS.values()}
    ipcache = IPCache("cluster1", lambda kind, entry: None)
    prefix = ipaddress.ip_network(f"{REMOTE_POD}/32")
    ipcache.upsert(prefix, IPCacheEntry(prefix, EMPLOYEE_C2.id, "cluster2",
                                        namespace="istio-space", pod_name="employee-7f"))
    names = Names("cluster1", identities.get, ipcache.get)
    names.meshagent_endpoint_changed(kind=ChangeKind.UPSERT, endpoint=ENDPOINT)
    obs = Observer(FlowMaker("cluster1/node1", names))
    obs.on_event(event(TRACE, FORWARDED, "forwarded", dst=(DB_V4, 1000)))
    # the pod is deleted, the remote pod replaced by another, the identity's labels change
    names.meshagent_endpoint_changed(kind=ChangeKind.DELETE, endpoint=ENDPOINT)
    replaced = IPCacheEntry(prefix, EMPLOYEE_C2.id, "cluster2", namespace="istio-space",
                            pod_name="employee-9x")
    ipcache.upsert(prefix, replaced)
    names.meshagent_ipcache_changes([(ChangeKind.UPSERT, replaced)])
    relabelled = Identity(EMPLOYEE_C2.id, EMPLOYEE_C2.labels | {"k8s:version=2"}, "cluster2")
    identities[relabelled.id] = relabelled
    names.meshagent_identity_changed(kind=ChangeKind.UPSERT, identity=relabelled)
    obs.on_event(event(TRACE, FORWARDED, "forwarded", dst=(DB_V4, 1001)))
    old, new = [r.flow async for r in obs.get_flows(observer_pb2.GetFlowsRequest(first=True))]
    assert (old.destination.ID, old.destination.pod_name) == (7, "db-0")
    assert old.source.pod_name == "employee-7f"
    assert list(old.source.labels) == sorted(EMPLOYEE_C2.labels)
    assert (new.destination.ID, new.destination.pod_name) == (0, "")
    assert new.source.pod_name == "employee-9x"
    assert list(new.source.labels) == sorted(relabelled.labels)


async def test_flows_are_built_when_read_each_time_the_same():
    obs = observer()
    obs.on_event(event())  # a policy verdict and a drop
    obs.on_event(event(POLICY_VERDICT, FORWARDED, "forwarded", match=MATCH_L3_L4))
    assert not any(isinstance(item, flow_pb2.Flow) for item in obs.ring)  # nothing built
    request = observer_pb2.GetFlowsRequest(first=True)
    first = [r async for r in obs.get_flows(request)]
    again = [r async for r in obs.get_flows(request)]
    assert first == again  # every field, uuid included
    assert len({r.flow.uuid for r in first}) == 3
    assert all(str(uuid.UUID(r.flow.uuid)) == r.flow.uuid and uuid.UUID(r.flow.uuid).version == 4
               for r in first)
    assert [r.flow.event_type.type for r in first] == [5, 1, 5]
    assert [p.name for p in first[2].flow.ingress_allowed_by] == [
        "clustermesh-ingress-l4-policy"]
    # a filtered read builds the same flows
    filtered = [r async for r in obs.get_flows(observer_pb2.GetFlowsRequest(
        first=True, whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.FORWARDED])]))]
    assert filtered == first[2:]


async def test_followers_with_and_without_filters_get_the_same_flows():
    obs = observer()
    everything = obs.get_flows(observer_pb2.GetFlowsRequest(follow=True))
    forwarded = obs.get_flows(observer_pb2.GetFlowsRequest(
        follow=True, whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.FORWARDED])]))
    pending = [asyncio.ensure_future(s.__anext__()) for s in (everything, forwarded)]
    await asyncio.sleep(0)
    obs.on_event(event())
    obs.on_event(event(POLICY_VERDICT, FORWARDED, "forwarded", match=MATCH_L3_L4))
    first_all, first_forwarded = [await p for p in pending]
    rest = [await everything.__anext__(), await everything.__anext__()]
    assert [r.flow.event_type.type for r in [first_all] + rest] == [5, 1, 5]
    assert first_forwarded == rest[1]
    for stream in (everything, forwarded):
        await stream.aclose()


# -- the ring buffer and GetFlows ---------------------------------------------------------------


def observer(capacity: int = 4095, now: list | None = None) -> Observer:
    now = now if now is not None else [T0 / 1e9 + 30]
    return Observer(maker(), capacity, clock=lambda: now[0])


def traces(count: int, start: int = 0) -> list[FlowEvent]:
    """``count`` trace events a millisecond apart, destination ports 1000+i."""
    return [event(TRACE, FORWARDED, "forwarded", dst=(DB_V4, 1000 + start + i),
                  time_ns=T0 + (start + i) * 1_000_000) for i in range(count)]


async def ports(obs: Observer, **request) -> list[int]:
    answers = [r async for r in obs.get_flows(observer_pb2.GetFlowsRequest(**request))]
    return [r.flow.l4.TCP.destination_port for r in answers]


def test_capacity_must_be_one_less_than_a_power_of_two():
    for bad in (0, 4096, 1000, 65536, 131071):
        with pytest.raises(ValueError, match="power of two"):
            Observer(maker(), bad)
    assert Observer(maker(), 1).capacity == 1 and Observer(maker(), 65535).capacity == 65535


async def test_the_ring_keeps_the_newest_and_counts_every_flow():
    now = [T0 / 1e9]
    obs = observer(7, now)
    for e in traces(10):
        obs.on_event(e)
    assert await ports(obs) == list(range(1003, 1010))
    now[0] += 30
    status = obs.server_status()
    assert (status.num_flows, status.max_flows, status.seen_flows) == (7, 7, 10)
    assert status.uptime_ns == 30_000_000_000 and status.version
    # a full ring reaching back less than a minute: the rate over the time it covers
    assert status.flows_rate == pytest.approx(7 / (30 - 0.003))


async def test_number_first_since_and_until():
    obs = observer()
    for e in traces(10):
        obs.on_event(e)
    assert await ports(obs, number=3) == [1007, 1008, 1009]
    assert await ports(obs, number=3, first=True) == [1000, 1001, 1002]
    since = json_format.Parse('"2023-11-14T22:13:20.126Z"', observer_pb2.GetFlowsRequest()
                              .since.__class__())  # T0 + 2.5 ms, rounded down
    assert await ports(obs, since=since) == list(range(1003, 1010))
    assert await ports(obs, since=since, number=2) == [1003, 1004]  # the first after since
    until = json_format.Parse('"2023-11-14T22:13:20.125456789Z"', since.__class__())
    assert await ports(obs, until=until, first=True) == [1000, 1001, 1002]
    assert await ports(obs, since=since, until=until) == []


async def test_number_counts_matching_flows_only():
    obs = observer()
    for e in traces(10):
        obs.on_event(e)
    odd = [flow_pb2.FlowFilter(destination_port=[str(p) for p in range(1001, 1010, 2)])]
    assert await ports(obs, number=2, whitelist=odd) == [1007, 1009]


async def test_follow_sends_the_last_then_each_new_flow():
    obs = observer()
    for e in traces(3):
        obs.on_event(e)
    stream = obs.get_flows(observer_pb2.GetFlowsRequest(number=1, follow=True))
    first = await stream.__anext__()
    assert first.flow.l4.TCP.destination_port == 1002
    assert (first.node_name, first.time) == ("cluster1/node1", first.flow.time)
    later = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    assert not later.done()
    obs.on_event(traces(1, start=3)[0])
    assert (await asyncio.wait_for(later, 1)).flow.l4.TCP.destination_port == 1003
    await stream.aclose()
    assert not obs.followers
    only_new = obs.get_flows(observer_pb2.GetFlowsRequest(follow=True))
    pending = asyncio.ensure_future(only_new.__anext__())
    await asyncio.sleep(0)
    obs.on_event(traces(1, start=4)[0])
    assert (await asyncio.wait_for(pending, 1)).flow.l4.TCP.destination_port == 1004
    await only_new.aclose()


async def test_a_slow_follower_loses_flows_and_is_told_how_many_and_where():
    obs = observer()
    stream = obs.get_flows(observer_pb2.GetFlowsRequest(follow=True))
    pending = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    for e in traces(FOLLOW_QUEUE + 25):
        obs.on_event(e)
    follower = next(iter(obs.followers))
    assert follower.queued == FOLLOW_QUEUE  # bounded, however far behind it is
    got = [(await pending).flow.l4.TCP.destination_port]
    for _ in range(FOLLOW_QUEUE - 1):
        got.append((await stream.__anext__()).flow.l4.TCP.destination_port)
    assert got == list(range(1000, 1000 + FOLLOW_QUEUE))
    lost = await stream.__anext__()  # the 25 after them were lost
    assert lost.WhichOneof("response_types") == "lost_events"
    assert lost.lost_events.source == flow_pb2.HUBBLE_RING_BUFFER
    assert lost.lost_events.num_events_lost == 25
    assert lost.node_name == "cluster1/node1"
    obs.on_event(traces(1, start=9000)[0])
    assert (await stream.__anext__()).flow.l4.TCP.destination_port == 10000
    assert obs.follow_lost == 25
    await stream.aclose()


async def test_events_the_datapath_lost_are_shown_where_they_were_lost():
    lost = [5]
    obs = Observer(maker(), lost=lambda: lost[0])  # 5 lost before the observer started
    stream = obs.get_flows(observer_pb2.GetFlowsRequest(follow=True))
    pending = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    first, second = traces(2)
    obs.on_event(first)
    lost[0] += 3
    obs.on_event(second)
    assert (await pending).flow.l4.TCP.destination_port == 1000
    notice = await stream.__anext__()
    assert notice.lost_events.source == flow_pb2.PERF_EVENT_RING_BUFFER
    assert notice.lost_events.num_events_lost == 3
    assert (await stream.__anext__()).flow.l4.TCP.destination_port == 1001
    await stream.aclose()
    # stored: sent whatever the filters, never counted as one of the flows asked for
    only_second = [flow_pb2.FlowFilter(destination_port=["1001"])]
    answers = [r async for r in obs.get_flows(observer_pb2.GetFlowsRequest(
        number=2, whitelist=only_second))]
    assert [r.WhichOneof("response_types") for r in answers] == ["lost_events", "flow"]
    newest = [r async for r in obs.get_flows(observer_pb2.GetFlowsRequest(number=1))]
    assert [r.WhichOneof("response_types") for r in newest] == ["flow"]  # notice is older
    assert obs.server_status().num_flows == obs.server_status().seen_flows == 2


async def test_requests_it_cannot_serve_raise_value_error():
    obs = observer()
    bad = [
        (dict(first=True, follow=True), "first cannot be specified with follow"),
        (dict(whitelist=[flow_pb2.FlowFilter(http_method=["GET"])]), "'http_method'"),
        (dict(blacklist=[flow_pb2.FlowFilter(source_fqdn=["x.io"])]), "'source_fqdn'"),
        (dict(whitelist=[flow_pb2.FlowFilter(source_service=["a/b"])]), "'source_service'"),
        (dict(whitelist=[flow_pb2.FlowFilter(source_ip=["10.0.0.300"])]), "10.0.0.300"),
        (dict(whitelist=[flow_pb2.FlowFilter(protocol=["gopher"])]), "gopher"),
        (dict(whitelist=[flow_pb2.FlowFilter(source_pod=["/"])]), "namespace"),
        (dict(whitelist=[flow_pb2.FlowFilter(source_label=["()"])]), "label"),
        (dict(whitelist=[flow_pb2.FlowFilter(node_name=["a/b/c"])]), "node name"),
        (dict(whitelist=[flow_pb2.FlowFilter(source_port=["70000"])]), "70000"),
        (dict(since={"seconds": 1, "nanos": -1}), "nanos"),
    ]
    for request, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            await ports(obs, **request)


# -- filters ------------------------------------------------------------------------------------


def flows_for_filters() -> dict[str, flow_pb2.Flow]:
    m = maker()
    return {
        "in-denied": m.flows(event())[1],  # drop: employee-c2 -> db 6379 SYN, ingress
        "in-verdict": m.flows(event())[0],  # its policy verdict
        "out-v6": m.flows(event(POLICY_VERDICT, FORWARDED, "forwarded", direction="egress",
                                src=(DB_V6, 5353), dst=("2001:db8::1", 53), protocol=17,
                                flags=0, identities=(DB.id, 10)))[0],
        "reply": m.flows(event(TRACE, FORWARDED, "forwarded", src=("2001:db8::1", 443),
                               dst=(DB_V6, 50000), flags=0x12, identities=(10, DB.id),
                               is_reply=True))[0],
        "icmp": m.flows(event(POLICY_VERDICT, FORWARDED, "forwarded", protocol=1,
                              src=(REMOTE_POD, 8 << 8), dst=(DB_V4, 0), flags=0))[0],
    }


def matching(**fields) -> set[str]:
    from meshagent.observe.filters import flows_filter
    passes = flows_filter([flow_pb2.FlowFilter(**fields)], [])
    return {name for name, flow in flows_for_filters().items() if passes(flow)}


def test_each_filter_field():
    everything = set(flows_for_filters())
    assert matching(source_ip=[REMOTE_POD]) == {"in-denied", "in-verdict", "icmp"}
    assert matching(source_ip=["10.2.0.0/16", "2001:db8::/32"]) == everything - {"out-v6"}
    assert matching(destination_ip=["2001:db8::1"]) == {"out-v6"}
    assert matching(source_pod=["istio-space/employee"]) == {"in-denied", "in-verdict", "icmp"}
    assert matching(source_pod=["istio-space/"]) == {"in-denied", "in-verdict", "icmp"}
    assert matching(source_pod=["employee"]) == set()  # no namespace: the empty one
    assert matching(destination_pod=["default/db-"]) == everything - {"out-v6"}
    assert matching(source_label=["k8s:app=employee"]) == {"in-denied", "in-verdict", "icmp"}
    assert matching(destination_label=["reserved:world-ipv6"]) == {"out-v6"}
    assert matching(source_identity=[10]) == {"reply"}
    assert matching(destination_identity=[DB.id]) == everything - {"out-v6"}
    assert matching(source_cluster_name=["cluster2"]) == {"in-denied", "in-verdict", "icmp"}
    assert matching(destination_cluster_name=["cluster1"]) == everything - {"out-v6"}
    assert matching(verdict=[flow_pb2.DROPPED]) == {"in-denied", "in-verdict"}
    assert matching(drop_reason_desc=[flow_pb2.POLICY_DENIED]) == {"in-denied", "in-verdict"}
    assert matching(event_type=[flow_pb2.EventTypeFilter(type=5)]) == {
        "in-verdict", "out-v6", "icmp"}
    assert matching(event_type=[flow_pb2.EventTypeFilter(type=4, match_sub_type=True,
                                                         sub_type=5)]) == set()
    assert matching(event_type=[flow_pb2.EventTypeFilter(type=4, match_sub_type=True,
                                                         sub_type=0)]) == {"reply"}
    assert matching(protocol=["UDP"]) == {"out-v6"}
    assert matching(protocol=["icmp"]) == {"icmp"}
    assert matching(protocol=["tcp", "icmpv6"]) == {"in-denied", "in-verdict", "reply"}
    assert matching(source_port=["443"]) == {"reply"}
    assert matching(destination_port=["6379", "53"]) == {"in-denied", "in-verdict", "out-v6"}
    assert matching(traffic_direction=[flow_pb2.EGRESS]) == {"out-v6", "reply"}
    assert matching(reply=[True]) == {"reply"}
    assert matching(reply=[False]) == everything - {"reply"}
    assert matching(tcp_flags=[flow_pb2.TCPFlags(SYN=True, ACK=True)]) == {"reply"}
    assert matching(tcp_flags=[flow_pb2.TCPFlags(SYN=True)]) == {
        "in-denied", "in-verdict", "reply"}
    assert matching(node_name=["cluster1/"]) == everything
    assert matching(node_name=["cluster2/*"]) == set()
    assert matching(node_name=["node*"]) == everything
    assert matching(ip_version=[flow_pb2.IPv6]) == {"out-v6", "reply"}
    some = flows_for_filters()["icmp"]
    assert matching(uuid=[some.uuid]) == set()  # a new uuid per flow made


def test_fields_and_values_and_lists_combine_as_hubble_does():
    from meshagent.observe.filters import flows_filter
    flows = flows_for_filters()

    def names(whitelist, blacklist=()):
        passes = flows_filter(whitelist, blacklist)
        return {name for name, flow in flows.items() if passes(flow)}
    # fields of one filter: AND
    assert names([flow_pb2.FlowFilter(protocol=["tcp"], verdict=[flow_pb2.FORWARDED])]) == {
        "reply"}
    # filters of the whitelist: OR
    assert names([flow_pb2.FlowFilter(protocol=["udp"]),
                  flow_pb2.FlowFilter(reply=[True])]) == {"out-v6", "reply"}
    # the blacklist removes what any of its filters matches
    assert names([], [flow_pb2.FlowFilter(protocol=["tcp"]),
                      flow_pb2.FlowFilter(ip_version=[flow_pb2.IPv6])]) == {"icmp"}
    assert names([flow_pb2.FlowFilter(source_ip=[REMOTE_POD])],
                 [flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])]) == {"icmp"}
    assert names([flow_pb2.FlowFilter()]) == set(flows)  # an empty filter matches all


def test_label_selectors_as_hubble_reads_them():
    """Cases of cilium/cilium pkg/hubble/filters/labels_test.go (TestLabelSelectorFilter)."""
    from meshagent.observe.labels import parse_selector

    def picks(selectors, label_sets):
        parsed = [parse_selector(s) for s in selectors]
        return [any(p.matches(labels) for p in parsed) for labels in label_sets]
    assert picks(["label1", "label2"], [["label1"], ["label1=val1"],
                                        ["label2", "label3", "label4=val4"], ["label3"]]) == [
        True, True, True, False]
    assert picks(["label1=val1", "label2=val2"], [
        ["label1"], ["label1=val1"], ["label1=val2", "label2=val1", "label3"],
        ["label2=val2", "label3"], ["label3=val1"], [""], [], ["label1=val1=toomuch"]]) == [
        False, True, False, True, False, False, False, False]
    assert picks(["label1 in (val1, val2), label3 notin ()"], [
        ["label1"], ["label1=val1"], ["label1=val2", "label2=val1", "label3=val3"],
        ["label2=val2", "label3"], ["label1=val1", "label3=val3"]]) == [
        False, True, True, False, True]
    assert picks([""], [["src1", "src2=val2"], [], [""]]) == [True, True, True]
    assert picks(["k8s:app=bar", "foo", "reserved:host"], [
        ["k8s:app=bar"], ["k8s:foo=baz"], ["k8s.app=bar"],
        ["container:foo=bar", "reserved:host"]]) == [True, True, False, True]
    assert picks(["any:key"], [["key"], ["reserved:key"], ["any.key"]]) == [
        True, True, False]
    # Hubble reads a dotted key's source up to its first dot: give the source
    assert picks(["io.kubernetes.pod.namespace=default"],
                 [["k8s:io.kubernetes.pod.namespace=default"]]) == [False]
    assert picks(["k8s:io.kubernetes.pod.namespace=default"],
                 [["k8s:io.kubernetes.pod.namespace=default"]]) == [True]
    assert picks(["!k8s:app, k8s:n>3"], [["k8s:app=x"], ["k8s:n=4"], ["k8s:n=2"]]) == [
        False, True, False]
    for bad in ("()", "=", "any:k8s:bla", "a in (b", "a b"):
        with pytest.raises(ValueError):
            parse_selector(bad)


# -- metrics ------------------------------------------------------------------------------------


def test_hubble_metrics_names_and_labels():
    obs = observer()
    lost = [3]
    registry = CollectorRegistry()
    registry.register(HubbleCollector(obs.metrics, lambda: lost[0]))
    obs.on_event(event())  # policy verdict + drop, TCP
    obs.on_event(event(POLICY_VERDICT, FORWARDED, "forwarded", direction="egress",
                       src=(DB_V6, 5353), dst=("2001:db8::1", 53), protocol=17, flags=0,
                       identities=(DB.id, 10), match=MATCH_L4_ONLY))
    obs.on_event(event(TRACE, FORWARDED, "forwarded", is_reply=True,
                       identities=(EMPLOYEE_C2.id, DB.id)))
    obs.on_event(event(POLICY_VERDICT, FORWARDED, "forwarded", identities=(1, DB.id),
                       match=MATCH_L3_ONLY))  # from the host: not a policy verdict metric
    text = generate_latest(registry).decode()
    expected = [
        'hubble_flows_processed_total{protocol="TCP",subtype="",type="Drop",'
        'verdict="DROPPED"} 1.0',
        'hubble_flows_processed_total{protocol="TCP",subtype="",type="PolicyVerdict",'
        'verdict="DROPPED"} 1.0',
        'hubble_flows_processed_total{protocol="UDP",subtype="",type="PolicyVerdict",'
        'verdict="FORWARDED"} 1.0',
        'hubble_flows_processed_total{protocol="TCP",subtype="to-endpoint",type="Trace",'
        'verdict="FORWARDED"} 1.0',
        'hubble_flows_processed_total{protocol="TCP",subtype="",type="PolicyVerdict",'
        'verdict="FORWARDED"} 1.0',
        'hubble_drop_total{protocol="TCP",reason="POLICY_DENIED"} 2.0',
        'hubble_policy_verdicts_total{action="dropped",direction="ingress",match="none"} 1.0',
        'hubble_policy_verdicts_total{action="forwarded",direction="egress",'
        'match="l4-only"} 1.0',
        'hubble_lost_events_total{source="perf_event_ring_buffer"} 3.0',
    ]
    lines = set(text.splitlines())
    assert [line for line in expected if line not in lines] == []
    samples = [line for line in lines if line.startswith("hubble_")]
    assert len(samples) == len(expected)  # nothing else: the host's verdict is not counted


def reference_labels(flow: flow_pb2.Flow) -> tuple:
    """A built flow's labels as Cilium's handlers read them from the flow
    (pkg/hubble/metrics/flow, drop, policy): the reference for the counts the observer keeps
    from events."""
    kind = flow.event_type.type
    which = flow.l4.WhichOneof("protocol") or "Unknown L4"
    name = {1: "Drop", 4: "Trace", 5: "PolicyVerdict"}[kind]
    subtype = {0: "to-endpoint", 5: "from-endpoint"}[flow.event_type.sub_type] \
        if kind == 4 else ""
    verdict = flow_pb2.Verdict.Name(flow.verdict)
    drop = (flow_pb2.DropReason.Name(flow.drop_reason_desc), which) \
        if flow.verdict == flow_pb2.DROPPED else None
    policy = None
    if kind == 5 and flow.source.identity != 1:
        policy = (flow_pb2.TrafficDirection.Name(flow.traffic_direction).lower(),
                  {0: "none", 1: "l3-only", 2: "l3-l4", 3: "l4-only", 4: "all"}
                  [flow.policy_match_type], verdict.lower())
    return (which, name, subtype, verdict), drop, policy


def test_metrics_counted_from_events_are_what_the_flows_say():
    import collections
    import itertools
    obs = observer()
    kinds = [(DROP, DROPPED, r) for r in ("policy_default", "policy_deny", "spoofed",
                                           "malformed", "frag_tiny", "frag_unknown",
                                           "unsupported_l3")]
    kinds += [(POLICY_VERDICT, FORWARDED, "forwarded"), (POLICY_VERDICT, AUDIT, "policy_deny"),
              (TRACE, FORWARDED, "forwarded")]
    protocols = [(6, (REMOTE_POD, 40000)), (17, (REMOTE_POD, 53)), (132, (REMOTE_POD, 9)),
                 (1, (REMOTE_POD, 8 << 8)), (58, (REMOTE_POD, 128 << 8)), (47, (REMOTE_POD, 0))]
    events = [event(kind, verdict, reason, direction=direction, src=src, protocol=protocol,
                    identities=(source, DB.id), is_reply=reply, match=match)
              for (kind, verdict, reason), (protocol, src), direction, source, reply, match
              in itertools.product(kinds, protocols, ("ingress", "egress"),
                                   (EMPLOYEE_C2.id, 1), (False, True), (0, 1, 2, 4))]
    # and some more of one direction, so that counts of one label value cannot pass for another
    events += [e for e in events if e.direction == "ingress" and e.match == 2]
    flows, drops, verdicts = (collections.Counter() for _ in range(3))
    for e in events:
        obs.on_event(e)
        for made in maker().flows(e):
            flow, drop, policy = reference_labels(made)
            flows[flow] += 1
            drops[drop] += drop is not None
            verdicts[policy] += policy is not None
    for counter in (drops, verdicts):
        counter.pop(None)
    assert obs.metrics.flows == dict(flows)
    assert obs.metrics.drops == dict(drops)
    assert obs.metrics.verdicts == dict(verdicts)
    assert len(flows) > 20 and len(drops) > 20 and len(verdicts) > 10


# -- memory -------------------------------------------------------------------------------------

MEASURE = """
import gc, ipaddress
from meshagent.datapath.events import FlowEvent
from meshagent.events import ChangeKind
from meshagent.model.endpoint import Endpoint
from meshagent.model.identity import Identity
from meshagent.observe.flows import FlowMaker
from meshagent.observe.names import Names
from meshagent.observe.observer import Observer

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def labels(app, cluster):  # what a pod of a Kubernetes cluster carries
    return frozenset({f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=default",
                      f"k8s:io.cilium.k8s.policy.cluster={cluster}",
                      "k8s:io.cilium.k8s.policy.serviceaccount=default",
                      "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
                      "k8s:version=v1"})
peers = {70000 + i: Identity(70000 + i, labels(f"client-{i}", "cluster2"), "cluster2")
         for i in range(50)}
names = Names("cluster1", peers.get, lambda key: None)
names.meshagent_endpoint_changed(kind=ChangeKind.UPSERT, endpoint=Endpoint(
    7, "default", labels("db", "cluster1"), ipaddress.IPv4Address("10.1.0.9"), 66000,
    pod_name="db-7848d6c4d5-th9v2"))
observer = Observer(FlowMaker("cluster1/node-1", names), 4095)
events = [FlowEvent(1_700_000_000_000_000_000 + i, "policy-verdict", "forwarded", "forwarded",
                    7, "ingress", f"10.2.{i % 200}.{i % 250}", 30000 + i, "10.1.0.9", 6379, 6,
                    0x02, 70000 + i % 50, 66000, match=2) for i in range(4095)]
gc.collect()
before = rss()
for e in events:
    observer.on_event(e)
gc.collect()
print((rss() - before) / len(observer.ring))
"""


def test_memory_per_flow_in_a_full_ring_is_bounded():
    """A full ring of realistic flows (six labels per end; 1,000 peer addresses, whose named
    ends are kept too) costs about 200 bytes a flow in process memory (docs/observability.md,
    "Memory and cost"; a built flow costs about 3 KB). Measured as resident memory in a fresh
    process, as it was when the ring held built flows, whose fields live in protobuf's upb
    arenas, out of tracemalloc's sight."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True,
                         check=True, timeout=120)
    per_flow = float(out.stdout)
    assert 64 < per_flow < 512, per_flow
