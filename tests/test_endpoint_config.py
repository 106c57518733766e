"""Policy audit mode in the control plane, through a real agent in a node's namespace with real
pods: ``meshagent endpoint config`` sets and clears it, the datapath is handed the endpoint
again with the new mode (through the feed), it survives restarts, ``--policy-audit-mode`` is
the default, and ``status``, ``endpoint list`` and ``policy trace`` say so.

The agent's datapath is a recorder (tests/recording_agent.py) that writes down every endpoint
it is handed: what the eBPF and nftables datapaths enforce is theirs to test.
"""

import json
import re
import sys
from pathlib import Path

import pytest
from test_endpoints import NodeAgent, lab  # noqa: F401 (the fixture)

from meshagent.client import AgentClient
from meshagent.errors import MeshagentError
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root and ip netns")]

RECORDING_AGENT = Path(__file__).parent / "recording_agent.py"

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-ingress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "6379", protocol: TCP}]}]
"""


def columns(line: str) -> list[str]:
    """A table line's cells (they are two spaces apart at least; a cell may hold one)."""
    return [cell.strip() for cell in line.split("  ") if cell.strip()]


class RecordingNode(NodeAgent):
    """A node agent whose datapath records what the feed hands it."""

    def __init__(self, lab, short_tmp, *args: str):
        node = lab.ns("node1")
        self.record = short_tmp / "datapath.jsonl"
        self.command = (sys.executable, str(RECORDING_AGENT), str(self.record))
        super().__init__(lab, node, short_tmp, "--plugins", "memory", "--cluster-name",
                         "cluster1", "--cluster-id", "101", "--node-name", "node1",
                         "--pod-cidr", "10.1.1.0/24", *args)

    def handed(self) -> list[dict]:
        """What the datapath was handed so far, oldest first."""
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def config(self, endpoint_id: int, *settings: str):
        return self.cli("endpoint", "config", str(endpoint_id), *settings)

    def by_id(self) -> dict[int, dict]:
        return {e["id"]: e for e in self.endpoints()}

    def section(self, name: str, *flags: str) -> dict:
        status = json.loads(self.cli("status", "-o", "json", *flags).stdout)
        return next(s for s in status["sections"] if s["name"] == name)


def test_set_clear_and_see_audit_mode_per_endpoint(lab, short_tmp):  # noqa: F811
    agent = RecordingNode(lab, short_tmp)
    audited = agent.create(lab.ns("pod1"), "app=db")["id"]
    enforced = agent.create(lab.ns("pod2"), "app=db")["id"]
    assert agent.config(audited).stdout == "PolicyAuditMode          Disabled\n"
    assert agent.section("Endpoints")["summary"] == "2 endpoints"
    before = len(agent.handed())

    result = agent.config(audited, "PolicyAuditMode=Enabled")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Endpoint {audited} configuration updated successfully\n"
    # the datapath got the endpoint again, in audit mode, when the command returned
    assert agent.handed()[before:] == [{"added": audited, "policy_audit": True}]
    assert agent.config(audited).stdout == "PolicyAuditMode          Enabled\n"
    assert json.loads(agent.config(audited, "-o", "json").stdout) == {
        "id": audited, "options": {"PolicyAuditMode": "Enabled"},
        "overrides": {"PolicyAuditMode": "Enabled"}}
    listed = agent.by_id()
    assert (listed[audited]["policy_audit"], listed[audited]["policy_audit_mode"]) == (True, True)
    assert (listed[enforced]["policy_audit"], listed[enforced]["policy_audit_mode"]) == (
        False, None)
    section = agent.section("Endpoints", "--verbose")
    assert (section["health"], section["summary"]) == ("Warning",
                                                       "2 endpoints, 1 in policy audit mode")
    assert section["details"] == [f"endpoint {audited} (default/10.1.1.1): policy audit mode"
                                  " (set on the endpoint)"]

    # with a policy selecting both for ingress: Cilium's enforcement columns, and trace
    policy = short_tmp / "policy.yaml"
    policy.write_text(POLICY)
    imported = agent.cli("policy", "import", str(policy), "--wait")
    assert imported.returncode == 0, imported.stderr
    listed = agent.by_id()
    assert (listed[audited]["policy_enabled"], listed[enforced]["policy_enabled"]) == (
        "audit-ingress", "ingress")
    table = agent.cli("endpoint", "list").stdout.splitlines()
    rows = {columns(line)[0]: columns(line) for line in table}
    assert rows["ENDPOINT"][1:3] == ["POLICY (ingress)", "POLICY (egress)"]
    assert rows["ENFORCEMENT"][:2] == ["ENFORCEMENT", "ENFORCEMENT"]  # Cilium's second line
    assert rows[str(audited)][1:3] == ["Disabled (Audit)", "Disabled"]
    assert rows[str(enforced)][1:3] == ["Enabled", "Disabled"]
    trace = ["policy", "trace", "--src-labels", "app=other", "--dport", "6379"]
    to_audited = agent.cli(*trace, "--dst-endpoint", str(audited))
    assert to_audited.returncode == 1  # the policy's verdict is still deny
    assert to_audited.stdout.splitlines()[-2:] == [
        "verdict:     DENY: denied by default (ingress is enforced and no rule allows it)",
        f"audit:       endpoint {audited} is in policy audit mode: this traffic passes anyway,"
        " reported with verdict AUDIT"]
    as_json = json.loads(agent.cli(*trace, "--dst-endpoint", str(audited), "-o", "json").stdout)
    assert (as_json["verdict"], as_json["policy_audit"], as_json["flow_verdict"]) == (
        "deny", True, "AUDIT")
    to_enforced = json.loads(agent.cli(*trace, "--dst-endpoint", str(enforced), "-o",
                                       "json").stdout)
    assert (to_enforced["verdict"], to_enforced["policy_audit"], to_enforced["flow_verdict"]) == (
        "deny", False, "DROPPED")
    assert "audit:" not in agent.cli(*trace, "--dst-endpoint", str(enforced)).stdout
    web = "app=web,io.kubernetes.pod.namespace=default,io.cilium.k8s.policy.cluster=cluster1"
    allowed = agent.cli("policy", "trace", "--src-labels", web, "--dport", "6379",
                        "--dst-endpoint", str(audited))
    assert allowed.returncode == 0
    assert allowed.stdout.splitlines()[-1] == (
        f"audit:       endpoint {audited} is in policy audit mode: traffic the policy denies"
        " would pass, reported with verdict AUDIT")
    assert json.loads(agent.cli("policy", "trace", "--src-labels", web, "--dport", "6379",
                                "--dst-endpoint", str(audited), "-o", "json").stdout)[
        "flow_verdict"] == "FORWARDED"

    # bad input: named, and nothing changed (nor handed to the datapath)
    before = len(agent.handed())
    bad_value = agent.config(audited, "PolicyAuditMode=maybe")
    assert bad_value.returncode == 1
    assert ("agent answered 400: invalid value 'maybe' for endpoint option PolicyAuditMode"
            in bad_value.stderr)
    bad_name = agent.config(audited, "PolicyAuditMode=Disabled", "Debugg=true")
    assert bad_name.returncode == 1
    assert "unknown endpoint option 'Debugg'; options: PolicyAuditMode" in bad_name.stderr
    no_value = agent.config(audited, "PolicyAuditMode")
    assert no_value.returncode == 2 and "cannot parse option 'PolicyAuditMode'" in no_value.stderr
    no_endpoint = agent.config(99, "PolicyAuditMode=Enabled")
    assert no_endpoint.returncode == 1 and "404: no endpoint 99" in no_endpoint.stderr
    with pytest.raises(MeshagentError, match=re.escape('400: expected {"options": {"NAME"')):
        AgentClient(agent.socket).call("PATCH", f"/endpoints/{audited}/config", json={})
    assert agent.config(audited).stdout == "PolicyAuditMode          Enabled\n"
    assert len(agent.handed()) == before

    # a change the datapath refuses: the endpoint is handed back as it was, and stays so
    Path(f"{agent.record}.refuse").write_text("1")
    refused = agent.config(audited, "PolicyAuditMode=Disabled")
    assert refused.returncode == 1 and "the recorder refused the batch" in refused.stderr
    assert agent.handed()[-1] == {"added": audited, "policy_audit": True}
    assert agent.config(audited).stdout == "PolicyAuditMode          Enabled\n"
    assert agent.by_id()[audited]["policy_audit"] is True

    # Disabled and Default, in Cilium's other spellings too
    assert agent.config(audited, "policyauditmode=false").returncode == 0
    assert agent.handed()[-1] == {"added": audited, "policy_audit": False}
    assert json.loads(agent.config(audited, "-o", "json").stdout)["overrides"] == {
        "PolicyAuditMode": "Disabled"}
    assert agent.config(audited, "PolicyAuditMode=Default").returncode == 0
    assert json.loads(agent.config(audited, "-o", "json").stdout) == {
        "id": audited, "options": {"PolicyAuditMode": "Disabled"}, "overrides": {}}
    assert agent.section("Endpoints")["health"] == "Ok"
    listed = agent.by_id()
    assert listed[audited]["policy_enabled"] == "ingress"
    assert listed[audited]["policy_audit_mode"] is None


def test_audit_mode_survives_restarts_and_follows_the_global_option(lab, short_tmp):  # noqa: F811
    agent = RecordingNode(lab, short_tmp)
    own = agent.create(lab.ns("pod1"), "app=db")["id"]
    follows = agent.create(lab.ns("pod2"), "app=db")["id"]
    assert agent.config(own, "PolicyAuditMode=Enabled").returncode == 0

    agent.stop()
    agent.record.unlink()
    agent.start()
    # restored as saved, and handed to the datapath that way
    assert sorted(map(json.dumps, agent.handed())) == sorted(map(json.dumps, [
        {"added": own, "policy_audit": True}, {"added": follows, "policy_audit": False}]))
    assert agent.config(own).stdout == "PolicyAuditMode          Enabled\n"

    # --policy-audit-mode: every endpoint without a setting of its own, after a restart too
    agent.stop()
    agent.record.unlink()
    agent.args = (*agent.args, "--policy-audit-mode", "true")
    agent.start()
    assert sorted(map(json.dumps, agent.handed())) == sorted(map(json.dumps, [
        {"added": own, "policy_audit": True}, {"added": follows, "policy_audit": True}]))
    listed = agent.by_id()
    assert (listed[follows]["policy_audit"], listed[follows]["policy_audit_mode"]) == (True, None)
    section = agent.section("Endpoints", "--verbose")
    assert (section["health"], section["summary"]) == (
        "Warning", "2 endpoints, policy audit mode on (--policy-audit-mode): 2 in it")
    assert section["details"] == [
        f"endpoint {own} (default/10.1.1.1): policy audit mode (set on the endpoint)",
        f"endpoint {follows} (default/10.1.1.2): policy audit mode (--policy-audit-mode)"]
    new = agent.create(lab.ns("pod3"), "app=web")
    assert (new["policy_audit"], new["policy_audit_mode"]) == (True, None)
    # an endpoint's own Disabled wins over the global option; Default follows it again
    assert agent.config(own, "PolicyAuditMode=Disabled").returncode == 0
    assert agent.handed()[-1] == {"added": own, "policy_audit": False}
    assert agent.config(own).stdout == "PolicyAuditMode          Disabled\n"
    assert agent.config(own, "PolicyAuditMode=Default").returncode == 0
    assert agent.handed()[-1] == {"added": own, "policy_audit": True}
    assert json.loads(agent.config(own, "-o", "json").stdout)["overrides"] == {}

