"""ClusterMesh sync: time from agent start to "remote ready, everything in the BPF maps".

A remote cluster (cluster2) whose etcd holds N ipcache entries, N/10 identities (60,000 at most:
what one cluster's range holds), N/100 nodes and N/100 services; the agent (cluster1, memory kvstore for itself, the eBPF datapath) connects to it.
Reported: seconds to ready (remote listed, datapath reconciled, BPF ipcache filled) and the
agent's peak RSS, at full, 1/10 and 1/100 scale.

    .venv/bin/python bench/clustermesh_sync.py [--entries 100000] [--only] [--json FILE]

``--only`` runs the full size alone, with the datapath: ``--entries 1000000 --only`` is the
million-entry run (filling etcd takes some minutes of it).
"""

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import (
    MESHAGENT,
    BpfFs,
    machine,
    peak_rss_mib,
    populate,
    progress,
    remote_cluster_items,
    report,
)

from meshagent.client import AgentClient
from meshagent.errors import MeshagentError
from meshagent.plugins.ebpf.maps import PinnedMap
from meshagent.plugins.etcd.client import EtcdKVStore
from meshagent.plugins.etcd.config import load_etcd_config
from meshagent_dev.etcd import EtcdServer

IDENTITY_ROOM = 60_000


def run_one(entries: int, workdir: Path, datapath: bool = True) -> dict:
    tag = f"{entries}{'' if datapath else '-nodp'}"
    server = EtcdServer(f"sync{tag}", workdir=workdir / f"etcd{tag}").start()
    bpffs = BpfFs()
    proc = None
    try:
        config = server.client_config(workdir / f"remote{tag}.yaml")
        # a tenth as many identities, but no more than a cluster's range holds (65,280): past
        # that a million entries would name identities cluster2 may not have, rejected
        items = remote_cluster_items(entries, min(max(entries // 10, 1), IDENTITY_ROOM),
                                     max(entries // 100, 1), max(entries // 100, 1))

        async def fill():
            store = EtcdKVStore(load_etcd_config(config))
            await populate(store, items)
            await store.close()
        started = time.monotonic()
        asyncio.run(fill())
        progress(f"  {entries:>7} entries: remote etcd filled with {len(items)} keys in"
                 f" {time.monotonic() - started:.1f}s")
        mesh = workdir / f"mesh{tag}"
        mesh.mkdir()
        (mesh / "cluster2").write_text(config.read_text() + "kvstore: etcd\n")
        sock = workdir / f"agent{tag}.sock"
        started = time.monotonic()
        proc = subprocess.Popen(
            [MESHAGENT, "--plugins", "memory,etcd,ebpf" if datapath else "memory,etcd",
             "--kvstore", "memory",
             "--cluster-name", "cluster1", "--cluster-id", "101", "--clustermesh-config",
             str(mesh), *(["--ebpf-bpf-root", str(bpffs.path),
                           # the default (512,000) holds 100,000s; a million needs more room
                           "--ebpf-ipcache-max", str(max(512_000, 2 * entries))]
                          if datapath else []),
             "--socket-path", str(sock),
             "--state-dir", str(workdir / f"state{tag}")],
            stdout=open(workdir / f"agent{tag}.log", "w"), stderr=subprocess.STDOUT)
        client = AgentClient(sock)
        while True:
            try:
                status = client.get("/status")
                section = next(s for s in status["sections"] if s["name"] == "Datapath")
                mesh_ok = next(s for s in status["sections"] if s["name"] == "ClusterMesh")[
                    "summary"].startswith("1/1")
                if status["ready"] and mesh_ok and (", synced" in section["summary"]
                                                    or not datapath):
                    break
            except (MeshagentError, StopIteration):
                pass
            if proc.poll() is not None:
                raise SystemExit(f"agent died: {(workdir / f'agent{tag}.log').read_text()}")
            time.sleep(0.05)
        ready = time.monotonic() - started
        in_map = len(PinnedMap(bpffs.path / "meshagent", "ipcache")) if datapath else None
        all_in = ready
        # past --datapath-sync-timeout the agent is ready before every entry is in the map:
        # wait for the rest (the agent's own addresses are in the map too)
        while datapath and len(PinnedMap(bpffs.path / "meshagent", "ipcache")) < entries:
            if proc.poll() is not None or time.monotonic() - started > 1800:
                break
            time.sleep(2)  # counting a million keys is a million syscalls
            all_in = time.monotonic() - started
        rss = peak_rss_mib(proc.pid)
        result = {"entries": entries, "keys": len(items), "datapath": datapath,
                  "seconds_to_ready": round(ready, 2), "ipcache_in_bpf": in_map,
                  "seconds_to_all_in_bpf": round(all_in, 2) if datapath else None,
                  "peak_rss_mib": round(rss, 1)}
        progress(f"  {entries:>7} entries{'' if datapath else ' (no datapath)'}: ready in"
                 f" {ready:.2f}s, {in_map} in the BPF ipcache then, all in {all_in:.1f}s,"
                 f" peak RSS {rss:.0f} MiB")
        return result
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        bpffs.close()
        server.cleanup()


def measure(entries: int, only: bool = False) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="ma-bench-sync-", dir="/tmp"))
    try:
        if only:
            runs = [run_one(entries, workdir)]
        else:
            runs = [run_one(n, workdir) for n in (entries // 100, entries // 10, entries)]
            runs.append(run_one(entries, workdir, datapath=False))  # what the datapath costs
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    full = runs[0] if only else runs[2]
    return {"machine": machine(), "runs": runs,
            "goal_seconds_le_5": full["seconds_to_ready"] <= 5,
            "goal_rss_le_200mib": full["peak_rss_mib"] <= 200}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--only", action="store_true",
                        help="the full size alone, with the datapath")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = measure(args.entries, args.only)
    report(result, args.json)


if __name__ == "__main__":
    main()
