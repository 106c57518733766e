"""Faults in the lab, under traffic: a hung remote etcd, a partition, the local etcd refusing
connections, a pod deleted while its etcd is away, an agent killed with SIGKILL.

The seed's scene, one node per cluster, the seed's l4-policy on cluster1. While each fault
lasts, employee-c2 (cluster2) and the stranger (cluster1) keep connecting to protected-db:
not one allowed connection may fail and not one denied connection may pass. Each fault must
show in status within 15 s naming the server, and everything must be back within 5 s of the
fault ending (etcd's own start-up included). One lab for the module; the tests run in order.
"""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import lab_up, redis_traffic, run_cli, seed_scene, wait_until

from meshagent.client import AgentClient
from meshagent.errors import MeshagentError
from meshagent_dev.lab import Lab
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

NOTICE_WITHIN = 15.0
HEAL_WITHIN = 5.0
ETCD2 = "10.99.2.250"
NODE1_IP = "10.99.1.1"

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory, "faults", nodes=1) as lab:
        seed_scene(lab)
        lab.pod_create("employee-c1", "cluster1-node1", "default", "app=employee")
        yield lab


def sock(lab: Lab, node: str = "cluster1-node1") -> str:
    return lab.state["nodes"][node]["socket"]


def section(lab: Lab, name: str, node: str = "cluster1-node1") -> dict:
    status = AgentClient(Path(sock(lab, node))).get("/status?verbose=1")
    return next(s for s in status["sections"] if s["name"] == name)


def wait_section(lab: Lab, name: str, health: str, timeout: float,
                 node: str = "cluster1-node1") -> tuple[dict, float]:
    """The section once its health is ``health``, and how long that took."""
    started = time.monotonic()
    while True:
        try:
            found = section(lab, name, node)
            if found["health"] == health:
                return found, time.monotonic() - started
        except MeshagentError:
            found = None  # the agent is restarting
        assert time.monotonic() - started < timeout, f"{node} {name} not {health}: {found}"
        time.sleep(0.1)


@contextlib.contextmanager
def traffic(lab: Lab, tmp_path: Path):
    """employee-c2 and the stranger keep connecting to protected-db while the block runs;
    afterwards, not one allowed connection failed and not one denied connection passed."""
    with redis_traffic(lab, tmp_path, "employee-c2", "stranger") as counts:
        yield
    (employee_ok, employee_failed), (stranger_ok, _) = counts["employee-c2"], counts["stranger"]
    print(f"\ntraffic: employee {employee_ok} ok / {employee_failed} failed,"
          f" stranger {stranger_ok} got through")
    assert employee_ok > 20 and employee_failed == 0
    assert stranger_ok == 0


@contextlib.contextmanager
def stopped(lab: Lab, process: str):
    """SIGSTOP: the process keeps its sockets and answers nothing (a hung server)."""
    pid = lab.state["pids"][process]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def in_ns(lab: Lab, ns_name: str, *command: str) -> None:
    ns = next(n for n in lab.state["namespaces"] if n.endswith(f"-{ns_name}"))
    subprocess.run(["ip", "netns", "exec", ns, *command], check=True)


@contextlib.contextmanager
def partitioned(lab: Lab, etcd_ns: str, peer: str):
    """etcd's answers to ``peer`` are dropped: the connection stays open, nothing comes back."""
    in_ns(lab, etcd_ns, "ip", "route", "add", "blackhole", f"{peer}/32")
    try:
        yield
    finally:
        in_ns(lab, etcd_ns, "ip", "route", "del", "blackhole", f"{peer}/32")


@contextlib.contextmanager
def down(lab: Lab, process: str, ns_name: str):
    """The etcd process is stopped (connections refused) and started again afterwards, with
    the same command line, data and port."""
    pid = lab.state["pids"][process]
    command = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # the lab (this process) started it
    try:
        yield
    finally:
        ns = next(n for n in lab.state["namespaces"] if n.endswith(f"-{ns_name}"))
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *command], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.state["pids"][process] = proc.pid
        lab.save()


def etcd_keys(lab: Lab, cluster: str, prefix: str) -> list[str]:
    """Keys in a cluster's etcd, read with etcdctl from its node's namespace."""
    config = yaml.safe_load((lab.dir / cluster / "etcd.yaml").read_text())
    node = lab.state["nodes"][f"{cluster}-node1"]["ns"]
    out = subprocess.run(
        ["ip", "netns", "exec", node, "etcdctl", "--endpoints", config["endpoints"][0],
         "--cacert", config["trusted-ca-file"], "--cert", config["cert-file"],
         "--key", config["key-file"], "get", "--prefix", "--keys-only", prefix],
        capture_output=True, text=True, check=True, timeout=10, env={"ETCDCTL_API": "3"})
    return [line for line in out.stdout.splitlines() if line]


def ip_list(lab: Lab, node: str) -> str:
    return run_cli("ip", "list", "--socket-path", sock(lab, node)).stdout


def mesh_ready(lab: Lab) -> bool:
    summary = section(lab, "ClusterMesh")["summary"]
    return summary.startswith("1/1 remote clusters ready") and "not answering" not in summary


def test_1_hung_remote_etcd_is_reported_and_resynced_at_once(lab, tmp_path):
    with traffic(lab, tmp_path):
        with stopped(lab, "etcd2"):
            found, took = wait_section(lab, "ClusterMesh", "Warning", NOTICE_WITHIN)
            assert ETCD2 in found["summary"] and "no answer for" in found["summary"], found
            print(f"\nhung remote etcd noticed in {took:.1f}s: {found['summary']}")
        _, took = wait_section(lab, "ClusterMesh", "Ok", HEAL_WITHIN)
        print(f"resynced {took:.1f}s after the remote etcd answered again")
        assert mesh_ready(lab)


def test_2_partition_is_reported_and_heals_in_seconds_however_long_it_was(lab, tmp_path):
    with traffic(lab, tmp_path):
        with partitioned(lab, "etcd2", NODE1_IP):
            found, took = wait_section(lab, "ClusterMesh", "Warning", NOTICE_WITHIN)
            assert ETCD2 in found["summary"], found
            wait_until(lambda: "not ready" in section(lab, "ClusterMesh")["summary"],
                     NOTICE_WITHIN, "the silent remote given up")
            time.sleep(8)  # long enough for a reconnect backoff to have grown
        _, took = wait_section(lab, "ClusterMesh", "Ok", HEAL_WITHIN)
        print(f"\npartition healed: ready after {took:.1f}s")
        with partitioned(lab, "etcd2", NODE1_IP):
            time.sleep(3)  # a blip
        _, took = wait_section(lab, "ClusterMesh", "Ok", HEAL_WITHIN)
        assert mesh_ready(lab)


def test_3_a_pod_deleted_while_its_etcd_is_hung_is_gone_everywhere_soon_after(lab, tmp_path):
    pod = lab.pod_create("leaver", "cluster2-node1", "istio-space", "app=leaver")
    key = f"cilium/state/ip/v1/default/{pod['ip']}"
    wait_until(lambda: pod["ip"] in ip_list(lab, "cluster1-node1"), 10, "leaver known in cluster1")
    assert etcd_keys(lab, "cluster2", key) == [key]  # published where Cilium publishes it
    with stopped(lab, "etcd2"):
        result = run_cli("endpoint", "delete", str(pod["endpoint"]), "--socket-path",
                         sock(lab, "cluster2-node1"))
        assert result.returncode == 0, result.stderr
        time.sleep(6)  # the delete cannot reach etcd
    took = wait_until(lambda: pod["ip"] not in ip_list(lab, "cluster1-node1"), HEAL_WITHIN,
                    "the deleted pod gone from cluster1")
    print(f"\ndelete made during the outage reached cluster1 {took:.1f}s after etcd answered")
    assert etcd_keys(lab, "cluster2", key) == []
    assert not [k for k in etcd_keys(lab, "cluster2", "cilium/state/identities/v1/value/")
                if "app=leaver" in k]


def test_4_local_etcd_down_is_reported_and_heals_at_once(lab, tmp_path):
    with traffic(lab, tmp_path):
        with down(lab, "etcd1", "etcd1"):
            found, took = wait_section(lab, "KVStore", "Failure", NOTICE_WITHIN)
            print(f"\nlocal etcd down noticed in {took:.1f}s: {found['summary']}")
            # a pod made meanwhile (its identity is held on this node already)
            late = lab.pod_create("employee-late", "cluster1-node1", "default", "app=employee")
            time.sleep(8)
        _, took = wait_section(lab, "KVStore", "Ok", HEAL_WITHIN)
        wait_section(lab, "Controllers", "Ok", HEAL_WITHIN)
        took = wait_until(lambda: late["ip"] in ip_list(lab, "cluster2-node1"), HEAL_WITHIN,
                        "the pod made during the outage known in cluster2")
        print(f"pod made during the outage reached cluster2 {took:.1f}s after etcd came back")
        wait_section(lab, "ClusterMesh", "Ok", HEAL_WITHIN, node="cluster2-node1")


def test_5_agent_killed_and_restarted_keeps_enforcing_and_leaks_nothing(lab, tmp_path):
    temp = lab.pod_create("temp", "cluster1-node1", "default", "app=temp")
    log = lab.dir / "logs" / "agent-cluster1-node1.log"
    with traffic(lab, tmp_path):
        for _ in range(2):
            log_start = log.stat().st_size
            pid = lab.state["pids"].pop("agent-cluster1-node1")
            os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # the lab (this process) started it
            lab.start_agent("cluster1-node1")
            wait_until(lambda: _ready(lab), 30, "the restarted agent ready")
            new_lines = log.read_text(errors="replace")[log_start:]
            assert " failed (" not in new_lines, new_lines  # no controller had to retry
    wait_section(lab, "Controllers", "Ok", HEAL_WITHIN)
    temp_key = f"cilium/state/ip/v1/default/{temp['ip']}"
    assert etcd_keys(lab, "cluster1", temp_key) == [temp_key]
    result = run_cli("endpoint", "delete", str(temp["endpoint"]), "--socket-path", sock(lab))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not [k for k in etcd_keys(lab, "cluster1", "cilium/state/identities/v1/value/")
                          if "app=temp" in k], HEAL_WITHIN, "temp's identity reference gone")
    wait_until(lambda: etcd_keys(lab, "cluster1", temp_key) == [],
             HEAL_WITHIN, "temp's IP entry gone")


def _ready(lab: Lab) -> bool:
    try:
        return AgentClient(Path(sock(lab))).get("/healthz")["ready"]
    except MeshagentError:
        return False
