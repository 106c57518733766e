"""The k8s plugin against the API stand-in: pod labels, policies and services from Kubernetes,
list+watch with resume and re-list, and bad input refused by name.

Agents run in-process on the memory kvstore; set MESHAGENT_TEST_KUBECONFIG to run the tests
that do not need the stand-in's controls against a real cluster.
"""

import asyncio
import json

import pytest
from kube import KubeCluster

from meshagent.errors import UsageError
from meshagent.events import ChangeKind
from meshagent.plugins.k8s.client import (
    CCNPS,
    CNPS,
    ENDPOINT_SLICES,
    NAMESPACES,
    PODS,
    SERVICES,
    KubeError,
)
from meshagent.runtime.status import Health
from meshagent.testing import eventually

CLUSTER = ["--cluster-name", "cluster1", "--cluster-id", "1", "--node-name", "node1",
           "--pod-cidr", "10.1.1.0/24"]


@pytest.fixture
async def kube(short_tmp):
    cluster = await KubeCluster.start(short_tmp, bookmark_interval=0.2)
    yield cluster
    await cluster.close()


def standin(kube: KubeCluster):
    if kube.standin is None:
        pytest.skip("needs the stand-in's controls (compaction, cut connections, injection)")
    return kube.standin


@pytest.fixture
async def k8s_agent(agent_factory, kube):
    async def start(*extra: str, wait_ready: bool = True):
        return await agent_factory(["--plugins", "memory,k8s", "--k8s-kubeconfig",
                                    str(kube.kubeconfig), "--k8s-pod-wait", "0.5", *CLUSTER,
                                    *extra], wait_ready=wait_ready)
    return start


def section(running, name="Kubernetes"):
    return next(s for s in running.agent.status(verbose=True).sections if s.name == name)


def cnp(namespace: str, name: str, app: str, allowed: str, port: int = 6379) -> dict:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": {
        "endpointSelector": {"matchLabels": {"app": app}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": allowed}}],
                     "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}]}]}]}}


def pod(namespace: str, name: str, labels: dict, node: str = "node1", account: str = "") -> dict:
    spec = {"nodeName": node, "containers": [{"name": "c", "image": "redis"}]}
    if account:
        spec["serviceAccountName"] = account
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": spec}


def policy_names(running) -> set[str]:
    """This run's policies (a real cluster may hold others)."""
    return {p.display for p in running.agent.policy_repository.policies()
            if p.name.startswith("ma") or (p.namespace or "").startswith("ma")}


# -- policies ------------------------------------------------------------------------------------


async def test_policies_follow_cnps_and_ccnps(kube, k8s_agent):
    ns = await kube.namespace("default")
    await kube.apply(CNPS, cnp(ns, "db", "protected-db", "employee"))
    running = await k8s_agent()
    # listed before ready: the agent never enforces without the cluster's policies
    assert policy_names(running) == {f"CiliumNetworkPolicy {ns}/db"}

    await kube.apply(CCNPS, {"metadata": {"name": kube.ns("all")}, "spec": {
        "endpointSelector": {}, "ingress": [{"fromEntities": ["cluster"]}]}})
    await eventually(lambda: f"CiliumClusterwideNetworkPolicy {kube.ns('all')}"
                     in policy_names(running), what="the CCNP")
    await kube.apply(CNPS, cnp(ns, "db", "protected-db", "admin", port=6380))
    await eventually(lambda: any(
        r.ingress[0].ports[0].port == 6380 for p in running.agent.policy_repository.policies()
        if p.name == "db" for r in p.rules), what="the updated CNP")

    await kube.delete(CNPS, ns, "db")
    await eventually(lambda: policy_names(running) == {
        f"CiliumClusterwideNetworkPolicy {kube.ns('all')}"}, what="the CNP to go")
    assert section(running).health is Health.OK, section(running)


async def test_a_malformed_cnp_is_refused_by_name_and_the_last_good_one_stays(kube, k8s_agent):
    ns = await kube.namespace("default")
    await kube.apply(CNPS, cnp(ns, "db", "protected-db", "employee"))
    running = await k8s_agent()
    bad = cnp(ns, "db", "protected-db", "employee")
    bad["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = "70000"
    await kube.apply(CNPS, bad)
    await eventually(lambda: f"CiliumNetworkPolicy {ns}/db" in str(section(running).details),
                     what="the refusal in status")
    status = section(running)
    assert status.health is Health.WARNING
    assert any(f"refused CiliumNetworkPolicy {ns}/db" in d and "70000" in d
               for d in status.details), status.details
    # the good version is still enforced
    (policy,) = running.agent.policy_repository.policies()
    assert policy.rules[0].ingress[0].ports[0].port == 6379
    # a new policy with an L7 rule is refused too, and names itself
    l7 = cnp(ns, "l7", "x", "y")
    l7["spec"]["ingress"][0]["toPorts"][0]["rules"] = {"http": [{"method": "GET"}]}
    await kube.apply(CNPS, l7)
    await eventually(lambda: f"refused CiliumNetworkPolicy {ns}/l7" in str(
        section(running).details), what="the L7 refusal")
    assert policy_names(running) == {f"CiliumNetworkPolicy {ns}/db"}
    # fixed: accepted, the refusal goes
    await kube.apply(CNPS, cnp(ns, "db", "protected-db", "employee", port=7000))
    await eventually(lambda: running.agent.policy_repository.policies()[0].rules[0].ingress[0]
                     .ports[0].port == 7000, what="the fixed policy")
    await kube.delete(CNPS, ns, "l7")
    await eventually(lambda: section(running).health is Health.OK, what="no refusals left")


# -- list and watch ------------------------------------------------------------------------------


async def test_a_cut_watch_resumes_from_its_resource_version_without_listing(kube, k8s_agent):
    server = standin(kube)
    ns = await kube.namespace("default")
    running = await k8s_agent()
    await eventually(lambda: server.watch_count("ciliumnetworkpolicies") == 1, what="a watch")
    reflector = next(r for r in _source(running).reflectors.values()
                     if r.name == "ciliumnetworkpolicies")
    version = reflector.resource_version
    server.drop_watches()
    await kube.apply(CNPS, cnp(ns, "db", "protected-db", "employee"))  # while cut
    await eventually(lambda: policy_names(running) == {f"CiliumNetworkPolicy {ns}/db"},
                     what="the policy made while the watch was cut")
    assert reflector.lists == 1  # resumed, not re-listed
    resumed = [r for r in server.requests if "ciliumnetworkpolicies?" in r and "watch=1" in r]
    assert len(resumed) >= 2 and f"resourceVersion={version}" in resumed[-1], resumed


async def test_gone_410_relists_and_deletes_what_vanished_meanwhile(kube, k8s_agent):
    server = standin(kube)
    ns = await kube.namespace("default")
    await kube.apply(CNPS, cnp(ns, "a", "a", "b"))
    await kube.apply(CNPS, cnp(ns, "b", "a", "b"))
    running = await k8s_agent()
    reflector = _source(running).reflectors["ciliumnetworkpolicies"]
    await eventually(lambda: server.watch_count("ciliumnetworkpolicies") == 1, what="a watch")
    # the agent loses its watch; meanwhile "a" goes, "c" comes, and history is compacted
    await server.stop()
    server.delete_object("ciliumnetworkpolicies", ns, "a")
    server.put_object("ciliumnetworkpolicies", {**cnp(ns, "c", "a", "b")})
    server.compact()
    port = int(server.url.rsplit(":", 1)[1])
    await server.start(port=port)
    await eventually(lambda: policy_names(running) == {f"CiliumNetworkPolicy {ns}/b",
                                                       f"CiliumNetworkPolicy {ns}/c"},
                     timeout=15, what="the re-listed policies")
    assert reflector.lists == 2


async def test_a_watch_answered_410_by_http_relists_too(kube, k8s_agent):
    server = standin(kube)
    ns = await kube.namespace("default")
    await kube.apply(CNPS, cnp(ns, "a", "a", "b"))
    running = await k8s_agent()
    reflector = _source(running).reflectors["ciliumnetworkpolicies"]
    await eventually(lambda: server.watch_count("ciliumnetworkpolicies") == 1, what="a watch")
    server.expired_as_http = True
    await server.stop()
    server.delete_object("ciliumnetworkpolicies", ns, "a")
    server.compact()
    await server.start(port=int(server.url.rsplit(":", 1)[1]))
    await eventually(lambda: not policy_names(running), timeout=15, what="the re-list")
    assert reflector.lists == 2


async def test_lists_come_in_pages(kube, k8s_agent, monkeypatch):
    from meshagent.plugins.k8s import reflector
    monkeypatch.setattr(reflector, "PAGE_SIZE", 2)
    ns = await kube.namespace("default")
    for i in range(5):
        await kube.apply(CNPS, cnp(ns, f"p{i}", "a", "b"))
    running = await k8s_agent()
    assert policy_names(running) == {f"CiliumNetworkPolicy {ns}/p{i}" for i in range(5)}
    if kube.standin is not None:
        pages = [r for r in kube.standin.requests
                 if "ciliumnetworkpolicies?" in r and "watch=1" not in r]
        assert len(pages) == 3 and "continue=" in pages[-1], pages


async def test_garbage_on_a_watch_is_skipped_counted_and_shown(kube, k8s_agent):
    server = standin(kube)
    ns = await kube.namespace("default")
    running = await k8s_agent()
    await eventually(lambda: server.watch_count("ciliumnetworkpolicies") == 1, what="a watch")
    server.inject("ciliumnetworkpolicies", "{not json")
    server.inject("ciliumnetworkpolicies", json.dumps({"type": "ADDED", "object": {"x": 1}}))
    await kube.apply(CNPS, cnp(ns, "db", "protected-db", "employee"))
    await eventually(lambda: policy_names(running) == {f"CiliumNetworkPolicy {ns}/db"},
                     what="the policy after the garbage")
    status = section(running)
    assert "ciliumnetworkpolicies: 2 malformed events skipped" in status.details
    assert status.health is Health.WARNING


async def test_unreachable_api_server_is_shown_and_nothing_is_ready(kube, k8s_agent):
    server = standin(kube)
    await server.stop()
    running = await k8s_agent(wait_ready=False)
    await eventually(lambda: "k8s-policies" in str(
        running.agent.status().sections), timeout=5, what="a status")
    await eventually(lambda: section(running).health is Health.FAILURE, timeout=5,
                     what="the failure in status")
    assert not running.agent.ready
    assert "Cannot connect" in str(section(running).details) or \
        "connect" in str(section(running).details).lower()


async def test_a_wrong_token_is_refused_and_said(short_tmp, agent_factory):
    cluster = await KubeCluster.start(short_tmp, token="s3cret")
    try:
        if cluster.standin is None:
            pytest.skip("needs the stand-in")
        wrong = short_tmp / "wrong"
        wrong.write_text(cluster.kubeconfig.read_text().replace("s3cret", "nope"))
        running = await agent_factory(["--plugins", "memory,k8s", "--k8s-kubeconfig",
                                       str(wrong), *CLUSTER], wait_ready=False)
        await eventually(lambda: "401 Unauthorized" in str(
            _source(running).reflectors["pods"].last_error), what="the 401")
        # the right token works
        ok = await agent_factory(["--plugins", "memory,k8s", "--k8s-kubeconfig",
                                  str(cluster.kubeconfig), *CLUSTER, "--memory-store", "other"])
        assert section(ok).health is Health.OK
    finally:
        await cluster.close()


def test_a_missing_kubeconfig_exits_2_naming_it(short_tmp):
    from conftest import run_cli
    result = run_cli("--plugins", "memory,k8s", "--k8s-kubeconfig", str(short_tmp / "nope"),
                     "--socket-path", str(short_tmp / "s.sock"), "--state-dir",
                     str(short_tmp / "state"))
    assert result.returncode == 2
    assert f"--k8s-kubeconfig {short_tmp / 'nope'}: no such file" in result.stderr


# -- pod labels ----------------------------------------------------------------------------------


async def test_endpoint_labels_come_from_the_pod_its_namespace_and_service_account(
        kube, k8s_agent):
    ns = await kube.namespace("shop", labels={"team": "blue"})
    await kube.apply(PODS, pod(ns, "db-0", {
        "app": "protected-db", "app.kubernetes.io/name": "redis", "pod-template-hash": "abc",
        "controller-revision-hash": "x", "statefulset.kubernetes.io/pod-name": "db-0",
        "kubernetes.io/os": "linux", "io.cilium.k8s.policy.cluster": "spoof"}, account="db"))
    running = await k8s_agent()
    labels = await running.agent.hooks.endpoint_labels(agent=running.agent, namespace=ns,
                                                       pod_name="db-0")
    assert labels == {"k8s:app=protected-db", "k8s:app.kubernetes.io/name=redis",
                      "k8s:io.cilium.k8s.namespace.labels.team=blue",
                      "k8s:io.cilium.k8s.policy.serviceaccount=db"}
    # a pod that arrives while the agent waits for it
    task = asyncio.create_task(running.agent.hooks.endpoint_labels(
        agent=running.agent, namespace=ns, pod_name="late"))
    await kube.apply(PODS, pod(ns, "late", {"app": "late"}))
    assert "k8s:app=late" in await task
    if kube.standin is not None:  # from the watch, not from a GET after the wait
        assert not [r for r in kube.standin.requests if r.startswith("GET") and "/late" in r]
    # a pod on another node is read from the API server
    await kube.apply(PODS, pod(ns, "elsewhere", {"app": "x"}, node="node2"))
    assert "k8s:app=x" in await running.agent.hooks.endpoint_labels(
        agent=running.agent, namespace=ns, pod_name="elsewhere")
    with pytest.raises(UsageError, match=rf"pod {ns}/ghost: .*404"):
        await running.agent.hooks.endpoint_labels(agent=running.agent, namespace=ns,
                                                  pod_name="ghost")


# -- services ------------------------------------------------------------------------------------


def service(namespace: str, name: str, ip: str, annotations: dict | None = None,
            cluster_ip: str | None = None) -> dict:
    return {"metadata": {"name": name, "namespace": namespace,
                         "annotations": annotations or {}},
            "spec": {"clusterIP": cluster_ip or ip, "ports": [{"port": 6379,
                                                              "protocol": "TCP"}]}}


def endpoint_slice(namespace: str, service_name: str, addresses: list[str],
                   ready: bool = True) -> dict:
    return {"metadata": {"name": f"{service_name}-abc", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"port": 6379, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": ready}}
                          for a in addresses]}


async def test_services_and_endpointslices_become_global_services(kube, k8s_agent):
    ns = await kube.namespace("default")
    await kube.apply(SERVICES, service(ns, "redis", "10.96.0.10",
                                       {"service.cilium.io/global": "true"}))
    await kube.apply(ENDPOINT_SLICES, endpoint_slice(ns, "redis", ["10.1.1.5"]))
    await kube.apply(SERVICES, service(ns, "headless", "", cluster_ip="None"))
    running = await k8s_agent()
    services = running.agent.services
    (svc,) = services.sourced.values()
    assert (svc.namespace, svc.name, svc.global_) == (ns, "redis", True)
    assert [str(b.ip) for b in svc.backends] == ["10.1.1.5"]
    key = f"cilium/state/services/v1/cluster1/{ns}/redis"

    async def exported():
        kv = await running.agent.kvstore.get(key)
        return kv and json.loads(kv.value)
    for _ in range(100):
        if await exported():
            break
        await asyncio.sleep(0.05)
    assert list((await exported())["backends"]) == ["10.1.1.5"]

    # a slice's endpoints change; a not-ready endpoint is no backend
    await kube.apply(ENDPOINT_SLICES, endpoint_slice(ns, "redis", ["10.1.1.5", "10.1.1.6"]))
    await eventually(lambda: len(services.sourced[(ns, "redis")].backends) == 2, what="2")
    await kube.apply(ENDPOINT_SLICES, endpoint_slice(ns, "redis", ["10.1.1.5"], ready=False))
    await eventually(lambda: not services.sourced[(ns, "redis")].backends, what="0 backends")

    # a bad annotation: refused by name, the last good version stays
    await kube.apply(SERVICES, service(ns, "redis", "10.96.0.10",
                                       {"service.cilium.io/global": "maybe"}))
    await eventually(lambda: f"refused Service {ns}/redis" in str(section(running).details),
                     what="the refusal")
    assert "maybe" in str(section(running).details)
    assert services.sourced[(ns, "redis")].global_
    # deleted: withdrawn here and from the remote clusters' view
    await kube.delete(SERVICES, ns, "redis")
    await eventually(lambda: not services.sourced, what="the service to go")
    for _ in range(100):
        if not await exported():
            break
        await asyncio.sleep(0.05)
    assert not await exported()


async def test_a_service_with_backends_outside_the_pod_cidr_is_refused_until_they_are_in(
        kube, k8s_agent):
    ns = await kube.namespace("default")
    running = await k8s_agent()
    await kube.apply(SERVICES, service(ns, "web", "10.96.0.20"))
    await kube.apply(ENDPOINT_SLICES, endpoint_slice(ns, "web", ["10.1.2.7"]))
    await eventually(lambda: "10.1.2.7" in str(section(running, "Services").details),
                     what="the refusal in the Services section")
    # the version without endpoints (the Service came first) stays
    assert running.agent.services.sourced[(ns, "web")].backends == ()
    # a second node of the cluster joins with 10.1.2.0/24: the refused version is good now
    await k8s_agent("--node-name", "node2", "--pod-cidr", "10.1.2.0/24")
    await eventually(lambda: [str(b.ip) for b in running.agent.services.sourced[
        (ns, "web")].backends] == ["10.1.2.7"], what="the service accepted")
    assert "10.1.2.7" not in str(section(running, "Services").details)


# -- the stand-in speaks the wire format ---------------------------------------------------------


async def test_standin_lists_in_pages_and_refuses_what_a_server_refuses(kube):
    ns = await kube.namespace("default")
    for i in range(5):
        await kube.apply(PODS, pod(ns, f"p{i}", {"i": str(i)}))
    first = await kube.api.request("GET", PODS.path(ns), query={"limit": "2"})
    assert len(first["items"]) == 2 and first["metadata"]["continue"]
    assert "kind" not in first["items"][0]  # built-in list items carry no TypeMeta
    rest = await kube.api.request("GET", PODS.path(ns), query={
        "limit": "10", "continue": first["metadata"]["continue"]})
    assert [p["metadata"]["name"] for p in first["items"] + rest["items"]] == \
        [f"p{i}" for i in range(5)]
    with pytest.raises(KubeError) as exc:
        await kube.api.request("POST", PODS.path(ns), body=pod(ns, "p0", {}))
    assert exc.value.code == 409 and exc.value.reason == "AlreadyExists"
    with pytest.raises(KubeError) as exc:
        await kube.api.request("POST", PODS.path(kube.ns("nope")), body=pod(kube.ns("nope"),
                                                                            "x", {}))
    assert exc.value.code == 404
    stale = await kube.api.request("GET", PODS.path(ns, "p1"))
    await kube.apply(PODS, pod(ns, "p1", {"i": "changed"}))
    with pytest.raises(KubeError) as exc:
        await kube.api.request("PUT", PODS.path(ns, "p1"), body=stale)
    assert exc.value.code == 409 and exc.value.reason == "Conflict"
    on_node = await kube.api.request("GET", PODS.path(), query={
        "fieldSelector": "spec.nodeName=node2"})
    assert on_node["items"] == []


async def test_standin_watch_sends_errors_and_bookmarks_as_a_server_does(kube):
    server = standin(kube)
    ns = await kube.namespace("default")
    listed = await kube.api.request("GET", NAMESPACES.path())
    version = listed["metadata"]["resourceVersion"]
    await kube.apply(PODS, pod(ns, "a", {}))
    lines = []
    async for line in kube.api.watch(PODS.path(), {"resourceVersion": version,
                                                   "allowWatchBookmarks": "true",
                                                   "timeoutSeconds": "1"}, 5):
        lines.append(json.loads(line))
    assert lines[0]["type"] == "ADDED" and lines[0]["object"]["kind"] == "Pod"
    assert any(e["type"] == "BOOKMARK" for e in lines[1:])
    server.compact()
    events = [json.loads(line) async for line in kube.api.watch(
        PODS.path(), {"resourceVersion": version, "timeoutSeconds": "1"}, 5)]
    assert events == [{"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f"too old resource version: {version} ({server.compacted})",
        "reason": "Expired", "code": 410}}]


def _source(running):
    return running.agent.plugins.pm.get_plugin("k8s.source")


async def test_a_resolver_that_does_not_wrap_the_default_receives_kubernetes_policies(
        kube, agent_factory):
    """Sources feed the core's repository, which hands every rule to the loaded resolver."""
    import standalone_resolver
    ns = await kube.namespace("default")
    await kube.apply(CNPS, cnp(ns, "db", "protected-db", "employee"))
    running = await agent_factory(
        ["--plugins", "memory,k8s", "--k8s-kubeconfig", str(kube.kubeconfig), "--k8s-pod-wait",
         "0.5", "--policy-resolver", "standalone", *CLUSTER],
        extra_plugins=[("standalone", standalone_resolver)])
    resolver = running.agent.policy_resolver
    assert isinstance(resolver, standalone_resolver.StandaloneResolver)
    assert [(u.kind, u.policy.display) for u in resolver.received] == [
        (ChangeKind.UPSERT, f"CiliumNetworkPolicy {ns}/db")]
    await kube.delete(CNPS, ns, "db")
    await eventually(lambda: len(resolver.received) == 2, what="the deletion handed over")
    assert resolver.received[1].kind is ChangeKind.DELETE
    assert resolver.revision == running.agent.policy_repository.revision == 2
