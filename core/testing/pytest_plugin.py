"""pytest fixtures for testing meshagent and its plugins (loaded through ``pytest11``).

- ``short_tmp``: a short temporary directory (unix socket paths must stay under 108 bytes).
- ``agent_factory``: starts real agents in the test's event loop and stops them afterwards.
- ``hook_recorder``: a plugin that records every event hook call, to pass to an agent.
- ``memory_kvstore``: a client of a fresh in-memory store.
"""

import asyncio
import io
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

from meshagent import hookimpl


@pytest.fixture
def short_tmp():
    path = Path(tempfile.mkdtemp(prefix="ma-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@attrs.define
class RunningAgent:
    agent: object
    task: asyncio.Task
    socket_path: Path

    @property
    def client(self):
        from meshagent.client import AgentClient
        return AgentClient(self.socket_path)

    async def stop(self) -> None:
        self.agent.stop()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 10)
        except asyncio.TimeoutError:
            raise AssertionError("the agent did not stop within 10 s; its loop's tasks:\n"
                                 + _task_stacks()) from None


def _task_stacks() -> str:
    """Where every task of the loop is waiting: what a stuck shutdown needs to be found."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=8, file=out)
    return out.getvalue()


@pytest.fixture
async def agent_factory(short_tmp):
    """``await agent_factory(["--plugins", "memory", ...], extra_plugins=[(name, obj)])``.

    Socket and state dir are private to each agent unless the args say otherwise; agents of one
    test share the memory store ``default`` unless ``--memory-store`` names another (that is
    one cluster). The environment is empty unless ``environ`` is given. Returns once the agent
    is ready (or, with ``wait_ready=False``, once its API socket exists).
    """
    from meshagent.cli import build_agent

    running: list[RunningAgent] = []

    async def start(args: Sequence[str] = ("--plugins", "memory"), *,
                    extra_plugins: Sequence[tuple[str, object]] = (),
                    environ: dict[str, str] | None = None, wait_ready: bool = True) -> RunningAgent:
        n = len(running)
        args = list(args)
        defaults = {"--socket-path": str(short_tmp / f"agent{n}.sock"),
                    "--state-dir": str(short_tmp / f"state{n}")}
        for flag, value in defaults.items():
            if not any(a == flag or a.startswith(flag + "=") for a in args):
                args += [flag, value]
        agent = build_agent(args, environ or {}, extra_plugins)
        task = asyncio.create_task(agent.run(), name=f"agent{n}")
        handle = RunningAgent(agent, task, agent.config.socket_path)
        running.append(handle)
        async with asyncio.timeout(10):
            while not (agent.ready if wait_ready else agent.config.socket_path.exists()):
                if task.done():
                    task.result()  # re-raise what stopped it
                await asyncio.sleep(0.02)
        return handle

    yield start
    for handle in reversed(running):
        if not handle.task.done():
            await handle.stop()


class HookRecorder:
    """Records every event hook call as ``(hook name, kind, object)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, object]] = []

    def of(self, hook: str) -> list[tuple[object, object]]:
        return [(kind, obj) for name, kind, obj in self.calls if name == hook]

    @hookimpl
    def meshagent_node_changed(self, kind, node):
        self.calls.append(("node", kind, node))

    @hookimpl
    def meshagent_identity_changed(self, kind, identity):
        self.calls.append(("identity", kind, identity))

    @hookimpl
    def meshagent_ipcache_changed(self, kind, entry):
        self.calls.append(("ipcache", kind, entry))

    @hookimpl
    def meshagent_endpoint_changed(self, kind, endpoint):
        self.calls.append(("endpoint", kind, endpoint))

    @hookimpl
    def meshagent_policy_changed(self, kind, policy):
        self.calls.append(("policy", kind, policy))

    @hookimpl
    def meshagent_service_changed(self, kind, service):
        self.calls.append(("service", kind, service))


@pytest.fixture
def hook_recorder() -> HookRecorder:
    return HookRecorder()


@pytest.fixture
async def memory_kvstore():
    from meshagent.plugins.memory.store import MemoryKVStore, shared_store
    client = MemoryKVStore(shared_store(f"test-{uuid.uuid4().hex[:8]}"))
    yield client
    await client.close()
