"""The dual-stack lab (``meshagent lab up --dual-stack``): both clusters' nodes publish IPv6
addresses and pod CIDRs, pods get an address of each family, remote IPv6 endpoints are admitted
inside the pod CIDRs granted to their cluster, IPv6 node routes are installed, and the seed
holds over IPv4. The eBPF datapath does not parse IPv6 yet: an IPv6 packet from the stranger to
protected-db is dropped, and ``meshagent monitor`` shows why."""

import json
import subprocess
import time

import pytest
from conftest import MESHAGENT, lab_up, redis_ping, run_cli, seed_scene

from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory, "dual", nodes=1, dual_stack=True) as lab:
        seed_scene(lab)
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
    routes = subprocess.run(["ip", "netns", "exec", lab.state["nodes"]["cluster1-node1"]["ns"],
                             "ip", "-6", "route", "show", "proto", "77"],
                            capture_output=True, text=True).stdout
    assert "fd00:2:1::/64 via fd00:99::2:1" in routes, routes


def test_pods_have_both_families_and_the_seed_holds(lab):
    pods = lab.state["pods"]
    assert pods["protected-db"]["ip6"].startswith("fd00:1:1::")
    assert pods["employee-c2"]["ip6"].startswith("fd00:2:1::")
    assert {pod: redis_ping(lab, pod) for pod in ("stranger", "employee-c2")} == {
        "stranger": "timeout", "employee-c2": "PONG"}
    ips = json.loads(run_cli("ip", "list", "-o", "json", "--socket-path", socket(lab)).stdout)
    remote = {e["prefix"]: e for e in ips if e["cluster"] == "cluster2"}
    employee = pods["employee-c2"]
    assert remote[f"{employee['ip6']}/128"]["identity"] == employee["identity"]


def test_an_ipv6_packet_from_the_stranger_to_protected_db_is_dropped_and_shown(lab, tmp_path):
    out = tmp_path / "monitor.json"
    monitor = subprocess.Popen([MESHAGENT, "monitor", "--type", "drop", "-o", "json",
                                "--socket-path", socket(lab)], stdout=open(out, "w"))
    try:
        time.sleep(1)
        db6 = lab.state["pods"]["protected-db"]["ip6"]
        ping = lab.pod_exec("stranger", ["ping", "-6", "-c", "1", "-W", "1", db6],
                            capture_output=True, text=True)
        assert ping.returncode != 0
        time.sleep(1)
    finally:
        monitor.kill()
    events = [json.loads(line) for line in out.read_text().splitlines()]
    unsupported = [e for e in events if e["reason"].startswith("unsupported L3 protocol")]
    stranger = lab.state["pods"]["stranger"]["endpoint"]
    assert any(e["endpoint"] == stranger for e in unsupported), events
