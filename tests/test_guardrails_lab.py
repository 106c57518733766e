"""A third-party policy resolver on the eBPF datapath: contrib's meshagent-guardrails, loaded by
name in the lab, with a deny list. The seed's verdicts hold (PONG / timeout / PONG) and the
deny list is enforced by the kernel: a contractor the seed's policy would let in is refused.
"""

import time

import pytest
from conftest import lab_up, redis_ping, run_cli, seed_scene

from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    deny = tmp_path_factory.mktemp("guardrails") / "deny.yaml"
    deny.write_text("deny:\n- matchLabels: {role: contractor}\n")
    args = ("--plugins", "etcd,ebpf,guardrails", "--policy-resolver", "guardrails",
            "--guardrails-deny-file", str(deny))
    with lab_up(tmp_path_factory, "guard", nodes=1, agent_args=args) as lab:
        seed_scene(lab)
        lab.pod_create("employee-c1", "cluster1-node1", "default", "app=employee")
        lab.pod_create("contractor", "cluster1-node1", "default", "app=employee,role=contractor")
        time.sleep(1)
        yield lab


def test_the_seed_holds_and_the_deny_list_is_enforced_in_the_kernel(lab):
    verdicts = {pod: redis_ping(lab, pod)
                for pod in ("employee-c1", "stranger", "employee-c2", "contractor")}
    assert verdicts == {"employee-c1": "PONG", "stranger": "timeout", "employee-c2": "PONG",
                        "contractor": "timeout"}
    socket = lab.state["nodes"]["cluster1-node1"]["socket"]
    status = run_cli("status", "--socket-path", socket).stdout
    assert "Guardrails:" in status and "1 deny rules" in status, status
    plugins = run_cli("plugins", "--socket-path", socket).stdout
    assert "guardrails" in plugins
    db = lab.state["pods"]["protected-db"]["endpoint"]
    contractor = lab.state["pods"]["contractor"]["identity"]
    traced = run_cli("policy", "trace", "--dst-endpoint", str(db), "--src-identity",
                     str(contractor), "--dport", "6379/TCP", "--socket-path", socket)
    assert "denied by guardrails (deny rule role=contractor" in traced.stdout, traced
