"""The k8s plugin publishes this node's Kubernetes labels with the node (Cilium's node
``Labels``), for fromNodes/toNodes selectors on the other nodes; against the API stand-in."""

import asyncio
import json
import time

import pytest
from kube import KubeCluster

from meshagent.kvstore import keys as kvkeys
from meshagent.plugins.k8s.client import NODES

ARGS = ["--plugins", "memory,k8s", "--cluster-name", "cluster1", "--cluster-id", "1",
        "--node-name", "node1", "--pod-cidr", "10.1.1.0/24", "--k8s-pod-wait", "0.5",
        "--local-node-labels", "role=from-the-option"]


@pytest.fixture
async def kube(short_tmp):
    cluster = await KubeCluster.start(short_tmp, bookmark_interval=0.2)
    if cluster.standin is None:
        await cluster.close()
        pytest.skip("writes Node objects: the stand-in only")
    yield cluster
    await cluster.close()


async def until_published(running, labels: dict) -> None:
    """Until this node's kvstore entry carries ``labels`` (5 s at most)."""
    deadline = time.monotonic() + 5
    while True:
        value = await running.agent.kvstore.get(kvkeys.node_key("cluster1", "node1"))
        got = json.loads(value.value).get("Labels", {}) if value else None
        if got == labels:
            return
        assert time.monotonic() < deadline, f"published labels {got}, not {labels}"
        await asyncio.sleep(0.05)


async def test_the_nodes_kubernetes_labels_are_published_and_followed(agent_factory, kube):
    await kube.apply(NODES, {"metadata": {"name": "node1", "labels": {
        "kubernetes.io/hostname": "node1", "node-role.kubernetes.io/worker": ""}}})
    await kube.apply(NODES, {"metadata": {"name": "node2", "labels": {"role": "infra"}}})
    running = await agent_factory([*ARGS, "--k8s-kubeconfig", str(kube.kubeconfig)])
    expected = {"kubernetes.io/hostname": "node1", "node-role.kubernetes.io/worker": ""}
    await until_published(running, expected)
    await kube.apply(NODES, {"metadata": {"name": "node1", "labels": {"role": "worker"}}})
    await until_published(running, {"role": "worker"})
    # labels that are not Kubernetes labels are refused, and the last good ones stay
    with pytest.raises(ValueError, match="'bad key'='x' is not a Kubernetes label"):
        running.agent.publisher.set_node_labels({"bad key": "x"})
    await until_published(running, {"role": "worker"})
