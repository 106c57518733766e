"""Shared pieces of the benchmarks: a populated remote etcd, an agent process, measurements."""

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
