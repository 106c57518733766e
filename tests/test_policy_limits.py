"""Policy input that would hurt the agent: alias bombs, deep nesting, oversized documents, and a
large but legal import, in a real agent process through the real CLI — refused in well under a
second with the agent's memory unchanged, or processed while the agent keeps answering."""

import asyncio
import os
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import MESHAGENT, run_cli

from meshagent.policy.api import MAX_INPUT_BYTES, MAX_YAML_DEPTH, PolicyError, parse_policies

ARGS = ["--plugins", "memory", "--cluster-name", "cluster1", "--cluster-id", "101"]


def alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def big_policy(rules: int) -> str:
    items = "\n".join(f"  - fromEndpoints: [{{matchLabels: {{app: a{i}}}}}]\n"
                      f"    toPorts: [{{ports: [{{port: '{1000 + i % 5000}', protocol: TCP}}]}}]"
                      for i in range(rules))
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: big}}\n"
            f"spec:\n  endpointSelector: {{matchLabels: {{app: db}}}}\n  ingress:\n{items}\n")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("text, problem", [
    (alias_bomb(8), "YAML nodes once its aliases are expanded"),
    ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_YAML_DEPTH} levels"),
    ("x" * (MAX_INPUT_BYTES + 1), "more than the limit"),
    (big_policy(20_001), "rules, more than the limit of 20000"),
])
def test_inputs_beyond_the_limits_are_refused_naming_the_limit(text, problem):
    with pytest.raises(PolicyError, match=problem):
        parse_policies(text, "input")


def test_bombs_are_refused_fast_and_the_agent_keeps_its_memory(agent_process, short_tmp):
    agent = agent_process(*ARGS)
    time.sleep(0.5)
    before = rss_mib(agent.proc.pid)
    for name, text in (("bomb.yaml", alias_bomb(8)), ("deep.yaml", "[" * 100_000 + "]" * 100_000)):
        path = short_tmp / name
        path.write_text(text)
        started = time.monotonic()
        result = run_cli("policy", "import", str(path), "--socket-path", str(agent.socket))
        took = time.monotonic() - started
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert ("aliases are expanded" in result.stderr or "nested deeper" in result.stderr)
        assert took < 1.5, took  # the CLI's own start-up included
    assert rss_mib(agent.proc.pid) < before * 1.1 + 5
    status = run_cli("status", "--socket-path", str(agent.socket))
    assert "Policy:" in status.stdout and "0 policies" in status.stdout


def test_a_10000_rule_import_never_stops_the_agent_answering(agent_process, short_tmp):
    agent = agent_process(*ARGS)
    path = short_tmp / "big.yaml"
    path.write_text(big_policy(10_000))

    async def watch(importer: subprocess.Popen) -> list[float]:
        latencies = []
        connector = aiohttp.UnixConnector(path=str(agent.socket))
        async with aiohttp.ClientSession(connector=connector) as session:
            while importer.poll() is None or not latencies:
                started = time.monotonic()
                async with session.get("http://meshagent/v1/status") as response:
                    assert response.status in (200, 503)
                    await response.read()
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.02)
        return latencies
    importer = subprocess.Popen([MESHAGENT, "policy", "import", str(path), "--socket-path",
                                 str(agent.socket)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    latencies = asyncio.run(watch(importer))
    assert importer.returncode == 0, importer.stderr.read()
    deadline = time.monotonic() + 60
    while "1 policies" not in run_cli("status", "--socket-path", str(agent.socket)).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    print(f"\nstatus during a 10,000-rule import: {len(latencies)} answers, slowest"
          f" {max(latencies) * 1000:.0f} ms")
    assert max(latencies) < 0.1, sorted(latencies)[-5:]


def test_the_cli_says_permission_denied_when_it_is_not_allowed_on_the_socket(agent_process):
    agent = agent_process(*ARGS)
    result = subprocess.run(["runuser", "-u", "nobody", "--", MESHAGENT, "status",
                             "--socket-path", str(agent.socket)], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items()
                                 if not k.startswith("MESHAGENT_")})
    assert result.returncode != 0
    assert "permission denied" in result.stderr and "no agent is running" not in result.stderr
    assert "Traceback" not in result.stderr
