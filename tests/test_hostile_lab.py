"""A hostile cluster2, in the lab: whoever controls cluster2's etcd writes what they like into
it; cluster1 keeps enforcing its own policy, keeps its own entries and routes, and keeps
cluster2 in sync. The seed's scene: protected-db and a stranger in cluster1, the employee in
cluster2 (istio-space), the seed's l4-policy on cluster1. One lab for the module, in order.
"""

import base64
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import lab_up, redis_ping, run_cli, seed_scene

from meshagent.client import AgentClient
from meshagent_dev.lab import Lab
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

WRITER = Path(__file__).resolve().parent / "hostile_writer.py"
C2 = 102 << 16


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory, "hostile", nodes=1) as lab:
        seed_scene(lab)
        yield lab


def sock(lab: Lab, node: str = "cluster1-node1") -> str:
    return lab.state["nodes"][node]["socket"]


ping = redis_ping


def attack(lab: Lab, operations: list) -> None:
    """Write into cluster2's etcd from cluster2's node, as its owner could."""
    path = lab.dir / f"ops-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(operations))
    node = lab.state["nodes"]["cluster2-node1"]["ns"]
    result = subprocess.run(["ip", "netns", "exec", node, sys.executable, str(WRITER),
                             str(lab.dir / "cluster2" / "etcd.yaml"), str(path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


def put(key: str | bytes, value: str | bytes) -> list:
    key = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    value = value.encode() if isinstance(value, str) else value
    return ["put", key.hex(), value.hex()]


def delete(key: str) -> list:
    return ["delete", key.encode().hex()]


def remote(lab: Lab) -> dict:
    body = AgentClient(Path(sock(lab))).get("/clustermesh")
    return next(r for r in body["remotes"] if r["name"] == "cluster2")


def ip_row(lab: Lab, ip: str) -> dict:
    rows = json.loads(run_cli("ip", "list", "-o", "json", "--socket-path", sock(lab)).stdout)
    return next((r for r in rows if r["prefix"] == f"{ip}/32"), {})


def eventually(check, timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.2)


def test_1_the_seed_holds(lab):
    assert [ping(lab, p) for p in ("employee-c2", "stranger")] == ["PONG", "timeout"]


def test_2_hijacking_a_local_address_changes_nothing_and_withdrawing_it_removes_nothing(lab):
    stranger = lab.state["pods"]["stranger"]
    employee = lab.state["pods"]["employee-c2"]
    key = f"cilium/state/ip/v1/default/{stranger['ip']}"
    before = remote(lab)["held"].get("endpoints", 0)
    attack(lab, [put(key, json.dumps({"IP": stranger["ip"], "ID": employee["identity"],
                                      "HostIP": "10.99.2.1"}))])
    eventually(lambda: remote(lab)["held"].get("endpoints", 0) == before + 1, what="held")
    assert ping(lab, "stranger") == "timeout"
    assert ip_row(lab, stranger["ip"])["identity"] == stranger["identity"]
    attack(lab, [delete(key)])
    eventually(lambda: remote(lab)["held"].get("endpoints", 0) == before, what="withdrawn")
    assert ip_row(lab, stranger["ip"])["identity"] == stranger["identity"]  # ours stays
    assert [ping(lab, p) for p in ("employee-c2", "stranger")] == ["PONG", "timeout"]


def test_3_ranges_and_the_world_are_not_a_remote_cluster_s_to_claim(lab):
    employee = lab.state["pods"]["employee-c2"]
    rejected = remote(lab)["rejected"].get("endpoints", 0)
    attack(lab, [put("cilium/state/ip/v1/cluster2/0.0.0.0/0", json.dumps(
        {"IP": "0.0.0.0", "Mask": base64.b64encode(bytes(4)).decode(),
         "ID": employee["identity"]}))])
    eventually(lambda: remote(lab)["rejected"].get("endpoints", 0) == rejected + 1,
               what="0.0.0.0/0 rejected")
    rows = json.loads(run_cli("ip", "list", "-o", "json", "--socket-path", sock(lab)).stdout)
    assert "0.0.0.0/0" not in {r["prefix"] for r in rows}


def test_4_no_remote_node_routes_over_our_pods_our_nodes_or_our_etcd(lab):
    def node(name: str, cidr: str) -> list:
        network, bits = cidr.split("/")
        mask = (0xFFFFFFFF << (32 - int(bits))) & 0xFFFFFFFF
        return put(f"cilium/state/nodes/v1/cluster2/{name}", json.dumps({
            "Name": name, "Cluster": "cluster2", "ClusterID": 102,
            "IPAddresses": [{"Type": "InternalIP", "IP": "10.99.2.77"}],
            "IPv4AllocCIDR": {"IP": network, "Mask": base64.b64encode(
                mask.to_bytes(4, "big")).decode()}}))
    attack(lab, [node("evil-pods", "10.1.0.0/16"), node("evil-underlay", "10.99.0.0/16"),
                 node("evil-etcd", "10.99.1.248/29"), node("evil-all", "0.0.0.0/1")])
    eventually(lambda: len(remote(lab)["refused_pod_cidrs"]) >= 4, what="refusals")
    refused = remote(lab)["refused_pod_cidrs"]
    assert "this cluster's pod addresses" in refused["evil-pods/10.1.0.0/16"]
    assert "covers" in refused["evil-underlay/10.99.0.0/16"]
    assert "kvstore server" in refused["evil-etcd/10.99.1.248/29"]
    node_ns = lab.state["nodes"]["cluster1-node1"]["ns"]
    routes = subprocess.run(["ip", "netns", "exec", node_ns, "ip", "-4", "route"],
                            capture_output=True, text=True).stdout
    assert "10.1.0.0/16" not in routes and "10.99.0.0/16 via" not in routes
    assert "10.99.1.248/29" not in routes and "0.0.0.0/1" not in routes
    status = run_cli("status", "--socket-path", sock(lab)).stdout
    assert "KVStore:     Ok" in status, status
    assert [ping(lab, p) for p in ("employee-c2", "stranger")] == ["PONG", "timeout"]


def garbage(count: int, seed: int = 7) -> list:
    """``count`` hostile writes: bad keys (not UTF-8, not canonical, other clusters), deep
    JSON, megabyte label sets, random bytes, values of the wrong shape."""
    rng = random.Random(seed)
    labels = ";".join(f"k8s:l{i}={'v' * 60}" for i in range(15_000)) + ";"  # ~1 MiB
    out = []
    for i in range(count):
        kind = i % 8
        if kind == 0:
            out.append(put(b"cilium/state/ip/v1/cluster2/\xff\xfe" + str(i).encode(), b"{}"))
        elif kind == 1:
            out.append(put(f"cilium/state/identities/v1/id/0{C2 + 300 + i}", "k8s:a=b;"))
        elif kind == 2:
            out.append(put(f"cilium/state/services/v1/cluster2/ns/s{i}",
                           "[" * 50_000 + "]" * 50_000))
        elif kind == 3 and i % 400 == 3:  # a few megabyte label sets (etcd's own limit ~1.5 MiB)
            out.append(put(f"cilium/state/identities/v1/id/{C2 + 1000 + i}", labels))
        elif kind == 3:
            out.append(put(f"cilium/state/identities/v1/id/{C2 + 1000 + i}",
                           "reserved:host;k8s:io.cilium.k8s.policy.cluster=cluster2;"))
        elif kind == 4:
            out.append(put(f"cilium/state/nodes/v1/cluster2/n{i}", rng.randbytes(64)))
        elif kind == 5:
            out.append(put(f"cilium/state/ip/v1/cluster2/10.77.{i // 250 % 250}.{i % 250}",
                           json.dumps({"IP": "10.77.0.1", "ID": "x"})))
        elif kind == 6:
            out.append(put(f"cilium/state/identities/v1/id/{(101 << 16) + 300 + i}",
                           "k8s:app=x;k8s:io.cilium.k8s.policy.cluster=cluster2;"))
        else:
            out.append(put(f"cilium/state/ip/v1/cluster2/10.2.{i // 250 % 250}.{i % 250 + 1}",
                           json.dumps({"IP": f"10.2.{i // 250 % 250}.{i % 250 + 1}",
                                       "ID": C2 + 256, "Mask": "!!"})))
    return out


def rss_mib(lab: Lab) -> float:
    pid = lab.state["pids"]["agent-cluster1-node1"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_5_ten_thousand_hostile_writes_are_counted_and_the_sync_goes_on(lab):
    start = remote(lab)
    counted = sum(start["rejected"].values()) + sum(start["held"].values())
    rss_before = rss_mib(lab)
    attack(lab, garbage(10_000))

    def all_counted() -> bool:
        now = remote(lab)
        return sum(now["rejected"].values()) + sum(now["held"].values()) >= counted + 10_000
    eventually(all_counted, timeout=120, what="every hostile write counted")
    now = remote(lab)
    assert now["ready"], now
    assert "not UTF-8" in " ".join(now["last_rejected"].values()) or now["rejected"]
    rss_after = rss_mib(lab)
    print(f"\nagent RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after 10,000 hostile"
          f" writes; rejected {now['rejected']}, held {now['held']}")
    assert rss_after < rss_before * 1.2
    # and cluster2 still syncs: a new employee there is allowed within seconds
    lab.pod_create("employee-late", "cluster2-node1", "istio-space", "app=employee")
    eventually(lambda: ping(lab, "employee-late") == "PONG", timeout=10, what="new pod allowed")
    assert ping(lab, "stranger") == "timeout"
