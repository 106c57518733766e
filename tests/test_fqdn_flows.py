"""The DNS proxy's records in a running agent: L7 flows in the observer (Hubble's
``Layer7.dns``; a refused question is a DROPPED request) that hubble-style printing shows, and
``l7`` records on ``GET /monitor`` in Cilium's monitor text."""

import io
import ipaddress

from meshagent.events import ChangeKind
from meshagent.fqdn.record import DNSRecord, format_l7
from meshagent.model.endpoint import Endpoint
from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.api.observer import observer_pb2
from meshagent.observe.printer import Printer, flow_type
from tests.test_fqdn_agent import Providers, args


def record(kind="Request", verdict="Denied", **fields):
    base = dict(protocol="UDP", endpoint=12, endpoint_identity=4321,
                endpoint_labels=("k8s:app=client",), endpoint_ip="10.1.0.12",
                endpoint_port=40000, server_identity=2, server_ip="192.0.2.53",
                server_port=53, query="other.example.com.", qtypes=("A",), rcode=5)
    base.update(fields)
    return DNSRecord(kind, verdict, "Denied by policy", **base)


async def test_records_become_l7_flows(agent_factory, short_tmp):
    running = await agent_factory(args(short_tmp / "state"),
                                  extra_plugins=[("dnstest", Providers())])
    agent = running.agent
    agent.hooks.endpoint_changed(kind=ChangeKind.UPSERT, endpoint=Endpoint(
        12, "default", frozenset({"k8s:app=client"}), ipaddress.IPv4Address("10.1.0.12"),
        4321, pod_name="client-0"))
    agent.fqdn.publish(record())
    agent.fqdn.publish(record("Response", "Forwarded", query="allowed.example.com.",
                              rcode=0, ips=("203.0.113.10",), ttl=30, rrtypes=("A",)))
    dropped = observer_pb2.GetFlowsRequest(
        number=10, whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])])
    [answer] = [a async for a in agent.observer.get_flows(dropped)]
    flow = answer.flow
    assert (flow.Type, flow.event_type.type, flow.verdict) == (flow_pb2.L7, 129,
                                                               flow_pb2.DROPPED)
    assert (flow.l7.type, flow.l7.dns.query, list(flow.l7.dns.qtypes)) == (
        flow_pb2.REQUEST, "other.example.com.", ["A"])
    assert flow.source.pod_name == "client-0" and flow.IP.destination == "192.0.2.53"
    assert flow.l4.UDP.destination_port == 53
    assert flow_type(flow) == "dns-request proxy"
    every = [a async for a in agent.observer.get_flows(observer_pb2.GetFlowsRequest(number=10))]
    response = every[-1].flow
    assert response.verdict == flow_pb2.FORWARDED and list(response.l7.dns.ips) == [
        "203.0.113.10"]
    assert response.IP.source == "192.0.2.53" and response.destination.ID == 12
    assert agent.observer.server_status().num_flows == 2
    out = io.StringIO()
    printer = Printer(out=out, err=io.StringIO())
    printer.write(every[-1])
    assert "dns-response proxy" in out.getvalue() and "203.0.113.10" in out.getvalue()
    # the same records reach meshagent monitor
    shown = [format_l7(n.to_json()) for n in agent.drops.recent if n.to_json()["type"] == "l7"]
    assert "<- Request dns from 12 ([k8s:app=client]) to 0 ([reserved:world])," in shown[0]
    assert "identity 4321->2, verdict Denied DNS Query: other.example.com. A" in shown[0]
    assert shown[1].endswith("verdict Forwarded DNS Query: allowed.example.com. A TTL: 30"
                             " Answer: '203.0.113.10'")


async def test_meshagent_monitor_prints_dns_records(agent_factory, short_tmp):
    import asyncio

    from tests.conftest import MESHAGENT, clean_env
    running = await agent_factory(args(short_tmp / "state"),
                                  extra_plugins=[("dnstest", Providers())])
    proc = await asyncio.create_subprocess_exec(
        MESHAGENT, "monitor", "--type", "l7", "--count", "1",
        env=clean_env(MESHAGENT_SOCKET_PATH=str(running.socket_path)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(100):  # until the monitor listens
            if running.agent.drops.listeners:
                break
            await asyncio.sleep(0.05)
        running.agent.fqdn.publish(record())
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # the stream's handler notices the monitor left at its next write (it waits until then)
    running.agent.fqdn.publish(record())
    assert proc.returncode == 0, err
    assert ("<- Request dns from 12 ([k8s:app=client]) to 0 ([reserved:world]), identity"
            " 4321->2, verdict Denied DNS Query: other.example.com. A") in out.decode()


async def test_flows_carry_the_names_the_endpoint_looked_up(agent_factory, short_tmp):
    """Hubble's destination_names (egress) and source_names (ingress): the names the local
    endpoint got the remote address for, without the final dot."""
    import time

    from meshagent.datapath.events import FORWARDED, TRACE, FlowEvent
    from meshagent.fqdn.cache import CacheEntry
    running = await agent_factory(args(short_tmp / "state"),
                                  extra_plugins=[("dnstest", Providers())])
    agent = running.agent
    agent.hooks.endpoint_changed(kind=ChangeKind.UPSERT, endpoint=Endpoint(
        12, "default", frozenset({"k8s:app=client"}), ipaddress.IPv4Address("10.1.0.12"),
        4321))
    for name in ("allowed.example.com.", "alias.example.com."):
        agent.fqdn.names.observe(12, CacheEntry(name, time.time(), 300,
                                                (ipaddress.ip_address("203.0.113.10"),)))
    out = FlowEvent(1_700_000_000_000_000_000, TRACE, FORWARDED, "forwarded", 12, "egress",
                    "10.1.0.12", 40000, "203.0.113.10", 443, 6, 0x02, 4321, 2)
    back = FlowEvent(1_700_000_000_100_000_000, TRACE, FORWARDED, "forwarded", 12, "ingress",
                     "203.0.113.10", 443, "10.1.0.12", 40000, 6, 0x12, 2, 4321, is_reply=True)
    other = FlowEvent(1_700_000_000_200_000_000, TRACE, FORWARDED, "forwarded", 12, "egress",
                      "10.1.0.12", 40001, "203.0.113.99", 443, 6, 0x02, 4321, 2)
    for event in (out, back, other):
        agent.flow_events.publish(event)
    flows = [a.flow async for a in agent.observer.get_flows(
        observer_pb2.GetFlowsRequest(number=3))]
    assert list(flows[0].destination_names) == ["alias.example.com", "allowed.example.com"]
    assert list(flows[0].source_names) == []
    assert list(flows[1].source_names) == ["alias.example.com", "allowed.example.com"]
    assert list(flows[2].destination_names) == []
