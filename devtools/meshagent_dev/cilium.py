"""A remote cluster written into etcd exactly as Cilium 1.17 writes it: cluster2, id 102 (the
conformance tests and the lab's Cilium-shaped peer, `meshagent lab up --cilium-peer`, use it).

The golden values below are byte-for-byte what Cilium's writers put in etcd (their Go structs
through ``encoding/json``); the file of github.com/cilium/cilium each follows is named beside
it. The variants are built from the same values, each by a small function, to hold meshagent to
what Cilium's own agents accept.

A writer is any client with ``async put(key, bytes)`` and ``async delete(key)`` (the tests
pass a plain etcd client): values go to etcd as the bytes given here, nothing of meshagent's
encoding is involved.
"""

import base64
import ipaddress
import json
import time
from collections.abc import Iterable, Mapping

CLUSTER = "cluster2"
CLUSTER_ID = 102

# -- key layout ---------------------------------------------------------------------------------
# pkg/kvstore/kvstore.go: BaseKeyPrefix "cilium", StatePrefix "cilium/state", CachePrefix
# "cilium/cache", HeartbeatPath "cilium/.heartbeat", ClusterConfigPrefix "cilium/cluster-config",
# SyncedPrefix "cilium/synced"; StateToCachePrefix swaps the first two.
STATE = "cilium/state"
CACHE = "cilium/cache"
HEARTBEAT_KEY = "cilium/.heartbeat"
CLUSTER_CONFIG_PREFIX = "cilium/cluster-config"
SYNCED_PREFIX = "cilium/synced"
# The four kinds and their store prefixes:
#   nodes      pkg/node/store/store.go        NodeStorePrefix    cilium/state/nodes/v1
#   services   pkg/clustermesh/store/store.go ServiceStorePrefix cilium/state/services/v1
#   identities pkg/identity/cache/cache.go    IdentitiesPath     cilium/state/identities/v1
#   ip         pkg/ipcache/kvstore.go         IPIdentitiesPath   cilium/state/ip/v1
KINDS = ("nodes", "services", "identities", "ip")
# pkg/ipcache/kvstore.go: DefaultAddressSpace = "default"; AddressSpace = DefaultAddressSpace.
# Cilium's agents write (IPIdentitySynchronizer.Upsert) and watch (IPIdentityWatcher.Watch)
# cilium/state/ip/v1/default/<ip>, whichever cluster they are in.
ADDRESS_SPACE = "default"


def node_key(name: str, cluster: str = CLUSTER) -> str:
    # pkg/node/store/store.go NodeStorePrefix + pkg/node/types/node.go GetKeyNodeName
    # (path.Join(cluster, name))
    return f"{STATE}/nodes/v1/{cluster}/{name}"


def identity_key(identity: int) -> str:
    # pkg/kvstore/allocator/allocator.go: master keys "<IdentitiesPath>/id/<id>"
    return f"{STATE}/identities/v1/id/{identity}"


def ip_key(ip: str) -> str:
    # pkg/ipcache/kvstore.go IPIdentitySynchronizer.Upsert:
    # JoinKey(IPIdentitiesPath, AddressSpace, IP.String())
    return f"{STATE}/ip/v1/{ADDRESS_SPACE}/{ip}"


def service_key(namespace: str, name: str, cluster: str = CLUSTER) -> str:
    # pkg/clustermesh/store/store.go ServiceStorePrefix + ClusterService.GetKeyName
    return f"{STATE}/services/v1/{cluster}/{namespace}/{name}"


def cluster_config_key(cluster: str = CLUSTER) -> str:
    # pkg/clustermesh/clustercfg/clustercfg.go Set: path.Join(ClusterConfigPrefix, clusterName)
    return f"{CLUSTER_CONFIG_PREFIX}/{cluster}"


def canary_key(kind: str, cluster: str = CLUSTER, cache: bool = False) -> str:
    """The sync canary of one kind: pkg/kvstore/store/syncstore.go writes
    path.Join(SyncedPrefix, cluster, <prefix>) once the kind's initial state is up;
    pkg/kvstore/store/watchstoremgr.go (WatchStoreManagerSync) starts the kind's watcher only
    once it exists. KVStoreMesh's cache canaries name the cache prefix
    (pkg/clustermesh/kvstoremesh/remote_cluster.go newReflector: WSSWithSyncedKeyOverride)."""
    return f"{SYNCED_PREFIX}/{cluster}/{CACHE if cache else STATE}/{kind}/v1"


def rfc3339(when: float | None = None) -> bytes:
    """Go's time.Now().Format(time.RFC3339), the value of the heartbeat
    (pkg/kvstore/heartbeat/heartbeat.go) and of the sync canaries (pkg/kvstore/store/syncstore.go)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)).encode()


# -- golden values (cluster2, id 102) -------------------------------------------------------------

# pkg/node/types/node.go, struct Node: no json tags (keys are the Go field names, in struct
# order, nil as null); Address{Type, IP} (pkg/node/types/node.go); *cidr.CIDR is an embedded
# *net.IPNet (pkg/cidr/cidr.go), so {"IP": ..., "Mask": base64 of the mask bytes} (net.IPMask is
# a []byte); Source is pkg/source/source.go's string ("custom-resource"); BootID (1.17).
NODE_NAME = "worker1"
NODE = (
    b'{"Name":"worker1","Cluster":"cluster2","IPAddresses":[{"Type":"InternalIP","IP":"10.99.2.1"},'
    b'{"Type":"InternalIP","IP":"fd00:99::2:1"}],"IPv4AllocCIDR":{"IP":"10.2.1.0","Mask":"////AA=="},'
    b'"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:2:1::","Mask":"//////////8AAAAAAAAAAA=="},'
    b'"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"",'
    b'"IPv6IngressIP":"","ClusterID":102,"Source":"custom-resource","EncryptionKey":0,"Labels":null,'
    b'"Annotations":null,"NodeIdentity":0,"WireguardPubKey":"","BootID":"6c1b9d2e-5a3f-4e7b-9c0d-1f2e3a4b5c6d"}'
)
NODE_IPV4, NODE_IPV6 = "10.99.2.1", "fd00:99::2:1"
NODE_POD_CIDRS = ("10.2.1.0/24", "fd00:2:1::/64")  # "////AA==" is /24, "//////////8AAAAAAAAAAA==" /64

# pkg/identity/key/global_identity.go GlobalIdentity.GetKey: the sorted labels, each
# "source:key=value;" (pkg/labels/array.go, sortable); the value of the master key id/<id>.
# 102 << 16 = 6684672 is cluster2's first identity (pkg/clustermesh/types/types.go
# MinimalAllocationIdentity); 6685228 is 556 past it.
IDENTITY_ID = 6685228
IDENTITY = (b"k8s:app=employee;k8s:io.cilium.k8s.policy.cluster=cluster2;"
            b"k8s:io.kubernetes.pod.namespace=istio-space;")
IDENTITY_LABELS = frozenset({"k8s:app=employee", "k8s:io.cilium.k8s.policy.cluster=cluster2",
                             "k8s:io.kubernetes.pod.namespace=istio-space"})

# pkg/identity/identity.go, struct IPIdentityPair: json tags IP, Mask (net.IPMask, null for a
# host), HostIP, ID, Key, Metadata, K8sNamespace/K8sPodName (omitempty), NamedPorts (omitempty).
ENDPOINT_IP = "10.2.1.5"
IP = (b'{"IP":"10.2.1.5","Mask":null,"HostIP":"10.99.2.1","ID":6685228,"Key":0,"Metadata":"",'
      b'"K8sNamespace":"istio-space","K8sPodName":"employee-0"}')

# pkg/clustermesh/store/store.go, struct ClusterService: json tags cluster, namespace, name,
# frontends/backends (map ip -> PortConfiguration, itself map port NAME -> *loadbalancer.L4Addr,
# whose fields have no tags: Protocol, Port; pkg/loadbalancer/loadbalancer.go), hostnames
# (omitempty), labels, selector, includeExternal, shared, clusterID.
SERVICE_NAMESPACE, SERVICE_NAME = "default", "protected-db"
SERVICE_VIP = "10.96.0.10"
SERVICE_PORT_NAME = "redis"
SERVICE = (
    b'{"cluster":"cluster2","namespace":"default","name":"protected-db","frontends":{"10.96.0.10":'
    b'{"redis":{"Protocol":"TCP","Port":6379}}},"backends":{"10.2.1.5":{"redis":{"Protocol":"TCP",'
    b'"Port":6379}}},"hostnames":{},"labels":{"app.kubernetes.io/name":"protected-db"},'
    b'"selector":{"app":"protected-db"},"includeExternal":true,"shared":true,"clusterID":102}'
)

# pkg/clustermesh/types/types.go CiliumClusterConfig{ID `id`, Capabilities `capabilities`
# {SyncedCanaries `syncedCanaries`, Cached `cached`, MaxConnectedClusters
# `maxConnectedClusters`}} (all omitempty), written by clustermesh-apiserver/clustermesh/root.go.
CLUSTER_CONFIG = b'{"id":102,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}'


def golden(*, canaries: Iterable[str] = KINDS, when: float | None = None) -> dict[str, bytes]:
    """Every key of the golden cluster2, with the canaries of ``canaries`` (kinds)."""
    stamp = rfc3339(when)
    entries = {
        node_key(NODE_NAME): NODE,
        identity_key(IDENTITY_ID): IDENTITY,
        ip_key(ENDPOINT_IP): IP,
        service_key(SERVICE_NAMESPACE, SERVICE_NAME): SERVICE,
        cluster_config_key(): CLUSTER_CONFIG,
        HEARTBEAT_KEY: stamp,
    }
    for kind in canaries:
        entries[canary_key(kind)] = stamp
    return entries


async def write(client, entries: Mapping[str, bytes | None]) -> None:
    """Put each key's bytes as they are (None deletes the key)."""
    for key, value in entries.items():
        if value is None:
            await client.delete(key)
        else:
            await client.put(key, value)


# -- helpers to build variants from the golden values ---------------------------------------------

def _compact(doc) -> bytes:
    """Go's json.Marshal spacing (none); key order as the dict gives it."""
    return json.dumps(doc, separators=(",", ":")).encode()


def _mask(prefixlen: int, bits: int) -> str:
    """net.IPMask as encoding/json writes a []byte: standard base64 (pkg/cidr/cidr.go)."""
    ones = ((1 << bits) - 1) ^ ((1 << (bits - prefixlen)) - 1)
    return base64.b64encode(ones.to_bytes(bits // 8, "big")).decode()


def node_doc(**changes) -> dict:
    """The golden node as a dict (field order kept), with ``changes`` applied."""
    doc = json.loads(NODE)
    doc.update(changes)
    return doc


def alloc_cidr(cidr: str) -> dict:
    network = ipaddress.ip_network(cidr)
    return {"IP": str(network.network_address),
            "Mask": _mask(network.prefixlen, network.max_prefixlen)}


def ip_pair(ip: str, identity: int, *, host_ip: str = NODE_IPV4, namespace: str = "istio-space",
            pod: str = "employee-0") -> bytes:
    """An IPIdentityPair laid out as the golden one (pkg/identity/identity.go)."""
    return _compact({"IP": ip, "Mask": None, "HostIP": host_ip, "ID": identity, "Key": 0,
                     "Metadata": "", "K8sNamespace": namespace, "K8sPodName": pod})


def labels_value(labels: Iterable[str]) -> bytes:
    """pkg/identity/key/global_identity.go GetKey: sorted, each followed by ';'."""
    return "".join(f"{label};" for label in sorted(labels)).encode()


def endpoint_labels(app: str, namespace: str = "istio-space", *extra: str) -> set[str]:
    """The labels Cilium gives a pod (pkg/labels, pkg/k8s/apis/cilium.io const.go:
    io.kubernetes.pod.namespace, io.cilium.k8s.policy.cluster)."""
    return {f"k8s:app={app}", f"k8s:io.cilium.k8s.policy.cluster={CLUSTER}",
            f"k8s:io.kubernetes.pod.namespace={namespace}", *extra}


# -- variants ---------------------------------------------------------------------------------------

def external_ip_node() -> tuple[str, dict[str, bytes]]:
    """A node announcing only an ExternalIP (a cloud node with no InternalIP listed). Cilium's
    pkg/node/addressing/addresstype.go ExtractNodeIP: InternalIP first, else ExternalIP, else
    any address but a CiliumInternalIP. Returns (the address to be used, entries)."""
    doc = node_doc(Name="worker2", IPAddresses=[{"Type": "ExternalIP", "IP": "203.0.113.22"}],
                   IPv4AllocCIDR=alloc_cidr("10.2.2.0/24"), IPv6AllocCIDR=None,
                   BootID="0e4c7f1a-2b3d-4c5e-8f90-a1b2c3d4e5f6")
    return "203.0.113.22", {node_key("worker2"): _compact(doc)}


RANGE_START = CLUSTER_ID << 16  # 6684672: pkg/clustermesh/types/types.go MinimalAllocationIdentity


def range_start_identities() -> dict[str, bytes]:
    """The first 256 ids of cluster2's range, 6684672..6684927: for a cluster id > 0 Cilium's
    range starts at id << 16 with no reserved ids in it (pkg/clustermesh/types/types.go
    MinimalAllocationIdentity; checked by pkg/identity/cache/allocator.go clusterIDValidator and
    pkg/ipcache/kvstore.go WithIdentityValidator), plus an endpoint on the very first one."""
    entries = {identity_key(RANGE_START + n): labels_value(endpoint_labels(f"early-{n}"))
               for n in range(256)}
    entries[ip_key("10.2.1.6")] = ip_pair("10.2.1.6", RANGE_START, pod="early-0")
    return entries


def dual_stack_service() -> dict[str, bytes]:
    """The golden service of a dual-stack cluster: an IPv6 frontend and backend beside the IPv4
    ones (pkg/clustermesh/store/store.go ClusterService; validate() accepts any netip address
    without a zone), and the IPv6 backend's ipcache entry."""
    doc = json.loads(SERVICE)
    doc["frontends"]["fd00:96::10"] = {"redis": {"Protocol": "TCP", "Port": 6379}}
    doc["backends"]["fd00:2:1::5"] = {"redis": {"Protocol": "TCP", "Port": 6379}}
    return {service_key(SERVICE_NAMESPACE, SERVICE_NAME): _compact(doc),
            ip_key("fd00:2:1::5"): ip_pair("fd00:2:1::5", IDENTITY_ID, host_ip=NODE_IPV6)}


def go_json_spellings() -> dict[str, bytes]:
    """The golden node, endpoint and service as Go's encoding/json also reads them: field names
    in any case (encoding/json matches a key to a field case-insensitively when no exact match;
    Cilium's own tests write "port"/"protocol"), unknown fields (ignored), absent fields (zero
    values: no Source, no Labels, no Metadata, no Key...)."""
    node = (b'{"name":"worker1","CLUSTER":"cluster2","ipaddresses":[{"type":"InternalIP",'
            b'"ip":"10.99.2.1"},{"TYPE":"InternalIP","Ip":"fd00:99::2:1"}],'
            b'"ipv4alloccidr":{"ip":"10.2.1.0","mask":"////AA=="},'
            b'"IPV6ALLOCCIDR":{"Ip":"fd00:2:1::","Mask":"//////////8AAAAAAAAAAA=="},'
            b'"clusterid":102,"FutureField":{"nested":[1,2,3]},"BootID":"x"}')
    endpoint = (b'{"ip":"10.2.1.5","hostip":"10.99.2.1","id":6685228,'
                b'"k8snamespace":"istio-space","k8sPODNAME":"employee-0","Shiny":true}')
    service = (b'{"Cluster":"cluster2","NAMESPACE":"default","Name":"protected-db",'
               b'"Frontends":{"10.96.0.10":{"redis":{"protocol":"TCP","port":6379}}},'
               b'"BACKENDS":{"10.2.1.5":{"redis":{"protocol":"TCP","port":6379}}},'
               b'"IncludeExternal":true,"Shared":true,"ClusterId":102,'
               b'"zones":{"10.2.1.5":{"zone":"a","forZones":[{"name":"a"}]}},"extra":[null]}')
    return {node_key(NODE_NAME): node, ip_key(ENDPOINT_IP): endpoint,
            service_key(SERVICE_NAMESPACE, SERVICE_NAME): service}


LONG_NS_KEY = "team-" + "a" * 40 + "-owner"  # 50 characters, no "/" prefix


def namespace_label_identities() -> dict[str, bytes]:
    """Identities carrying the namespace's labels, as Cilium adds them to every pod's identity
    (pkg/k8s/apis/cilium.io/const.go PodNamespaceMetaLabels "io.cilium.k8s.namespace.labels";
    pkg/k8s/utils: "k8s:io.cilium.k8s.namespace.labels.<key>=<value>"): the joined key is longer
    than a Kubernetes name part (63) and may contain a "/" inside (kubernetes.io/metadata.name).
    Cilium's identity decoding (pkg/labels/labels.go ParseLabel) takes any key."""
    prefix = "k8s:io.cilium.k8s.namespace.labels."
    return {
        identity_key(IDENTITY_ID + 1): labels_value(endpoint_labels(
            "long-ns", "istio-space", f"{prefix}{LONG_NS_KEY}=yes")),
        identity_key(IDENTITY_ID + 2): labels_value(endpoint_labels(
            "meta-ns", "istio-space", f"{prefix}kubernetes.io/metadata.name=istio-space")),
    }


def no_pod_cidr_node() -> dict[str, bytes]:
    """The golden node of a cluster whose IPAM gives pods addresses from no per-node CIDR (ENI,
    Azure, multi-pool): no IPv4AllocCIDR / IPv6AllocCIDR (null, as encoding/json writes a nil
    *cidr.CIDR)."""
    doc = node_doc(IPv4AllocCIDR=None, IPv6AllocCIDR=None)
    return {node_key(NODE_NAME): _compact(doc)}


# -- KVStoreMesh's cache (Cilium's layout) -----------------------------------------------------------

def cache_key(state_key: str, cluster: str = CLUSTER) -> str:
    """Where Cilium's KVStoreMesh copies a state key of ``cluster`` in the local etcd
    (pkg/clustermesh/kvstoremesh/remote_cluster.go: the remote prefixes it watches are
    nodes/v1/<cluster>, services/v1/<cluster>, ip/v1/default and identities/v1; newReflector
    writes each key, relative to that prefix, under path.Join(StateToCachePrefix(prefix),
    cluster)): cilium/cache/nodes/v1/C/<node>, cilium/cache/services/v1/C/<ns>/<name>,
    cilium/cache/ip/v1/C/<ip>, cilium/cache/identities/v1/C/id/<id>."""
    rest = state_key[len(STATE) + 1:]
    kind, version, tail = rest.split("/", 2)
    if kind in ("nodes", "services"):
        owner, _, tail = tail.partition("/")
        assert owner == cluster, state_key
    elif kind == "ip":
        space, _, tail = tail.partition("/")
        assert space == ADDRESS_SPACE, state_key
    return f"{CACHE}/{kind}/{version}/{cluster}/{tail}"


def kvstoremesh_cache(entries: Mapping[str, bytes], *, cluster: str = CLUSTER,
                      cluster_id: int = CLUSTER_ID, canaries: Iterable[str] = KINDS,
                      when: float | None = None) -> dict[str, bytes]:
    """What Cilium's KVStoreMesh writes into the local etcd for a remote cluster holding
    ``entries`` (its state keys): the values unchanged under the cache keys, one canary per
    kind at cilium/synced/<cluster>/cilium/cache/<kind>/v1 (newReflector's
    WSSWithSyncedKeyOverride), and the remote's cluster config with the ``cached`` capability
    (remote_cluster.go Run, via cmutils.EnforceClusterConfig: SyncedCanaries and Cached true,
    the remote's ID, MaxConnectedClusters and ServiceExportsEnabled copied from the remote's
    config; the golden config has no serviceExportsEnabled, so it stays out)."""
    stamp = rfc3339(when)
    out = {cache_key(key, cluster): value for key, value in entries.items()
           if key.startswith(STATE + "/")}
    for kind in canaries:
        out[canary_key(kind, cluster, cache=True)] = stamp
    out[cluster_config_key(cluster)] = _compact(
        {"id": cluster_id, "capabilities": {"syncedCanaries": True, "cached": True,
                                            "maxConnectedClusters": 255}})
    return out
