"""Merging global services across clusters, without an agent: backends, sharing, affinity,
conflicting ports and backends whose endpoint is gone (Cilium's global-service annotations)."""

import ipaddress

from meshagent.model.service import Backend, Frontend, Service
from meshagent.service.merge import merge_services

IP = ipaddress.IPv4Address
FRONT = (Frontend(IP("10.96.0.10"), 6379),)


def svc(cluster: str, *backends: str, global_: bool = True, shared: bool = True,
        affinity: str = "none", port: int = 6379) -> Service:
    return Service("default", "redis", cluster, (Frontend(IP("10.96.0.10"), port),),
                   tuple(Backend(IP(b), 6379, cluster) for b in backends), global_, shared,
                   affinity)


def merged(ours: Service, *remote: Service, live: set[str] | None = None):
    everything = {b.ip for s in (ours, *remote) for b in s.backends}
    alive = everything if live is None else {IP(a) for a in live}
    result = merge_services({("default", "redis"): ours}, list(remote), alive, "cluster1")
    return result[("default", "redis")]


def backends(m) -> list[str]:
    return [f"{b.ip} ({b.cluster})" for b in m.backends]


def test_a_global_service_merges_the_backends_of_every_cluster():
    m = merged(svc("cluster1", "10.1.0.5"), svc("cluster2", "10.2.0.5", "10.2.0.6"))
    assert backends(m) == ["10.1.0.5 (cluster1)", "10.2.0.5 (cluster2)", "10.2.0.6 (cluster2)"]
    assert m.remote_backends == 2 and m.conflicts == ()


def test_a_local_service_takes_no_remote_backends():
    m = merged(svc("cluster1", "10.1.0.5", global_=False), svc("cluster2", "10.2.0.5"))
    assert backends(m) == ["10.1.0.5 (cluster1)"] and m.remote_backends == 0


def test_a_remote_service_that_is_not_global_or_not_shared_offers_nothing():
    assert backends(merged(svc("cluster1", "10.1.0.5"),
                           svc("cluster2", "10.2.0.5", shared=False))) == ["10.1.0.5 (cluster1)"]
    assert backends(merged(svc("cluster1", "10.1.0.5"),
                           svc("cluster2", "10.2.0.5", global_=False))) == ["10.1.0.5 (cluster1)"]


def test_affinity_local_prefers_local_backends_while_any_is_alive():
    ours = svc("cluster1", "10.1.0.5", affinity="local")
    assert backends(merged(ours, svc("cluster2", "10.2.0.5"))) == ["10.1.0.5 (cluster1)"]
    assert backends(merged(ours, svc("cluster2", "10.2.0.5"), live={"10.2.0.5"})) == [
        "10.2.0.5 (cluster2)"]  # the local backend's endpoint is gone: fail over


def test_affinity_remote_prefers_remote_backends_while_any_is_alive():
    ours = svc("cluster1", "10.1.0.5", affinity="remote")
    assert backends(merged(ours, svc("cluster2", "10.2.0.5"))) == ["10.2.0.5 (cluster2)"]
    assert backends(merged(ours, svc("cluster2", "10.2.0.5"), live={"10.1.0.5"})) == [
        "10.1.0.5 (cluster1)"]


def test_remote_backends_serve_the_frontend_port_of_their_port_name():
    """Cilium matches a remote backend to a frontend by port name (pkg/k8s/watchers/service.go,
    genCartesianProduct); the remote's frontends and port numbers do not matter."""
    ours = Service("default", "redis", "cluster1", (Frontend(IP("10.96.0.10"), 6379, name="redis"),
                                                    Frontend(IP("10.96.0.10"), 9121, name="metrics")),
                   (Backend(IP("10.1.0.5"), 6379, "cluster1", name="redis"),), True)
    theirs = Service("default", "redis", "cluster2", (Frontend(IP("10.96.9.9"), 7000, name="x"),),
                     (Backend(IP("10.2.0.5"), 6380, "cluster2", name="redis"),
                      Backend(IP("10.2.0.5"), 9121, "cluster2", name="metrics")), True)
    m = merged(ours, theirs)
    by_port = {f.port: [f"{b.ip}:{b.port}" for b in chosen] for f, chosen in m.balanced()}
    assert by_port == {6379: ["10.1.0.5:6379", "10.2.0.5:6380"], 9121: ["10.2.0.5:9121"]}
    assert m.conflicts == ()


def test_a_cluster_whose_port_names_differ_is_reported_and_not_used():
    m = merged(svc("cluster1", "10.1.0.5"), Service(
        "default", "redis", "cluster2", FRONT, (Backend(IP("10.2.0.5"), 6379, "cluster2",
                                                        name="tcp-6379"),), True))
    assert backends(m) == ["10.1.0.5 (cluster1)"]
    assert m.conflicts == ("cluster2: backend port names 'tcp-6379' match no port of this"
                           " service ('')",)


def test_a_remote_backend_with_one_of_our_backends_addresses_is_not_used():
    m = merged(svc("cluster1", "10.1.0.5"), svc("cluster2", "10.1.0.5", "10.2.0.5"))
    assert backends(m) == ["10.1.0.5 (cluster1)", "10.2.0.5 (cluster2)"]
    assert m.conflicts == ("cluster2: backend addresses 10.1.0.5 are this cluster's own; not"
                           " used",)


def test_a_backend_whose_endpoint_is_gone_is_not_used():
    m = merged(svc("cluster1", "10.1.0.5", "10.1.0.6"), live={"10.1.0.6"})
    assert backends(m) == ["10.1.0.6 (cluster1)"]
