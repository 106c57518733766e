"""IP (or CIDR) to identity mappings, the facts the datapath judges remote traffic by."""

import ipaddress

import attrs


@attrs.frozen
class IPCacheEntry:
    """Who owns an address: published under ``cilium/state/ip/v1/<cluster>/<ip>``."""

    prefix: ipaddress.IPv4Network
    identity: int
    cluster: str
    host_ip: ipaddress.IPv4Address | None = None
    namespace: str = ""
    pod_name: str = ""
