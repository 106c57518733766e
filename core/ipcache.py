"""IP (or CIDR) to identity mappings, the facts the datapath judges remote traffic by."""

import ipaddress
import json

import attrs

from meshagent.jsonfields import field, ipv4, load_object, mask_to_prefixlen, prefixlen_to_mask


@attrs.frozen
class IPCacheEntry:
    """Who owns an address: published under ``cilium/state/ip/v1/<cluster>/<ip>``."""

    prefix: ipaddress.IPv4Network
    identity: int
    cluster: str
    host_ip: ipaddress.IPv4Address | None = None
    namespace: str = ""
    pod_name: str = ""

    @property
    def key_ip(self) -> str:
        """The address as it appears in the key: bare for a host, ``a.b.c.d/len`` for a CIDR."""
        if self.prefix.prefixlen == 32:
            return str(self.prefix.network_address)
        return str(self.prefix)


def ipcache_to_json(entry: IPCacheEntry) -> bytes:
    """Cilium's identity.IPIdentityPair JSON."""
    doc = {
        "IP": str(entry.prefix.network_address),
        "Mask": None if entry.prefix.prefixlen == 32 else prefixlen_to_mask(entry.prefix.prefixlen),
        "HostIP": str(entry.host_ip) if entry.host_ip else "",
        "ID": entry.identity,
        "Key": 0,
        "K8sNamespace": entry.namespace,
        "K8sPodName": entry.pod_name,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def ipcache_from_json(data: bytes, cluster: str) -> IPCacheEntry:
    doc = load_object(data)
    ip = ipv4(field(doc, "IP", str), "IP")
    prefixlen = mask_to_prefixlen(doc.get("Mask"), "Mask")
    try:
        prefix = ipaddress.IPv4Network(f"{ip}/{prefixlen}")
    except ValueError as exc:
        raise ValueError(f"field 'IP': {exc}") from None
    identity = field(doc, "ID", int)
    host = field(doc, "HostIP", str, required=False, default="")
    return IPCacheEntry(prefix, identity, cluster, ipv4(host, "HostIP") if host else None,
                        field(doc, "K8sNamespace", str, required=False, default=""),
                        field(doc, "K8sPodName", str, required=False, default=""))
