"""The acceptance test of ``meshagent observe --mesh``: the seed's story in the two-cluster lab
(real agents, real redis), seen from cluster1's node as a Hubble Relay would show it.

Every agent serves Hubble's API on its node IP, port 4244, with mutual TLS (one Hubble CA for
both clusters); ``meshagent lab observe`` runs ``meshagent observe --mesh`` in cluster1's node
with the lab's client certificate. With the seed's policy, employee-c2's connection to
protected-db is seen at both ends (leaving employee-c2's node in cluster2, arriving at
protected-db in cluster1) and forwarded, each end naming both clusters; the stranger's SYN is
dropped with ``POLICY_DENIED``. Every line is a GetFlowsResponse as Hubble's decoder takes it.
"""

import json
import re
import subprocess
import time

import pytest
from conftest import MESHAGENT, clean_env, lab_up, redis_ping, seed_scene
from google.protobuf import json_format

from meshagent.observe.api.observer import observer_pb2
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory, "observe", nodes=1) as lab:
        seed_scene(lab)
        # the story the flows tell: the employee in cluster2 is let in, the stranger is not
        assert redis_ping(lab, "employee-c2") == "PONG"
        assert redis_ping(lab, "stranger") == "timeout"
        yield lab


def observe(lab, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(lab.observe_command(list(args)), capture_output=True, text=True,
                          timeout=60, env=clean_env())


def parsed(text: str) -> list[observer_pb2.GetFlowsResponse]:
    """Each line as Hubble's client decodes it: no unknown field allowed."""
    return [json_format.Parse(line, observer_pb2.GetFlowsResponse(),
                              ignore_unknown_fields=False) for line in text.splitlines()]


def employee_to_db(flow) -> bool:
    return (flow.source.pod_name, flow.source.namespace, flow.source.cluster_name,
            flow.destination.pod_name, flow.destination.namespace,
            flow.destination.cluster_name) == ("employee-c2", "istio-space", "cluster2",
                                               "protected-db", "default", "cluster1")


def test_the_mesh_shows_the_employee_at_both_ends_and_the_strangers_drop(lab):
    deadline = time.monotonic() + 20
    while True:  # the events reach the agents' buffers on their own time
        result = observe(lab, "--to-pod", "default/protected-db", "-o", "json")
        assert result.returncode == 0, result.stderr
        responses = parsed(result.stdout)
        flows = [r.flow for r in responses if r.HasField("flow")]
        forwarded = [f for f in flows if employee_to_db(f) and f.verdict == 1]  # FORWARDED
        ends = {f.node_name.split("/")[0] for f in forwarded}
        dropped = [f for f in flows if f.source.pod_name == "stranger" and f.verdict == 2]
        if ends == {"cluster1", "cluster2"} and dropped or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ends == {"cluster1", "cluster2"}, f"employee-c2's flows: {forwarded}\n{result.stdout}"
    assert {f.node_name for f in forwarded} == {"cluster1/node1", "cluster2/node1"}
    assert dropped, result.stdout
    for flow in dropped:
        assert flow.destination.pod_name == "protected-db"
        assert flow.destination.cluster_name == flow.source.cluster_name == "cluster1"
        assert flow.node_name == "cluster1/node1"
        assert flow.l4.TCP.destination_port == 6379 and flow.l4.TCP.flags.SYN
    lines = [json.loads(line).get("flow", {}) for line in result.stdout.splitlines()]
    assert any(line.get("drop_reason_desc") == "POLICY_DENIED"
               and line["source"]["pod_name"] == "stranger" for line in lines)
    # the merged stream is in time order, and every node was reached
    times = [r.time.ToNanoseconds() for r in responses]
    assert times == sorted(times)
    assert result.stderr == "", result.stderr


def test_lab_observe_prints_hubbles_compact_lines(lab):
    """``meshagent lab observe -- ARGS``: the operator's way in, Hubble's default output."""
    result = subprocess.run([MESHAGENT, "lab", "--dir", str(lab.dir), "observe", "--",
                             "--from-pod", "default/stranger", "--verdict", "DROPPED",
                             "--print-node-name"],
                            capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines, result.stderr
    shape = re.compile(  # the drop, and the policy verdict that decided it
        r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d\.\d{3} \[cluster1/node1\]:"
        r" default/stranger:\d+ \(ID:\d+\) (->|<>) default/protected-db:6379 \(ID:\d+\)"
        r" (Policy denied DROPPED|policy-verdict:none INGRESS DENIED) \(TCP Flags: SYN\)")
    for line in lines:
        assert shape.fullmatch(line), line


def test_a_node_that_does_not_answer_is_named_and_holds_nobody_back(lab):
    """cluster2's node drops every packet to Hubble's port: its dial hangs, the others'
    flows still come, and the stream says which node it could not reach."""
    ns = lab.state["nodes"]["cluster2-node1"]["ns"]
    rule = ["INPUT", "-p", "tcp", "--dport", "4244", "-j", "DROP"]
    subprocess.run(["ip", "netns", "exec", ns, "iptables", "-I", *rule], check=True)
    try:
        started = time.monotonic()
        result = observe(lab, "--to-pod", "default/protected-db", "-o", "json",
                         "--timeout", "2s")
        took = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        (status,) = parsed(result.stderr)
        assert status.node_status.state_change == 2  # NODE_UNAVAILABLE
        assert list(status.node_status.node_names) == ["cluster2/node1"]
        assert {r.flow.node_name for r in parsed(result.stdout) if r.HasField("flow")} \
            == {"cluster1/node1"}
        assert took < 10
        compact = observe(lab, "--timeout", "2s")
        assert "1 nodes are unavailable: cluster2/node1" in compact.stderr
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-D", *rule], check=True)


def test_audit_mode_lets_the_stranger_in_and_says_so_until_it_is_turned_off(lab):
    """protected-db under the seed's default-deny policy, in audit mode: the stranger gets
    PONG and its flow says AUDIT (at the node that judged it); audit mode off, it times out
    again. The module's other tests see the stranger dropped, so this one runs last."""
    db = lab.state["pods"]["protected-db"]
    socket = lab.state["nodes"][db["node"]]["socket"]

    def audit(value: str) -> None:
        result = subprocess.run([MESHAGENT, "endpoint", "config", str(db["endpoint"]),
                                 f"PolicyAuditMode={value}", "--socket-path", socket],
                                capture_output=True, text=True, timeout=30, env=clean_env())
        assert result.returncode == 0, result.stderr

    audit("Enabled")
    try:
        listed = subprocess.run([MESHAGENT, "endpoint", "list", "--socket-path", socket],
                                capture_output=True, text=True, timeout=30, env=clean_env())
        assert "(Audit)" in listed.stdout, listed.stdout
        assert redis_ping(lab, "stranger") == "PONG"
        assert redis_ping(lab, "employee-c2") == "PONG"
        deadline = time.monotonic() + 20
        while True:
            result = observe(lab, "--from-pod", "default/stranger", "--verdict", "AUDIT",
                             "-o", "json")
            assert result.returncode == 0, result.stderr
            audited = [r.flow for r in parsed(result.stdout) if r.HasField("flow")]
            if audited or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert audited, result.stdout
        for flow in audited:
            assert (flow.destination.pod_name, flow.node_name) == ("protected-db",
                                                                   "cluster1/node1")
            assert flow.traffic_direction == 1  # INGRESS: protected-db's policy audited it
        lines = [json.loads(line)["flow"] for line in result.stdout.splitlines()
                 if '"flow"' in line]
        assert {line["verdict"] for line in lines} == {"AUDIT"}
    finally:
        audit("Disabled")
    assert redis_ping(lab, "stranger") == "timeout"
    assert redis_ping(lab, "employee-c2") == "PONG"
