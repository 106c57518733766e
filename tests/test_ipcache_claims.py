"""The IPCache keeps a lone claim by the entry's own cluster as the entry alone: every answer
is the same as with the tuple of claims, whoever claims and in whatever order."""

import ipaddress

from meshagent.events import ChangeKind
from meshagent.model.ipcache import POLICY_SOURCE, IPCache, IPCacheEntry

PREFIX = ipaddress.ip_network("10.5.0.1/32")


def entry(identity: int, cluster: str) -> IPCacheEntry:
    return IPCacheEntry(PREFIX, identity, cluster)


def test_a_lone_claim_answers_as_any_other():
    events = []
    cache = IPCache("cluster1", lambda kind, e: events.append((kind, e.identity)))
    remote = entry(70000, "cluster2")
    cache.upsert(PREFIX, remote)
    assert cache.get(PREFIX) == remote and cache.claims(PREFIX) == {"cluster2": remote}
    assert cache.values() == [remote] and list(cache) == [PREFIX] and len(cache) == 1
    # a policy's claim of an entry naming cluster1 is the policy's, not cluster1's
    cidr = entry(1 << 24, "cluster1")
    cache.upsert(PREFIX, cidr, POLICY_SOURCE)
    assert cache.claims(PREFIX) == {POLICY_SOURCE: cidr, "cluster2": remote}
    assert cache.delete(PREFIX, "cluster2") == remote
    assert cache.claims(PREFIX) == {POLICY_SOURCE: cidr} and cache.get(PREFIX) == cidr
    assert cache.count(POLICY_SOURCE) == 1 and cache.count("cluster2") == 0
    local = entry(65800, "cluster1")
    cache.upsert(PREFIX, local)
    assert cache.claims(PREFIX) == {"cluster1": local, POLICY_SOURCE: cidr}
    cache.delete(PREFIX, POLICY_SOURCE)
    assert cache.claims(PREFIX) == {"cluster1": local} and cache.get(PREFIX) == local
    assert cache.delete(PREFIX) == local and cache.get(PREFIX) is None and len(cache) == 0
    assert cache.claims(PREFIX) == {} and cache.delete(PREFIX) is None
    assert events == [(ChangeKind.UPSERT, 70000), (ChangeKind.UPSERT, 1 << 24),
                      (ChangeKind.UPSERT, 65800), (ChangeKind.DELETE, 65800)]
