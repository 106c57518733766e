"""Propagation: remote ipcache puts at a steady rate → latency until the local BPF map has them.

A writer process puts `--rate` ipcache entries per second into the remote cluster's etcd for
`--seconds`, each carrying its put time; the agent (in this process, eBPF datapath) records when
each entry was written into the BPF ipcache. Reports p50, p99, max and whether it kept up.

    .venv/bin/python bench/propagation.py [--rate 1000] [--seconds 30] [--json FILE]
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
    machine,
    percentile_ms,
    progress,
    report,
    timed_ebpf_apply,
)

from meshagent.cli import build_agent
from meshagent_dev.etcd import EtcdServer

WRITER = r'''
import asyncio, json, sys, time
from meshagent.plugins.etcd.client import EtcdKVStore
from meshagent.plugins.etcd.config import load_etcd_config
config, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
async def main():
    store = EtcdKVStore(load_etcd_config(config))
    await store.put("cilium/cluster-config/cluster2", b'{"id": 102}')
    # the node whose pod CIDR (10.208.0.0/12) holds every address written below
    await store.put("cilium/state/nodes/v1/cluster2/node1", json.dumps({
        "Name": "node1", "Cluster": "cluster2", "ClusterID": 102,
        "IPAddresses": [{"Type": "InternalIP", "IP": "10.98.0.1"}],
        "IPv4AllocCIDR": {"IP": "10.208.0.0", "Mask": "//AAAA=="}}).encode())
    start = time.monotonic(); n = 0; pending = set()
    while time.monotonic() - start < seconds:
        due = start + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        ip = f"10.{210 + n // 65536}.{(n // 256) % 256}.{n % 256}"
        value = json.dumps({"IP": ip, "ID": (102 << 16) + 256 + n % 1000,
                            "K8sPodName": f"{time.time():.6f}"}).encode()
        task = asyncio.ensure_future(store.put(f"cilium/state/ip/v1/cluster2/{ip}", value))
        pending.add(task); task.add_done_callback(pending.discard)
        n += 1
    await asyncio.gather(*pending)
    print(n)
asyncio.run(main())
'''


async def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="ma-bench-prop-", dir="/tmp"))
    server = EtcdServer("prop", workdir=workdir / "etcd").start()
    bpffs = BpfFs()
    arrivals: list[tuple[float, float]] = []  # (put time, written into the BPF map)
    with timed_ebpf_apply(arrivals):
        try:
            config = server.client_config(workdir / "remote.yaml")
            mesh = workdir / "mesh"
            mesh.mkdir()
            (mesh / "cluster2").write_text(config.read_text() + "kvstore: etcd\n")
            # the remote's config first, so the agent is ready before the stream starts
            subprocess.run([sys.executable, "-c", WRITER, str(config), "1", "0"], check=True,
                           capture_output=True)
            agent = build_agent(agent_command(mesh, workdir / "a.sock", workdir / "state",
                                              bpffs.path)[1:], {})
            task = asyncio.create_task(agent.run())
            while not agent.datapath_synced.is_set():
                await asyncio.sleep(0.05)
            progress(f"agent synced; writing {args.rate}/s for {args.seconds}s")
            writer = await asyncio.create_subprocess_exec(
                sys.executable, "-c", WRITER, str(config), str(args.rate), str(args.seconds),
                stdout=asyncio.subprocess.PIPE)
            last = 0
            while writer.returncode is None:
                try:
                    await asyncio.wait_for(writer.wait(), 5)
                except asyncio.TimeoutError:
                    progress(f"  {len(arrivals)} updates applied so far (+{len(arrivals) - last})")
                    last = len(arrivals)
            written = int((await writer.stdout.read()).decode().split()[-1])
            deadline = time.monotonic() + 10
            while len(arrivals) < written and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            agent.stop()
            await task
        finally:
            bpffs.close()
            server.cleanup()
            shutil.rmtree(workdir, ignore_errors=True)
    ordered = sorted(arrived - put for put, arrived in arrivals)
    p99 = percentile_ms(ordered, 0.99)
    result = {"machine": machine(), "rate_per_s": args.rate, "seconds": args.seconds,
              "written": written, "applied": len(arrivals),
              "p50_ms": percentile_ms(ordered, 0.50), "p99_ms": p99,
              "max_ms": round(max(ordered) * 1000, 1),
              "mean_ms": round(statistics.mean(ordered) * 1000, 1),
              "kept_up": len(arrivals) >= written and p99 < 1000,
              "goal_p99_le_100ms": p99 <= 100}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    report(result, args.json)


if __name__ == "__main__":
    main()
