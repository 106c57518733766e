"""meshagent-audit, tested the way a third-party plugin is: through meshagent's pytest fixtures
(``agent_factory``, loaded by the ``pytest11`` entry point) and its public hooks."""

import ipaddress
import json

import pytest

from meshagent.errors import UsageError
from meshagent.events import ChangeKind, PolicyChange
from meshagent.hooks.manager import PluginManager
from meshagent.model.endpoint import Endpoint
from meshagent.model.identity import Identity
from meshagent.model.ipcache import IPCacheEntry
from meshagent.model.node import Node
from meshagent.model.service import Service

IP = ipaddress.ip_address("10.1.0.7")

# (hook the agent publishes through, facade method, keyword, object)
EVENTS = [
    ("meshagent_node_changed", "node_changed", "node", Node("node1", "cluster1", 101)),
    ("meshagent_identity_changed", "identity_changed", "identity",
     Identity(6619393, frozenset({"k8s:app=stranger"}))),
    ("meshagent_ipcache_changed", "ipcache_changed", "entry",
     IPCacheEntry(ipaddress.ip_network("10.1.0.7/32"), 6619393, "cluster1")),
    ("meshagent_endpoint_changed", "endpoint_changed", "endpoint",
     Endpoint(7, "default", frozenset({"k8s:app=stranger"}), IP, 6619393)),
    ("meshagent_policy_changed", "policy_changed", "policy", PolicyChange("p", "default", 2)),
    ("meshagent_service_changed", "service_changed", "service",
     Service("default", "protected-db", "cluster2")),
]


@pytest.mark.parametrize("hook, method, keyword, obj", EVENTS, ids=[e[0] for e in EVENTS])
async def test_each_event_hook_appends_one_json_line(agent_factory, short_tmp, hook, method,
                                                     keyword, obj):
    log_file = short_tmp / "audit.jsonl"
    running = await agent_factory(["--plugins", "memory,audit", "--audit-file", str(log_file)])
    before = len(log_file.read_text().splitlines())  # the agent's own node is there already
    getattr(running.agent.hooks, method)(kind=ChangeKind.UPSERT, **{keyword: obj})
    getattr(running.agent.hooks, method)(kind=ChangeKind.DELETE, **{keyword: obj})
    lines = [json.loads(line) for line in log_file.read_text().splitlines()[before:]]
    kind = method.removesuffix("_changed")
    assert [(line["kind"], line["change"]) for line in lines] == [(kind, "upsert"), (kind, "delete")]


async def test_event_filter_and_status(agent_factory, short_tmp):
    log_file = short_tmp / "audit.jsonl"
    running = await agent_factory(["--plugins", "memory,audit", "--audit-file", str(log_file),
                                   "--audit-events", "identity"])
    hooks = running.agent.hooks
    hooks.node_changed(kind=ChangeKind.UPSERT, node=EVENTS[0][3])
    hooks.identity_changed(kind=ChangeKind.UPSERT, identity=EVENTS[1][3])
    assert [json.loads(line)["kind"] for line in log_file.read_text().splitlines()] == ["identity"]
    status = await running.client.request("GET", "/status")
    audit = next(s for s in status["sections"] if s["name"] == "Audit")
    assert audit["summary"] == f"1 changes written to {log_file}" and audit["plugin"] == "audit.log"


async def test_unknown_event_kind_is_rejected(agent_factory):
    with pytest.raises(UsageError, match="invalid --audit-events: unknown kind nodes"):
        await agent_factory(["--plugins", "memory,audit", "--audit-events", "nodes"])


async def test_two_agents_in_one_process_keep_separate_logs(agent_factory, short_tmp):
    a = await agent_factory(["--plugins", "memory,audit", "--audit-file", str(short_tmp / "a")])
    b = await agent_factory(["--plugins", "memory,audit", "--audit-file", str(short_tmp / "b")])
    b_before = (short_tmp / "b").read_text()
    a.agent.hooks.node_changed(kind=ChangeKind.UPSERT, node=EVENTS[0][3])
    assert "node1" in (short_tmp / "a").read_text()
    assert (short_tmp / "b").read_text() == b_before
    assert [e["object"]["cluster"] for e in await b.client.request("GET", "/audit")] == ["default"]


def test_commands_hook_offers_the_audit_command():
    """meshagent_commands: every installed plugin is asked; audit offers 'audit'."""
    commands = {command.name: plugin for plugin, command in PluginManager(None).hooks.commands()}
    assert commands["audit"] == "audit"
