"""The agent API over its unix socket, and the CLI commands that use it."""

import json
import os
import socket
import stat

import pytest
from conftest import run_cli

import meshagent
from meshagent.errors import AgentNotRunning, MeshagentError, PluginError
from meshagent.plugin import Route, json_response
from meshagent.plugins.memory.store import shared_store


async def test_status_plugins_config_healthz_round_trip(agent_factory):
    running = await agent_factory(["--plugins", "memory", "--cluster-name", "c1",
                                   "--cluster-id", "3", "--node-name", "n1"])
    client = running.client
    status = await client.request("GET", "/status")
    assert (status["cluster_name"], status["cluster_id"], status["node_name"]) == ("c1", 3, "n1")
    assert status["ready"] is True
    sections = {s["name"]: s for s in status["sections"]}
    assert sections["KVStore"]["health"] == "Ok"
    assert sections["Datapath"]["health"] == "Disabled"
    assert "control plane only" in sections["Datapath"]["summary"]
    assert sections["Controllers"]["summary"].endswith(" healthy")  # all of them
    assert sections["Controllers"]["summary"].split("/")[0] == sections["Controllers"]["summary"].split("/")[1].split()[0]
    assert sections["Controllers"]["details"] == []  # details only with verbose
    verbose = await client.request("GET", "/status", params={"verbose": "true"})
    assert any("kvstore-connect" in d for d in
               next(s for s in verbose["sections"] if s["name"] == "Controllers")["details"])

    plugins = {p["name"]: p for p in await client.request("GET", "/plugins")}
    assert plugins["memory"]["status"] == "active" and plugins["audit"]["status"] == "blocked"

    config = await client.request("GET", "/config")
    assert config["cluster-name"] == {"value": "c1", "source": "flag"}
    assert config["log-format"] == {"value": "text", "source": "default"}

    assert await client.request("GET", "/healthz") == {"ready": True}


async def test_unknown_path_is_a_json_404(agent_factory):
    running = await agent_factory()
    with pytest.raises(MeshagentError, match="agent answered 404: Not Found"):
        await running.client.request("GET", "/nope")


async def test_socket_mode_is_0660(agent_factory):
    running = await agent_factory()
    assert stat.S_IMODE(os.stat(running.socket_path).st_mode) == 0o660


async def test_stale_socket_is_replaced(agent_factory, short_tmp):
    path = short_tmp / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(path))
    leftover.close()  # the file stays, nobody listens: what a crashed agent leaves
    running = await agent_factory(["--plugins", "memory", "--socket-path", str(path)])
    assert (await running.client.request("GET", "/healthz"))["ready"] is True


async def test_second_agent_on_the_same_socket_is_refused(agent_factory):
    first = await agent_factory()
    with pytest.raises(MeshagentError, match="already serving the API socket"):
        await agent_factory(["--plugins", "memory", "--socket-path", str(first.socket_path)])
    assert (await first.client.request("GET", "/healthz"))["ready"] is True


async def test_second_agent_on_the_same_state_dir_is_refused(agent_factory):
    first = await agent_factory()
    state_dir = first.agent.config.state_dir
    with pytest.raises(MeshagentError, match=rf"state dir {state_dir} is in use by another agent"
                                             rf" \(pid {os.getpid()}\)"):
        await agent_factory(["--plugins", "memory", "--state-dir", str(state_dir)])


async def test_plugin_routes_are_served(agent_factory):
    running = await agent_factory(["--plugins", "memory,audit", "--node-name", "n1"])
    recent = await running.client.request("GET", "/audit", params={"limit": "5"})
    assert [(e["kind"], e["object"]["name"]) for e in recent] == [("node", "n1")]  # itself
    with pytest.raises(MeshagentError, match="400: limit must be an integer"):
        await running.client.request("GET", "/audit", params={"limit": "x"})


class StatusSquatter:
    @meshagent.hookimpl
    def meshagent_api_routes(self):
        async def squat(request):
            return json_response({})
        return [Route("GET", "/status", squat)]


async def test_route_clash_names_both_owners(agent_factory):
    with pytest.raises(PluginError, match=r"GET /v1/status is served by both 'core' and 'squat'"):
        await agent_factory(extra_plugins=[("squat", StatusSquatter())])


async def test_client_without_agent_says_so(short_tmp):
    from meshagent.client import AgentClient
    with pytest.raises(AgentNotRunning, match="no agent is running"):
        await AgentClient(short_tmp / "none.sock").request("GET", "/status")


@pytest.mark.parametrize("command", ["status", "config", "audit"])
def test_cli_without_agent_is_one_line_and_nonzero(command, short_tmp):
    result = run_cli(command, "--socket-path", str(short_tmp / "none.sock"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("meshagent: error: no agent is running: cannot connect to")
    assert result.stdout == ""


def test_unknown_command_exits_2_listing_commands():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "unknown command 'frobnicate'" in result.stderr
    assert "audit" in result.stderr and "status" in result.stderr


def test_cli_against_a_real_agent_process(agent_process):
    agent = agent_process("--plugins", "memory,audit", "--cluster-name", "cluster1",
                          "--cluster-id", "101")
    sock = ["--socket-path", str(agent.socket)]
    status = run_cli("status", *sock)
    assert status.returncode == 0, status.stderr
    assert "Cluster:     cluster1 (id 101)" in status.stdout
    assert "Datapath:    Disabled" in status.stdout and "Audit:" in status.stdout
    verbose = run_cli("status", "--verbose", *sock)
    assert "kvstore-connect [core.kvstore]" in verbose.stdout
    as_json = json.loads(run_cli("status", "-o", "json", *sock).stdout)
    assert as_json["cluster_id"] == 101
    config = run_cli("config", *sock).stdout
    assert any(line.split()[:3] == ["cluster-id", "101", "flag"] for line in config.splitlines())
    plugins = json.loads(run_cli("plugins", "-o", "json", *sock).stdout)
    assert {p["name"]: p["status"] for p in plugins} == {
        "audit": "active", "consul": "blocked", "ebpf": "blocked", "etcd": "blocked",
        "guardrails": "blocked", "k8s": "blocked", "memory": "active", "nftables": "blocked"}
    audit = run_cli("audit", "--limit", "3", *sock)
    assert audit.returncode == 0
    assert [json.loads(line)["kind"] for line in audit.stdout.splitlines()] == ["node"]


@pytest.mark.parametrize("args", [["exec", "employee", "--", "true"], ["socket", "node1"],
                                  ["exec", "employee", "--dir", "DIR", "--", "true"]])
def test_lab_commands_without_a_lab_say_so_in_one_line(args, short_tmp):
    """``--dir`` is the lab's, also when given after the pod name."""
    lab_dir = short_tmp / "nolab"
    args = [str(lab_dir) if a == "DIR" else a for a in args]
    if "--dir" not in args:
        args = ["--dir", str(lab_dir), *args]
    result = run_cli("lab", *args)
    assert result.returncode == 1, result
    assert result.stderr == (f"meshagent: error: no lab in {lab_dir}: run 'meshagent lab up'"
                             " first (or give its --dir)\n")


async def test_kvstore_down_answers_503_naming_the_kvstore(agent_factory):
    store = shared_store("api-503")
    running = await agent_factory(["--plugins", "memory", "--memory-store", "api-503",
                                   "--cluster-name", "cluster1", "--cluster-id", "101"])
    store.set_available(False)
    try:
        answer = await running.client.request("DELETE", "/services/default/redis", ok=(503,))
    finally:
        store.set_available(True)
    assert answer["error"].startswith("kvstore unavailable: ")
    assert "api-503" in answer["error"]
