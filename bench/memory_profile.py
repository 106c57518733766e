"""Where the agent's memory goes during a 100,000-entry ClusterMesh sync (tracemalloc).

    .venv/bin/python bench/memory_profile.py [--entries 100000]

Prints the traced size and the top allocation sites once the remote cluster is ready (no
datapath, so it shows the control plane's own objects).
"""

import argparse
import asyncio
import shutil
import tempfile
import tracemalloc
from pathlib import Path

from common import populate, remote_cluster_items

from meshagent.cli import build_agent
from meshagent.plugins.etcd.client import EtcdKVStore
from meshagent.plugins.etcd.config import load_etcd_config
from meshagent_dev.etcd import EtcdServer


async def main(entries: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="ma-bench-mem-", dir="/tmp"))
    server = EtcdServer("mem", workdir=workdir / "etcd").start()
    try:
        config = server.client_config(workdir / "remote.yaml")
        store = EtcdKVStore(load_etcd_config(config))
        await populate(store, remote_cluster_items(entries, entries // 10, entries // 100,
                                                   entries // 100))
        await store.close()
        mesh = workdir / "mesh"
        mesh.mkdir()
        (mesh / "cluster2").write_text(config.read_text() + "kvstore: etcd\n")
        tracemalloc.start(10)
        agent = build_agent(["--plugins", "memory,etcd", "--kvstore", "memory",
                             "--cluster-name", "cluster1", "--cluster-id", "101",
                             "--clustermesh-config", str(mesh), "--socket-path",
                             str(workdir / "a.sock"), "--state-dir", str(workdir / "state")], {})
        task = asyncio.create_task(agent.run())
        while not (agent.clustermesh is not None and agent.clustermesh.remotes.get("cluster2")
                   and agent.clustermesh.remotes["cluster2"].ready):
            await asyncio.sleep(0.05)
        snapshot = tracemalloc.take_snapshot()
        current, peak = tracemalloc.get_traced_memory()
        print(f"traced now {current / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB")
        for stat in snapshot.statistics("lineno")[:25]:
            print(f"{stat.size / 2**20:6.1f} MiB {stat.count:8d}  {stat.traceback[0]}")
        agent.stop()
        await task
    finally:
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().entries))
