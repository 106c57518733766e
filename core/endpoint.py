"""A local workload (pod) the agent wired up and the datapath enforces policy for."""

import ipaddress

import attrs


@attrs.frozen
class Endpoint:
    id: int
    namespace: str
    labels: frozenset[str]
    ipv4: ipaddress.IPv4Address
    identity: int
    ifname: str = ""  # host-side veth
    ifindex: int = 0
    netns: str = ""
