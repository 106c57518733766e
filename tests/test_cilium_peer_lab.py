"""The seed's story with a Cilium cluster as the peer: cluster2's etcd is written exactly as a
Cilium 1.17 cluster writes it (meshagent_dev.cilium's golden values; no meshagent agent in
cluster2), its pod employee-c2 is Cilium's employee-0 (10.2.1.5, identity 6685228) in a real
namespace behind its node worker1. cluster1 is meshagent, with the seed's policy: the employee
from the Cilium cluster gets PONG, the stranger times out.
"""

import os
import subprocess
import time

import pytest
from conftest import lab_up, redis_ping, run_cli, wait_until

from meshagent_dev import cilium
from meshagent_dev.etcd import etcdctl_command
from meshagent_dev.lab import REDIS_SERVER
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

POLICY = "contrib/seed/l4-policy.yaml"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory, "cpeer", nodes=1, cilium_peer=True) as lab:
        lab.pod_create("protected-db", "cluster1-node1", "default", "app=protected-db")
        lab.pod_create("stranger", "cluster1-node1", "default", "app=stranger")
        lab.pod_spawn("protected-db", "redis", list(REDIS_SERVER))
        time.sleep(0.5)
        yield lab


def socket(lab) -> str:
    return lab.state["nodes"]["cluster1-node1"]["socket"]


def test_1_the_cilium_cluster_is_ready_and_its_pod_known(lab):
    status = run_cli("status", "--socket-path", socket(lab))
    assert "ClusterMesh:" in status.stdout and "1/1 remote clusters ready" in status.stdout
    ips = run_cli("ip", "list", "--socket-path", socket(lab))
    row = next(line for line in ips.stdout.splitlines() if line.startswith("10.2.1.5"))
    assert str(cilium.IDENTITY_ID) in row and "cluster2" in row and "employee-0" in row
    nodes = run_cli("node", "list", "--socket-path", socket(lab))
    assert "cluster2/worker1" in nodes.stdout and "10.2.1.0/24" in nodes.stdout


def test_2_the_seeds_verdicts_hold_across_the_cilium_cluster(lab):
    assert redis_ping(lab, "employee-c2") == "PONG"  # no policy yet: open
    assert redis_ping(lab, "stranger") == "PONG"
    result = run_cli("policy", "import", POLICY, "--socket-path", socket(lab))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: redis_ping(lab, "stranger") == "timeout", 10, "the policy enforced")
    assert redis_ping(lab, "employee-c2") == "PONG"  # Cilium's identity 6685228 is allowed
    assert redis_ping(lab, "stranger") == "timeout"


def test_3_a_stale_cilium_entry_goes_when_cilium_deletes_it(lab):
    """Cilium deletes the pod's ipcache entry (the pod is gone): its traffic is no longer the
    employee's, so the policy drops it."""
    server_ns = next(ns for ns in lab.state["namespaces"] if ns.endswith("-etcd2"))
    root = lab.dir / "cluster2" / "etcd" / "users" / "root"  # the etcd's own admin file
    result = subprocess.run(["ip", "netns", "exec", server_ns, *etcdctl_command(root), "del",
                             cilium.ip_key(cilium.ENDPOINT_IP)], capture_output=True, text=True,
                            env={**os.environ, "ETCDCTL_API": "3"})
    assert result.returncode == 0, result.stderr
    wait_until(lambda: redis_ping(lab, "employee-c2") == "timeout", 10, "the entry withdrawn")
