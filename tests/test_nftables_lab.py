"""The seed's story on the nftables datapath (``meshagent lab up --datapath nftables``):
agents run as ``meshagent --plugins etcd,nftables``; employee PONG, stranger timeout, cluster2's
employee PONG over IPv4 and IPv6 with real redis; the stranger's SYN in ``meshagent monitor``;
status and ``meshagent nft``; an agent killed with SIGKILL leaves its table enforcing, and the
restarted agent takes it over without dropping a single allowed connection."""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    MESHAGENT,
    clean_env,
    lab_up,
    redis_ping,
    redis_traffic,
    run_cli,
    seed_scene,
)

from meshagent.client import AgentClient
from meshagent.errors import MeshagentError
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root and ip netns")]
SEED = {"employee": "PONG", "stranger": "timeout", "employee-c2": "PONG"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory, "nft", nodes=1, dual_stack=True, datapath="nftables") as lab:
        seed_scene(lab)
        lab.pod_create("employee", "cluster1-node1", "default", "app=employee")
        time.sleep(1)
        yield lab


def socket(lab) -> str:
    return lab.state["nodes"]["cluster1-node1"]["socket"]


def in_node(lab, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", lab.state["nodes"]["cluster1-node1"]["ns"],
                           *command], capture_output=True, text=True, timeout=30)


def test_agents_run_the_nftables_datapath_and_the_seed_holds_over_both_families(lab):
    assert "etcd,nftables" in lab.agent_command("cluster1-node1")
    for family in (4, 6):
        assert {pod: redis_ping(lab, pod, family) for pod in SEED} == SEED, family
    status = run_cli("status", "--socket-path", socket(lab)).stdout
    assert "1/1 remote clusters ready" in status
    line = next(x for x in status.splitlines() if x.startswith("Datapath:"))
    assert "Ok" in line and "nftables: table netdev meshagent on 3 endpoints, synced" in line
    assert "policy denied (by default)" in line
    tables = in_node(lab, "nft", "list", "tables").stdout
    # ours only: the datapath's table, and the one that hands DNS to the proxy (tproxy)
    assert set(tables.splitlines()) == {"table netdev meshagent", "table inet meshagent_proxy"}


def test_monitor_shows_the_strangers_syn(lab):
    monitor = subprocess.Popen([MESHAGENT, "monitor", "--type", "drop", "-o", "json",
                                "--count", "1", "--socket-path", socket(lab)],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert redis_ping(lab, "stranger", 6) == "timeout"
        out, _ = monitor.communicate(timeout=10)
    finally:
        monitor.kill()
    event = json.loads(out)
    db, stranger = lab.state["pods"]["protected-db"], lab.state["pods"]["stranger"]
    assert event["reason"] == "policy denied (by default)"
    assert (event["endpoint"], event["direction"]) == (db["endpoint"], "ingress")
    assert (event["source"]["ip"], event["destination"]["ip"]) == (stranger["ip6"], db["ip6"])
    assert event["destination"]["port"] == 6379 and event["tcp_flags"] == ["SYN"]


def test_observe_shows_the_flows_the_table_logged(lab):
    """Hubble's view on the nftables datapath (``meshagent observe --mesh``): the employee's
    connection to protected-db is a forwarded policy verdict at both ends (entering the db:
    the peer's identity and port, L3-L4) and its first reply is traced; the stranger's SYN
    is dropped with POLICY_DENIED."""
    assert redis_ping(lab, "employee-c2") == "PONG"
    assert redis_ping(lab, "stranger") == "timeout"
    deadline = time.monotonic() + 20
    while True:  # the events reach the agent's buffer on their own time
        result = subprocess.run(lab.observe_command(["--pod", "default/protected-db",
                                                     "-o", "jsonpb"]),
                                capture_output=True, text=True, timeout=60, env=clean_env())
        assert result.returncode == 0, result.stderr
        flows = [json.loads(line)["flow"] for line in result.stdout.splitlines()
                 if "flow" in json.loads(line)]
        verdicts = [f for f in flows if f["source"].get("pod_name") == "employee-c2"
                    and f["verdict"] == "FORWARDED" and not f.get("is_reply")]
        replies = [f for f in flows if f["destination"].get("pod_name") == "employee-c2"
                   and f.get("is_reply")]
        drops = [f for f in flows if f["source"].get("pod_name") == "stranger"
                 and f["verdict"] == "DROPPED"]
        if verdicts and replies and drops or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert verdicts and replies and drops, result.stdout
    # both ends: leaving employee-c2's node in cluster2, entering protected-db's in cluster1
    assert {f["node_name"] for f in verdicts} == {"cluster1/node1", "cluster2/node1"}
    assert any(f.get("policy_match_type") == 2 for f in verdicts
               if f["node_name"] == "cluster1/node1"), verdicts
    assert {f["node_name"] for f in drops} == {"cluster1/node1"}
    assert {f["drop_reason_desc"] for f in drops} == {"POLICY_DENIED"}
    assert all(f["l4"]["TCP"]["destination_port"] == 6379 for f in drops)


def test_audit_mode_on_the_table_lets_the_stranger_in_until_it_is_turned_off(lab):
    """protected-db in audit mode (``meshagent endpoint config``): its policy drop chains
    audit, so the stranger gets PONG and its flow says AUDIT; audit mode off, it times out
    again and the employee still gets in."""
    db = lab.state["pods"]["protected-db"]

    def audit(value: str) -> None:
        result = run_cli("endpoint", "config", str(db["endpoint"]), f"PolicyAuditMode={value}",
                         "--socket-path", socket(lab))
        assert result.returncode == 0, result.stderr

    audit("Enabled")
    try:
        assert redis_ping(lab, "stranger") == "PONG"
        deadline = time.monotonic() + 20
        while True:
            result = subprocess.run(lab.observe_command(["--from-pod", "default/stranger",
                                                         "--verdict", "AUDIT", "-o", "jsonpb"]),
                                    capture_output=True, text=True, timeout=60, env=clean_env())
            assert result.returncode == 0, result.stderr
            audited = [json.loads(line)["flow"] for line in result.stdout.splitlines()
                       if '"flow"' in line]
            if audited or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert audited, result.stdout
        assert {(f["destination"]["pod_name"], f["node_name"], f["traffic_direction"])
                for f in audited} == {("protected-db", "cluster1/node1", "INGRESS")}
    finally:
        audit("Disabled")
    assert redis_ping(lab, "stranger") == "timeout"
    assert redis_ping(lab, "employee-c2") == "PONG"


def test_nft_commands_read_the_table(lab):
    assert redis_ping(lab, "stranger") == "timeout"
    counters = json.loads(in_node(lab, MESHAGENT, "nft", "counters", "-o", "json").stdout)
    by_reason = {row["reason"]: row["packets"] for row in counters}
    assert by_reason["forwarded"] > 0 and by_reason["policy denied (by default)"] > 0
    ipcache = json.loads(in_node(lab, MESHAGENT, "nft", "ipcache", "list", "-o", "json").stdout)
    employee = lab.state["pods"]["employee-c2"]
    assert employee["ip"] in {row["range"] for row in ipcache}, ipcache  # a one-address range
    db = lab.state["pods"]["protected-db"]["endpoint"]
    policy = json.loads(in_node(lab, MESHAGENT, "nft", "policy", "get", str(db),
                                "-o", "json").stdout)
    allowed = {(row["map"], row["key"].split(" . ", 1)[1]) for row in policy
               if (row["verdict"], row["match"]) == ("allow", "L3-L4")}
    assert (f"spec4_{db}_in", "tcp . 6379") in allowed, policy
    assert (f"spec6_{db}_in", "tcp . 6379") in allowed, policy


def test_a_killed_agent_leaves_its_table_enforcing_and_the_restart_drops_nothing(lab, tmp_path):
    with redis_traffic(lab, tmp_path, "employee", "employee-c2", "stranger") as counts:
        time.sleep(1)
        pid = lab.state["pids"].pop("agent-cluster1-node1")
        os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        time.sleep(2)  # no agent: the table alone enforces
        lab.start_agent("cluster1-node1")
        deadline = time.monotonic() + 30
        while not _ready(lab):
            assert time.monotonic() < deadline, "the restarted agent never got ready"
            time.sleep(0.2)
        time.sleep(2)
    assert counts["employee"][0] > 20 and counts["employee"][1] == 0, counts
    assert counts["employee-c2"][0] > 20 and counts["employee-c2"][1] == 0, counts
    assert counts["stranger"][0] == 0, counts
    log = (lab.dir / "logs" / "agent-cluster1-node1.log").read_text(errors="replace")
    assert "kept table netdev meshagent with 3 endpoints" in log
    for family in (4, 6):
        assert {pod: redis_ping(lab, pod, family) for pod in SEED} == SEED, family


def _ready(lab) -> bool:
    try:
        return AgentClient(Path(socket(lab))).get("/healthz")["ready"]
    except MeshagentError:
        return False
