"""Policies in a running agent: import/get/delete through the API and CLI, stored in the
cluster's kvstore, resolved against identities and endpoints, handed to the datapath, traced."""

import asyncio
import ipaddress
import json

import pytest
from conftest import run_cli
from test_policy_semantics import IDS, SEED

import meshagent
from meshagent.events import ChangeKind
from meshagent.kvstore import keys as kvkeys
from meshagent.model.endpoint import Endpoint
from meshagent.model.identity import Identity
from meshagent.model.ipcache import IPCacheEntry
from meshagent.policy.api import parse_policies
from meshagent.policy import PolicyUpdate
from meshagent.testing import eventually
from meshagent.testing.resolver_contract import RecordingDatapath, add_endpoint

ARGS = ["--plugins", "memory", "--cluster-name", "cluster1", "--cluster-id", "101",
        "--memory-store", "cluster1"]


def verdicts(datapath: RecordingDatapath, endpoint_id: int) -> dict:
    """What the datapath holds for an endpoint, verdicts as text."""
    return {k: v.value for k, v in datapath.state.get(endpoint_id, {}).items()}


def cli(running, *args):
    return asyncio.to_thread(run_cli, *args, "--socket-path", str(running.socket_path))


def add_identities(agent):
    for identity in IDS.values():
        if identity.id >= 256 and identity.id < (1 << 24):
            agent.tables.identities.upsert(identity.id, identity)


@pytest.fixture
def seed_file(tmp_path):
    path = tmp_path / "l4-policy.yaml"
    path.write_text(SEED)
    return path


async def test_import_get_delete_and_revision(agent_factory, seed_file, tmp_path):
    a1 = await agent_factory(ARGS)
    result = await cli(a1, "policy", "import", str(seed_file))
    assert result.returncode == 0, result.stderr
    assert "imported CiliumNetworkPolicy default/clustermesh-ingress-l4-policy" in result.stdout
    stored = await a1.agent.kvstore.get(
        kvkeys.policy_key("CiliumNetworkPolicy", "default", "clustermesh-ingress-l4-policy"))
    assert json.loads(stored.value)["spec"]["endpointSelector"]["matchLabels"]["app"] == \
        "protected-db"
    await eventually(lambda: a1.agent.policy_resolver.revision == 1)
    got = json.loads((await cli(a1, "policy", "get", "-o", "json")).stdout)
    assert got["revision"] == 1 and got["policies"][0]["metadata"]["name"] == \
        "clustermesh-ingress-l4-policy"
    assert "kind: CiliumNetworkPolicy" in (await cli(a1, "policy", "get")).stdout
    status = (await cli(a1, "status")).stdout
    assert "Policy:      Ok        revision 1, 1 policies, 0/0 endpoints enforcing" in status

    bad = tmp_path / "bad.yaml"
    bad.write_text(SEED.replace('port: "6379"', "port: redis"))
    refused = await cli(a1, "policy", "import", str(bad))
    assert refused.returncode == 1
    assert "named ports ('redis') are not supported" in refused.stderr and str(bad) in refused.stderr
    assert a1.agent.policy_resolver.revision == 1  # nothing of it was imported

    deleted = await cli(a1, "policy", "delete", "clustermesh-ingress-l4-policy")
    assert deleted.returncode == 0, deleted.stderr
    await eventually(lambda: a1.agent.policy_repository.policies() == [])
    again = await cli(a1, "policy", "delete", "clustermesh-ingress-l4-policy")
    assert again.returncode == 1 and "404" in again.stderr


async def test_every_agent_of_the_cluster_enforces_the_same_set(agent_factory, seed_file):
    a1 = await agent_factory(ARGS + ["--node-name", "node1"])
    a2 = await agent_factory(ARGS + ["--node-name", "node2"])
    other = await agent_factory(["--plugins", "memory", "--cluster-name", "cluster2",
                                 "--cluster-id", "102", "--memory-store", "cluster2"])
    assert (await cli(a1, "policy", "import", str(seed_file))).returncode == 0
    await eventually(lambda: len(a2.agent.policy_repository.policies()) == 1)
    assert other.agent.policy_repository.policies() == []  # not shared with other clusters


async def test_verdicts_reach_the_datapath_and_trace_explains(agent_factory, seed_file):
    datapath = RecordingDatapath()
    a1 = await agent_factory(ARGS, extra_plugins=[("recording", datapath)])
    add_identities(a1.agent)
    db = Endpoint(7, "default", IDS["db"].labels, ipaddress.ip_address("10.1.1.7"), IDS["db"].id)
    await add_endpoint(a1.agent, db)
    await eventually(lambda: 7 in datapath.state)
    assert set(verdicts(datapath, 7).values()) == {"allow"}  # no policy yet: allow all
    assert (await cli(a1, "policy", "import", str(seed_file))).returncode == 0
    await eventually(lambda: "deny" not in verdicts(datapath, 7).values() and any(
        key.identity == IDS["employee-c2"].id for key in datapath.state[7]))
    ingress = {k: v for k, v in verdicts(datapath, 7).items() if k.direction == "ingress"}
    assert {k.identity for k in ingress} == {IDS["employee"].id, IDS["employee-c2"].id}
    assert {(k.protocol, k.port) for k in ingress} == {(6, 6379)}

    # a remote identity arriving later is added incrementally
    late = Identity((102 << 16) + 999, IDS["employee-c2"].labels, "cluster2")
    a1.agent.tables.identities.upsert(late.id, late)
    await eventually(lambda: any(k.identity == late.id for k in datapath.state[7]))

    allowed = await cli(a1, "policy", "trace", "--src-labels",
                        "app=employee,io.kubernetes.pod.namespace=istio-space,"
                        "io.cilium.k8s.policy.cluster=cluster2", "--dst-endpoint", "7",
                        "--dport", "6379/TCP")
    assert allowed.returncode == 0, allowed.stderr
    assert f"identity {IDS['employee-c2'].id} from cluster cluster2" in allowed.stdout
    assert "verdict:     ALLOW: allowed" in allowed.stdout
    assert "matched:     allow: CiliumNetworkPolicy default/clustermesh-ingress-l4-policy" \
        in allowed.stdout
    denied = await cli(a1, "policy", "trace", "--src-identity", str(IDS["stranger"].id),
                       "--dst-endpoint", "7", "--dport", "6379")
    assert denied.returncode == 1
    assert "verdict:     DENY: denied by default" in denied.stdout
    a1.agent.tables.ipcache.upsert(ipaddress.ip_network("10.1.1.9/32"), IPCacheEntry(
        ipaddress.ip_network("10.1.1.9/32"), IDS["employee"].id, "cluster1"))
    by_ip = json.loads((await cli(a1, "policy", "trace", "--src-ip", "10.1.1.9", "--dst-endpoint",
                                  "7", "--dport", "6379", "-o", "json")).stdout)
    assert by_ip["verdict"] == "allow" and by_ip["source"]["identity"] == IDS["employee"].id
    world = json.loads((await cli(a1, "policy", "trace", "--src-ip", "192.0.2.1",
                                  "--dst-endpoint", "7", "--dport", "6379", "-o", "json")).stdout)
    assert world["source"]["identity"] == 2 and world["verdict"] == "deny"


async def test_cidr_rules_get_local_identities_and_ipcache_prefixes(agent_factory, tmp_path):
    a1 = await agent_factory(ARGS)
    path = tmp_path / "cidr.yaml"
    path.write_text(SEED.replace("fromEndpoints:", "fromCIDRSet:\n      - cidr: 10.9.0.0/16\n"
                                 "        except: [10.9.1.0/24]\n    fromEndpoints:"))
    assert (await cli(a1, "policy", "import", str(path))).returncode == 0
    await eventually(lambda: a1.agent.tables.ipcache.get(ipaddress.ip_network("10.9.1.0/24")))
    entry = a1.agent.tables.ipcache.get(ipaddress.ip_network("10.9.0.0/16"))
    assert entry.identity >= 1 << 24
    assert a1.agent.tables.identities.get(entry.identity).labels == frozenset(
        {"cidr:10.9.0.0/16", "reserved:world"})
    # CIDR identities are node-local: not published to the kvstore
    assert await a1.agent.kvstore.get(kvkeys.ipcache_key("10.9.0.0/16")) is None


async def test_a_bad_stored_document_is_refused_and_the_last_good_stays(agent_factory,
                                                                        seed_file):
    a1 = await agent_factory(ARGS)
    assert (await cli(a1, "policy", "import", str(seed_file))).returncode == 0
    await eventually(lambda: a1.agent.policy_resolver.revision == 1)
    key = kvkeys.policy_key("CiliumNetworkPolicy", "default", "clustermesh-ingress-l4-policy")
    await a1.agent.kvstore.put(key, b'{"kind": "CiliumNetworkPolicy", "spec": 3}')
    await eventually(lambda: key in a1.agent.policy_repository.rejected)
    assert len(a1.agent.policy_repository.policies()) == 1
    status = await a1.client.request("GET", "/status", params={"verbose": "1"})
    section = next(s for s in status["sections"] if s["name"] == "Policy")
    assert section["health"] == "Warning" and any("refused" in d for d in section["details"])


class CRDSource:
    """A policy source plugin, as the k8s plugin will be."""

    def __init__(self):
        self.feed: asyncio.Queue = asyncio.Queue()

    @meshagent.hookimpl
    def meshagent_policy_source(self, agent):
        async def updates():
            while True:
                yield await self.feed.get()
        return updates()


async def test_policy_source_hook_feeds_the_resolver(agent_factory):
    source = CRDSource()
    a1 = await agent_factory(ARGS, extra_plugins=[("crd", source)])
    (policy,) = parse_policies(SEED)
    await source.feed.put(PolicyUpdate(ChangeKind.UPSERT, policy))
    await eventually(lambda: a1.agent.policy_repository.policies() == [policy])
    await source.feed.put(PolicyUpdate(ChangeKind.DELETE, key=policy.key))
    await eventually(lambda: a1.agent.policy_repository.policies() == [])
