"""fromNodes with real traffic: a pod of cluster1 admits a client in the host network of a node
whose labels its policy selects, and no other node, pod or world address; on each datapath.

Every agent runs with --enable-node-selector-labels; cluster1-node2 and cluster2-node2 are
labelled role=worker, cluster2-node1 role=infra (each agent restarted with
--local-node-labels). The policy names the cluster label (Exists), so nodes of both clusters
count and only their labels decide.
"""

import subprocess
import time

import pytest
from conftest import lab_up, run_cli
from nettraffic import CLIENT, SERVER

from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

PY = "/usr/bin/python3"
LABELS = {"cluster1-node2": "role=worker", "cluster2-node1": "role=infra",
          "cluster2-node2": "role=worker"}
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-from-worker-nodes, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromNodes:
    - matchLabels: {role: worker}
      matchExpressions: [{key: io.cilium.k8s.policy.cluster, operator: Exists}]
    toPorts: [{ports: [{port: "7000", protocol: TCP}]}]
"""


@pytest.fixture(scope="module", params=["ebpf", "nftables"])
def lab(tmp_path_factory, request):
    with lab_up(tmp_path_factory, f"nodes-{request.param}", nodes=2, datapath=request.param,
                agent_args=["--enable-node-selector-labels=true"]) as lab:
        for name, labels in LABELS.items():
            lab.restart_agent(name, ["--local-node-labels", labels])
        lab.pod_create("db", "cluster1-node1", "default", "app=db")
        lab.pod_create("worker-pod", "cluster1-node2", "default", "role=worker")
        lab.pod_spawn("db", "tcp", [PY, "-c", SERVER, "7000,7001", "7002"])
        time.sleep(1)
        yield lab


def from_node(lab, node: str, port: int = 7000) -> str:
    result = subprocess.run(["ip", "netns", "exec", lab.state["nodes"][node]["ns"], PY, "-c",
                             CLIENT, "tcp", lab.state["pods"]["db"]["ip"], str(port)],
                            capture_output=True, text=True, timeout=20)
    return result.stdout.strip()


def from_pod(lab, pod: str) -> str:
    result = lab.pod_exec(pod, [PY, "-c", CLIENT, "tcp", lab.state["pods"]["db"]["ip"], "7000"],
                          capture_output=True, text=True, timeout=20)
    return result.stdout.strip()


def test_before_the_policy_every_node_reaches_the_pod(lab):
    assert {node: from_node(lab, node) for node in LABELS} == dict.fromkeys(LABELS, "ok")


def test_from_nodes_admits_the_selected_nodes_only(lab, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    socket = lab.state["nodes"]["cluster1-node1"]["socket"]
    result = run_cli("policy", "import", str(path), "--wait", "--socket-path", socket)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 20
    while True:
        got = {node: from_node(lab, node) for node in LABELS}
        if got == {"cluster1-node2": "ok", "cluster2-node1": "timeout",
                   "cluster2-node2": "ok"} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == {"cluster1-node2": "ok", "cluster2-node1": "timeout", "cluster2-node2": "ok"}
    assert from_node(lab, "cluster1-node2", 7001) == "timeout"  # another port
    assert from_pod(lab, "worker-pod") == "timeout"  # a pod with the label is not a node


def test_a_node_that_loses_its_label_loses_its_access(lab):
    lab.restart_agent("cluster2-node2", ["--local-node-labels", "role=infra"])
    deadline = time.monotonic() + 20
    while from_node(lab, "cluster2-node2") != "timeout" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert from_node(lab, "cluster2-node2") == "timeout"
    assert from_node(lab, "cluster1-node2") == "ok"
