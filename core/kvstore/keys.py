"""Where things live in a cluster's kvstore: Cilium's key layout.

Keeping Cilium's layout lets a user inspect meshagent's kvstore with what they know from
``cilium kvstore get --recursive cilium/state/``.
"""

import time

NODES = "cilium/state/nodes/v1/"
IDENTITIES_BASE = "cilium/state/identities/v1/"  # Cilium's identity store (its canary)
IDENTITIES = IDENTITIES_BASE + "id/"
IDENTITY_VALUES = IDENTITIES_BASE + "value/"
IPCACHE = "cilium/state/ip/v1/"
# Cilium's ipcache lives under the address space "default" (pkg/ipcache, DefaultAddressSpace):
# whose entries they are is given by whose kvstore holds them
IPCACHE_ADDRESS_SPACE = "default"
SERVICES = "cilium/state/services/v1/"
CLUSTER_CONFIG = "cilium/cluster-config/"
SYNCED = "cilium/synced/"
HEARTBEAT = "cilium/.heartbeat"
# meshagent's own, shared by the agents of one cluster (Cilium keeps these in Kubernetes)
POLICIES = "meshagent/policies/v1/"
LOCAL_SERVICES = "meshagent/services/v1/"
IDENTITY_GC = "meshagent/identities/v1/gc"  # "idle", or "running <node>" while one collects
KVSTOREMESH = "meshagent/kvstoremesh/"  # KVStoreMesh's own
# KVStoreMesh's replicas elect their leader with this key, on the leader's lease
KVSTOREMESH_LEADER = f"{KVSTOREMESH}leader"


def node_key(cluster: str, node: str) -> str:
    return f"{NODES}{cluster}/{node}"


def identity_key(identity: int) -> str:
    return f"{IDENTITIES}{identity}"


def ipcache_key(ip: str) -> str:
    """``cilium/state/ip/v1/default/<ip>``: where Cilium and meshagent publish an address."""
    return f"{IPCACHE}{IPCACHE_ADDRESS_SPACE}/{ip}"


def legacy_ipcache_key(cluster: str, ip: str) -> str:
    """Where meshagent before 0.2 published an address (read during an upgrade only)."""
    return f"{IPCACHE}{cluster}/{ip}"


def service_key(cluster: str, namespace: str, name: str) -> str:
    return f"{SERVICES}{cluster}/{namespace}/{name}"


def cluster_config_key(cluster: str) -> str:
    return f"{CLUSTER_CONFIG}{cluster}"


#: The stores a cluster writes a sync canary for, once each is published (Cilium's four)
STORES = (NODES, IDENTITIES_BASE, IPCACHE, SERVICES)


def synced_key(cluster: str, prefix: str) -> str:
    """The sync canary for one of ``cluster``'s stores (written once it is published):
    ``cilium/synced/<cluster>/cilium/state/<kind>/v1``."""
    return f"{SYNCED}{cluster}/{prefix.rstrip('/')}"


def rfc3339_now() -> bytes:
    """The value of heartbeats and sync canaries: the time as Go's ``time.RFC3339`` writes it
    (Cilium's ``pkg/kvstore/heartbeat``, ``pkg/kvstore/store/syncstore.go``), in UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()


def policy_key(kind: str, namespace: str, name: str) -> str:
    return f"{POLICIES}{kind}/{namespace or '-'}/{name}"


def local_service_key(namespace: str, name: str) -> str:
    return f"{LOCAL_SERVICES}{namespace}/{name}"


def split_key(key: str, prefix: str, parts: int) -> list[str]:
    """The ``parts`` path elements of ``key`` after ``prefix``; ValueError if it has others."""
    rest = key[len(prefix):].split("/")
    if not key.startswith(prefix) or len(rest) != parts or not all(rest):
        raise ValueError(f"key {key!r} is not {prefix}" + "/".join(["<x>"] * parts))
    return rest
