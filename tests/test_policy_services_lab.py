"""A ``toServices`` rule following a Service's backends with real traffic, on both datapaths:
the client may reach backend A of Service ``db``; backend B joins → reachable; A leaves the
Service → dropped; a pod that is no backend, and a backend's other port, stay dropped.

The Service has a selector, as Services of pods do: its backends are the pods it selects, and
the rule follows the selector (Cilium's translation; a Service without one stands for its
backends' addresses, which a pod's own identity hides: docs/policy.md, "toServices").
"""

import time

import pytest
from conftest import lab_up, run_cli
from nettraffic import CLIENT, SERVER

from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

PY = "/usr/bin/python3"
NODE = "cluster1-node1"
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-to-db, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toServices:
    - k8sService: {serviceName: db, namespace: default}
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


@pytest.fixture(scope="module", params=["ebpf", "nftables"])
def lab(request, tmp_path_factory):
    with lab_up(tmp_path_factory, f"svc{request.param[:3]}", nodes=1,
                datapath=request.param) as lab:
        lab.pod_create("client", NODE, "default", "app=client")
        lab.pod_create("db-a", NODE, "default", "app=db,tier=a")
        lab.pod_create("other", NODE, "default", "app=other")
        for pod in ("db-a", "other"):
            lab.pod_spawn(pod, "tcp", [PY, "-c", SERVER, "8080,9090", "5300"])
        time.sleep(1)
        yield lab


def apply_service(lab, selector: str, backends: list[str]) -> None:
    addresses = ", ".join(f"{{ip: {lab.state['pods'][pod]['ip']}}}" for pod in backends)
    text = (f"apiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: default}}\n"
            f"spec: {{clusterIP: 10.96.0.50, ports: [{{port: 8080}}], selector: {selector}}}\n"
            f"---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: db, namespace: default}}\n"
            f"subsets: [{{addresses: [{addresses}], ports: [{{port: 8080}}]}}]\n")
    path = lab.dir / f"db-{time.monotonic_ns()}.yaml"
    path.write_text(text)
    result = run_cli("service", "apply", str(path), "--socket-path", lab.node_socket(NODE))
    assert result.returncode == 0, result.stderr


def talk(lab, pod: str, port: int = 8080) -> str:
    ip = lab.state["pods"][pod]["ip"]
    result = lab.pod_exec("client", [PY, "-c", CLIENT, "tcp", ip, str(port), "0", "0.5"],
                          capture_output=True, text=True, timeout=20)
    return result.stdout.strip()


def settle(lab, want: dict[str, str]) -> dict[str, str]:
    """Each pod's answer on 8080 once it is ``want`` (or what it is after 15 seconds)."""
    deadline = time.monotonic() + 15
    while True:
        got = {pod: talk(lab, pod) for pod in want}
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_1_the_rule_allows_the_services_backend_and_nothing_else(lab):
    apply_service(lab, "{app: db}", ["db-a"])
    path = lab.dir / "policy.yaml"
    path.write_text(POLICY)
    result = run_cli("policy", "import", str(path), "--wait", "--socket-path",
                     lab.node_socket(NODE))
    assert result.returncode == 0, result.stderr
    assert settle(lab, {"db-a": "ok", "other": "timeout"}) == {"db-a": "ok", "other": "timeout"}
    assert talk(lab, "db-a", 9090) == "timeout"  # the rule's port only


def test_2_a_backend_added_is_reachable(lab):
    lab.pod_create("db-b", NODE, "default", "app=db,tier=b")
    lab.pod_spawn("db-b", "tcp", [PY, "-c", SERVER, "8080,9090", "5300"])
    apply_service(lab, "{app: db}", ["db-a", "db-b"])
    want = {"db-a": "ok", "db-b": "ok", "other": "timeout"}
    assert settle(lab, want) == want


def test_3_a_backend_removed_is_dropped(lab):
    apply_service(lab, "{app: db, tier: b}", ["db-b"])
    want = {"db-a": "timeout", "db-b": "ok", "other": "timeout"}
    assert settle(lab, want) == want
    assert talk(lab, "db-b", 9090) == "timeout"
