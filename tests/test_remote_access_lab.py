"""A remote cluster reads our etcd and writes nothing into it, in the lab, with and without
KVStoreMesh: from cluster2's node, with the files cluster2 was given for cluster1 (etcd user
``remote``), writes into cluster1's etcd are refused, reads of what a remote needs work, the
KVStoreMesh cache is out of reach, and both clusters' agents and the seed's verdicts are
unaffected. The seed's scene; one lab per mode.
"""

import json
import subprocess

import pytest
from conftest import lab_up, redis_ping, run_cli, seed_scene

from meshagent_dev.etcd import etcdctl_command
from meshagent_dev.lab import Lab
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]
SEED = {"employee-c2": "PONG", "stranger": "timeout"}


@pytest.fixture(scope="module", params=[False, True], ids=["direct", "kvstoremesh"])
def lab(request, tmp_path_factory):
    kvstoremesh = request.param
    with lab_up(tmp_path_factory, "remote", nodes=1, kvstoremesh=kvstoremesh) as lab:
        seed_scene(lab)
        yield lab


def given_to_cluster2(lab: Lab):
    """The file cluster2 was given to reach cluster1's etcd: its agents' clustermesh file,
    or with KVStoreMesh the one its KVStoreMesh dials."""
    return lab.dir / "cluster2" / ("kvstoremesh" if lab.state["kvstoremesh"] else "clustermesh")\
        / "cluster1"


def as_cluster2(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    """etcdctl, from cluster2's node, into cluster1's etcd with cluster2's files."""
    node = lab.state["nodes"]["cluster2-node1"]["ns"]
    return subprocess.run(["ip", "netns", "exec", node,
                           *etcdctl_command(given_to_cluster2(lab)), *args],
                          capture_output=True, text=True, timeout=15,
                          env={"ETCDCTL_API": "3", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def refused(result: subprocess.CompletedProcess) -> bool:
    return result.returncode != 0 and "permission denied" in result.stderr


def mesh_summaries(lab: Lab) -> dict[str, str]:
    found = {}
    for name, node in lab.state["nodes"].items():
        status = json.loads(run_cli("status", "-o", "json", "--socket-path",
                                    node["socket"]).stdout)
        assert status["ready"], name
        found[name] = next(s["summary"] for s in status["sections"]
                           if s["name"] == "ClusterMesh")
    return found


def test_1_the_seed_holds(lab):
    assert {pod: redis_ping(lab, pod) for pod in SEED} == SEED


def test_2_cluster2_cannot_write_cluster1_s_etcd(lab):
    stranger = lab.state["pods"]["stranger"]["ip"]
    employee = lab.state["pods"]["employee-c2"]
    forged = json.dumps({"IP": stranger, "ID": employee["identity"], "HostIP": "10.99.2.1"})
    for key in (f"cilium/state/ip/v1/cluster1/{stranger}", f"cilium/state/ip/v1/default/{stranger}",
                "cilium/state/ip/v1/cluster1/10.1.1.77", "cilium/cluster-config/cluster1",
                "cilium/.heartbeat", "meshagent/policies/v1/CiliumNetworkPolicy/default/x"):
        assert refused(as_cluster2(lab, "put", key, forged)), key
    assert refused(as_cluster2(lab, "del", f"cilium/state/ip/v1/cluster1/{stranger}"))
    assert refused(as_cluster2(lab, "del", "--prefix", "cilium/state/"))


def test_3_cluster2_reads_what_a_remote_needs_and_not_the_cache(lab):
    stranger = lab.state["pods"]["stranger"]["ip"]
    state = as_cluster2(lab, "get", "--prefix", "--keys-only", "cilium/state/")
    assert state.returncode == 0, state.stderr
    assert f"cilium/state/ip/v1/default/{stranger}" in state.stdout.split()
    config = as_cluster2(lab, "get", "--print-value-only", "cilium/cluster-config/cluster1")
    assert config.returncode == 0 and json.loads(config.stdout)["id"] == 101
    for prefix in ("cilium/cache/", "cilium/cluster-config/", "meshagent/", ""):
        assert refused(as_cluster2(lab, "get", "--prefix", "--keys-only", prefix)), prefix


def test_4_agents_stay_ready_and_the_verdicts_hold(lab):
    summaries = mesh_summaries(lab)
    assert all(s.startswith("1/1 remote clusters ready") for s in summaries.values()), summaries
    assert {pod: redis_ping(lab, pod) for pod in SEED} == SEED
    rows = json.loads(run_cli("ip", "list", "-o", "json", "--socket-path",
                              lab.state["nodes"]["cluster1-node1"]["socket"]).stdout)
    stranger = lab.state["pods"]["stranger"]
    (row,) = [r for r in rows if r["prefix"] == f"{stranger['ip']}/32"]
    assert row["identity"] == stranger["identity"] and row["cluster"] == "cluster1"
