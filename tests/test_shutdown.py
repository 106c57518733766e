"""The agent process: runs, answers, and stops on SIGTERM/SIGINT; a second SIGINT forces."""

import json
import signal
import subprocess
import sys
import textwrap
import time

from conftest import clean_env, run_cli


def _wait_exit(proc, timeout: float) -> tuple[int, float]:
    start = time.monotonic()
    code = proc.wait(timeout=timeout)
    return code, time.monotonic() - start


def test_sigterm_stops_within_5s_and_cleans_up(agent_process):
    agent = agent_process("--plugins", "memory")
    status = run_cli("status", "-o", "json", "--socket-path", str(agent.socket))
    assert status.returncode == 0 and json.loads(status.stdout)["ready"] is True
    agent.signal(signal.SIGTERM)
    code, took = _wait_exit(agent.proc, 5)
    assert code == 0 and took < 5
    assert not agent.socket.exists()
    log = agent.log.read_text()
    assert "shutting down" in log and "agent stopped" in log


def test_sigint_stops_gracefully(agent_process):
    agent = agent_process("--plugins", "memory")
    agent.signal(signal.SIGINT)
    code, _ = _wait_exit(agent.proc, 5)
    assert code == 0 and not agent.socket.exists()


STUBBORN_AGENT = textwrap.dedent("""
    import asyncio, sys
    import meshagent
    from meshagent.daemon.agent import run_forever
    from meshagent.cli import build_agent
    from meshagent.runtime.controller import Controller

    class Stubborn:
        @meshagent.hookimpl
        def meshagent_controllers(self):
            async def run(handle):
                handle.ready()
                while True:
                    try:
                        await asyncio.sleep(3600)
                    except asyncio.CancelledError:
                        print("ignoring cancellation", flush=True)
            return [Controller("stubborn", run)]

    run_forever(build_agent(sys.argv[1:], {}, [("stubborn", Stubborn())]))
""")


def _start_stubborn(short_tmp, *args):
    script = short_tmp / "stubborn.py"
    script.write_text(STUBBORN_AGENT)
    sock = short_tmp / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--plugins", "memory", "--socket-path", str(sock),
         "--state-dir", str(short_tmp / "state"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    return proc


def test_second_sigint_forces_exit(short_tmp):
    proc = _start_stubborn(short_tmp, "--shutdown-timeout", "60")
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting for the stubborn controller
        proc.send_signal(signal.SIGINT)
        code, took = _wait_exit(proc, 5)
        assert code == 130 and took < 2
        assert "second interrupt" in proc.stdout.read()
    finally:
        proc.kill()


def test_shutdown_timeout_abandons_a_stuck_controller(short_tmp):
    proc = _start_stubborn(short_tmp, "--shutdown-timeout", "0.5")
    try:
        proc.send_signal(signal.SIGTERM)
        code, took = _wait_exit(proc, 5)
        out = proc.stdout.read()
        assert code == 0 and took < 4, out
        assert "did not stop within 0.5s" in out
    finally:
        proc.kill()
