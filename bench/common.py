"""Shared pieces of the benchmarks: a populated remote etcd, an agent process, measurements."""

import asyncio
import calendar
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meshagent.client import AgentClient
from meshagent.errors import MeshagentError
from meshagent.kvstore import keys as kvkeys
from meshagent.model.identity import format_labels

MESHAGENT = str(Path(sys.executable).with_name("meshagent"))
C2 = 102 << 16


def machine() -> str:
    return (f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()},"
            f" Linux {platform.release()}, Python {platform.python_version()}")


def report(result: dict, json_path: str | None, text: str | None = None) -> None:
    """Print a benchmark's result (as JSON unless ``text`` is given) and write it to ``--json``
    when asked: ``bench/run.py`` reads those files."""
    print(text if text is not None else json.dumps(result, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


def percentile_ms(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted durations in seconds, in milliseconds (0.1 ms)."""
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


async def populate(store, items: list[tuple[str, str]], concurrency: int = 256) -> None:
    """Write many keys with bounded concurrency."""
    import asyncio
    queue = iter(items)

    async def worker():
        for key, value in queue:
            await store.put(key, value.encode())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def remote_cluster_items(ipcache: int, identities: int, nodes: int, services: int,
                         cluster: str = "cluster2", cluster_id: int = 102, net: int = 200):
    """A cluster's keys (cluster2's unless told): node i owns 10.<net + i // 256>.<i % 256>.0/24,
    and its pods (ipcache entries, 100 a node at most) sit there, as a remote cluster's must."""
    items = [(kvkeys.cluster_config_key(cluster), json.dumps({"id": cluster_id}))]
    nodes = max(nodes, -(-ipcache // 100))
    base = cluster_id << 16

    def pod_net(i: int) -> str:
        return f"10.{net + i // 256}.{i % 256}"
    for i in range(nodes):
        items.append((kvkeys.node_key(cluster, f"node{i}"), json.dumps(
            {"Name": f"node{i}", "Cluster": cluster, "ClusterID": cluster_id,
             "IPAddresses": [{"Type": "InternalIP",
                              "IP": f"10.{net - 102}.{i // 250}.{i % 250 + 1}"}],
             "IPv4AllocCIDR": {"IP": f"{pod_net(i)}.0", "Mask": "////AA=="}},
            separators=(",", ":"))))
    for i in range(identities):
        labels = frozenset({f"k8s:app=app{i}", "k8s:io.kubernetes.pod.namespace=default",
                            f"k8s:io.cilium.k8s.policy.cluster={cluster}"})
        items.append((kvkeys.identity_key(base + 256 + i), format_labels(labels)))
    for i in range(ipcache):
        ip = f"{pod_net(i // 100)}.{i % 100 + 1}"
        items.append((kvkeys.ipcache_key(ip), json.dumps(
            {"IP": ip, "ID": base + 256 + (i % max(identities, 1)),
             "HostIP": f"10.{net - 102}.0.1"}, separators=(",", ":"))))
    for i in range(services):
        items.append((kvkeys.service_key(cluster, "default", f"svc{i}"), json.dumps(
            {"cluster": cluster, "namespace": "default", "name": f"svc{i}",
             "frontends": {"10.97.0.1": {"p": {"Protocol": "TCP", "Port": 1000 + i}}},
             "backends": {}, "includeExternal": True, "shared": True, "clusterID": cluster_id},
            separators=(",", ":"))))
    # the sync canaries, last, as a writer puts them once its stores are written
    items += [(kvkeys.synced_key(cluster, store), kvkeys.rfc3339_now().decode())
              for store in kvkeys.STORES]
    return items


class BpfFs:
    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="ma-bench-bpf-", dir="/tmp"))
        subprocess.run(["mount", "-t", "bpf", "bpf", str(self.path)], check=True)

    def close(self):
        subprocess.run(["umount", "-l", str(self.path)], check=False)
        with contextlib.suppress(OSError):
            self.path.rmdir()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def agent_command(mesh: Path, sock: Path, state: Path, bpffs: Path | None,
                  ipcache_max: int = 512_000) -> list[str]:
    """The agent of every benchmark (those running it in-process drop the executable):
    cluster1 on the memory kvstore, the eBPF datapath (unless ``bpffs`` is None), remote
    clusters from ``mesh``; JSON log lines, whose times say what start-up spent its time on."""
    return [MESHAGENT, "--plugins", "memory,etcd,ebpf" if bpffs else "memory,etcd",
            "--kvstore", "memory", "--cluster-name", "cluster1", "--cluster-id", "101",
            "--clustermesh-config", str(mesh),
            *(["--ebpf-bpf-root", str(bpffs), "--ebpf-ipcache-max", str(ipcache_max)]
              if bpffs else []),
            "--socket-path", str(sock), "--state-dir", str(state), "--log-format", "json"]


def wait_agent_ready(proc: subprocess.Popen, sock: Path, datapath: bool, log: Path,
                     remotes: int = 1, timeout: float = 1800) -> float:
    """Poll ``/status`` until the agent is ready, its ``remotes`` remote clusters are ready and
    (with a datapath) the datapath has synced; the monotonic time it first said so."""
    client = AgentClient(sock)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = client.get("/status")
            sections = {s["name"]: s["summary"] for s in status["sections"]}
            if (status["ready"] and sections["ClusterMesh"].startswith(f"{remotes}/{remotes}")
                    and (not datapath or ", synced" in sections["Datapath"])):
                return time.monotonic()
        except (MeshagentError, KeyError):
            pass
        if proc.poll() is not None:
            raise SystemExit(f"agent died: {log.read_text()[-4000:]}")
        time.sleep(0.02)
    raise SystemExit(f"agent not ready in {timeout:.0f}s: {log.read_text()[-4000:]}")


def log_timeline(log: Path) -> list[tuple[float, str]]:
    """The wall-clock time and message of each JSON log line, in order."""
    timeline = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        whole, _, ms = entry["time"].rstrip("Z").partition(".")
        timeline.append((calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
                         + int(ms or 0) / 1000, entry["msg"]))
    return timeline


# what the agent reads of a remote cluster, by prefix: one task each, as the agent reads its
# kinds; every value decoded as the agent must (JSON, or an identity's label list)
READ_PREFIXES = (kvkeys.CLUSTER_CONFIG, kvkeys.SYNCED, kvkeys.NODES, kvkeys.IDENTITIES,
                 kvkeys.IPCACHE, kvkeys.SERVICES)


async def read_once(store, prefix: str) -> int:
    """List ``prefix`` in pages and decode every value; the number of keys read."""
    count = 0
    labels = prefix == kvkeys.IDENTITIES
    timestamps = prefix == kvkeys.SYNCED
    async for page in store.list_pages(prefix):
        for at, item in enumerate(page.items, 1):
            if not at % 2_000:
                await asyncio.sleep(0)  # as the agent does: the store reads the next page ahead
            if labels:
                item.value.decode().split(";")
            elif timestamps:
                item.value.decode()
            else:
                json.loads(item.value)
        count += len(page.items)
    return count


def read_floor(config: Path, runs: int = 3) -> dict:
    """The read floor: a bare Python reader (the etcd plugin's ``list_pages`` and the decode of
    every value, no agent) over what the agent reads of a remote; the median of ``runs``, each
    on a client already connected (connecting is part of the start-up floor)."""
    from meshagent.plugins.etcd.client import EtcdKVStore
    from meshagent.plugins.etcd.config import load_etcd_config

    async def once() -> tuple[float, int]:
        store = EtcdKVStore(load_etcd_config(config))
        await store.get(kvkeys.cluster_config_key("cluster2"))  # connected, as the agent is
        try:
            started = time.perf_counter()
            counts = await asyncio.gather(*(read_once(store, p) for p in READ_PREFIXES))
            return time.perf_counter() - started, sum(counts)
        finally:
            await store.close()
    timings = [asyncio.run(once()) for _ in range(runs)]
    return {"seconds": round(statistics.median(t for t, _ in timings), 3),
            "each": [round(t, 3) for t, _ in timings], "keys": timings[0][1]}


@contextlib.contextmanager
def timed_ebpf_apply(arrivals: list[tuple[float, float]]):
    """Record, for every ipcache upsert the eBPF datapath writes, the put time its writer
    stored in the entry's pod name (``bench/rate.py``'s writer does) and the time it was
    written into the BPF map."""
    from meshagent.plugins.ebpf.datapath import EbpfDatapath
    real_apply = EbpfDatapath.apply

    async def timed_apply(self, batch):
        await real_apply(self, batch)
        now = time.time()
        for entry in batch.ipcache_upserts:
            if entry.pod_name:
                arrivals.append((float(entry.pod_name), now))

    EbpfDatapath.apply = timed_apply
    try:
        yield
    finally:
        EbpfDatapath.apply = real_apply
