"""The ``memory`` plugin: an in-process kvstore for tests and single-node development.

Clients that name the same store (``--memory-store``, default ``default``) share it, so several
agents in one process form a cluster; a clustermesh file ``{"memory-store": NAME}`` reaches
another named store. Nothing survives the process.
"""

from pathlib import Path

import yaml

import meshagent
from meshagent.plugin import UsageError
from meshagent.plugins.memory.store import MemoryKVStore, shared_store


class MemoryBackend:
    name = "memory"

    def local_client(self, config) -> MemoryKVStore:
        return MemoryKVStore(shared_store(config.get("memory-store")))

    def client_from_file(self, path: Path) -> MemoryKVStore:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"memory kvstore config {path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("memory-store"), str):
            raise UsageError(f"memory kvstore config {path}: needs 'memory-store: NAME'")
        return MemoryKVStore(shared_store(data["memory-store"]))

    def files_of(self, path: Path) -> tuple[Path, ...]:
        return ()


@meshagent.hookimpl
def meshagent_addoption(parser):
    group = parser.getgroup("memory", "memory kvstore plugin")
    group.addoption("memory-store", type=str, default="default",
                    help="name of the in-process store; agents naming the same one share it")


@meshagent.hookimpl
def meshagent_register_kvstore(registry):
    registry.register("memory", lambda agent: MemoryBackend())
