"""Shared helpers: run the real ``meshagent`` executable, start it as a process, bring a lab
up for a module."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MESHAGENT = shutil.which("meshagent", path=str(Path(sys.executable).parent)) or "meshagent"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without MESHAGENT_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHAGENT_")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30):
    return subprocess.run([MESHAGENT, *args], capture_output=True, text=True,
                          env=env or clean_env(), timeout=timeout)


class AgentProcess:
    """A real agent process; always killed at teardown."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None):
        self.socket = tmp / "agent.sock"
        self.state = tmp / "state"
        self.log = tmp / "agent.log"
        self.proc = subprocess.Popen(
            [MESHAGENT, "--socket-path", str(self.socket), "--state-dir", str(self.state), *args],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env or clean_env(),
        )

    def wait_for_socket(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.exists():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"agent socket never appeared: {self.log.read_text()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def agent_process(short_tmp):
    started: list[AgentProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> AgentProcess:
        proc = AgentProcess(short_tmp, *args, env=env)
        started.append(proc)
        proc.wait_for_socket()
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def bpffs(short_tmp):
    """A bpffs of the test's own, so pinned maps never mix between tests."""
    root = short_tmp / "bpffs"
    root.mkdir()
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", str(root)], check=True)
    yield root
    subprocess.run(["umount", "-l", str(root)], check=False)


@contextlib.contextmanager
def lab_up(tmp_path_factory, name: str, nodes: int):
    """The two-cluster lab with ``nodes`` nodes per cluster, torn down afterwards (also when
    setting it up failed)."""
    from meshagent.lab import Lab
    directory = Path(tmp_path_factory.mktemp(name, numbered=True))
    lab = Lab(Path("/tmp") / f"ma-{name}-{directory.name}")
    try:
        lab.bring_up(nodes=nodes)
        yield lab
    finally:
        lab.tear_down(quiet=True)


def redis_ping(lab, pod: str) -> str:
    """``redis-cli ping`` from a lab pod to protected-db: PONG, or "timeout"."""
    db = lab.state["pods"]["protected-db"]["ip"]
    try:
        out = lab.pod_exec(pod, ["redis-cli", "-h", db, "-p", "6379", "ping"],
                           capture_output=True, text=True, timeout=2)
        return out.stdout.strip()
    except subprocess.TimeoutExpired:
        return "timeout"
