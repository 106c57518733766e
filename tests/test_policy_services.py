"""``toServices``: parsed, translated as Cilium's ``pkg/policy/k8s/service.go`` does (a Service
with a selector becomes a selector with its namespace, one without becomes its backends'
/32s and /128s), and kept in step with the cluster's Services by the agent — only the
endpoints of the policies naming them are recomputed, and the datapath gets the differences."""

import asyncio
import ipaddress

import attrs
import pytest
from conftest import run_cli

from meshagent.model.endpoint import Endpoint
from meshagent.model.identity import Identity
from meshagent.policy.api import EndpointSelector, PolicyError, Requirement, parse_policies
from meshagent.policy.contract import MapKey, Verdict
from meshagent.policy.services import selects, translate
from meshagent.service.kubernetes import ServiceError, parse_services
from meshagent.testing.resolver_contract import RecordingDatapath, add_endpoint

CLIENT_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-db, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toServices:
    - k8sService: {serviceName: db, namespace: default}
    toPorts: [{ports: [{port: "6379", protocol: TCP}]}]
"""


def service_yaml(name: str, backends: list[str], namespace: str = "default",
                 selector: dict | None = None, labels: dict | None = None) -> str:
    """A Service and its Endpoints, as ``meshagent service apply`` takes them."""
    meta = f"{{name: {name}, namespace: {namespace}"
    meta += f", labels: {labels}}}" if labels else "}"
    spec = "{clusterIP: 10.96.0.10, ports: [{port: 6379}]"
    spec += f", selector: {selector}}}" if selector else "}"
    text = f"apiVersion: v1\nkind: Service\nmetadata: {meta}\nspec: {spec}\n"
    if backends:
        addresses = ", ".join(f"{{ip: {ip}}}" for ip in backends)
        text += (f"---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name},"
                 f" namespace: {namespace}}}\nsubsets: [{{addresses: [{addresses}],"
                 " ports: [{port: 6379}]}]\n")
    return text


def services(*texts: str):
    return [s for text in texts for s in parse_services(text, "cluster1")]


# -- parsing ------------------------------------------------------------------------------------


def test_to_services_parses_both_forms_with_an_empty_namespace_meaning_any():
    (policy,) = parse_policies(CLIENT_POLICY.replace(
        "    - k8sService: {serviceName: db, namespace: default}\n",
        "    - k8sService: {serviceName: db, namespace: default}\n"
        "    - k8sServiceSelector: {selector: {matchLabels: {tier: cache}}}\n"))
    by_name, by_labels = policy.rules[0].egress[0].services
    assert (by_name.name, by_name.namespace, by_name.selector) == ("db", "default", None)
    assert (by_labels.name, by_labels.namespace) == (None, "")
    assert by_labels.selector == EndpointSelector((Requirement("tier", "In",
                                                               frozenset({"cache"})),))


@pytest.mark.parametrize("item, error", [
    ("{toServices: [{k8sService: {namespace: default}}]}",
     "spec.egress[0].toServices[0].k8sService.serviceName: is required"),
    ("{toServices: [{k8sService: {serviceName: a}, k8sServiceSelector: {selector: {}}}]}",
     "spec.egress[0].toServices[0]: give one of k8sService or k8sServiceSelector"),
    ("{toServices: [{k8sServiceSelector: {namespace: x}}]}",
     "spec.egress[0].toServices[0].k8sServiceSelector.selector: is required"),
    ("{toServices: [{k8sService: {serviceName: a, port: 80}}]}",
     "spec.egress[0].toServices[0].k8sService.port: unknown field"),
    ("{toServices: [{k8sService: {serviceName: a}}], toCIDRSet: [{cidr: 10.0.0.0/8}]}",
     "spec.egress[0]: combining ToCIDRSet and ToServices is not supported yet"),
    ("{toServices: [{k8sService: {serviceName: a}}], toEndpoints: [{}]}",
     "spec.egress[0]: combining ToEndpoints and ToServices is not supported yet"),
    ("{toServices: {k8sService: {serviceName: a}}}",
     "spec.egress[0].toServices: must be a list, not dict"),
])
def test_bad_to_services_is_refused_naming_the_field(item, error):
    text = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
            f"spec:\n  endpointSelector: {{}}\n  egress: [{item}]\n")
    with pytest.raises(PolicyError) as caught:
        parse_policies(text, "t")
    assert str(caught.value) == f"t document 1 (CiliumNetworkPolicy p): {error}"


def test_to_services_is_egress_only():
    text = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
            "spec:\n  endpointSelector: {}\n  ingress: [{toServices: []}]\n")
    with pytest.raises(PolicyError, match=r"spec.ingress\[0\].toServices: unknown field"):
        parse_policies(text)


# -- translation --------------------------------------------------------------------------------


def test_a_service_without_a_selector_becomes_its_backends_addresses():
    (policy,) = parse_policies(CLIENT_POLICY)
    known = services(service_yaml("db", ["10.1.0.5", "10.1.0.6", "fd00:1::5"]),
                     service_yaml("db", ["10.1.0.9"], namespace="other"))
    (item,) = translate(policy, known).rules[0].egress
    assert [str(c.cidr) for c in item.cidrs] == ["10.1.0.5/32", "10.1.0.6/32", "fd00:1::5/128"]
    assert item.endpoints is None and item.ports == policy.rules[0].egress[0].ports


def test_a_service_with_a_selector_becomes_that_selector_in_its_namespace():
    (policy,) = parse_policies(CLIENT_POLICY.replace("namespace: default}", "}"))
    known = services(service_yaml("db", ["10.1.0.5"], namespace="other",
                                  selector={"app": "redis"}))
    (item,) = translate(policy, known).rules[0].egress
    assert item.cidrs is None  # the backends do not count: the selector picks the pods
    assert item.endpoints == (EndpointSelector((
        Requirement("app", "In", frozenset({"redis"})),
        Requirement("k8s:io.kubernetes.pod.namespace", "In", frozenset({"other"})))),)


def test_a_service_selector_matches_the_services_labels_and_namespace():
    (policy,) = parse_policies(CLIENT_POLICY.replace(
        "k8sService: {serviceName: db, namespace: default}",
        "k8sServiceSelector: {selector: {matchLabels: {tier: cache}}, namespace: default}"))
    ref = policy.rules[0].egress[0].services[0]
    cache = services(service_yaml("cache", ["10.1.0.5"], labels={"tier": "cache"}))[0]
    elsewhere = services(service_yaml("cache", ["10.1.0.5"], namespace="x",
                                      labels={"tier": "cache"}))[0]
    unlabelled = services(service_yaml("cache", ["10.1.0.5"]))[0]
    assert selects(ref, cache) and not selects(ref, elsewhere) and not selects(ref, unlabelled)


def test_a_service_change_concerns_the_policies_naming_it_in_either_version():
    from meshagent.policy.services import names_any
    (policy,) = parse_policies(CLIENT_POLICY.replace(
        "k8sService: {serviceName: db, namespace: default}",
        "k8sServiceSelector: {selector: {matchLabels: {tier: cache}}}"))
    cache = services(service_yaml("redis", ["10.1.0.5"], labels={"tier": "cache"}))
    relabelled = services(service_yaml("redis", ["10.1.0.5"], labels={"tier": "db"}))
    assert names_any(policy, cache) and not names_any(policy, relabelled)
    assert names_any(policy, cache + relabelled)  # the old version matched: it concerns it


def test_naming_no_known_service_allows_nothing():
    (policy,) = parse_policies(CLIENT_POLICY)
    (item,) = translate(policy, services(service_yaml("web", ["10.1.0.5"]))).rules[0].egress
    assert (item.endpoints, item.cidrs) == (None, None) and item.names_peers


def test_service_labels_and_selector_travel_in_the_cluster_service_json():
    """pkg/clustermesh/store/store.go: ClusterService's ``labels`` and ``selector`` maps."""
    from meshagent.model.service import service_from_json, service_to_json
    (service,) = services(service_yaml("db", ["10.1.0.5"], selector={"app": "redis"},
                                       labels={"tier": "cache"}))
    assert service.labels == (("tier", "cache"),) and service.selector == (("app", "redis"),)
    assert service_from_json(service_to_json(service)) == service
    # what a Cilium agent's encoding/json reads of it (tests/cilium/reader.py)
    from cilium import reader
    read = reader.go_unmarshal(reader.CLUSTER_SERVICE, service_to_json(service))
    assert (read["labels"], read["selector"]) == ({"tier": "cache"}, {"app": "redis"})
    decoded = service_from_json(b'{"cluster":"c2","namespace":"default","name":"db",'
                                b'"Labels":{"tier":"cache"},"SELECTOR":{"app":"redis"}}')
    assert (decoded.labels, decoded.selector) == ((("tier", "cache"),), (("app", "redis"),))


# -- in an agent --------------------------------------------------------------------------------

ARGS = ["--plugins", "memory", "--cluster-name", "cluster1", "--cluster-id", "101",
        "--memory-store", "svcpolicy", "--pod-cidr", "10.1.0.0/16"]


class BatchRecorder(RecordingDatapath):
    """Also remembers which endpoints each batch carried entries for."""

    def __init__(self):
        super().__init__()
        self.touched: list[set[int]] = []

    async def apply(self, batch) -> None:
        self.touched.append({ep for ep, changes in batch.policy.items() if changes})
        await super().apply(batch)


def pod(number: int, ip: str, labels: set[str]) -> tuple[Endpoint, Identity]:
    identity = Identity(1000 + number, frozenset(labels | {
        "k8s:io.kubernetes.pod.namespace=default", "k8s:io.cilium.k8s.policy.cluster=cluster1"}),
        "cluster1")
    return Endpoint(number, "default", identity.labels, ipaddress.ip_address(ip),
                    identity.id), identity


async def until(predicate, what: str) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never: {what}")


async def test_a_to_services_rule_follows_the_services_backends(agent_factory, tmp_path):
    datapath = BatchRecorder()
    running = await agent_factory(ARGS, extra_plugins=[("recording", datapath)])
    agent = running.agent
    client, client_id = pod(7, "10.1.0.7", {"k8s:app=client"})
    other, other_id = pod(8, "10.1.0.8", {"k8s:app=other"})
    for identity in (client_id, other_id):
        agent.tables.identities.upsert(identity.id, identity)
    for endpoint in (client, other):
        await add_endpoint(agent, endpoint)
    await agent.services.apply(service_yaml("db", ["10.1.5.1"]), "t")
    (policy,) = parse_policies(CLIENT_POLICY)
    await agent.policy_repository.store([policy])

    def allowed() -> set[str]:
        """The backends the client may reach on 6379/TCP, by the CIDR identities' prefixes."""
        ids = {k.identity for k, v in datapath.state.get(7, {}).items()
               if v is Verdict.ALLOW and k.direction == "egress" and (k.protocol, k.port) ==
               (6, 6379)}
        return {str(e.prefix.network_address) for e in agent.tables.ipcache.values()
                if e.identity in ids}

    await until(lambda: allowed() == {"10.1.5.1"}, "backend A allowed")
    # the rule as written is what policy get shows; the resolver has it translated
    assert agent.policy_repository.policies() == [policy]
    revision = agent.policy_repository.revision
    batches = len(datapath.touched)
    await agent.services.apply(service_yaml("db", ["10.1.5.1", "10.1.5.2"]), "t")
    await until(lambda: allowed() == {"10.1.5.1", "10.1.5.2"}, "backend B added")
    await agent.services.apply(service_yaml("db", ["10.1.5.2"]), "t")
    await until(lambda: allowed() == {"10.1.5.2"}, "backend A removed")
    assert agent.policy_repository.revision == revision + 2  # one per translation that changed
    # only the client's entries changed: the other endpoint's policy does not name the service
    assert set().union(*datapath.touched[batches:]) == {7}
    # a service the policy does not name changes nothing
    await agent.services.apply(service_yaml("web", ["10.1.5.9"]), "t")
    # nor does a remote cluster's ClusterService of the same name, global or not: only this
    # cluster's services are toServices targets (as they reach the tables through ClusterMesh)
    (remote,) = parse_services(service_yaml("db", ["10.2.5.1"]).replace(
        "name: db,", "name: db, annotations: {service.cilium.io/global: 'true'},"), "cluster2")
    agent.tables.services.upsert(("cluster2", "default", "db"), remote)
    await asyncio.sleep(0.3)
    assert agent.policy_repository.revision == revision + 2
    assert allowed() == {"10.1.5.2"}
    # the service goes: nothing is allowed to it any more, and its CIDR identity goes too
    assert await agent.services.delete("default", "db")
    await until(lambda: allowed() == set(), "service deleted")
    assert not any(e.prefix == ipaddress.ip_network("10.1.5.2/32")
                   for e in agent.tables.ipcache.values())
    assert datapath.problems == []


async def test_a_service_with_a_selector_allows_the_pods_it_selects(agent_factory, tmp_path):
    datapath = RecordingDatapath()
    running = await agent_factory(ARGS, extra_plugins=[("recording", datapath)])
    agent = running.agent
    client, client_id = pod(7, "10.1.0.7", {"k8s:app=client"})
    redis, redis_id = pod(9, "10.1.0.9", {"k8s:app=redis"})
    stranger, stranger_id = pod(10, "10.1.0.10", {"k8s:app=stranger"})
    for identity in (client_id, redis_id, stranger_id):
        agent.tables.identities.upsert(identity.id, identity)
    await add_endpoint(agent, client)
    (policy,) = parse_policies(CLIENT_POLICY)
    await agent.policy_repository.store([policy])
    await agent.services.apply(service_yaml("db", ["10.1.0.9"], selector={"app": "redis"}), "t")
    key = MapKey("egress", redis_id.id, 6, 6379, 6379)
    await until(lambda: datapath.state.get(7, {}).get(key) is Verdict.ALLOW, "redis allowed")
    egress = {k.identity for k in datapath.state[7] if k.direction == "egress"}
    assert egress == {redis_id.id}  # not the stranger, nothing else
    # the selector changes to one no pod matches: the pod is no longer allowed
    await agent.services.apply(service_yaml("db", ["10.1.0.9"], selector={"app": "gone"}), "t")
    await until(lambda: key not in datapath.state[7], "redis dropped")
    # policy get shows toServices as written
    socket = str(running.socket_path)
    shown = await asyncio.to_thread(run_cli, "policy", "get", "-o", "json", "--socket-path",
                                    socket)
    assert shown.returncode == 0, shown.stderr
    assert '"serviceName": "db"' in shown.stdout and "10.1.0.9" not in shown.stdout


def test_a_new_translation_recomputes_only_the_endpoints_the_policy_selects():
    """The resolver, handed a policy again with the same endpoint selectors (its toServices
    translated anew), recomputes the endpoints it selects and no other."""
    from meshagent.policy.resolver import PolicyEndpoint, Resolver
    resolver = Resolver("cluster1")
    client, _ = pod(7, "10.1.0.7", {"k8s:app=client"})
    other, _ = pod(8, "10.1.0.8", {"k8s:app=other"})
    for endpoint in (client, other):
        resolver.set_endpoint(PolicyEndpoint(endpoint.id, endpoint.namespace, endpoint.labels))
    (policy,) = parse_policies(CLIENT_POLICY)
    resolver.upsert_policy(translate(policy, services(service_yaml("db", ["10.1.5.1"]))))
    resolver.stage_policy(translate(policy, services(service_yaml("db", ["10.1.5.2"]))))
    assert resolver.dirty == {7}
    resolver.recompute_pending(1)
    moved = attrs.evolve(policy, rules=(attrs.evolve(
        policy.rules[0], endpoint_selector=EndpointSelector()),))
    resolver.stage_policy(moved)  # other endpoints now: every one is looked at
    assert resolver.dirty == {7, 8}


def test_the_kubernetes_source_keeps_a_services_labels_and_selector():
    from meshagent.plugins.k8s.translate import service_from
    service = service_from({"metadata": {"name": "db", "namespace": "shop",
                                         "labels": {"tier": "db"}},
                            "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 5432}],
                                     "selector": {"app": "pg"}}}, [], "cluster1")
    assert (service.labels, service.selector) == ((("tier", "db"),), (("app", "pg"),))
    with pytest.raises(ServiceError, match=r"spec.selector must map strings to strings"):
        service_from({"metadata": {"name": "db", "namespace": "shop"},
                      "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 5432}],
                               "selector": {"app": 5}}}, [], "cluster1")
