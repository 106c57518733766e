"""End to end: the seed's scenario in the lab, two nodes per cluster, real redis.

One lab for the module (building it takes seconds); the tests run in order and the last one
removes cluster2 from cluster1's clustermesh directory.
"""

import json
import time
from pathlib import Path

import pytest
from conftest import lab_up, redis_ping, redis_traffic, run_cli

from meshagent_dev.lab import REDIS_SERVER, Lab
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

POLICY = Path(__file__).resolve().parent.parent / "contrib" / "seed" / "l4-policy.yaml"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory, "e2e", nodes=2) as lab:
        lab.pod_create("protected-db", "cluster1-node1", "default", "app=protected-db")
        lab.pod_create("employee-c1", "cluster1-node2", "default", "app=employee")  # other node
        lab.pod_create("stranger", "cluster1-node1", "default", "app=stranger")
        lab.pod_create("employee-c2", "cluster2-node2", "istio-space", "app=employee")
        lab.pod_spawn("protected-db", "redis", list(REDIS_SERVER))
        time.sleep(0.5)
        yield lab


ping = redis_ping


def socket_of(lab: Lab, node: str) -> str:
    return lab.state["nodes"][node]["socket"]


def test_1_seed_scenario_before_and_after_the_policy(lab):
    assert [ping(lab, p) for p in ("employee-c1", "stranger", "employee-c2")] == ["PONG"] * 3
    # --wait: returns once the policy is in the BPF maps of the node's endpoints (no sleep)
    result = run_cli("policy", "import", str(POLICY), "--wait", "--socket-path",
                     socket_of(lab, "cluster1-node1"))
    assert result.returncode == 0, result.stderr
    assert "revision 1 enforced on every local endpoint" in result.stdout, result.stdout
    assert ping(lab, "stranger") == "timeout"
    endpoints = run_cli("endpoint", "list", "-o", "json", "--socket-path",
                        socket_of(lab, "cluster1-node1"))
    assert {e["policy_revision"] for e in json.loads(endpoints.stdout)} == {1}
    assert [ping(lab, p) for p in ("employee-c1", "stranger", "employee-c2")] == \
        ["PONG", "timeout", "PONG"]
    for node in ("cluster1-node1", "cluster1-node2", "cluster2-node1", "cluster2-node2"):
        status = run_cli("status", "--socket-path", socket_of(lab, node)).stdout
        assert "ClusterMesh: Ok        1/1 remote clusters ready" in status, status
    nodes = run_cli("node", "list", "--socket-path", socket_of(lab, "cluster1-node1")).stdout
    assert [line.split()[0] for line in nodes.splitlines()[1:]] == [
        "cluster1/node1", "cluster1/node2", "cluster2/node1", "cluster2/node2"]


def test_2_a_new_cluster2_pod_is_allowed_within_5s(lab):
    started = time.monotonic()
    lab.pod_create("employee-late", "cluster2-node1", "istio-space", "app=employee")
    while ping(lab, "employee-late") != "PONG":
        assert time.monotonic() - started < 5, "not allowed within 5 s"
        time.sleep(0.05)
    took = time.monotonic() - started
    print(f"\npropagation: cluster2 pod created -> allowed by cluster1's datapath in {took:.2f}s")
    assert ping(lab, "stranger") == "timeout"


def test_3_agent_restart_on_the_db_node_loses_no_request(lab, tmp_path):
    with redis_traffic(lab, tmp_path, "employee-c2", "stranger") as counts:
        time.sleep(2)
        lab.stop_agent("cluster1-node1")
        time.sleep(1)
        lab.start_agent("cluster1-node1")
        time.sleep(7)
    (employee_ok, employee_failed), (stranger_ok, _) = counts["employee-c2"], counts["stranger"]
    print(f"\nrestart under traffic: employee {employee_ok} ok / {employee_failed} failed,"
          f" stranger {stranger_ok} got through")
    assert employee_ok > 50 and employee_failed == 0
    assert stranger_ok == 0


def test_4_removing_cluster2_from_the_mesh_denies_its_employee(lab):
    deadline = time.monotonic() + 20
    while "1/1 remote clusters ready" not in run_cli(
            "status", "--socket-path", socket_of(lab, "cluster1-node1")).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert ping(lab, "employee-c2") == "PONG"
    (lab.dir / "cluster1" / "clustermesh" / "cluster2").unlink()
    started = time.monotonic()
    while ping(lab, "employee-c2") == "PONG":
        assert time.monotonic() - started < 10, "cluster2's employee still allowed"
        time.sleep(0.1)
    assert ping(lab, "employee-c2") == "timeout"
    assert ping(lab, "employee-c1") == "PONG"
    status = run_cli("status", "--socket-path", socket_of(lab, "cluster1-node1")).stdout
    assert "0/0 remote clusters ready" in status
