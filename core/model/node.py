"""A node of the mesh, as published under ``cilium/state/nodes/v1/<cluster>/<node>``."""

import ipaddress
import json

import attrs

from meshagent.model.identity import LABEL_KEY, LABEL_VALUE, MAX_LABELS
from meshagent.model.jsonfields import (
    GoNames,
    field,
    ip_address,
    ipv4,
    ipv6,
    load_object,
    mask_to_prefixlen,
    prefixlen_to_mask,
)
from meshagent.model.net import Address, Network


@attrs.frozen
class Node:
    name: str
    cluster: str
    cluster_id: int
    ipv4: ipaddress.IPv4Address | None = None
    pod_cidrs: tuple[Network, ...] = ()  # IPv4 ones first, then IPv6 ones
    ipv6: ipaddress.IPv6Address | None = None
    labels: tuple[tuple[str, str], ...] = ()  # (key, value), sorted: the node's Labels

    @property
    def full_name(self) -> str:
        """``cluster/node``, the way ``node list`` names nodes across the mesh."""
        return f"{self.cluster}/{self.name}"

    def address(self, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The node's address of that family (where its pod CIDRs of that family are routed)."""
        return self.ipv6 if version == 6 else self.ipv4


def node_to_json(node: Node) -> bytes:
    """Cilium's node.Node JSON (the fields meshagent uses), both families."""
    doc: dict = {"Name": node.name, "Cluster": node.cluster, "ClusterID": node.cluster_id,
                 "IPAddresses": []}
    for address in (node.ipv4, node.ipv6):
        if address is not None:
            doc["IPAddresses"].append({"Type": "InternalIP", "IP": str(address)})
    for family, version in (("IPv4", 4), ("IPv6", 6)):
        cidrs = [c for c in node.pod_cidrs if c.version == version]
        if cidrs:
            doc[f"{family}AllocCIDR"] = _cidr_json(cidrs[0])
            if cidrs[1:]:
                doc[f"{family}SecondaryAllocCIDRs"] = [_cidr_json(c) for c in cidrs[1:]]
    if node.labels:
        doc["Labels"] = dict(node.labels)
    return json.dumps(doc, separators=(",", ":")).encode()


# Cilium's node.Node (pkg/node/types/node.go) and its Address, as encoding/json reads them
NODE_FIELDS = GoNames("Name", "Cluster", "IPAddresses", "IPv4AllocCIDR", "IPv4SecondaryAllocCIDRs",
                      "IPv6AllocCIDR", "IPv6SecondaryAllocCIDRs", "ClusterID", "Labels")
ADDRESS_FIELDS = GoNames("Type", "IP")
CIDR_FIELDS = GoNames("IP", "Mask")


def node_from_json(data: bytes) -> Node:
    """Decode Cilium's node JSON as a Cilium agent does; ValueError says what is wrong."""
    doc = load_object(data, NODE_FIELDS)
    name = field(doc, "Name", str)
    cluster = field(doc, "Cluster", str)
    cluster_id = field(doc, "ClusterID", int, required=False, default=0)
    addresses = []
    for entry in field(doc, "IPAddresses", list, required=False, default=[]):
        if not isinstance(entry, dict):
            raise ValueError("field 'IPAddresses' must hold objects")
        entry = ADDRESS_FIELDS.match(entry)
        ip = field(entry, "IP", str, required=False, default="")
        if ip:
            addresses.append((field(entry, "Type", str, required=False, default=""),
                              ip_address(ip, "IPAddresses.IP")))
    cidrs: list[Network] = []
    for family, parse in (("IPv4", ipv4), ("IPv6", ipv6)):
        primary = field(doc, f"{family}AllocCIDR", dict, required=False)
        for cidr in ([primary] if primary else []) + list(
                field(doc, f"{family}SecondaryAllocCIDRs", list, required=False, default=[])):
            cidrs.append(_cidr_from_json(cidr, f"{family}AllocCIDR", parse))
    labels = node_labels(field(doc, "Labels", dict, required=False, default={}))
    return Node(name, cluster, cluster_id, node_ip(addresses, 4), tuple(cidrs),
                node_ip(addresses, 6), labels)


def node_labels(labels: dict) -> tuple[tuple[str, str], ...]:
    """A node's ``Labels`` (Kubernetes labels: key and value syntax, at most MAX_LABELS),
    sorted; ValueError says which one is wrong."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"field 'Labels': {len(labels)} labels, more than {MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(value, str) or not LABEL_KEY.match(key) or not LABEL_VALUE.match(value):
            raise ValueError(f"field 'Labels': {str(key)[:80]!r}={str(value)[:80]!r} is not a"
                             " Kubernetes label")
    return tuple(sorted(labels.items()))


def node_ip(addresses: list[tuple[str, Address]], version: int) -> Address | None:
    """The node's address of a family as Cilium picks it (``Node.GetNodeIP``): its first
    InternalIP; else its last ExternalIP; else its first address of another type. Its
    CiliumInternalIP (the router's address inside the pod CIDR) never."""
    backup = None
    for kind, address in addresses:
        if address.version != version or kind == "CiliumInternalIP":
            continue
        if kind == "InternalIP":
            return address
        if kind == "ExternalIP":
            backup = address
        elif backup is None:
            backup = address
    return backup


def _cidr_json(network: Network) -> dict:
    return {"IP": str(network.network_address),
            "Mask": prefixlen_to_mask(network.prefixlen, network.max_prefixlen)}


def _cidr_from_json(doc: object, name: str, parse) -> Network:
    if not isinstance(doc, dict):
        raise ValueError(f"field {name!r} must be an object")
    doc = CIDR_FIELDS.match(doc)
    ip = parse(doc.get("IP"), f"{name}.IP")
    prefixlen = mask_to_prefixlen(doc.get("Mask"), f"{name}.Mask", ip.max_prefixlen)
    try:
        return ipaddress.ip_network(f"{ip}/{prefixlen}")
    except ValueError as exc:
        raise ValueError(f"field {name!r}: {exc}") from None
