"""Global services in the datapath: a client in cluster1 balanced over redis backends in both
clusters (tc-level DNAT with reverse NAT), by the annotations. Privileged, real redis."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import lab_up, run_cli
from test_services import service_yaml

from meshagent_dev.lab import REDIS_SERVER, Lab
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

VIP = "10.96.0.10"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory, "gs", nodes=1) as lab:
        for pod, node in (("redis-a", "cluster1-node1"), ("redis-b", "cluster2-node1")):
            lab.pod_create(pod, node, "default", "app=protected-db")
            lab.pod_spawn(pod, f"redis-{pod}", list(REDIS_SERVER))
        lab.pod_create("client", "cluster1-node1", "default", "app=employee")
        lab.pod_create("stranger", "cluster1-node1", "default", "app=stranger")
        time.sleep(0.5)
        yield lab


def run_id(lab: Lab, pod: str, host: str) -> str:
    try:
        out = lab.pod_exec(pod, ["redis-cli", "-h", host, "-p", "6379", "info", "server"],
                           capture_output=True, text=True, timeout=3).stdout
    except subprocess.TimeoutExpired:
        return "timeout"
    match = re.search(r"run_id:(\w+)", out)
    return match.group(1) if match else f"no answer: {out!r}"


def served_by(lab: Lab, tries: int = 24, client: str = "client") -> set[str]:
    return {run_id(lab, client, VIP) for _ in range(tries)}


def apply(lab: Lab, cluster: str, text: str, tmp_path: Path) -> None:
    path = tmp_path / f"{cluster}.yaml"
    path.write_text(text)
    result = run_cli("service", "apply", str(path), "--socket-path",
                     lab.state["nodes"][f"{cluster}-node1"]["socket"])
    assert result.returncode == 0, result.stderr
    time.sleep(1)


def ids(lab: Lab) -> dict[str, str]:
    return {pod: run_id(lab, pod, "127.0.0.1") for pod in ("redis-a", "redis-b")}


def test_global_service_is_served_by_both_clusters(lab, tmp_path):
    backends = ids(lab)
    a, b = lab.state["pods"]["redis-a"]["ip"], lab.state["pods"]["redis-b"]["ip"]
    apply(lab, "cluster1", service_yaml(VIP, [a]), tmp_path)
    apply(lab, "cluster2", service_yaml("10.97.0.10", [b]), tmp_path)
    assert served_by(lab) == {backends["redis-a"], backends["redis-b"]}
    listing = run_cli("service", "list", "-o", "json", "--socket-path",
                      lab.state["nodes"]["cluster1-node1"]["socket"]).stdout
    assert sorted(bk["cluster"] for bk in json.loads(listing)[0]["backends"]) == [
        "cluster1", "cluster2"]


def test_not_shared_then_affinity_local_then_failover(lab, tmp_path):
    backends = ids(lab)
    a, b = lab.state["pods"]["redis-a"]["ip"], lab.state["pods"]["redis-b"]["ip"]
    apply(lab, "cluster2", service_yaml("10.97.0.10", [b], annotations={
        "service.cilium.io/global": "true", "service.cilium.io/shared": "false"}), tmp_path)
    assert served_by(lab, 12) == {backends["redis-a"]}
    apply(lab, "cluster2", service_yaml("10.97.0.10", [b]), tmp_path)  # shared again
    local = {"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}
    apply(lab, "cluster1", service_yaml(VIP, [a], annotations=local), tmp_path)
    assert served_by(lab, 12) == {backends["redis-a"]}
    apply(lab, "cluster1", service_yaml(VIP, [], annotations=local), tmp_path)  # local gone
    assert served_by(lab, 12) == {backends["redis-b"]}


def test_a_backend_whose_endpoint_goes_is_not_used(lab, tmp_path):
    backends = ids(lab)
    a, b = lab.state["pods"]["redis-a"]["ip"], lab.state["pods"]["redis-b"]["ip"]
    apply(lab, "cluster1", service_yaml(VIP, [a, "10.1.1.99"]), tmp_path)  # .99: no endpoint
    apply(lab, "cluster2", service_yaml("10.97.0.10", [b]), tmp_path)
    assert served_by(lab) == {backends["redis-a"], backends["redis-b"]}  # never .99


def test_policy_is_enforced_against_the_backend(lab, tmp_path):
    """cluster1 guards its redis with the seed's policy; cluster2's redis has none."""
    backends = ids(lab)
    a, b = lab.state["pods"]["redis-a"]["ip"], lab.state["pods"]["redis-b"]["ip"]
    apply(lab, "cluster1", service_yaml(VIP, [a]), tmp_path)
    apply(lab, "cluster2", service_yaml("10.97.0.10", [b]), tmp_path)
    policy = Path(__file__).resolve().parent.parent / "contrib" / "seed" / "l4-policy.yaml"
    result = run_cli("policy", "import", str(policy), "--socket-path",
                     lab.state["nodes"]["cluster1-node1"]["socket"])
    assert result.returncode == 0, result.stderr
    time.sleep(1)
    assert served_by(lab) == {backends["redis-a"], backends["redis-b"]}  # employee
    assert served_by(lab, 10, client="stranger") == {"timeout", backends["redis-b"]}


def test_removing_cluster2_withdraws_its_backends(lab, tmp_path):
    backends = ids(lab)
    a, b = lab.state["pods"]["redis-a"]["ip"], lab.state["pods"]["redis-b"]["ip"]
    apply(lab, "cluster1", service_yaml(VIP, [a]), tmp_path)
    apply(lab, "cluster2", service_yaml("10.97.0.10", [b]), tmp_path)
    assert served_by(lab) == {backends["redis-a"], backends["redis-b"]}
    (lab.dir / "cluster1" / "clustermesh" / "cluster2").unlink()
    time.sleep(1)
    assert served_by(lab, 12) == {backends["redis-a"]}
