"""Dual-stack pods: with an IPv6 --pod-cidr beside the IPv4 one, every endpoint gets an
address of each family, wired, published (a /32 and a /128 ipcache entry) and restored; the
CNI result carries both. The pods reach each other over both families, without a datapath
and with the eBPF one, which tracks IPv6 connections and enforces policy on them as on IPv4."""

import json
import time

import pytest
from conftest import run_cli
from test_endpoints import cni, lab, ping, single_node  # noqa: F401 (lab: a fixture)

from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not can_run(), reason="needs root")]

DUAL = ("--pod-cidr", "10.1.1.0/24,fd00:1:1::/64", "--node-ip", "10.99.1.1,fd00:99:1::1")


def ping6(lab, from_ns: str, address: str) -> bool:  # noqa: F811
    return lab.exec(from_ns, "ping", "-6", "-c", "1", "-W", "1", address,
                    check=False).returncode == 0


def test_dual_stack_pods_get_both_families_and_talk_over_both(lab, short_tmp):  # noqa: F811
    node, agent = single_node(lab, short_tmp, *DUAL)
    pod1, pod2 = lab.ns("pod1"), lab.ns("pod2")
    ep1, ep2 = agent.create(pod1, "app=employee"), agent.create(pod2, "app=protected-db")
    assert (ep1["ipv4"], ep1["ipv6"]) == ("10.1.1.1", "fd00:1:1::1")
    assert (ep2["ipv4"], ep2["ipv6"]) == ("10.1.1.2", "fd00:1:1::2")
    assert "fd00:1:1::1/128" in lab.exec(pod1, "ip", "-6", "addr", "show", "eth0").stdout
    assert ping(lab, pod1, "10.1.1.2") and ping6(lab, pod1, "fd00:1:1::2")
    ips = {(e["prefix"], e["identity"]) for e in json.loads(agent.cli("ip", "list", "-o",
                                                                     "json").stdout)}
    assert ips == {("10.1.1.1/32", ep1["identity"]), ("fd00:1:1::1/128", ep1["identity"]),
                   ("10.1.1.2/32", ep2["identity"]), ("fd00:1:1::2/128", ep2["identity"])}
    table = agent.cli("endpoint", "list").stdout.splitlines()
    header = table[0].split("  ")
    assert [c.strip() for c in header if c.strip()][3:5] == ["IPV4", "IPV6"]
    assert table[2].split()[3:5] == ["10.1.1.1", "fd00:1:1::1"]  # under two header lines
    nodes = agent.cli("node", "list").stdout.splitlines()
    assert nodes[1].split() == ["cluster1/node1", "10.99.1.1", "10.1.1.0/24", "fd00:99:1::1",
                                "fd00:1:1::/64"]
    # a restart restores both addresses; a delete gives both back
    agent.stop()
    agent.start()
    again = {e["id"]: e for e in agent.endpoints()}
    assert again[ep1["id"]]["ipv6"] == "fd00:1:1::1" and ping6(lab, pod2, "fd00:1:1::1")
    assert agent.cli("endpoint", "delete", str(ep2["id"])).returncode == 0
    assert agent.create(lab.ns("pod3"))["ipv6"] == "fd00:1:1::2"


def test_the_cni_result_carries_both_families(lab, short_tmp):  # noqa: F811
    node, agent = single_node(lab, short_tmp, *DUAL)
    pod = lab.ns("pod1")
    config = {"cniVersion": "1.0.0", "name": "meshagent", "type": "meshagent-cni",
              "socketPath": str(agent.socket)}
    code, answer = cni("ADD", config, netns=f"/var/run/netns/{pod}")
    assert code == 0, answer
    assert answer["ips"] == [
        {"address": "10.1.1.1/32", "gateway": "169.254.1.1", "interface": 1},
        {"address": "fd00:1:1::1/128", "gateway": "fe80::1", "interface": 1}]
    assert answer["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
                                {"dst": "::/0", "gw": "fe80::1"}]
    config["prevResult"] = answer
    code, _ = cni("CHECK", config, netns=f"/var/run/netns/{pod}")
    assert code == 0


def test_with_the_ebpf_datapath_both_families_are_tracked_and_enforced(lab, short_tmp,  # noqa: F811
                                                                       bpffs):
    def bpf(*args: str):
        return json.loads(run_cli("bpf", *args, "--bpf-root", str(bpffs), "-o", "json").stdout)
    node, agent = single_node(lab, short_tmp, *DUAL, "--plugins", "memory,ebpf",
                              "--ebpf-bpf-root", str(bpffs))
    pod1, pod2 = lab.ns("pod1"), lab.ns("pod2")
    agent.create(pod1, "app=employee")
    agent.create(pod2, "app=protected-db")
    assert ping(lab, pod1, "10.1.1.2")
    assert ping6(lab, pod1, "fd00:1:1::2")  # neighbour discovery passes, ICMPv6 is judged
    tracked = {(c["source"], c["destination"], c["kind"]) for c in bpf("ct", "list")}
    assert ("[fd00:1:1::1]:0", "[fd00:1:1::2]:0", "forward") in {
        (src.rsplit(":", 1)[0] + ":0", dst.rsplit(":", 1)[0] + ":0", kind)
        for src, dst, kind in tracked}, tracked
    ipcache = {row["prefix"]: row["identity"] for row in bpf("ipcache", "list")}
    assert "fd00:1:1::2/128" in ipcache and "10.1.1.2/32" in ipcache, ipcache
    policy = short_tmp / "db-only-redis.yaml"
    policy.write_text(DB_ONLY_REDIS)
    assert agent.cli("policy", "import", str(policy)).returncode == 0
    time.sleep(0.5)
    assert not ping6(lab, pod1, "fd00:1:1::2")
    assert not ping(lab, pod1, "10.1.1.2")
    dropped = {m["reason"]: m["packets"] for m in bpf("metrics")}
    assert dropped.get("policy denied (by default)", 0) >= 2, dropped
    agent.stop()


DB_ONLY_REDIS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-only-redis, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: protected-db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: employee}}]
    toPorts: [{ports: [{port: "6379", protocol: TCP}]}]
"""
