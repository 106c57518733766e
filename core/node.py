"""A node of the mesh, as published under ``cilium/state/nodes/v1/<cluster>/<node>``."""

import ipaddress

import attrs


@attrs.frozen
class Node:
    name: str
    cluster: str
    cluster_id: int
    ipv4: ipaddress.IPv4Address | None = None
    pod_cidrs: tuple[ipaddress.IPv4Network, ...] = ()

    @property
    def full_name(self) -> str:
        """``cluster/node``, the way ``node list`` names nodes across the mesh."""
        return f"{self.cluster}/{self.name}"
