"""The observer in a running agent: subscribed to the agent's flow events, naming ends from
its tables and endpoints, naming policies through the loaded resolver, its capacity from
``--hubble-event-buffer-capacity`` and its metrics in the agent's Prometheus registry."""

import ipaddress
import socket

import aiohttp
import attrs
import pytest

from meshagent.datapath.events import FORWARDED, MATCH_L3_L4, POLICY_VERDICT, TRACE, FlowEvent
from meshagent.errors import UsageError
from meshagent.events import ChangeKind
from meshagent.model.endpoint import Endpoint
from meshagent.model.ipcache import IPCacheEntry
from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.api.observer import observer_pb2
from meshagent.policy.api import parse_policies
from meshagent.testing.policy_cases import IDS, SEED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_flow_events_become_flows_served_and_counted(agent_factory):
    port = free_port()
    running = await agent_factory([
        "--plugins", "memory", "--cluster-name", "cluster1", "--cluster-id", "1",
        "--node-name", "node1", "--hubble-event-buffer-capacity", "15",
        "--prometheus-serve-addr", f"127.0.0.1:{port}"])
    agent = running.agent
    db = IDS["db"]
    employee = IDS["employee"]
    for identity in (db, employee):
        agent.tables.identities.upsert(identity.id, identity)
    endpoint = Endpoint(7, "default", db.labels, ipaddress.IPv4Address("10.1.0.9"), db.id,
                        pod_name="db-0")
    agent.hooks.endpoint_changed(kind=ChangeKind.UPSERT, endpoint=endpoint)
    await agent.policy_repository.store(parse_policies(SEED))
    for _ in range(20):
        agent.flow_events.publish(FlowEvent(
            1_700_000_000_000_000_000, POLICY_VERDICT, FORWARDED, "forwarded", 7, "ingress",
            "10.1.0.20", 40000, "10.1.0.9", 6379, 6, 0x02, employee.id, db.id,
            match=MATCH_L3_L4))
    agent.flow_events.lost(4)

    status = agent.observer.server_status()
    assert (status.num_flows, status.max_flows, status.seen_flows) == (15, 15, 20)
    [answer] = [r async for r in agent.observer.get_flows(
        observer_pb2.GetFlowsRequest(number=1))]
    flow = answer.flow
    assert answer.node_name == flow.node_name == "cluster1/node1"
    assert (flow.destination.ID, flow.destination.pod_name) == (7, "db-0")
    assert flow.source.labels == sorted(employee.labels)
    [policy] = flow.ingress_allowed_by
    assert (policy.name, policy.revision) == ("clustermesh-ingress-l4-policy",
                                              agent.policy_resolver.revision)
    assert flow.verdict == flow_pb2.FORWARDED

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    assert ('hubble_flows_processed_total{protocol="TCP",subtype="",type="PolicyVerdict",'
            'verdict="FORWARDED"} 20.0') in text
    assert ('hubble_policy_verdicts_total{action="forwarded",direction="ingress",'
            'match="l3-l4"} 20.0') in text
    assert 'hubble_lost_events_total{source="perf_event_ring_buffer"} 4.0' in text


@pytest.mark.parametrize("value", ["4096", "0", "100000"])
def test_the_capacity_option_takes_ciliums_values_only(value, short_tmp):
    from meshagent.cli import build_agent
    with pytest.raises(UsageError, match="hubble-event-buffer-capacity"):
        build_agent(["--plugins", "memory", "--hubble-event-buffer-capacity", value,
                     "--socket-path", str(short_tmp / "a.sock"),
                     "--state-dir", str(short_tmp / "s")], {}, ())


async def test_names_follow_the_agents_tables(agent_factory):
    """The observer keeps named ends between events; the agent's ipcache and endpoint
    changes reach it through the hooks, so the next event is named anew."""
    running = await agent_factory(["--plugins", "memory", "--cluster-name", "cluster1",
                                   "--cluster-id", "1", "--node-name", "node1"])
    agent = running.agent
    db, employee = IDS["db"], IDS["employee"]
    for identity in (db, employee):
        agent.tables.identities.upsert(identity.id, identity)
    endpoint = Endpoint(7, "default", db.labels, ipaddress.IPv4Address("10.1.0.9"), db.id,
                        pod_name="db-0")
    agent.hooks.endpoint_changed(kind=ChangeKind.UPSERT, endpoint=endpoint)
    prefix = ipaddress.ip_network("10.2.0.5/32")

    def remote(pod: str) -> None:
        agent.tables.ipcache.upsert(prefix, IPCacheEntry(
            prefix, employee.id, "cluster1", host_ip="192.168.0.2", namespace="default",
            pod_name=pod))
        agent.flow_events.publish(FlowEvent(
            1_700_000_000_000_000_000, TRACE, FORWARDED, "forwarded", 7, "ingress",
            "10.2.0.5", 40000, "10.1.0.9", 6379, 6, 0x01, employee.id, db.id))
    remote("employee-1")
    agent.hooks.endpoint_changed(kind=ChangeKind.UPSERT, endpoint=attrs.evolve(
        endpoint, pod_name="db-1"))
    remote("employee-2")
    answers = [r.flow async for r in agent.observer.get_flows(
        observer_pb2.GetFlowsRequest(first=True))]
    assert [(f.source.pod_name, f.destination.pod_name) for f in answers] == [
        ("employee-1", "db-0"), ("employee-2", "db-1")]
