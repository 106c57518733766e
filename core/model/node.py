"""A node of the mesh, as published under ``cilium/state/nodes/v1/<cluster>/<node>``."""

import ipaddress
import json

import attrs

from meshagent.model.jsonfields import (
    field,
    ipv4,
    load_object,
    mask_to_prefixlen,
    prefixlen_to_mask,
)


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


def node_to_json(node: Node) -> bytes:
    """Cilium's node.Node JSON (the fields meshagent uses)."""
    doc: dict = {"Name": node.name, "Cluster": node.cluster, "ClusterID": node.cluster_id,
                 "IPAddresses": []}
    if node.ipv4 is not None:
        doc["IPAddresses"].append({"Type": "InternalIP", "IP": str(node.ipv4)})
    if node.pod_cidrs:
        doc["IPv4AllocCIDR"] = _cidr_json(node.pod_cidrs[0])
        if node.pod_cidrs[1:]:
            doc["IPv4SecondaryAllocCIDRs"] = [_cidr_json(c) for c in node.pod_cidrs[1:]]
    return json.dumps(doc, separators=(",", ":")).encode()


def node_from_json(data: bytes) -> Node:
    """Decode Cilium's node JSON; ValueError says what is wrong."""
    doc = load_object(data)
    name = field(doc, "Name", str)
    cluster = field(doc, "Cluster", str)
    cluster_id = field(doc, "ClusterID", int, required=False, default=0)
    address = None
    for entry in field(doc, "IPAddresses", list, required=False, default=[]):
        if not isinstance(entry, dict):
            raise ValueError("field 'IPAddresses' must hold objects")
        kind = entry.get("Type", entry.get("AddressType"))
        ip = entry.get("IP")
        if kind == "InternalIP" and isinstance(ip, str) and ":" not in ip:
            address = ipv4(ip, "IPAddresses.IP")
            break
    cidrs = []
    primary = field(doc, "IPv4AllocCIDR", dict, required=False)
    for cidr in ([primary] if primary else []) + list(
            field(doc, "IPv4SecondaryAllocCIDRs", list, required=False, default=[])):
        cidrs.append(_cidr_from_json(cidr, "IPv4AllocCIDR"))
    return Node(name, cluster, cluster_id, address, tuple(cidrs))


def _cidr_json(network: ipaddress.IPv4Network) -> dict:
    return {"IP": str(network.network_address), "Mask": prefixlen_to_mask(network.prefixlen)}


def _cidr_from_json(doc: object, name: str) -> ipaddress.IPv4Network:
    if not isinstance(doc, dict):
        raise ValueError(f"field {name!r} must be an object")
    ip = ipv4(doc.get("IP"), f"{name}.IP")
    prefixlen = mask_to_prefixlen(doc.get("Mask"), f"{name}.Mask")
    try:
        return ipaddress.IPv4Network(f"{ip}/{prefixlen}")
    except ValueError as exc:
        raise ValueError(f"field {name!r}: {exc}") from None
