"""ClusterMesh sync beside its floors: agent start to "remote ready, everything in the BPF maps".

A remote cluster (cluster2) whose etcd holds N ipcache entries, N/10 identities (60,000 at most:
what one cluster's range holds), N/100 nodes and N/100 services; the agent (cluster1, memory
kvstore for itself, the eBPF datapath) connects to it. Measured in one run:

- the start-up floor: the same agent, its remote holding no entries (only its cluster config
  and sync canaries), start to ready; the median of ``--startup-runs``, the first run (a cold
  program cache, if the agent keeps one) apart, and from the agent's log what start-up spent
  its time on;
- for each size, on the same etcd data: the read floor (``list_pages`` and the decode of every
  value, no agent: bench/common.py ``read_floor``), then the agent's seconds to ready and to
  every entry in the BPF ipcache, and its peak RSS. Goal: seconds to all in the BPF ipcache
  ≤ 2 × read floor + start-up floor.

At full, 1/10 and 1/100 scale, and at full scale without a datapath (the control):

    .venv/bin/python bench/clustermesh_sync.py [--entries 100000] [--only] [--json FILE]

``--only`` runs the full size alone, with the datapath: ``--entries 1000000 --only`` is the
million-entry run of ``make bench-scale``.
"""

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BpfFs,
    agent_command,
    log_timeline,
    machine,
    peak_rss_mib,
    progress,
    read_floor,
    remote_cluster_items,
    report,
    wait_agent_ready,
)

from meshagent.kvstore import keys as kvkeys
from meshagent.plugins.ebpf.maps import PinnedMap
from meshagent.plugins.etcd.client import EtcdKVStore
from meshagent.plugins.etcd.config import load_etcd_config
from meshagent_dev.etcd import EtcdServer

IDENTITY_ROOM = 60_000
FILL_SLICE = 127 * 64  # keys written side by side: 64 Txns of put_many


def fill(entries: int, workdir: Path, tag: str) -> tuple[EtcdServer, Path, int]:
    """A remote etcd holding ``entries`` ipcache entries and their share of the rest; its
    client file and its number of keys. The sync canaries go in last."""
    server = EtcdServer(f"sync{tag}", workdir=workdir / f"etcd{tag}").start()
    config = server.client_config(workdir / f"remote{tag}.yaml")
    # a tenth as many identities, but no more than a cluster's range holds (65,280): past
    # that a million entries would name identities cluster2 may not have, rejected
    items = [(key, value.encode()) for key, value in remote_cluster_items(
        entries, min(entries // 10, IDENTITY_ROOM) if entries else 0, entries // 100,
        entries // 100)]
    canaries = [item for item in items if item[0].startswith(kvkeys.SYNCED)]
    rest = [item for item in items if not item[0].startswith(kvkeys.SYNCED)]

    async def put_all():
        store = EtcdKVStore(load_etcd_config(config))
        for i in range(0, len(rest), FILL_SLICE):
            await store.put_many(rest[i:i + FILL_SLICE])
        await store.put_many(canaries)
        await store.close()
    started = time.monotonic()
    asyncio.run(put_all())
    progress(f"  {entries:>7} entries: remote etcd filled with {len(items)} keys in"
             f" {time.monotonic() - started:.1f}s")
    return server, config, len(items)


def start_agent(config: Path, workdir: Path, tag: str, bpffs: Path | None,
                ipcache_max: int = 512_000) -> tuple[subprocess.Popen, Path, Path, float]:
    """The agent with ``config`` as its one remote: the process, its socket, its log and the
    wall-clock time it was started. Every agent of a run has the same state dir, one after
    the other, as an agent restarting on its node has: what it keeps there (a program cache,
    say) is warm after the first run."""
    mesh = workdir / f"mesh{tag}"
    mesh.mkdir()
    (mesh / "cluster2").write_text(config.read_text() + "kvstore: etcd\n")
    sock, log = workdir / f"agent{tag}.sock", workdir / f"agent{tag}.log"
    spawned = time.time()
    proc = subprocess.Popen(agent_command(mesh, sock, workdir / "state", bpffs,
                                          ipcache_max),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, sock, log, spawned


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM, and SIGKILL if the agent has not exited a minute later (with a million
    entries it once took more than ten seconds)."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def import_seconds(runs: int = 3) -> float:
    """A fresh interpreter importing the agent's command line module (what every start pays
    before its own work), the median of ``runs``."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "import meshagent.cli"], check=True)
        times.append(time.monotonic() - started)
    return round(statistics.median(times), 3)


def startup_floor(workdir: Path, runs: int) -> dict:
    """The agent's own time to ready with no remote entries: the median of the runs after the
    first, and the first apart. Each run: a fresh bpffs, the same remote etcd holding only its
    cluster config and sync canaries."""
    server, config, _ = fill(0, workdir, "empty")
    try:
        each, phases = [], []
        for n in range(runs):
            bpffs, proc = BpfFs(), None
            try:
                spawned_mono = time.monotonic()
                proc, sock, log, spawned = start_agent(config, workdir, f"empty{n}", bpffs.path)
                ready = wait_agent_ready(proc, sock, True, log) - spawned_mono
                each.append(ready)
                timeline = [(round(t - spawned, 3), msg) for t, msg in log_timeline(log)]
                phases.append({name: next(t for t, msg in timeline if msg.startswith(start))
                               for name, start in (("started", "agent started"),
                                                   ("ready", "agent ready"))
                               if any(msg.startswith(start) for _, msg in timeline)})
            finally:
                stop(proc)
                bpffs.close()
        warm = each[1:] or each
        result = {"seconds": round(statistics.median(warm), 3),
                  "first_run_seconds": round(each[0], 3), "each": [round(t, 2) for t in each],
                  "runs": runs, "import_meshagent_cli_seconds": import_seconds(),
                  # from the agent's log, the median over the runs after the first: process
                  # start to "agent started" (imports, plugins, options) and to "agent ready"
                  "log_seconds_to": {name: round(statistics.median(
                      p[name] for p in phases[1:] or phases if name in p), 3)
                      for name in ("started", "ready") if any(name in p for p in phases)},
                  # the last run's log until ready, in seconds since its process started
                  "last_log": [[0.0, "(the process started)"], *(
                      [t, msg] for t, msg in timeline
                      if t <= phases[-1].get("ready", float("inf")))]}
        progress(f"  start-up floor: {result['seconds']}s (first run {result['first_run_seconds']}s,"
                 f" each {result['each']}), importing meshagent.cli"
                 f" {result['import_meshagent_cli_seconds']}s, log {result['log_seconds_to']}")
        return result
    finally:
        server.cleanup()


def run_one(entries: int, workdir: Path, datapath: bool = True, floor_runs: int = 3) -> dict:
    """One size: its read floor, then the agent's sync of the same data."""
    tag = f"{entries}{'' if datapath else '-nodp'}"
    server, config, keys = fill(entries, workdir, tag)
    bpffs = BpfFs() if datapath else None
    proc = None
    try:
        floor = read_floor(config, floor_runs)
        progress(f"  {entries:>7} entries: read floor {floor['seconds']}s (each {floor['each']},"
                 f" {floor['keys']} keys)")
        started = time.monotonic()
        proc, sock, log, _ = start_agent(config, workdir, tag, bpffs and bpffs.path,
                                         max(512_000, 2 * entries))
        ready = wait_agent_ready(proc, sock, datapath, log) - started
        ipcache = PinnedMap(bpffs.path / "meshagent", "ipcache") if datapath else None
        in_map = len(ipcache) if datapath else None
        all_in = ready
        # past --datapath-sync-timeout the agent is ready before every entry is in the map:
        # wait for the rest (the agent's own addresses are in the map too)
        count = in_map
        while datapath and count < entries:
            if proc.poll() is not None or time.monotonic() - started > 1800:
                break
            all_in = time.monotonic() - started
            count = len(ipcache)  # walks every key of the map, one syscall each
        rss = peak_rss_mib(proc.pid)
        result = {"entries": entries, "keys": keys, "datapath": datapath,
                  "read_floor_s": floor["seconds"], "read_floor_each_s": floor["each"],
                  "seconds_to_ready": round(ready, 2), "ipcache_in_bpf": in_map,
                  "seconds_to_all_in_bpf": round(all_in, 2) if datapath else None,
                  "peak_rss_mib": round(rss, 1),
                  "kib_per_entry": round(rss * 1024 / entries, 2) if entries else None}
        progress(f"  {entries:>7} entries{'' if datapath else ' (no datapath)'}: ready in"
                 f" {ready:.2f}s, {in_map} in the BPF ipcache then, all in {all_in:.1f}s,"
                 f" peak RSS {rss:.0f} MiB")
        return result
    finally:
        stop(proc)
        if bpffs is not None:
            bpffs.close()
        server.cleanup()


def with_goal(run: dict, startup: float) -> dict:
    """A datapath run against its budget: 2 × its read floor + the start-up floor."""
    budget = 2 * run["read_floor_s"] + startup
    return run | {"budget_s": round(budget, 3),
                  "over_budget": round(run["seconds_to_all_in_bpf"] / budget, 2),
                  "beyond_startup_over_read_floor": round(
                      (run["seconds_to_all_in_bpf"] - startup) / run["read_floor_s"], 2),
                  "goal_within_budget": run["seconds_to_all_in_bpf"] <= budget}


def measure(entries: int, only: bool = False, startup_runs: int = 5) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="ma-bench-sync-", dir="/tmp"))
    try:
        startup = startup_floor(workdir, startup_runs)
        if only:
            runs = [run_one(entries, workdir)]
        else:
            runs = [run_one(n, workdir) for n in (entries // 100, entries // 10, entries)]
            runs.append(run_one(entries, workdir, datapath=False))  # what the datapath costs
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    runs = [with_goal(r, startup["seconds"]) if r["datapath"] else r for r in runs]
    full = runs[0] if only else runs[2]
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "startup_floor": startup, "runs": runs, "full": full,
            "goal_startup_le_1s": startup["seconds"] <= 1,
            "goal_within_budget": full["goal_within_budget"],
            "goal_rss_le_512mib": full["peak_rss_mib"] <= 512}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--only", action="store_true",
                        help="the full size alone, with the datapath")
    parser.add_argument("--startup-runs", type=int, default=5,
                        help="agent starts for the start-up floor (the first counted apart)")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = measure(args.entries, args.only, args.startup_runs)
    report(result, args.json)


if __name__ == "__main__":
    main()
