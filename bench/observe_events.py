"""What the observer costs per flow event, and per stored flow.

    .venv/bin/python bench/observe_events.py [--connections 4000] [--repeat 5]

Feeds ``Observer.on_event`` the eight events the eBPF datapath reports for one new TCP
connection between two pods of the node (a policy verdict at each end, the first reply packet
at each end, and each side's FIN at both ends), each connection from a new client port, with
a policy resolver naming the allowing policy as the agent's does. Prints:

* µs of CPU per ``on_event`` (the best of ``--repeat`` runs over ``--connections`` connections
  into a ring of the default capacity, no reader);
* µs per flow for a reader: ``GetFlows`` of the whole ring, each flow's response serialized
  (the first read, then a second one);
* bytes of resident memory per stored flow in a full ring of 4,095 flows (a fresh process,
  as ``tests/test_observe.py`` measures it).
"""

import argparse
import asyncio
import ipaddress
import subprocess
import sys
import time

from meshagent.datapath.events import (
    FORWARDED,
    MATCH_ALL,
    MATCH_L3_L4,
    POLICY_VERDICT,
    TRACE,
    FlowEvent,
)
from meshagent.events import ChangeKind
from meshagent.model.endpoint import Endpoint
from meshagent.model.identity import Identity
from meshagent.observe.api.observer import observer_pb2
from meshagent.observe.flows import FlowMaker
from meshagent.observe.names import Names
from meshagent.observe.observer import Observer
from meshagent.policy.api import parse_policies
from meshagent.policy.resolver import PolicyEndpoint, Resolver, Verdict, deciding_policies

SERVER_IP, CLIENT_IP = "10.1.0.9", "10.1.0.20"
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "6379", protocol: TCP}]}]
"""


def labels(app: str) -> frozenset[str]:
    """The six labels a pod of a Kubernetes cluster carries."""
    return frozenset({f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=default",
                      "k8s:io.cilium.k8s.policy.cluster=cluster1",
                      "k8s:io.cilium.k8s.policy.serviceaccount=default",
                      "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
                      "k8s:version=v1"})


SERVER = Identity(66000, labels("server"), "cluster1")
CLIENT = Identity(66001, labels("client"), "cluster1")


def observer() -> Observer:
    identities = {SERVER.id: SERVER, CLIENT.id: CLIENT}
    names = Names("cluster1", identities.get, lambda key: None)
    resolver = Resolver("cluster1")
    for number, (identity, ip, pod) in enumerate(
            [(SERVER, SERVER_IP, "server-7848d6c4d5-th9v2"),
             (CLIENT, CLIENT_IP, "client-5d8f7c9b4-x2kqz")], start=7):
        endpoint = Endpoint(number, "default", identity.labels, ipaddress.IPv4Address(ip),
                            identity.id, pod_name=pod)
        names.meshagent_endpoint_changed(kind=ChangeKind.UPSERT, endpoint=endpoint)
        resolver.add_identity(identity)
        resolver.set_endpoint(PolicyEndpoint(number, "default", identity.labels))
    for policy in parse_policies(POLICY):
        resolver.upsert_policy(policy)

    def attribute(endpoint, direction, identity, protocol, port, allowed, match):
        return deciding_policies(resolver, endpoint, direction, identity, protocol, port,
                                 Verdict.ALLOW if allowed else Verdict.DENY, match)
    return Observer(FlowMaker("cluster1/node-1", names, attribute, lambda: 3))


def connection(number: int, time_ns: int) -> list[FlowEvent]:
    """The eight events of one short TCP connection, client port 10000 + number % 50000."""
    port = 10000 + number % 50000
    out = (CLIENT_IP, port, SERVER_IP, 6379, CLIENT.id, SERVER.id)
    back = (SERVER_IP, 6379, CLIENT_IP, port, SERVER.id, CLIENT.id)

    def make(offset, kind, endpoint, direction, ends, flags, reply, match=0):
        s_ip, s_port, d_ip, d_port, s_id, d_id = ends
        return FlowEvent(time_ns + offset, kind, FORWARDED, "forwarded", endpoint, direction,
                         s_ip, s_port, d_ip, d_port, 6, flags, s_id, d_id, reply, match)
    return [
        make(0, POLICY_VERDICT, 8, "egress", out, 0x02, False, MATCH_ALL),
        make(1, POLICY_VERDICT, 7, "ingress", out, 0x02, False, MATCH_L3_L4),
        make(2, TRACE, 7, "egress", back, 0x12, True),
        make(3, TRACE, 8, "ingress", back, 0x12, True),
        make(4, TRACE, 8, "egress", out, 0x11, False),
        make(5, TRACE, 7, "ingress", out, 0x11, False),
        make(6, TRACE, 7, "egress", back, 0x11, True),
        make(7, TRACE, 8, "ingress", back, 0x11, True),
    ]


def events(connections: int) -> list[FlowEvent]:
    start = 1_700_000_000_000_000_000
    return [e for n in range(connections) for e in connection(n, start + n * 1000)]


def per_event(connections: int, repeat: int) -> float:
    """µs of CPU per on_event, the best of ``repeat`` runs."""
    feed = events(connections)
    best = float("inf")
    for _ in range(repeat):
        obs = observer()
        for e in feed[:800]:  # warm the caches
            obs.on_event(e)
        started = time.process_time()
        for e in feed:
            obs.on_event(e)
        best = min(best, time.process_time() - started)
    return best / len(feed) * 1e6


async def read_all(obs: Observer) -> int:
    request = observer_pb2.GetFlowsRequest(first=True)
    return len([r.SerializeToString() async for r in obs.get_flows(request)])


def per_read(connections: int) -> tuple[float, float]:
    """µs per flow for GetFlows of the whole ring: the first read, and a second."""
    obs = observer()
    for e in events(connections):
        obs.on_event(e)
    times = []
    for _ in range(2):
        started = time.process_time()
        count = asyncio.run(read_all(obs))
        times.append((time.process_time() - started) / count * 1e6)
    return times[0], times[1]


MEMORY = """
import gc, sys
sys.path.insert(0, {here!r})
from observe_events import events, observer
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
obs = observer()
feed = events(4095 // 8 + 1)
gc.collect()
before = rss()
for e in feed:
    obs.on_event(e)
gc.collect()
print((rss() - before) / len(obs.ring))
"""


def per_flow_memory() -> float:
    """Resident bytes per stored flow: the events exist before, as the datapath made them."""
    here = str(__import__("pathlib").Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", MEMORY.format(here=here)], check=True,
                         capture_output=True, text=True)
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"on_event: {per_event(args.connections, args.repeat):.2f} µs per event")
    first, second = per_read(4095 // 8 + 1)
    print(f"GetFlows of a full ring: {first:.2f} µs per flow (first read), "
          f"{second:.2f} µs (second)")
    print(f"memory: {per_flow_memory():.0f} bytes per stored flow")


if __name__ == "__main__":
    main()
