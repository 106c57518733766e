"""What KVStoreMesh buys: N simulated agents per cluster × M clusters against real etcds,
direct (every agent dials every remote etcd) against cached (one ``meshagent kvstoremesh`` per
cluster dials them; agents read their own etcd).

    .venv/bin/python bench/kvstoremesh.py [--clusters 3] [--agents 10] [--entries 2000]

A simulated agent is the agent's real ClusterMesh and ClusterSync code filling its own tables,
with its own kvstore clients (a client of its own cluster's etcd, as every agent holds, and in
direct mode one per remote cluster; cached, it reads every remote through its own client, as
``--clustermesh-read-cache`` does), and no datapath, API or endpoints; one worker process per
cluster runs that cluster's agents. Reported for each mode, measured in one run:

- connections to each etcd, from processes of other clusters and in all (``ss``, by the pid
  holding the client end), and its watchers (etcd's ``etcd_debugging_mvcc_watcher_total``),
  in all and the agents' own (those gone while the agents are stopped a moment, once synced);
- etcd CPU seconds (utime + stime of the servers) from the agents' start until all are synced;
- seconds until every agent of every cluster has synced every remote cluster;
- after cluster1's etcd restarts: seconds from a change written to it once it is back until
  every agent of the other clusters has applied it.
"""

import argparse
import asyncio
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import MESHAGENT, cpu_seconds, machine, populate, progress, remote_cluster_items, report

from meshagent.kvstore import keys as kvkeys
from meshagent.model.cluster import ClusterConfig
from meshagent.model.identity import format_labels
from meshagent_dev.etcd import EtcdServer

HERE = Path(__file__).resolve()


# -- the worker: one cluster's simulated agents ---------------------------------------------------


async def worker(args) -> None:
    """Runs ``--agents`` agents' ClusterMesh; answers ``ready`` and ``has CLUSTER ID`` on stdin
    once every agent is ready / holds that identity."""
    from meshagent.clustermesh.mesh import ClusterMesh
    from meshagent.clustermesh.sync import ClusterSync
    from meshagent.model.cluster import ClusterInfo
    from meshagent.model.ipcache import IPCache
    from meshagent.model.table import Table, Tables
    from meshagent.plugins.etcd import EtcdBackend

    logging.disable(logging.WARNING)  # a restarted etcd makes every agent say so
    info = ClusterInfo(args.cluster, args.cluster_id)
    backend = EtcdBackend()
    meshes, all_tables, locals_ = [], [], []
    for _ in range(args.agents):
        local = backend.client_from_file(Path(args.etcd_config))
        await local.connect()
        locals_.append(local)  # held open, as every agent holds its own cluster's
        tables = Tables(nodes=Table("node", lambda k, v: None),
                        identities=Table("identity", lambda k, v: None),
                        ipcache=IPCache(args.cluster, lambda k, v: None),
                        services=Table("service", lambda k, v: None))
        mesh = ClusterMesh(
            cluster=info, backend_named=lambda name: backend, directory=Path(args.mesh_dir),
            cache_ttl=0.0, follower=lambda name, config, tables=tables: ClusterSync(
                name, config.id, info, tables, cached=config.cached),
            cache_store=local if args.cached else None)
        meshes.append(mesh)
        all_tables.append(tables)
        asyncio.create_task(mesh.follow_directory(lambda: None))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] == "ready":
            await until(lambda: all(m.remotes and all(r.ready for r in m.remotes.values())
                                    for m in meshes))
        elif line[0] == "has":
            await until(lambda n=int(line[2]): all(t.identities.get(n) is not None
                                                   for t in all_tables))
        print("ok", flush=True)


async def until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.02)


# -- the orchestrator ---------------------------------------------------------------------------


class Cluster:
    def __init__(self, k: int, workdir: Path):
        self.k = k
        self.name, self.id = f"cluster{k}", 100 + k
        self.etcd = EtcdServer(f"kvm{k}", workdir=workdir / f"etcd{k}").start()
        self.config = self.etcd.client_config(workdir / f"etcd{k}.yaml")
        self.workdir = workdir

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.etcd.proc.pid)

    def store(self):
        """A new client of this cluster's etcd (not connected yet)."""
        from meshagent.plugins.etcd.client import EtcdKVStore
        from meshagent.plugins.etcd.config import load_etcd_config
        return EtcdKVStore(load_etcd_config(self.config))

    def watchers(self) -> int:
        text = urllib.request.urlopen(f"{self.etcd.url}/metrics", timeout=5).read().decode()
        found = re.search(r"^etcd_debugging_mvcc_watcher_total (\S+)$", text, re.M)
        return int(float(found.group(1))) if found else -1


def client_pids(port: int) -> list[int]:
    """The pid holding the client end of each established connection to ``port``."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return [int(m.group(1)) for m in re.finditer(r"pid=(\d+)", out)]


class Mode:
    """One mode's processes: the workers (and KVStoreMesh replicators when cached)."""

    def __init__(self, name: str, clusters: list[Cluster], agents: int, workdir: Path):
        self.name, self.clusters, self.workdir = name, clusters, workdir / name
        self.workers: dict[str, subprocess.Popen] = {}
        self.replicators: dict[str, subprocess.Popen] = {}
        for c in clusters:
            agent_dir = self.workdir / c.name / "agents"
            agent_dir.mkdir(parents=True)
            kvm_dir = self.workdir / c.name / "kvstoremesh"
            kvm_dir.mkdir()
            for other in clusters:
                if other is c:
                    continue
                if name == "direct":
                    other.etcd.client_config(agent_dir / other.name)
                else:  # the file only names the cluster; KVStoreMesh dials it
                    (agent_dir / other.name).write_text("endpoints: []\n")
                    other.etcd.client_config(kvm_dir / other.name)
        self.agents = agents

    def start(self) -> None:
        for c in self.clusters:
            if self.name == "cached":
                log = open(self.workdir / f"kvstoremesh-{c.name}.log", "w")
                self.replicators[c.name] = subprocess.Popen(
                    [MESHAGENT, "kvstoremesh", "--plugins", "etcd", "--cluster-name", c.name,
                     "--cluster-id", str(c.id), "--etcd-config", str(c.config),
                     "--clustermesh-config", str(self.workdir / c.name / "kvstoremesh"),
                     "--kvstoremesh-socket-path", str(self.workdir / f"{c.name}.sock")],
                    stdout=log, stderr=subprocess.STDOUT)
        self.start_workers()

    def start_workers(self) -> None:
        for c in self.clusters:
            self.workers[c.name] = subprocess.Popen(
                [sys.executable, str(HERE), "--worker", "--cluster", c.name, "--cluster-id",
                 str(c.id), "--agents", str(self.agents), "--etcd-config", str(c.config),
                 "--mesh-dir", str(self.workdir / c.name / "agents"),
                 *(["--cached"] if self.name == "cached" else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, command: str, clusters: list[Cluster]) -> float:
        """Send ``command`` to the workers of ``clusters``; seconds until all answered."""
        started = time.monotonic()
        for c in clusters:
            self.workers[c.name].stdin.write(command + "\n")
            self.workers[c.name].stdin.flush()
        for c in clusters:
            answer = self.workers[c.name].stdout.readline()
            if answer.strip() != "ok":
                raise RuntimeError(f"worker of {c.name} answered {answer!r}")
        return time.monotonic() - started

    def connections(self, c: Cluster) -> dict:
        """Connections to ``c``'s etcd: in all, and from other clusters' processes."""
        own = {self.workers[c.name].pid, c.etcd.proc.pid}  # etcd's gateway dials itself
        if c.name in self.replicators:
            own.add(self.replicators[c.name].pid)
        pids = client_pids(c.etcd.client_port)
        return {"total": len(pids), "from_other_clusters": sum(1 for p in pids if p not in own)}

    def stop(self, workers_only: bool = False) -> None:
        for proc in [*self.workers.values(), *([] if workers_only else self.replicators.values())]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_mode(name: str, clusters: list[Cluster], args, workdir: Path) -> dict:
    mode = Mode(name, clusters, args.agents, workdir)
    cpu_before = [c.cpu_seconds() for c in clusters]
    try:
        progress(f"{name}: {len(clusters)} clusters × {args.agents} agents")
        started = time.monotonic()
        mode.start()
        mode.ask("ready", clusters)
        synced = time.monotonic() - started
        cpu_sync = [round(c.cpu_seconds() - b, 2) for c, b in zip(clusters, cpu_before)]
        progress(f"{name}: all synced in {synced:.1f}s")
        time.sleep(3)
        connections = [mode.connections(c) for c in clusters]
        watchers = [c.watchers() for c in clusters]
        # the agents stopped, what is left are the KVStoreMesh replicators' own watchers;
        # then the agents start again and sync before the restart below
        mode.stop(workers_only=True)
        time.sleep(2)
        without_agents = [c.watchers() for c in clusters]
        mode.start_workers()
        mode.ask("ready", clusters)
        cpu_idle_before = [c.cpu_seconds() for c in clusters]
        time.sleep(5)
        cpu_idle = [round(c.cpu_seconds() - b, 2) for c, b in zip(clusters, cpu_idle_before)]
        first, others = clusters[0], clusters[1:]
        first.etcd.stop()
        time.sleep(2)
        first.etcd.start()
        cpu_restart_before = first.cpu_seconds()
        marker = (first.id << 16) + 60000 + (0 if name == "direct" else 1)
        asyncio.run(put(first, kvkeys.identity_key(marker), format_labels(frozenset({
            "k8s:app=marker", f"k8s:io.cilium.k8s.policy.cluster={first.name}",
            "k8s:io.kubernetes.pod.namespace=default"}))))
        resynced = mode.ask(f"has {first.name} {marker}", others)
        cpu_restart = round(first.cpu_seconds() - cpu_restart_before, 2)
        progress(f"{name}: after {first.name}'s etcd restart, all agents had its change in"
                 f" {resynced:.1f}s")
    finally:
        mode.stop()
    return {"seconds_to_all_synced": round(synced, 2),
            "connections_per_etcd": connections, "watchers_per_etcd": watchers,
            "watchers_per_etcd_without_agents": without_agents,
            "agents_watchers_per_etcd": [w - o for w, o in zip(watchers, without_agents)],
            "etcd_cpu_seconds_during_sync": cpu_sync, "etcd_cpu_seconds_idle_5s": cpu_idle,
            "seconds_to_all_synced_after_restart": round(resynced, 2),
            "restarted_etcd_cpu_seconds_until_synced": cpu_restart}


async def put(cluster: Cluster, key: str, value: str) -> None:
    store = cluster.store()
    for _ in range(100):  # the restarted server may take a moment to serve
        try:
            await store.connect()
            await store.put(key, value.encode())
            break
        except Exception:
            await asyncio.sleep(0.05)
    await store.close()


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="ma-bench-kvm-", dir="/tmp"))
    clusters: list[Cluster] = []
    try:
        for k in range(1, args.clusters + 1):
            clusters.append(Cluster(k, workdir))
        entries = args.entries

        async def fill(c: Cluster):
            store = c.store()
            items = remote_cluster_items(entries, max(entries // 10, 1), max(entries // 100, 1),
                                         max(entries // 100, 1), c.name, c.id, 100 + 10 * c.k)
            await populate(store, items)
            await store.put(kvkeys.cluster_config_key(c.name), ClusterConfig(
                c.id, synced_canaries=True, max_connected_clusters=255).to_json())
            await store.close()
            return len(items)
        keys = [asyncio.run(fill(c)) for c in clusters]
        progress(f"{args.clusters} etcds filled with {keys[0]:,} keys each")
        results = {mode: run_mode(mode, clusters, args, workdir) for mode in ("direct", "cached")}
    finally:
        for c in clusters:
            c.etcd.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    d, c = results["direct"], results["cached"]

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2) if b else float("inf")
    other = [x["from_other_clusters"] for x in d["connections_per_etcd"]]
    other_cached = [x["from_other_clusters"] for x in c["connections_per_etcd"]]
    return {
        "machine": machine(), "clusters": args.clusters, "agents_per_cluster": args.agents,
        "entries_per_cluster": args.entries, "keys_per_cluster": keys[0],
        "direct": d, "cached": c,
        # read through the cache, an agent's watches of its own etcd fall by the number of
        # remote clusters: one watch per kind over all of them, not one per kind per cluster
        "goal_agents_watchers_fall": max(c["agents_watchers_per_etcd"]) * (args.clusters - 1)
        <= max(d["agents_watchers_per_etcd"]),
        "direct_over_cached": {
            "connections_from_other_clusters": ratio(max(other), max(other_cached)),
            "connections_total": ratio(max(x["total"] for x in d["connections_per_etcd"]),
                                       max(x["total"] for x in c["connections_per_etcd"])),
            "watchers": ratio(max(d["watchers_per_etcd"]), max(c["watchers_per_etcd"])),
            "agents_watchers": ratio(max(d["agents_watchers_per_etcd"]),
                                     max(c["agents_watchers_per_etcd"])),
            "etcd_cpu_during_sync": ratio(sum(d["etcd_cpu_seconds_during_sync"]),
                                          sum(c["etcd_cpu_seconds_during_sync"])),
            "seconds_to_all_synced": ratio(d["seconds_to_all_synced"],
                                           c["seconds_to_all_synced"]),
            "restarted_etcd_cpu": ratio(d["restarted_etcd_cpu_seconds_until_synced"],
                                        c["restarted_etcd_cpu_seconds_until_synced"]),
            "seconds_after_restart": ratio(d["seconds_to_all_synced_after_restart"],
                                           c["seconds_to_all_synced_after_restart"]),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument("--agents", type=int, default=10, help="simulated agents per cluster")
    parser.add_argument("--entries", type=int, default=2000,
                        help="ipcache entries per cluster (and a tenth as many identities)")
    parser.add_argument("--json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cluster", help=argparse.SUPPRESS)
    parser.add_argument("--cluster-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mesh-dir", help=argparse.SUPPRESS)
    parser.add_argument("--etcd-config", help=argparse.SUPPRESS)
    parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker(args))
        return
    report(run(args), args.json)


if __name__ == "__main__":
    main()
