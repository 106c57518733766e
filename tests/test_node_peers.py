"""Node peers in a running agent: nodes publish their labels (Cilium's node JSON ``Labels``),
``--enable-node-selector-labels`` gives every other node's address the identity of its labels,
fromNodes/toNodes policies need it (Cilium's error otherwise), and ``policy get -o rules``
shows each rule with its labels as ``cilium policy get`` does."""

import asyncio
import ipaddress
import json

import pytest
from conftest import run_cli

from meshagent.kvstore import keys as kvkeys
from meshagent.model.identity import ReservedIdentity
from meshagent.model.node import Node, node_from_json, node_to_json
from meshagent.policy.api import NODE_SELECTOR_LABELS_OFF
from meshagent.runtime.config import parse_node_labels
from meshagent.testing import eventually

ARGS = ["--plugins", "memory", "--cluster-name", "cluster1", "--cluster-id", "101",
        "--node-name", "n0", "--node-ip", "10.0.0.1", "--local-node-labels", "role=db"]
NODE_PEERS = ["--enable-node-selector-labels=true"]
SCOPE = 2 << 24

# A node as a Cilium agent writes it (pkg/node/types/node.go: Node has no json tags, so its
# fields are the Go names; Labels is map[string]string), trimmed to the fields meshagent reads.
CILIUM_NODE = (b'{"Name":"worker-1","Cluster":"cluster2","IPAddresses":[{"Type":"InternalIP",'
               b'"IP":"10.2.0.11"}],"IPv4AllocCIDR":{"IP":"10.2.1.0","Mask":"////AA=="},'
               b'"IPv4HealthIP":"","Labels":{"kubernetes.io/hostname":"worker-1",'
               b'"node-role.kubernetes.io/worker":"","topology.kubernetes.io/zone":"a"},'
               b'"NodeIdentity":0,"ClusterID":102,"Source":"kvstore","EncryptionKey":0}')


def cli(running, *args):
    return asyncio.to_thread(run_cli, *args, "--socket-path", str(running.socket_path))


def test_a_cilium_nodes_labels_are_read():
    node = node_from_json(CILIUM_NODE)
    assert node.labels == (("kubernetes.io/hostname", "worker-1"),
                           ("node-role.kubernetes.io/worker", ""),
                           ("topology.kubernetes.io/zone", "a"))
    # encoding/json matches field names case-insensitively
    assert node_from_json(CILIUM_NODE.replace(b'"Labels"', b'"labels"')).labels == node.labels
    assert node_from_json(node_to_json(node)) == node
    assert b'"Labels"' not in node_to_json(Node("n", "c", 1))  # none: left out, as before


@pytest.mark.parametrize("labels, problem", [
    (b'{"role":1}', "'role'='1' is not a Kubernetes label"),
    (b'{"bad key!":"x"}', "'bad key!'='x' is not a Kubernetes label"),
    (b'["role"]', "field 'Labels' must be an object"),
])
def test_a_nodes_bad_labels_refuse_the_node(labels, problem):
    data = b'{"Name":"n","Cluster":"c","Labels":' + labels + b'}'
    with pytest.raises(ValueError, match=problem):
        node_from_json(data)


def test_local_node_labels_option():
    assert parse_node_labels("zone=a,role=db") == (("role", "db"), ("zone", "a"))
    with pytest.raises(ValueError, match="'role' is not a Kubernetes label key=value"):
        parse_node_labels("role")


async def put_node(agent, node: Node) -> None:
    await agent.kvstore.put(kvkeys.node_key(node.cluster, node.name), node_to_json(node))


def node_rows(agent) -> dict[str, int]:
    return {e.key_ip: e.identity for e in agent.tables.ipcache.values()
            if e.identity >= SCOPE}


async def test_other_nodes_get_the_identity_of_their_labels(agent_factory):
    running = await agent_factory(ARGS + NODE_PEERS)
    agent = running.agent
    published = json.loads((await agent.kvstore.get(kvkeys.node_key("cluster1", "n0"))).value)
    assert published["Labels"] == {"role": "db"}
    a = Node("n1", "cluster1", 101, ipaddress.ip_address("10.0.0.2"),
             ipv6=ipaddress.ip_address("fd00::2"), labels=(("role", "worker"),))
    b = Node("n2", "cluster1", 101, ipaddress.ip_address("10.0.0.3"), labels=(("role", "worker"),))
    await put_node(agent, a)
    await put_node(agent, b)
    await eventually(lambda: len(node_rows(agent)) == 3)
    rows = node_rows(agent)
    assert "10.0.0.1" not in rows  # this node: not a remote node
    worker = rows["10.0.0.2"]
    assert rows == {"10.0.0.2": worker, "fd00::2": worker, "10.0.0.3": worker}
    assert agent.tables.identities.get(worker).labels == frozenset({
        ReservedIdentity.REMOTE_NODE.label, "k8s:io.cilium.k8s.policy.cluster=cluster1",
        "node:role=worker"})
    # a node whose labels change moves to the identity of its new labels
    await put_node(agent, Node("n2", "cluster1", 101, ipaddress.ip_address("10.0.0.3"),
                               labels=(("role", "infra"),)))
    await eventually(lambda: node_rows(agent).get("10.0.0.3") not in (None, worker))
    infra = node_rows(agent)["10.0.0.3"]
    assert "node:role=infra" in agent.tables.identities.get(infra).labels
    # the last node of a label set takes its identity with it
    await agent.kvstore.delete(kvkeys.node_key("cluster1", "n1"))
    await eventually(lambda: set(node_rows(agent)) == {"10.0.0.3"})
    assert agent.tables.identities.get(worker) is None


async def test_without_the_option_node_addresses_stay_as_they_were(agent_factory):
    running = await agent_factory(ARGS)
    await put_node(running.agent, Node("n1", "cluster1", 101, ipaddress.ip_address("10.0.0.2"),
                                       labels=(("role", "worker"),)))
    await eventually(lambda: running.agent.tables.nodes.get(("cluster1", "n1")) is not None)
    assert node_rows(running.agent) == {}


NODES_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-from-workers, namespace: default}
spec:
  description: metrics scrapes from the workers
  labels: [{key: team, value: dba, source: k8s}, "audit"]
  endpointSelector: {matchLabels: {app: protected-db}}
  ingress:
  - fromNodes: [{matchLabels: {role: worker}}]
"""


async def test_node_peers_need_the_option(agent_factory, tmp_path):
    running = await agent_factory(ARGS)
    path = tmp_path / "nodes.yaml"
    path.write_text(NODES_POLICY)
    refused = await cli(running, "policy", "import", str(path))
    assert refused.returncode == 1
    assert f"CiliumNetworkPolicy default/db-from-workers: {NODE_SELECTOR_LABELS_OFF}" in \
        refused.stderr


async def test_policy_get_shows_rules_with_their_labels(agent_factory, tmp_path):
    running = await agent_factory(ARGS + NODE_PEERS)
    path = tmp_path / "nodes.yaml"
    path.write_text(NODES_POLICY)
    imported = await cli(running, "policy", "import", str(path))
    assert imported.returncode == 0, imported.stderr
    shown = await cli(running, "policy", "get", "-o", "rules")
    assert shown.returncode == 0, shown.stderr
    text, revision = shown.stdout.rsplit("\n", 2)[0], shown.stdout.rsplit("\n", 2)[1]
    assert revision == "Revision: 1"
    (rule,) = json.loads(text)
    assert list(rule) == ["endpointSelector", "ingress", "labels", "description"]
    assert rule["description"] == "metrics scrapes from the workers"
    assert rule["labels"] == [
        {"key": "audit", "source": "unspec"},
        {"key": "io.cilium.k8s.policy.derived-from", "value": "CiliumNetworkPolicy",
         "source": "k8s"},
        {"key": "io.cilium.k8s.policy.name", "value": "db-from-workers", "source": "k8s"},
        {"key": "io.cilium.k8s.policy.namespace", "value": "default", "source": "k8s"},
        {"key": "io.cilium.k8s.policy.uid", "source": "k8s"},
        {"key": "team", "value": "dba", "source": "k8s"}]
    # cilium policy get LABEL...: the rules carrying every label given
    for labels, count in ((["k8s:team=dba"], 1), (["team=dba", "audit"], 1),
                          (["unspec:team=dba"], 0), (["team=sre"], 0)):
        filtered = await cli(running, "policy", "get", "-o", "rules", *labels)
        assert len(json.loads(filtered.stdout.rsplit("\n", 2)[0])) == count, labels
    # the default output is still the documents
    assert "kind: CiliumNetworkPolicy" in (await cli(running, "policy", "get")).stdout


def test_a_node_address_ranks_after_the_local_clusters_entry_and_before_policy_cidrs():
    from meshagent.model.ipcache import NODE_SOURCE, POLICY_SOURCE, IPCache, IPCacheEntry
    ipcache = IPCache("cluster1", notify_many=lambda changes: None)
    prefix = ipaddress.ip_network("10.0.0.2/32")
    ipcache.upsert(prefix, IPCacheEntry(prefix, (1 << 24) + 1, "cluster1"), POLICY_SOURCE)
    ipcache.upsert(prefix, IPCacheEntry(prefix, SCOPE + 1, "cluster1"), NODE_SOURCE)
    assert ipcache.get(prefix).identity == SCOPE + 1
    ipcache.upsert(prefix, IPCacheEntry(prefix, 70000, "cluster1"))
    assert ipcache.get(prefix).identity == 70000
    ipcache.delete(prefix, "cluster1")
    ipcache.delete(prefix, NODE_SOURCE)
    assert ipcache.get(prefix).identity == (1 << 24) + 1


async def test_a_top_level_description_is_imported_with_ciliums_warning(agent_factory, tmp_path):
    running = await agent_factory(ARGS)
    path = tmp_path / "old-style.yaml"
    path.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
                    "description: L3 ingress from env=qa\nmetadata: {name: l3-ingress-qa}\n"
                    "spec:\n  endpointSelector: {matchLabels: {app: foo}}\n  ingress:\n"
                    "  - fromEndpoints: [{matchLabels: {env: qa}}]\n")
    imported = await cli(running, "policy", "import", str(path))
    assert imported.returncode == 0, imported.stderr
    assert "imported CiliumNetworkPolicy default/l3-ingress-qa" in imported.stdout
    assert imported.stderr.strip() == (
        "warning: CiliumNetworkPolicy default/l3-ingress-qa: It seems you have a policy with a"
        " top-level description. This field is no longer supported. Please migrate your"
        " policy's description field under `spec` or `specs`.")
    (policy,) = running.agent.policy_repository.policies()
    assert policy.description == "L3 ingress from env=qa"
    assert json.loads((await cli(running, "policy", "get", "-o", "json")).stdout)[
        "policies"][0]["description"] == "L3 ingress from env=qa"
