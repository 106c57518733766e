"""IP (or CIDR) to identity mappings, the facts the datapath judges remote traffic by."""

import ipaddress
import json

import attrs

from meshagent.events import ChangeKind
from meshagent.model.jsonfields import (
    field,
    ip_address,
    load_object,
    mask_to_prefixlen,
    prefixlen_to_mask,
)
from meshagent.model.net import Address, Network


@attrs.frozen
class IPCacheEntry:
    """Who owns an address: published under ``cilium/state/ip/v1/<cluster>/<ip>``."""

    prefix: Network  # either family
    identity: int
    cluster: str
    host_ip: Address | None = None
    namespace: str = ""
    pod_name: str = ""

    @property
    def key_ip(self) -> str:
        """The address as it appears in the key: bare for a host, ``a.b.c.d/len`` for a CIDR."""
        if self.prefix.prefixlen == self.prefix.max_prefixlen:
            return str(self.prefix.network_address)
        return str(self.prefix)


def ipcache_to_json(entry: IPCacheEntry) -> bytes:
    """Cilium's identity.IPIdentityPair JSON."""
    doc = {
        "IP": str(entry.prefix.network_address),
        "Mask": None if entry.prefix.prefixlen == entry.prefix.max_prefixlen else
        prefixlen_to_mask(entry.prefix.prefixlen, entry.prefix.max_prefixlen),
        "HostIP": str(entry.host_ip) if entry.host_ip else "",
        "ID": entry.identity,
        "Key": 0,
        "K8sNamespace": entry.namespace,
        "K8sPodName": entry.pod_name,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def ipcache_from_json(data: bytes, cluster: str) -> IPCacheEntry:
    doc = load_object(data)
    ip = ip_address(field(doc, "IP", str), "IP")
    prefixlen = mask_to_prefixlen(doc.get("Mask"), "Mask", ip.max_prefixlen)
    try:
        prefix = ipaddress.ip_network(f"{ip}/{prefixlen}")
    except ValueError as exc:
        raise ValueError(f"field 'IP': {exc}") from None
    identity = field(doc, "ID", int)
    host = field(doc, "HostIP", str, required=False, default="")
    return IPCacheEntry(prefix, identity, cluster, ip_address(host, "HostIP") if host else None,
                        field(doc, "K8sNamespace", str, required=False, default=""),
                        field(doc, "K8sPodName", str, required=False, default=""))


#: The source of the node-local CIDR identities of policies (not a cluster name: no ':' there).
POLICY_SOURCE = ":policy"


class IPCache:
    """IP prefix → identity, from several sources at once, one entry in force per prefix.

    Every cluster (and this node's policies, for CIDR identities) claims prefixes under its own
    name; a claim never replaces another source's. The one in force is the local cluster's,
    then the policies', then the remote cluster that claimed the prefix first (as Cilium's
    ipcache prefers local sources over ClusterMesh). Withdrawing a claim brings the next one
    into force, never removes another source's. Observers hear of the entry in force only.
    """

    def __init__(self, local_cluster: str, notify):
        self.local_cluster = local_cluster
        self._notify = notify
        self._claims: dict[Network, dict[str, tuple[int, IPCacheEntry]]] = {}
        self._in_force: dict[Network, IPCacheEntry] = {}
        self._counts: dict[str, int] = {}
        self._order = 0

    def _rank(self, source: str, order: int) -> tuple[int, int]:
        return (0 if source == self.local_cluster else 1 if source == POLICY_SOURCE else 2,
                order)

    def upsert(self, prefix: Network, entry: IPCacheEntry,
               source: str | None = None) -> bool:
        """``source`` (default: the entry's cluster) claims ``prefix``; True if that changed
        the entry in force."""
        source = source or entry.cluster
        claims = self._claims.setdefault(prefix, {})
        if source in claims:
            order = claims[source][0]  # an update keeps its place in line
        else:
            self._order += 1
            order = self._order
            self._counts[source] = self._counts.get(source, 0) + 1
        claims[source] = (order, entry)
        return self._refresh(prefix)

    def delete(self, prefix: Network, cluster: str | None = None
               ) -> IPCacheEntry | None:
        """Withdraw ``cluster``'s claim (every claim when None); the claim it had."""
        claims = self._claims.get(prefix)
        if not claims:
            return None
        sources = list(claims) if cluster is None else [cluster]
        gone = None
        for source in sources:
            claim = claims.pop(source, None)
            if claim is not None:
                gone = claim[1]
                self._counts[source] -= 1
        if not claims:
            del self._claims[prefix]
        self._refresh(prefix)
        return gone

    def _refresh(self, prefix: Network) -> bool:
        claims = self._claims.get(prefix)
        best = None
        if claims:
            source = min(claims, key=lambda s: self._rank(s, claims[s][0]))
            best = claims[source][1]
        if self._in_force.get(prefix) == best:
            return False
        if best is None:
            gone = self._in_force.pop(prefix)
            self._notify(ChangeKind.DELETE, gone)
        else:
            self._in_force[prefix] = best
            self._notify(ChangeKind.UPSERT, best)
        return True

    def get(self, prefix: Network) -> IPCacheEntry | None:
        return self._in_force.get(prefix)

    def claims(self, prefix: Network) -> dict[str, IPCacheEntry]:
        """Every source's claim on ``prefix``, whether in force or not."""
        return {s: e for s, (_, e) in self._claims.get(prefix, {}).items()}

    def values(self) -> list[IPCacheEntry]:
        return list(self._in_force.values())

    def count(self, cluster: str) -> int:
        """How many prefixes ``cluster`` claims (in force or not)."""
        return self._counts.get(cluster, 0)

    def __len__(self) -> int:
        return len(self._in_force)

    def __iter__(self):
        return iter(list(self._in_force))
