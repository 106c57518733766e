"""What a remote cluster can and cannot do, without a network: address ownership, the ipcache's
sources and precedence, identity validation, and decoding that never stops a sync (random
keys and values through the remote sync path, hypothesis)."""

import ipaddress
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshagent.clustermesh.ownership import AddressOwnership
from meshagent.clustermesh.sync import ClusterSync
from meshagent.events import ChangeKind
from meshagent.kvstore import keys as kvkeys
from meshagent.model.cluster import ClusterInfo
from meshagent.model.identity import format_labels
from meshagent.model.ipcache import POLICY_SOURCE, IPCache, IPCacheEntry, ipcache_to_json
from meshagent.model.node import Node
from meshagent.model.table import Table, Tables

net, ip = ipaddress.IPv4Network, ipaddress.IPv4Address
C1, C2 = 101 << 16, 102 << 16
LOCAL = ClusterInfo("cluster1", 101)


def entry(prefix: str, identity: int, cluster: str) -> IPCacheEntry:
    return IPCacheEntry(net(prefix), identity, cluster)


# -- the ipcache: sources and precedence ----------------------------------------------------------

def test_a_remote_never_replaces_a_local_entry_and_withdrawing_restores_the_next():
    events = []
    cache = IPCache("cluster1", lambda kind, e: events.append((kind, e.cluster, e.identity)))
    stranger = entry("10.1.1.3/32", C1 + 302, "cluster1")
    cache.upsert(stranger.prefix, stranger)
    hijack = entry("10.1.1.3/32", C2 + 300, "cluster2")
    assert cache.upsert(hijack.prefix, hijack) is False  # claimed, not in force
    assert cache.get(stranger.prefix) == stranger and cache.count("cluster2") == 1
    cache.delete(hijack.prefix, "cluster2")  # the remote withdraws: ours stays
    assert cache.get(stranger.prefix) == stranger
    cache.upsert(hijack.prefix, hijack)
    cache.delete(stranger.prefix, "cluster1")  # ours goes: the remote's claim comes in
    assert cache.get(stranger.prefix) == hijack
    assert events == [(ChangeKind.UPSERT, "cluster1", C1 + 302),
                      (ChangeKind.UPSERT, "cluster2", C2 + 300)]


def test_between_remotes_the_first_claim_holds_and_policies_come_before_remotes():
    cache = IPCache("cluster1", lambda kind, e: None)
    first, second = entry("10.5.0.1/32", C2 + 300, "cluster2"), entry("10.5.0.1/32",
                                                                       (103 << 16) + 300,
                                                                       "cluster3")
    cache.upsert(first.prefix, first)
    cache.upsert(second.prefix, second)
    cache.upsert(first.prefix, entry("10.5.0.1/32", C2 + 301, "cluster2"))  # keeps its place
    assert cache.get(first.prefix).cluster == "cluster2"
    cidr = entry("10.5.0.1/32", (1 << 24) + 1, "cluster1")
    cache.upsert(cidr.prefix, cidr, POLICY_SOURCE)
    assert cache.get(cidr.prefix) == cidr
    assert set(cache.claims(cidr.prefix)) == {"cluster2", "cluster3", POLICY_SOURCE}


# -- address ownership ------------------------------------------------------------------------------

def owner_setup(protected=("10.99.1.250",)):
    return AddressOwnership("cluster1", [net("10.1.1.0/24")], lambda: list(protected))


def node(name, cluster, address, *cidrs):
    return Node(name, cluster, 101 if cluster == "cluster1" else 102, ip(address),
                tuple(net(c) for c in cidrs))


def test_remote_pod_cidrs_are_granted_first_come_and_never_over_ours():
    o = owner_setup()
    o.node_changed(ChangeKind.UPSERT, node("node2", "cluster1", "10.99.1.2", "10.1.2.0/24"))
    o.node_changed(ChangeKind.UPSERT, node("n1", "cluster2", "10.99.2.1", "10.2.1.0/24"))
    o.node_changed(ChangeKind.UPSERT, node("n1", "cluster3", "10.99.3.1", "10.2.0.0/16"))
    o.node_changed(ChangeKind.UPSERT, node("evil", "cluster2", "10.99.2.9", "10.1.0.0/16"))
    o.recompute()
    assert o.owner(ip("10.1.1.3")) == "cluster1" and o.owner(ip("10.1.2.3")) == "cluster1"
    assert o.owner(ip("10.2.1.7")) == "cluster2"
    assert o.owner(ip("10.2.9.9")) is None  # cluster3's /16 overlaps cluster2's /24: refused
    refused = {(c, n, str(cidr)): why for (c, n, cidr), why in o.refused.items()}
    assert "cluster2's pod addresses" in refused[("cluster3", "n1", "10.2.0.0/16")]
    assert "this cluster's pod addresses" in refused[("cluster2", "evil", "10.1.0.0/16")]
    o.node_changed(ChangeKind.DELETE, node("n1", "cluster2", "10.99.2.1", "10.2.1.0/24"))
    o.recompute()
    assert o.owner(ip("10.2.9.9")) == "cluster3"  # the range is free now


def test_no_pod_cidr_may_cover_a_node_or_a_kvstore_server():
    o = owner_setup()
    o.node_changed(ChangeKind.UPSERT, node("n1", "cluster2", "10.99.2.1", "0.0.0.0/0"))
    o.node_changed(ChangeKind.UPSERT, node("n2", "cluster2", "10.50.0.1", "10.99.1.0/24"))
    o.node_changed(ChangeKind.UPSERT, node("n3", "cluster2", "10.50.0.2", "10.99.2.0/24"))
    o.recompute()
    reasons = {str(cidr): why for (_, _, cidr), why in o.refused.items()}
    assert "this cluster's pod addresses" in reasons["0.0.0.0/0"]
    assert "kvstore server" in reasons["10.99.1.0/24"]
    assert "address of a node (10.99.2.1)" in reasons["10.99.2.0/24"]
    assert o.routes("node1") == {}


# -- the remote sync path -------------------------------------------------------------------------

def new_sync(ownership: AddressOwnership | None = None) -> tuple[ClusterSync, Tables]:
    tables = Tables(nodes=Table("node", lambda k, v: None),
                    identities=Table("identity", lambda k, v: None),
                    ipcache=IPCache("cluster1", lambda k, v: None),
                    services=Table("service", lambda k, v: None))
    ownership = ownership or owner_setup()
    return ClusterSync("cluster2", 102, LOCAL, tables, ownership), tables


def apply(sync: ClusterSync, key: str, value: bytes | None) -> None:
    for prefix in sync.prefixes:
        if key.startswith(prefix.kind.prefix):
            prefix._apply(key, value)
            return


GOOD_LABELS = frozenset({"k8s:app=employee", "k8s:io.kubernetes.pod.namespace=default",
                         "k8s:io.cilium.k8s.policy.cluster=cluster2"})


@pytest.mark.parametrize("key, value, reason", [
    (kvkeys.identity_key(C2 - 100), format_labels(GOOD_LABELS), "outside cluster2's range"),
    (kvkeys.IDENTITIES + f"0{C2 + 300}", format_labels(GOOD_LABELS), "canonically"),
    (kvkeys.IDENTITIES + "+6684972", format_labels(GOOD_LABELS), "canonically"),
    (kvkeys.identity_key(C2 + 300), format_labels(GOOD_LABELS | {
        "k8s:io.cilium.k8s.policy.cluster=cluster1"}), "2 cluster labels"),
    (kvkeys.identity_key(C2 + 300), "k8s:app=a;", "0 cluster labels"),
    (kvkeys.identity_key(C2 + 300), "a:b:c=d;k8s:io.cilium.k8s.policy.cluster=cluster2;",
     "source 'a'"),
    (kvkeys.identity_key(C2 + 300), "k8s:" + "x" * 2_000_000 + "=1;", "larger than the limit"),
    (kvkeys.identity_key(5), "reserved:init;", "reserved identity"),
    (kvkeys.ipcache_key("0.0.0.0/0"), json.dumps(
        {"IP": "0.0.0.0", "Mask": "AAAAAA==", "ID": C2 + 300}), "not a single address"),
    (kvkeys.ipcache_key("10.2.0.1"), "[" * 3_000 + "]" * 3_000, "larger than"),
    (kvkeys.service_key("cluster2", "d", "s"), "[" * 100_000 + "]" * 100_000, "nested too deep"),
    (kvkeys.service_key("cluster2", "d", "s"), '{"cluster": 1' + "0" * 5000 + "}",
     "malformed JSON"),
    (kvkeys.IPCACHE + "cluster2/\udcff", b"{}", "not UTF-8"),
])
def test_bad_entries_are_rejected_with_a_reason(key, value, reason):
    sync, tables = new_sync()
    apply(sync, key, value.encode() if isinstance(value, str) else value)
    assert sum(sync.checks.rejected.values()) == 1, sync.checks.last_reject
    assert reason in "".join(sync.checks.last_reject.values())
    assert len(tables.identities) == len(tables.ipcache) == 0


def test_a_remote_endpoint_waits_for_a_pod_cidr_granted_to_its_cluster():
    ownership = owner_setup()
    sync, tables = new_sync(ownership)
    ownership.listeners.append(sync.readmit)
    pod = IPCacheEntry(net("10.2.1.5/32"), C2 + 300, "cluster2")
    apply(sync, kvkeys.ipcache_key("10.2.1.5"), ipcache_to_json(pod))
    apply(sync, kvkeys.ipcache_key("10.1.1.3"), ipcache_to_json(
        IPCacheEntry(net("10.1.1.3/32"), C2 + 300, "cluster2")))  # cluster1's stranger
    assert len(tables.ipcache) == 0 and sync.held == {"endpoints": 2}
    ownership.node_changed(ChangeKind.UPSERT, node("n1", "cluster2", "10.99.2.1", "10.2.1.0/24"))
    ownership.recompute()
    assert tables.ipcache.values() == [pod] and sync.held == {"endpoints": 1}
    ownership.node_changed(ChangeKind.DELETE, node("n1", "cluster2", "10.99.2.1", "10.2.1.0/24"))
    ownership.recompute()  # the grant went: so does the entry
    assert len(tables.ipcache) == 0 and sync.held == {"endpoints": 2}


KEYS = st.one_of(
    st.sampled_from([kvkeys.NODES, kvkeys.IDENTITIES, kvkeys.IPCACHE, kvkeys.SERVICES]).flatmap(
        lambda prefix: st.text(max_size=40).map(lambda rest: prefix + rest)),
    st.sampled_from([kvkeys.node_key("cluster2", "n1"), kvkeys.identity_key(C2 + 300),
                     kvkeys.ipcache_key("10.2.1.5"),
                     kvkeys.service_key("cluster2", "default", "s")]))
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                       lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                       max_leaves=20)
VALUES = st.one_of(
    st.binary(max_size=300),
    JSONISH.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"IP": st.sampled_from(["10.2.1.5", "0.0.0.0", "x", ""]),
                           "ID": st.integers(-5, 2**40), "Mask": st.sampled_from(
                               [None, "////AA==", "AAAAAA==", "!!"])}).map(
        lambda d: json.dumps(d).encode()),
    st.integers(1, 20_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.text().map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEYS, VALUES | st.none()), max_size=30))
def test_random_keys_and_values_never_stop_the_sync(items):
    """Whatever a remote writes, every value is applied or counted, nothing escapes, and a good
    entry written afterwards still applies."""
    sync, tables = new_sync()
    for key, value in items:
        apply(sync, key, value)  # must not raise
    good = (kvkeys.identity_key(C2 + 999), format_labels(GOOD_LABELS).encode())
    apply(sync, *good)
    assert tables.identities.get(C2 + 999) is not None
    assert set(sync.checks.rejected) <= {"nodes", "identities", "endpoints", "services"}


def test_a_cilium_clusters_ipcache_under_the_default_address_space_is_that_clusters():
    """Cilium writes cilium/state/ip/v1/default/<ip>: read from cluster2, it is cluster2's and
    is judged as cluster2's (its range, its pod CIDRs), never more."""
    ownership = owner_setup()
    sync, tables = new_sync(ownership)
    ownership.node_changed(ChangeKind.UPSERT, node("n1", "cluster2", "10.99.2.1", "10.2.1.0/24"))
    ownership.recompute()
    pod = IPCacheEntry(net("10.2.1.5/32"), C2 + 300, "cluster2")
    apply(sync, kvkeys.IPCACHE + "default/10.2.1.5", ipcache_to_json(pod))
    apply(sync, kvkeys.IPCACHE + "default/10.2.1.6", ipcache_to_json(
        IPCacheEntry(net("10.2.1.6/32"), (103 << 16) + 300, "cluster2")))  # cluster3's range
    assert tables.ipcache.values() == [pod]
    assert "outside cluster2's range" in sync.checks.last_reject["endpoints"]
