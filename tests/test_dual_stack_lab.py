"""The dual-stack lab (``meshagent lab up --dual-stack``): both clusters' nodes publish IPv6
addresses and pod CIDRs, pods get an address of each family, remote IPv6 endpoints are admitted
inside the pod CIDRs granted to their cluster, IPv6 node routes are installed, and the seed's
verdicts hold over both families across clusters (employee PONG, stranger timeout, cluster2's
employee PONG); an IPv6 packet from the stranger to protected-db is dropped by the eBPF
datapath, and ``meshagent monitor`` shows it with its IPv6 addresses."""

import json
import subprocess
import time

import pytest
from conftest import MESHAGENT, lab_up, redis_ping, run_cli, seed_scene, wait_until

from meshagent.datapath.drops import format_drop
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory, "dual", nodes=1, dual_stack=True) as lab:
        seed_scene(lab)
        lab.pod_create("employee", "cluster1-node1", "default", "app=employee")
        time.sleep(1)
        yield lab


def socket(lab, node: str = "cluster1-node1") -> str:
    return lab.state["nodes"][node]["socket"]


def test_node_list_shows_ipv6_addresses_and_cidrs_of_both_clusters(lab):
    nodes = json.loads(run_cli("node", "list", "-o", "json", "--socket-path",
                               socket(lab)).stdout)
    by_name = {f"{n['cluster']}/{n['name']}": n for n in nodes}
    for cluster in (1, 2):
        node = by_name[f"cluster{cluster}/node1"]
        assert node["ipv6"] == f"fd00:99::{cluster}:1"
        assert node["pod_cidrs"] == [f"10.{cluster}.1.0/24", f"fd00:{cluster}:1::/64"]
    table = run_cli("node", "list", "--socket-path", socket(lab)).stdout.splitlines()
    row = next(line for line in table if line.startswith("cluster2/node1")).split()
    assert row == ["cluster2/node1", "10.99.2.1", "10.2.1.0/24", "fd00:99::2:1",
                   "fd00:2:1::/64"]
    def routes() -> str:
        return subprocess.run(["ip", "netns", "exec", lab.state["nodes"]["cluster1-node1"]["ns"],
                               "ip", "-6", "route", "show", "proto", "77"],
                              capture_output=True, text=True).stdout
    # installed by the node-routes controller within moments of the node's arrival (the lab
    # is ready once the remote is synced, which may be a moment before)
    wait_until(lambda: "fd00:2:1::/64 via fd00:99::2:1" in routes(), 5, "the IPv6 node route")


def test_pods_have_both_families_and_the_seed_holds_over_both(lab):
    pods = lab.state["pods"]
    assert pods["protected-db"]["ip6"].startswith("fd00:1:1::")
    assert pods["employee-c2"]["ip6"].startswith("fd00:2:1::")
    seed = {"employee": "PONG", "stranger": "timeout", "employee-c2": "PONG"}
    for family in (4, 6):
        assert {pod: redis_ping(lab, pod, family) for pod in seed} == seed, family
    ips = json.loads(run_cli("ip", "list", "-o", "json", "--socket-path", socket(lab)).stdout)
    remote = {e["prefix"]: e for e in ips if e["cluster"] == "cluster2"}
    employee = pods["employee-c2"]
    assert remote[f"{employee['ip6']}/128"]["identity"] == employee["identity"]


def test_an_ipv6_packet_from_the_stranger_to_protected_db_is_dropped_and_shown(lab, tmp_path):
    out = tmp_path / "monitor.json"
    monitor = subprocess.Popen([MESHAGENT, "monitor", "--type", "drop", "-o", "json",
                                "--socket-path", socket(lab)], stdout=open(out, "w"))
    db6 = lab.state["pods"]["protected-db"]["ip6"]
    stranger6 = lab.state["pods"]["stranger"]["ip6"]
    try:
        time.sleep(1)
        assert redis_ping(lab, "stranger", 6) == "timeout"
        time.sleep(1)
    finally:
        monitor.kill()
    events = [json.loads(line) for line in out.read_text().splitlines()]
    syn = [e for e in events if e["source"]["ip"] == stranger6
           and (e["destination"]["ip"], e["destination"]["port"]) == (db6, 6379)]
    assert syn, events
    assert syn[0]["reason"] == "policy denied (by default)"
    assert syn[0]["protocol"] == "tcp" and syn[0]["tcp_flags"] == ["SYN"]
    assert syn[0]["source"]["identity"] == lab.state["pods"]["stranger"]["identity"]
    assert f"[{stranger6}]:" in format_drop(syn[0])
    assert f"-> [{db6}]:6379 tcp SYN" in format_drop(syn[0])
