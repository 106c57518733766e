"""IP (or CIDR) to identity mappings, the facts the datapath judges remote traffic by."""

import contextlib
import functools
import ipaddress
import json
import socket

import attrs

from meshagent.events import ChangeKind
from meshagent.model.jsonfields import (
    GoNames,
    field,
    ip_address,
    load_object,
    mask_to_prefixlen,
    prefixlen_to_mask,
)
from meshagent.model.net import Address, Network


def prefix_key(prefix: Network | bytes) -> bytes:
    """A prefix packed: its length, then its address (5 bytes for IPv4, 17 for IPv6). The
    ipcache holds prefixes this way: an ``ipaddress`` network costs some 400 bytes."""
    if isinstance(prefix, bytes):
        return prefix
    return bytes((prefix.prefixlen,)) + prefix.network_address.packed


def host_key(address: Address) -> bytes:
    """:func:`prefix_key` of the address alone (/32, /128)."""
    return bytes((address.max_prefixlen,)) + address.packed


def unpack_address(packed: bytes) -> Address:
    return ipaddress.IPv4Address(packed) if len(packed) == 4 else ipaddress.IPv6Address(packed)


def _pack_host(host_ip: Address | str | bytes | None) -> bytes:
    """A host address as its bytes (b"": none), from an address, its text or its bytes."""
    if isinstance(host_ip, bytes):
        return host_ip
    return ipaddress.ip_address(host_ip).packed if host_ip else b""


@attrs.frozen(repr=False, weakref_slot=False)
class IPCacheEntry:
    """Who owns an address: published under ``cilium/state/ip/v1/<cluster>/<ip>``.

    Held packed, as a remote cluster may publish a million: the prefix as :func:`prefix_key`
    (also its key in the :class:`IPCache`), the host address as its bytes. ``prefix`` and
    ``host_ip`` unpack them; JSON shows those, as before."""

    # built as IPCacheEntry(prefix, identity, cluster, host_ip=...), as before the packing
    key: bytes = attrs.field(alias="prefix", converter=prefix_key, metadata={"json": "prefix"})
    identity: int
    cluster: str
    host: bytes = attrs.field(alias="host_ip", converter=_pack_host, default=b"",
                              metadata={"json": "host_ip"})  # b"": none
    namespace: str = ""
    pod_name: str = ""

    @property
    def prefixlen(self) -> int:
        return self.key[0]

    @property
    def packed(self) -> bytes:
        """The prefix's address as bytes (4 or 16)."""
        return self.key[1:]

    @property
    def version(self) -> int:
        return 4 if len(self.key) == 5 else 6

    @property
    def is_host(self) -> bool:
        """A single address (/32, /128), as every endpoint's entry is."""
        return self.key[0] == 8 * (len(self.key) - 1)

    @property
    def address(self) -> Address:
        """The prefix's (network) address."""
        return unpack_address(self.key[1:])

    @property
    def prefix(self) -> Network:
        if len(self.key) == 5:
            return ipaddress.IPv4Network((self.key[1:], self.key[0]))
        return ipaddress.IPv6Network((self.key[1:], self.key[0]))

    @property
    def host_ip(self) -> Address | None:
        return unpack_address(self.host) if self.host else None

    @property
    def key_ip(self) -> str:
        """The address as it appears in the key: bare for a host, ``a.b.c.d/len`` for a CIDR."""
        if self.key[0] == 32 and len(self.key) == 5:  # IPv4 host: as ipaddress writes it
            return socket.inet_ntop(socket.AF_INET, self.key[1:])
        return str(self.address) if self.is_host else str(self.prefix)

    def __repr__(self) -> str:
        return (f"IPCacheEntry({self.prefix}, {self.identity}, {self.cluster!r}, {self.host_ip},"
                f" {self.namespace!r}, {self.pod_name!r})")


def ipcache_to_json(entry: IPCacheEntry) -> bytes:
    """Cilium's identity.IPIdentityPair JSON."""
    bits = 8 * len(entry.packed)
    doc = {
        "IP": str(entry.address),
        "Mask": None if entry.is_host else prefixlen_to_mask(entry.prefixlen, bits),
        "HostIP": str(entry.host_ip) if entry.host else "",
        "ID": entry.identity,
        "Key": 0,
        "K8sNamespace": entry.namespace,
        "K8sPodName": entry.pod_name,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=4096)
def _packed_host(text: str) -> bytes:
    """A host address as bytes, one object for all the entries of a node (100 or so)."""
    return ip_address(text, "HostIP").packed


# Cilium's identity.IPIdentityPair (pkg/identity/identity.go), as encoding/json reads it
IPCACHE_FIELDS = GoNames("IP", "Mask", "HostIP", "ID", "Key", "Metadata", "K8sNamespace",
                         "K8sPodName", "NamedPorts")


def _packed_ip(text: str) -> bytes:
    """An address's bytes, read as :func:`ipaddress.ip_address` reads it: an IPv4 address
    by inet_pton, which takes exactly the dotted quads ipaddress takes (no leading zeros,
    four parts) some ten times faster; anything else by ipaddress."""
    try:
        return socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):
        return ip_address(text, "IP").packed


def _text(doc: dict, name: str) -> str:
    """An optional string field ("" when absent or null)."""
    value = doc.get(name)
    if value is None or type(value) is str:
        return value or ""
    return field(doc, name, str)  # raises, saying why


def ipcache_from_json(data: bytes, cluster: str) -> IPCacheEntry:
    doc = load_object(data, IPCACHE_FIELDS)
    ip = doc.get("IP")
    packed = _packed_ip(ip if type(ip) is str else field(doc, "IP", str))
    bits = 8 * len(packed)
    mask = doc.get("Mask")
    prefixlen = bits if mask is None else mask_to_prefixlen(mask, "Mask", bits)
    if prefixlen != bits:  # a range: its address must be the network's
        try:
            ipaddress.ip_network((unpack_address(packed), prefixlen))
        except ValueError as exc:
            raise ValueError(f"field 'IP': {exc}") from None
    identity = doc.get("ID")
    if type(identity) is not int:
        identity = field(doc, "ID", int)
    host = _text(doc, "HostIP")
    if identity < 0:
        raise ValueError(f"field 'ID': {identity} is negative")
    return IPCacheEntry(bytes((prefixlen,)) + packed, _shared_int(identity), cluster,
                        _packed_host(host) if host else None,
                        _text(doc, "K8sNamespace"), _text(doc, "K8sPodName"))


@functools.lru_cache(maxsize=65536)
def _shared_int(number: int) -> int:
    """One int object for every entry of an identity (28 bytes each, a million entries)."""
    return number


#: The source of the node-local CIDR identities of policies (not a cluster name: no ':' there).
POLICY_SOURCE = ":policy"
#: The source of the addresses the DNS proxy saw answered for ``toFQDNs`` names: ranked last,
#: so it never takes an address from a cluster's entry (a pod, a node) or a policy's CIDR.
FQDN_SOURCE = ":fqdn"
#: The source of node addresses given node identities (``--enable-node-selector-labels``).
NODE_SOURCE = ":nodes"


class IPCache:
    """IP prefix → identity, from several sources at once, one entry in force per prefix.

    Every cluster (and this node's policies, for CIDR identities, its node identities, and its
    DNS proxy, for ``toFQDNs`` addresses) claims prefixes under its own name; a claim never
    replaces another source's. The one in force is the local cluster's, then the node
    identities', then the policies', then the remote cluster that claimed the prefix first (as
    Cilium's ipcache prefers local sources over ClusterMesh), then the DNS proxy's. Withdrawing
    a claim brings the next one
    into force, never removes another source's. Observers hear of the entry in force only.

    Prefixes are given as networks or as :func:`prefix_key` (what the ClusterMesh sync has).
    Each prefix keeps its claims in one flat tuple, ``(source, entry, source, entry, ...)`` in
    that order of rank, the first in force; a prefix claimed only by the entry's own cluster
    (a remote cluster's million endpoints) keeps the entry alone, not even a tuple.
    """

    def __init__(self, local_cluster: str, notify=None, notify_many=None):
        self.local_cluster = local_cluster
        # observers: notify_many([(kind, entry), ...]) with every change in order, those made
        # while held in one call; or, without it, notify(kind, entry) for each change
        self._notify = notify
        self._notify_many = notify_many
        self._held_depth = 0
        self._pending: list[tuple[ChangeKind, IPCacheEntry]] = []
        # prefix_key -> (source, entry, ...) by rank, or the entry when its cluster's is the
        # only claim
        self._claims: dict[bytes, tuple | IPCacheEntry] = {}
        self._counts: dict[str, int] = {}

    def _tier(self, source: str) -> int:
        if source == self.local_cluster:
            return 0
        return {NODE_SOURCE: 1, POLICY_SOURCE: 2, FQDN_SOURCE: 4}.get(source, 3)

    def upsert(self, prefix: Network | bytes, entry: IPCacheEntry,
               source: str | None = None) -> bool:
        """``source`` (default: the entry's cluster) claims ``prefix``; True if that changed
        the entry in force. A new claim goes after those of its tier (claimed first, ranked
        first); an update keeps its place in line."""
        source = source or entry.cluster
        key = prefix_key(prefix)
        claims = self._held(key)
        sources = claims[::2]
        if source in sources:
            at = 2 * sources.index(source)
            rest = claims[at + 2:]
        else:
            tier = self._tier(source)
            at = 2 * sum(1 for s in sources if self._tier(s) <= tier)
            rest = claims[at:]
            self._counts[source] = self._counts.get(source, 0) + 1
        now = claims[:at] + (source, entry) + rest
        self._claims[key] = entry if len(now) == 2 and source == entry.cluster else now
        return self._changed(claims[1] if claims else None, now[1])

    def _held(self, key: bytes) -> tuple:
        """The claims on a prefix as a tuple (``(source, entry, ...)``, () for none)."""
        held = self._claims.get(key, ())
        return held if type(held) is tuple else (held.cluster, held)

    def delete(self, prefix: Network | bytes, cluster: str | None = None
               ) -> IPCacheEntry | None:
        """Withdraw ``cluster``'s claim (every claim when None); the claim it had (when None,
        the one in force)."""
        key = prefix_key(prefix)
        claims = self._held(key)
        if not claims:
            return None
        kept: tuple = ()
        gone = claims[1] if cluster is None else None
        for source, entry in zip(claims[::2], claims[1::2]):
            if cluster is None or source == cluster:
                gone = gone or entry
                self._counts[source] -= 1
            else:
                kept += (source, entry)
        if kept:
            self._claims[key] = kept[1] if len(kept) == 2 and kept[0] == kept[1].cluster else kept
        else:
            del self._claims[key]
        self._changed(claims[1], kept[1] if kept else None)
        return gone

    def _changed(self, before: IPCacheEntry | None, after: IPCacheEntry | None) -> bool:
        """Tell observers when the entry in force changed (later, while held)."""
        if before == after:
            return False
        change = (ChangeKind.DELETE, before) if after is None else (ChangeKind.UPSERT, after)
        if self._held_depth:
            self._pending.append(change)
        elif self._notify_many is not None:
            self._notify_many([change])
        else:
            self._notify(*change)
        return True

    @contextlib.contextmanager
    def held(self):
        """Hold change notices until the outermost scope ends, then give them in order, in
        one ``notify_many`` call (one ``notify`` each without it): a remote's listing is a
        million changes, and a million hook calls cost more than the changes. Observers hear
        of a change after it is made, as before, only later; the same prefix may change more
        than once in one call."""
        self._held_depth += 1
        try:
            yield
        finally:
            self._held_depth -= 1
            if not self._held_depth and self._pending:
                pending, self._pending = self._pending, []
                if self._notify_many is not None:
                    self._notify_many(pending)
                else:
                    for change in pending:
                        self._notify(*change)

    def get(self, prefix: Network | bytes) -> IPCacheEntry | None:
        held = self._claims.get(prefix_key(prefix))
        return held[1] if type(held) is tuple else held

    def claims(self, prefix: Network | bytes) -> dict[str, IPCacheEntry]:
        """Every source's claim on ``prefix``, whether in force or not."""
        claims = self._held(prefix_key(prefix))
        return dict(zip(claims[::2], claims[1::2]))

    def values(self) -> list[IPCacheEntry]:
        return [held[1] if type(held) is tuple else held for held in self._claims.values()]

    def count(self, cluster: str) -> int:
        """How many prefixes ``cluster`` claims (in force or not)."""
        return self._counts.get(cluster, 0)

    def __len__(self) -> int:
        return len(self._claims)

    def __iter__(self):
        return iter([entry.prefix for entry in self.values()])
