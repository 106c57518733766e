"""The seed's story with KVStoreMesh (``meshagent lab up --kvstoremesh``): each cluster runs
``meshagent kvstoremesh`` in a namespace of its own; agents read the other cluster from their
own etcd and hold no connection to the other one. The seed's verdicts hold with real redis; a
KVStoreMesh killed under traffic loses nothing and catches up when it is back; a cluster
removed from its directory is withdrawn from the agents."""

import json
import shutil
import signal
import subprocess
import time

import pytest
from conftest import lab_up, redis_ping, redis_traffic, run_cli, seed_scene, wait_until

from meshagent.client import AgentClient
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root and ip netns")]
SEED = {"employee": "PONG", "stranger": "timeout", "employee-c2": "PONG"}
NODE = "cluster1-node1"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory, "kvm", nodes=1, kvstoremesh=True) as lab:
        seed_scene(lab)
        lab.pod_create("employee", NODE, "default", "app=employee")
        time.sleep(1)
        yield lab


def connections(lab, node: str, address: str) -> list[str]:
    """The node namespace's TCP connections to ``address`` (the agent is its only process)."""
    out = subprocess.run(["ip", "netns", "exec", lab.state["nodes"][node]["ns"], "ss", "-Htn",
                          "state", "established", "dst", address],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def remote(lab, node: str = NODE) -> dict:
    mesh = AgentClient(lab.state["nodes"][node]["socket"]).get("/clustermesh")
    return next(r for r in mesh["remotes"] if r["name"] != lab.state["nodes"][node]["cluster"])


def test_agents_read_the_other_cluster_from_their_own_etcd_and_the_seed_holds(lab):
    assert {pod: redis_ping(lab, pod) for pod in SEED} == SEED
    for node, own, other in (("cluster1-node1", "10.99.1.250", "10.99.2.250"),
                             ("cluster2-node1", "10.99.2.250", "10.99.1.250")):
        assert connections(lab, node, own), f"{node} talks to its own etcd"
        assert connections(lab, node, other) == [], f"{node} dials the other etcd"
        r = remote(lab, node)
        assert r["ready"] and r["source"] == "cache" and r["kvstoremesh"]
    status = run_cli("status", "--verbose", "--socket-path", lab.node_socket(NODE)).stdout
    assert "1/1 remote clusters ready" in status and "through the KVStoreMesh cache" in status
    assert "kvstoremesh=true, sync-canaries=true" in status
    kvm = run_cli("kvstoremesh", "status", "--verbose", "--socket-path",
                  lab.kvstoremesh_socket("cluster1"))
    assert kvm.returncode == 0, kvm.stdout + kvm.stderr
    assert "1/1 remote clusters ready" in kvm.stdout
    assert "cluster2: ready, 1 nodes, 1 endpoints, 1 identities" in kvm.stdout
    assert "10.99.2.250" in kvm.stdout  # KVStoreMesh alone dials cluster2's etcd


def test_a_killed_kvstoremesh_drops_nothing_and_catches_up(lab, tmp_path):
    with redis_traffic(lab, tmp_path, "employee-c2") as counts:
        time.sleep(0.5)
        lab.stop_kvstoremesh("cluster1", signal.SIGKILL)
        # while it is down, a new employee starts in cluster2: not known in cluster1 yet
        lab.pod_create("employee2-c2", "cluster2-node1", "istio-space", "app=employee")
        time.sleep(2)
        assert redis_ping(lab, "employee2-c2") == "timeout"
        assert remote(lab)["ready"]  # the cache stays; the agent keeps enforcing it
        lab.start_kvstoremesh("cluster1")
        wait_until(lambda: redis_ping(lab, "employee2-c2") == "PONG", 20,
                        "the new employee, once KVStoreMesh is back")
    ok, failed = counts["employee-c2"]
    assert ok > 20 and failed == 0, counts


def test_a_cluster_removed_from_kvstoremesh_is_withdrawn(lab, tmp_path):
    directory = lab.dir / "cluster1" / "kvstoremesh"
    shutil.move(directory / "cluster2", tmp_path / "cluster2")
    try:
        wait_until(lambda: remote(lab)["endpoints"] == 0 and remote(lab)["identities"] == 0,
                        20, "cluster2's entries withdrawn from cluster1's agent")
        assert redis_ping(lab, "employee-c2") == "timeout"
    finally:
        shutil.move(tmp_path / "cluster2", directory / "cluster2")
    wait_until(lambda: redis_ping(lab, "employee-c2") == "PONG", 30, "back")
    assert json.loads(run_cli("kvstoremesh", "remotes", "--socket-path",
                              lab.kvstoremesh_socket("cluster1")).stdout)["remotes"]

