"""Prometheus endpoint (off by default) and the two log formats."""

import json
import signal
import socket

import aiohttp
import pytest

from meshagent.errors import UsageError
from meshagent.events import ChangeKind
from meshagent.model.node import Node
from meshagent.runtime.metrics import parse_serve_addr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_metrics_endpoint_serves_core_and_plugin_metrics(agent_factory):
    port = free_port()
    running = await agent_factory(["--plugins", "memory,audit",
                                   "--prometheus-serve-addr", f"127.0.0.1:{port}"])
    running.agent.hooks.node_changed(kind=ChangeKind.UPSERT, node=Node("n1", "c1", 1))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    assert "meshagent_agent_ready 1.0" in text
    assert 'meshagent_controller_failures_total{controller="kvstore-connect"} 0.0' in text
    assert 'meshagent_audit_events_total{kind="node"} 2.0' in text  # its own node, and n1


async def test_metrics_are_off_by_default(agent_factory):
    running = await agent_factory()
    assert running.agent.config.get("prometheus-serve-addr") == ""


@pytest.mark.parametrize("addr, expected", [(":9962", ("0.0.0.0", 9962)),
                                            ("127.0.0.1:9090", ("127.0.0.1", 9090))])
def test_serve_addr_forms(addr, expected):
    assert parse_serve_addr(addr) == expected


@pytest.mark.parametrize("addr", ["9962", "host:", "host:99999", "host:abc"])
def test_bad_serve_addr(addr):
    with pytest.raises(UsageError, match="--prometheus-serve-addr"):
        parse_serve_addr(addr)


def test_json_logs_are_one_object_per_line(agent_process):
    agent = agent_process("--plugins", "memory", "--log-format", "json", "--debug")
    agent.signal(signal.SIGTERM)
    agent.proc.wait(timeout=5)
    records = [json.loads(line) for line in agent.log.read_text().splitlines()]
    assert {"time", "level", "subsys", "msg"} <= set(records[0])
    messages = [r["msg"] for r in records]
    assert any(m.startswith("agent started: cluster default") for m in messages)
    assert "agent stopped" in messages


def test_text_logs_and_unknown_config_dir_files(agent_process, short_tmp):
    config_dir = short_tmp / "cm"
    config_dir.mkdir()
    (config_dir / "hubble-relay-image").write_text("x")  # a key meant for someone else
    agent = agent_process("--plugins", "memory", "--config-dir", str(config_dir))
    agent.signal(signal.SIGTERM)
    agent.proc.wait(timeout=5)
    log = agent.log.read_text()
    assert "WARNING meshagent: config-dir file 'hubble-relay-image' names no option" in log
    assert " INFO    meshagent.daemon.agent: agent started" in log
