"""A strict reader of a cluster's etcd, decoding it the way Cilium's agents and KVStoreMesh do.

Nothing of meshagent's decoding is used: values are decoded with Go ``encoding/json``'s rules
into Cilium's structs (declared below from Cilium's source), then Cilium's validators run, and
only the prefixes Cilium watches are read, in the order it reads them (cluster config first,
then each kind once its sync canary exists). ``read_cluster`` returns what a Cilium 1.17 agent
would import from that cluster, and the list of what it would refuse or never see.

Go ``encoding/json`` rules applied (src/encoding/json/decode.go):
- an object key goes to the field whose JSON name equals it, else to one whose name equals it
  ignoring case (``foldName``; ASCII case folding here, Go also folds K/ſ);
- unknown keys are ignored; a repeated key overwrites; ``null`` leaves the zero value;
- a value of the wrong JSON type is an error (``UnmarshalTypeError``): the entry is refused
  (Cilium's ``Unmarshal`` returns it and the store skips the key);
- unsigned integers take a JSON number written as digits only, within the type's range
  (``strconv.ParseUint`` of the literal: no sign, fraction or exponent);
- ``net.IP`` is a ``TextUnmarshaler``: a JSON string, "" meaning nil, else ``net.ParseIP``
  (no zone, no leading zeros); ``net.IPMask`` is a ``[]byte``: standard base64.
"""

import abc
import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

from meshagent_dev import cilium as W

# -- Go encoding/json, just enough for Cilium's structs ---------------------------------------------


class GoJSONError(ValueError):
    pass


class _Number(str):
    """A JSON number kept as its literal text (Go parses the literal per target type)."""


def _no_constant(name: str):
    raise GoJSONError(f"invalid character {name[0]!r} looking for beginning of value")


def _loads(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # encoding/json replaces invalid UTF-8 inside strings; outside them it is a syntax error
        raise GoJSONError("invalid UTF-8") from None
    try:
        return json.loads(text, parse_int=_Number, parse_float=_Number,
                          parse_constant=_no_constant)  # NaN, Infinity: not JSON to Go
    except json.JSONDecodeError as exc:
        raise GoJSONError(f"syntax error: {exc}") from None


class GoType(abc.ABC):
    """A Go type as encoding/json fills it: its zero value, and how a JSON value decodes."""

    zero: Any = None

    @abc.abstractmethod
    def decode(self, value: Any, where: str) -> Any:
        """The Go value of ``value`` (GoJSONError as Go's Unmarshal would fail)."""


class _String(GoType):
    zero = ""

    def decode(self, value, where):
        if value is None:
            return self.zero
        if not isinstance(value, str) or isinstance(value, _Number):
            raise GoJSONError(f"{where}: cannot unmarshal {_kind(value)} into Go value of type string")
        return value


class _Bool(GoType):
    zero = False

    def decode(self, value, where):
        if value is None:
            return self.zero
        if not isinstance(value, bool):
            raise GoJSONError(f"{where}: cannot unmarshal {_kind(value)} into Go value of type bool")
        return value


class _Uint(GoType):
    zero = 0

    def __init__(self, bits: int):
        self.bits = bits

    def decode(self, value, where):
        if value is None:
            return self.zero
        if not isinstance(value, _Number):
            raise GoJSONError(f"{where}: cannot unmarshal {_kind(value)} into Go value of type"
                              f" uint{self.bits}")
        if not re.fullmatch(r"[0-9]+", value) or int(value) >= 1 << self.bits:
            raise GoJSONError(f"{where}: cannot unmarshal number {value} into Go value of type"
                              f" uint{self.bits}")
        return int(value)


class _IP(GoType):
    """net.IP (UnmarshalText: "" is nil; net.ParseIP otherwise)."""
    zero = None

    def decode(self, value, where):
        if value is None:
            return None
        if not isinstance(value, str) or isinstance(value, _Number):
            raise GoJSONError(f"{where}: cannot unmarshal {_kind(value)} into Go value of type net.IP")
        if value == "":
            return None
        return parse_ip(value, where)


class _Bytes(GoType):
    """[]byte, e.g. net.IPMask: a base64 string (StdEncoding)."""
    zero = None

    def decode(self, value, where):
        if value is None:
            return None
        if not isinstance(value, str) or isinstance(value, _Number):
            raise GoJSONError(f"{where}: cannot unmarshal {_kind(value)} into Go value of type []uint8")
        try:
            return base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
        except (binascii.Error, ValueError):
            raise GoJSONError(f"{where}: illegal base64 data") from None


class Ptr(GoType):
    def __init__(self, elem: GoType):
        self.elem = elem

    def decode(self, value, where):
        return None if value is None else self.elem.decode(value, where)


class Slice(GoType):
    def __init__(self, elem: GoType):
        self.elem = elem

    def decode(self, value, where):
        if value is None:
            return None
        if not isinstance(value, list):
            raise GoJSONError(f"{where}: cannot unmarshal {_kind(value)} into Go value of type []T")
        return [self.elem.decode(v, f"{where}[{i}]") for i, v in enumerate(value)]


class Map(GoType):
    """map[string]T."""

    def __init__(self, elem: GoType):
        self.elem = elem

    def decode(self, value, where):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise GoJSONError(f"{where}: cannot unmarshal {_kind(value)} into Go value of type map")
        return {k: self.elem.decode(v, f"{where}[{k!r}]") for k, v in value.items()}


class Struct(GoType):
    """A Go struct: (JSON name, type) per field, in struct order."""

    def __init__(self, name: str, fields: list[tuple[str, GoType]]):
        self.name = name
        self.fields = fields

    @property
    def zero(self):
        return {name: kind.zero for name, kind in self.fields}

    def decode(self, value, where):
        out = self.zero
        if value is None:
            return out
        if not isinstance(value, dict):
            raise GoJSONError(f"{where}: cannot unmarshal {_kind(value)} into Go value of type"
                              f" {self.name}")
        for key, item in value.items():
            target = self._field(key)
            if target is None:
                continue  # unknown fields are ignored
            name, kind = target
            out[name] = kind.decode(item, f"{self.name}.{name}")
        return out

    def _field(self, key: str):
        for name, kind in self.fields:
            if name == key:
                return name, kind
        folded = key.encode().lower()
        for name, kind in self.fields:
            if name.encode().lower() == folded:
                return name, kind
        return None


def _kind(value) -> str:
    if isinstance(value, _Number):
        return f"number {value}"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def parse_ip(text: str, where: str = "IP"):
    """Go's net.ParseIP: dotted IPv4 or IPv6 (no zone)."""
    if "%" in text:
        raise GoJSONError(f"{where}: invalid IP address: {text}")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise GoJSONError(f"{where}: invalid IP address: {text}") from None


def go_unmarshal(schema: Struct, data: bytes) -> dict:
    return schema.decode(_loads(data), schema.name)


STRING, BOOL, IP, BYTES = _String(), _Bool(), _IP(), _Bytes()
UINT8, UINT16, UINT32 = _Uint(8), _Uint(16), _Uint(32)

# -- Cilium's structs -------------------------------------------------------------------------------

# pkg/cidr/cidr.go: type CIDR struct{ *net.IPNet } -> net.IPNet's fields IP and Mask promoted
CIDR = Struct("cidr.CIDR", [("IP", IP), ("Mask", BYTES)])
# pkg/node/types/node.go Address{Type addressing.AddressType; IP net.IP} (no tags)
ADDRESS = Struct("nodeTypes.Address", [("Type", STRING), ("IP", IP)])
# pkg/node/types/node.go struct Node (Cilium 1.17; no json tags)
NODE = Struct("nodeTypes.Node", [
    ("Name", STRING), ("Cluster", STRING), ("IPAddresses", Slice(ADDRESS)),
    ("IPv4AllocCIDR", Ptr(CIDR)), ("IPv4SecondaryAllocCIDRs", Slice(Ptr(CIDR))),
    ("IPv6AllocCIDR", Ptr(CIDR)), ("IPv6SecondaryAllocCIDRs", Slice(Ptr(CIDR))),
    ("IPv4HealthIP", IP), ("IPv6HealthIP", IP), ("IPv4IngressIP", IP), ("IPv6IngressIP", IP),
    ("ClusterID", UINT32), ("Source", STRING), ("EncryptionKey", UINT8),
    ("Labels", Map(STRING)), ("Annotations", Map(STRING)), ("NodeIdentity", UINT32),
    ("WireguardPubKey", STRING), ("BootID", STRING),
])
# pkg/identity/identity.go NamedPort / IPIdentityPair (json tags)
NAMED_PORT = Struct("identity.NamedPort", [("Name", STRING), ("Port", UINT16),
                                           ("Protocol", STRING)])
IP_IDENTITY_PAIR = Struct("identity.IPIdentityPair", [
    ("IP", IP), ("Mask", BYTES), ("HostIP", IP), ("ID", UINT32), ("Key", UINT8),
    ("Metadata", STRING), ("K8sNamespace", STRING), ("K8sPodName", STRING),
    ("K8sServiceAccount", STRING), ("NamedPorts", Slice(NAMED_PORT)),
])
# pkg/loadbalancer/loadbalancer.go L4Addr{Protocol L4Type; Port uint16} (no tags)
L4ADDR = Struct("loadbalancer.L4Addr", [("Protocol", STRING), ("Port", UINT16)])
PORT_CONFIGURATION = Map(Ptr(L4ADDR))  # pkg/clustermesh/store/store.go PortConfiguration
# pkg/clustermesh/store/store.go BackendZone / ForZone / ClusterService (json tags)
BACKEND_ZONE = Struct("store.BackendZone", [
    ("zone", STRING), ("forZones", Slice(Struct("store.ForZone", [("name", STRING)])))])
CLUSTER_SERVICE = Struct("store.ClusterService", [
    ("cluster", STRING), ("namespace", STRING), ("name", STRING),
    ("frontends", Map(PORT_CONFIGURATION)), ("backends", Map(PORT_CONFIGURATION)),
    ("hostnames", Map(STRING)), ("zones", Map(BACKEND_ZONE)), ("labels", Map(STRING)),
    ("selector", Map(STRING)), ("includeExternal", BOOL), ("shared", BOOL),
    ("clusterID", UINT32),
])
# pkg/clustermesh/types/types.go CiliumClusterConfig / CiliumClusterConfigCapabilities
CLUSTER_CONFIG = Struct("types.CiliumClusterConfig", [
    ("id", UINT32),
    ("capabilities", Struct("types.CiliumClusterConfigCapabilities", [
        ("syncedCanaries", BOOL), ("cached", BOOL), ("maxConnectedClusters", UINT32),
        ("serviceExportsEnabled", Ptr(BOOL))])),
])

# -- Cilium's rules ------------------------------------------------------------------------------------

# pkg/clustermesh/types/types.go: ClusterIDMin 0, ClusterIDMax = MaxConnectedClusters (255/511)
# pkg/identity/numericidentity.go MinimalNumericIdentity = 256
MINIMAL_NUMERIC_IDENTITY = 256
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"  # pkg/policy/api/selector.go PolicyLabelCluster
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def is_rfc3339(value: bytes | None) -> bool:
    """Go's time.RFC3339 layout "2006-01-02T15:04:05Z07:00" (what the heartbeat and canaries
    hold: pkg/kvstore/heartbeat/heartbeat.go, pkg/kvstore/store/syncstore.go)."""
    return value is not None and bool(RFC3339.match(value.decode("ascii", "replace")))


def identity_shift(max_connected_clusters: int = 255) -> int:
    """pkg/clustermesh/types/types.go GetClusterIDShift: 24 - log2(max + 1)."""
    return 15 if max_connected_clusters == 511 else 16


def identity_range(cluster_id: int, max_connected_clusters: int = 255) -> range:
    """pkg/clustermesh/types/types.go Minimal/MaximumAllocationIdentity: for an id > 0 the whole
    id << shift .. ((id + 1) << shift) - 1; for 0, 256 .. (1 << shift) - 1."""
    shift = identity_shift(max_connected_clusters)
    start = cluster_id << shift if cluster_id > 0 else MINIMAL_NUMERIC_IDENTITY
    return range(start, (cluster_id + 1) << shift)


def validate_cluster_id(cluster_id: int, max_connected_clusters: int = 255) -> str:
    """pkg/clustermesh/types/types.go ValidateClusterID."""
    if cluster_id == 0:
        return "ClusterID 0 is reserved"
    if cluster_id > max_connected_clusters:
        return f"ClusterID > {max_connected_clusters} is not supported"
    return ""


def validate_remote_config(config: dict | None, max_connected_clusters: int = 255) -> str:
    """pkg/clustermesh/types/option.go ClusterInfo.ValidateRemoteConfig (1.17: the config is
    required): the id must be valid; with an extended mesh (511) maxConnectedClusters must be
    equal on both sides."""
    if config is None or config["id"] == 0:
        return "remote cluster is missing cluster configuration"
    if problem := validate_cluster_id(config["id"], max_connected_clusters):
        return problem
    remote_max = config["capabilities"]["maxConnectedClusters"]
    if max_connected_clusters != 255 and remote_max != max_connected_clusters:
        return (f"mismatched MaxConnectedClusters; local={max_connected_clusters},"
                f" remote={remote_max}")
    return ""


def node_ip(node: dict, ipv6: bool = False):
    """pkg/node/addressing/addresstype.go ExtractNodeIP: InternalIP first, else the last
    ExternalIP, else any other address; never a CiliumInternalIP."""
    backup = None
    for address in node["IPAddresses"] or []:
        ip = address["IP"]
        if ip is None or (ip.version == 6) != ipv6:
            continue
        kind = address["Type"]
        if kind == "CiliumInternalIP":
            continue
        if kind == "InternalIP":
            return ip
        if kind == "ExternalIP":
            backup = ip
        elif backup is None:
            backup = ip
    return backup


def cidr_text(cidr: dict | None) -> str | None:
    """A decoded cidr.CIDR as "ip/len" (net.IPNet.String)."""
    if cidr is None or cidr["IP"] is None:
        return None
    mask = cidr["Mask"] or b""
    ones = "".join(f"{b:08b}" for b in mask)
    if "01" in ones:
        return f"{cidr['IP']}/{mask.hex()}"  # a non-canonical mask, as net.IPNet.String shows it
    return f"{cidr['IP']}/{ones.count('1')}"


def pod_cidrs(node: dict) -> list[str]:
    out = []
    for family in ("IPv4", "IPv6"):
        for cidr in [node[f"{family}AllocCIDR"]] + list(node[f"{family}SecondaryAllocCIDRs"] or []):
            if (text := cidr_text(cidr)) is not None:
                out.append(text)
    return out


def pair_prefix_string(pair: dict) -> str:
    """pkg/identity/identity.go IPIdentityPair.PrefixString (the key it must be stored under):
    IP.String() for a host (Mask nil), "ip/ones" otherwise."""
    ip = pair["IP"]
    text = "<nil>" if ip is None else str(ip)
    if pair["Mask"] is None:
        return text
    ones = "".join(f"{b:08b}" for b in pair["Mask"]).count("1")
    return f"{text}/{ones}"


def parse_labels(value: bytes) -> list[tuple[str, str, str]]:
    """pkg/identity/key/global_identity.go PutKey -> pkg/labels/array.go
    NewLabelArrayFromSortedList: ';'-separated "source:key=value" (pkg/labels/labels.go
    ParseLabel; no source means "unspec")."""
    out = []
    for text in value.decode("utf-8", "replace").split(";"):
        if not text:
            continue
        source, sep, rest = text.partition(":")
        if not sep:
            source, rest = "unspec", text
        key, _, val = rest.partition("=")
        out.append((source, key, val))
    return out


# -- reading a cluster ---------------------------------------------------------------------------------

@dataclass
class CiliumView:
    """What a Cilium agent imports from one remote cluster."""
    cluster: str
    local_cluster_id: int = 0
    config: dict | None = None
    nodes: dict[str, dict] = field(default_factory=dict)  # node name -> decoded Node
    identities: dict[int, frozenset[str]] = field(default_factory=dict)
    ipcache: dict[str, dict] = field(default_factory=dict)  # prefix string -> IPIdentityPair
    services: dict[tuple[str, str], dict] = field(default_factory=dict)
    canaries: dict[str, bytes | None] = field(default_factory=dict)  # kind -> canary value
    watched: dict[str, bool] = field(default_factory=dict)  # kind -> its watcher would run
    problems: list[str] = field(default_factory=list)


def prefixes(cluster: str, cached: bool) -> dict[str, str]:
    """The prefix a Cilium agent watches per kind (pkg/clustermesh/remote_cluster.go Run with
    the ``adapter`` = kvstore.StateToCachePrefix when the config says ``cached``):
    nodes/v1/<cluster>, services/v1/<cluster>; pkg/ipcache/kvstore.go Watch: ip/v1/default
    (state) or cilium/cache/ip/v1/<cluster> (cached); pkg/identity/cache/allocator.go
    WatchRemoteIdentities: identities/v1/id (state) or cilium/cache/identities/v1/<cluster>/id."""
    base = W.CACHE if cached else W.STATE
    return {
        "nodes": f"{base}/nodes/v1/{cluster}/",
        "services": f"{base}/services/v1/{cluster}/",
        "ip": f"{base}/ip/v1/{cluster if cached else W.ADDRESS_SPACE}/",
        "identities": (f"{base}/identities/v1/{cluster}/id/" if cached
                       else f"{base}/identities/v1/id/"),
    }


async def _get(client, key: str) -> bytes | None:
    entry = await client.get(key)
    return None if entry is None else entry.value


async def _list(client, prefix: str) -> list[tuple[str, bytes]]:
    return [(kv.key, kv.value) for kv in (await client.list_prefix(prefix)).items]


async def read_cluster(client, cluster: str, *, local_cluster_id: int = 0,
                       max_connected_clusters: int = 255) -> CiliumView:
    """What a Cilium 1.17 agent (of a cluster with id ``local_cluster_id``) imports from
    ``cluster`` reading ``client``'s etcd, plus every problem it meets (an entry it refuses, a
    kind it never watches)."""
    view = CiliumView(cluster, local_cluster_id)
    # pkg/clustermesh/common/remote_cluster.go: the cluster config is read (and validated)
    # before anything else is watched; pkg/clustermesh/clustercfg/clustercfg.go Get
    raw = await _get(client, W.cluster_config_key(cluster))
    if raw is None:
        view.problems.append(f"config: no {W.cluster_config_key(cluster)}: remote cluster is"
                             " missing cluster configuration")
        return view
    try:
        config = go_unmarshal(CLUSTER_CONFIG, raw)
    except GoJSONError as exc:
        view.problems.append(f"config: {exc}")
        return view
    if problem := validate_remote_config(config, max_connected_clusters):
        view.problems.append(f"config: {problem}")
        return view
    if config["id"] == local_cluster_id:  # pkg/clustermesh/idsmgr.go ReserveClusterID
        view.problems.append(f"config: cluster id {config['id']} is already in use")
        return view
    view.config = config
    capabilities = config["capabilities"]
    cached = capabilities["cached"]
    cluster_id = config["id"]
    for kind, prefix in prefixes(cluster, cached).items():
        canary = W.canary_key(kind, cluster, cache=cached)
        view.canaries[kind] = await _get(client, canary)
        # pkg/kvstore/store/watchstoremgr.go: with syncedCanaries a kind's watcher starts once
        # its canary exists; without, at once (NewWatchStoreManagerImmediate)
        if capabilities["syncedCanaries"] and view.canaries[kind] is None:
            view.watched[kind] = False
            view.problems.append(f"{kind}: no sync canary {canary}: Cilium never starts"
                                 f" watching {prefix}")
            continue
        view.watched[kind] = True
        for key, value in await _list(client, prefix):
            name = key[len(prefix):]
            try:
                DECODERS[kind](view, cluster, cluster_id, max_connected_clusters, name, value)
            except GoJSONError as exc:
                view.problems.append(f"{kind}: {key}: {exc}")
    return view


def _node(view, cluster, cluster_id, max_clusters, name, value):
    node = go_unmarshal(NODE, value)
    # pkg/node/types/node.go Node.validate (1.17): Cluster and Name must be set
    if node["Cluster"] == "":
        raise GoJSONError("cluster is unset")
    if node["Name"] == "":
        raise GoJSONError("name is unset")
    # pkg/node/store/store.go ClusterNameValidator, NameValidator, ClusterIDValidator (the
    # remote's key creator: pkg/clustermesh/clustermesh.go NewRemoteCluster)
    if node["Cluster"] != cluster:
        raise GoJSONError(f"unexpected cluster name: got {node['Cluster']}, expected {cluster}")
    if node["Name"] != name:
        raise GoJSONError(f"name does not match key: got {node['Name']}, expected {name}")
    if node["ClusterID"] != cluster_id:
        raise GoJSONError(f"unexpected cluster ID: got {node['ClusterID']}, expected {cluster_id}")
    view.nodes[name] = node


def _service(view, cluster, cluster_id, max_clusters, name, value):
    svc = go_unmarshal(CLUSTER_SERVICE, value)
    # pkg/clustermesh/store/store.go ClusterService.validate
    for fname in ("cluster", "namespace", "name"):
        if svc[fname] == "":
            raise GoJSONError(f"{fname} is unset")
    # (the id is checked unless it is the reader's own, "to allow it to be zero")
    if svc["clusterID"] != view.local_cluster_id and (
            problem := validate_cluster_id(svc["clusterID"], max_clusters)):
        raise GoJSONError(problem)
    for where in ("frontends", "backends"):
        for address in svc[where] or {}:
            parse_ip(address, where)  # netip.ParseAddr; a zone is refused
    # ClusterNameValidator, NamespacedNameValidator, ClusterIDValidator
    if svc["cluster"] != cluster:
        raise GoJSONError(f"unexpected cluster name: got {svc['cluster']}, expected {cluster}")
    if f"{svc['namespace']}/{svc['name']}" != name:
        raise GoJSONError(f"namespaced name does not match key: got"
                          f" {svc['namespace']}/{svc['name']}, expected {name}")
    if svc["clusterID"] != cluster_id:
        raise GoJSONError(f"unexpected cluster ID: got {svc['clusterID']}, expected {cluster_id}")
    view.services[(svc["namespace"], svc["name"])] = svc


def _identity(view, cluster, cluster_id, max_clusters, name, value):
    # pkg/allocator/cache.go: the id is the key's last part, strconv.ParseUint(.., 10, 64)
    if not re.fullmatch(r"[0-9]+", name):
        raise GoJSONError(f"unable to parse key {name!r} as an identity")
    number = int(name)
    # pkg/identity/cache/allocator.go clusterIDValidator and clusterNameValidator
    allowed = identity_range(cluster_id, max_clusters)
    if number not in allowed:
        raise GoJSONError(f"ID {number} does not belong to the allocation range of cluster ID"
                          f" {cluster_id}")
    labels = parse_labels(value)
    found = False
    for source, key, val in labels:
        if key != CLUSTER_LABEL:
            continue
        if source != "k8s":
            raise GoJSONError(f"unexpected source for cluster label: got {source}, expected k8s")
        if val != cluster:
            raise GoJSONError(f"unexpected cluster name: got {val}, expected {cluster}")
        found = True
    if not found:
        raise GoJSONError(f"could not find expected label {CLUSTER_LABEL}")
    view.identities[number] = frozenset(f"{s}:{k}={v}" if v else f"{s}:{k}"
                                        for s, k, v in labels)


def _ip(view, cluster, cluster_id, max_clusters, name, value):
    pair = go_unmarshal(IP_IDENTITY_PAIR, value)
    # pkg/identity/identity.go IPIdentityPair.Unmarshal: the key must be PrefixString()
    if (got := pair_prefix_string(pair)) != name:
        raise GoJSONError(f"IP address does not match key: expected {name}, got {got}")
    # pkg/ipcache/kvstore.go OnUpdate: nil IP ignored; WithIdentityValidator(config.ID)
    if pair["IP"] is None:
        raise GoJSONError("Ignoring entry with nil IP")
    ident = pair["ID"]
    if ident >= MINIMAL_NUMERIC_IDENTITY and ident not in identity_range(cluster_id, max_clusters):
        raise GoJSONError(f"ID {ident} does not belong to the allocation range of cluster ID"
                          f" {cluster_id}")
    view.ipcache[name] = pair


DECODERS = {"nodes": _node, "services": _service, "identities": _identity, "ip": _ip}


# -- Cilium's KVStoreMesh reading a remote ------------------------------------------------------------

@dataclass
class KVStoreMeshView:
    """What Cilium's KVStoreMesh would copy from a remote cluster into its local cache."""
    cluster: str
    config: dict | None = None
    copied: dict[str, bytes] = field(default_factory=dict)  # cache key -> value
    problems: list[str] = field(default_factory=list)


async def read_as_kvstoremesh(client, cluster: str) -> KVStoreMeshView:
    """pkg/clustermesh/kvstoremesh/remote_cluster.go Run: the remote's cluster config is read
    first (pkg/clustermesh/common/remote_cluster.go); with syncedCanaries each kind is watched
    only once its canary cilium/synced/<cluster>/cilium/state/<kind>/v1 exists
    (store.NewWatchStoreManagerSync); the prefixes are nodes/v1/<cluster>,
    services/v1/<cluster>, ip/v1/default and identities/v1 (all of it). Values are copied as
    they are (store.KVPairCreator: no decoding)."""
    view = KVStoreMeshView(cluster)
    raw = await _get(client, W.cluster_config_key(cluster))
    if raw is None:
        view.problems.append(f"config: no {W.cluster_config_key(cluster)}")
        return view
    try:
        view.config = go_unmarshal(CLUSTER_CONFIG, raw)
    except GoJSONError as exc:
        view.problems.append(f"config: {exc}")
        return view
    capabilities = view.config["capabilities"]
    if capabilities["cached"]:
        view.problems.append("config: the remote is itself a KVStoreMesh cache")
        return view
    watched = {"nodes": f"{W.STATE}/nodes/v1/{cluster}/",
               "services": f"{W.STATE}/services/v1/{cluster}/",
               "ip": f"{W.STATE}/ip/v1/{W.ADDRESS_SPACE}/",
               "identities": f"{W.STATE}/identities/v1/"}
    for kind, prefix in watched.items():
        canary = W.canary_key(kind, cluster)
        if capabilities["syncedCanaries"] and await _get(client, canary) is None:
            view.problems.append(f"{kind}: no sync canary {canary}: KVStoreMesh never copies"
                                 f" {prefix}")
            continue
        for key, value in await _list(client, prefix):
            rest = key[len(prefix):]
            view.copied[f"{W.CACHE}/{kind}/v1/{cluster}/{rest}"] = value
    return view
