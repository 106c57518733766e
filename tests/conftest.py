"""Shared helpers: run the real ``meshagent`` executable, start it as a process, bring a lab
up for a module."""

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
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


_program_cache: list[str] = []


def shared_program_cache() -> str:
    """One compiled-program cache for the lab agents of this test run: the first agent of a
    program compiles it, the others load it (plugins/ebpf/progcache.py; its own tests cover
    the misses). Removed when the run ends."""
    if not _program_cache:
        path = tempfile.mkdtemp(prefix="ma-progcache-", dir="/tmp")
        atexit.register(shutil.rmtree, path, True)
        _program_cache.append(path)
    return _program_cache[0]


@contextlib.contextmanager
def lab_up(tmp_path_factory, name: str, nodes: int, agent_args: Sequence[str] = (),
           dual_stack: bool = False, datapath: str = "ebpf", kvstoremesh: bool = False,
           cilium_peer: bool = False, outside: Sequence = ()):
    """The two-cluster lab with ``nodes`` nodes per cluster, torn down afterwards (also when
    setting it up failed); ``outside``: its DNS server and these outside hosts."""
    from meshagent_dev.lab import Lab
    # short (sockets live there) and unique across concurrent runs on one machine
    lab = Lab(Path(tempfile.mkdtemp(prefix=f"ma-{name}-", dir="/tmp")))
    if datapath == "ebpf":
        agent_args = ["--ebpf-program-cache-dir", shared_program_cache(), *agent_args]
    try:
        lab.bring_up(nodes=nodes, agent_args=agent_args, dual_stack=dual_stack,
                     datapath=datapath, kvstoremesh=kvstoremesh, cilium_peer=cilium_peer,
                     outside=outside)
        yield lab
    finally:
        lab.tear_down(quiet=True)


SEED_POLICY = Path(__file__).resolve().parent.parent / "contrib" / "seed" / "l4-policy.yaml"


def seed_scene(lab) -> None:
    """The seed's scene on a one-node-per-cluster lab: protected-db (redis) and a stranger in
    cluster1, the employee in cluster2's istio-space, the seed's l4-policy on cluster1."""
    from meshagent_dev.lab import REDIS_SERVER
    lab.pod_create("protected-db", "cluster1-node1", "default", "app=protected-db")
    lab.pod_create("stranger", "cluster1-node1", "default", "app=stranger")
    lab.pod_create("employee-c2", "cluster2-node1", "istio-space", "app=employee")
    lab.pod_spawn("protected-db", "redis", list(REDIS_SERVER))
    result = run_cli("policy", "import", str(SEED_POLICY), "--socket-path",
                     lab.state["nodes"]["cluster1-node1"]["socket"])
    assert result.returncode == 0, result.stderr
    time.sleep(1)


#: connects to redis every 50 ms until the stop file exists; writes "ok failed"
REDIS_UNTIL = r'''
import os, socket, sys, time
host, stop, out = sys.argv[1], sys.argv[2], sys.argv[3]
ok = failed = 0
while not os.path.exists(stop):
    try:
        s = socket.create_connection((host, 6379), timeout=2.0)
        s.sendall(b"PING\r\n")
        ok += s.recv(100).startswith(b"+PONG"); s.close()
    except OSError:
        failed += 1
    time.sleep(0.05)
open(out, "w").write(f"{ok} {failed}")
'''


@contextlib.contextmanager
def redis_traffic(lab, tmp_path: Path, *pods: str):
    """The pods keep connecting to protected-db's redis while the block runs. Yields a dict
    that, once the block ends, holds (ok, failed) for each pod."""
    db = lab.state["pods"]["protected-db"]["ip"]
    stop = tmp_path / "stop-traffic"
    outs = {pod: tmp_path / f"{pod}.count" for pod in pods}
    procs = [subprocess.Popen(["ip", "netns", "exec", lab.state["pods"][pod]["ns"],
                               sys.executable, "-c", REDIS_UNTIL, db, str(stop), str(out)])
             for pod, out in outs.items()]
    counts: dict[str, tuple[int, int]] = {}
    try:
        yield counts
    finally:
        stop.touch()
        for proc in procs:
            proc.wait(timeout=10)
        stop.unlink()
    for pod, out in outs.items():
        ok, failed = map(int, out.read_text().split())
        counts[pod] = (ok, failed)


def wait_until(predicate, timeout: float, what: str) -> float:
    """Poll ``predicate`` (from a synchronous test) until it holds; the seconds it took."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def redis_ping(lab, pod: str, family: int = 4) -> str:
    """``redis-cli ping`` from a lab pod to protected-db's address of ``family``: PONG, or
    "timeout"."""
    db = lab.state["pods"]["protected-db"]["ip6" if family == 6 else "ip"]
    try:
        out = lab.pod_exec(pod, ["redis-cli", "-h", db, "-p", "6379", "ping"],
                           capture_output=True, text=True, timeout=2)
        return out.stdout.strip()
    except subprocess.TimeoutExpired:
        return "timeout"


@pytest.fixture(scope="module", params=["ebpf", "nftables"])
def kernel_driver(request):
    """A scenario driver on each datapath in turn (the differential machinery's), for tests
    that walk a scenario of their own through both kernels."""
    from meshagent.testing.datapath_contract import ScenarioDriver
    from meshagent.testing.packets import KERNEL_WALK
    from meshagent_dev.netlab import can_run

    if not can_run():
        pytest.skip("needs root and BPF")
    if request.param == "ebpf":
        from test_datapath_differential import kernel_judge
        with kernel_judge() as judge:
            yield ScenarioDriver(judge)
    else:
        from test_nftables_datapath import NamespaceJudge
        judge = NamespaceJudge()
        try:
            yield ScenarioDriver(judge, local_delivery=False, walk=KERNEL_WALK)
        finally:
            judge.close()
