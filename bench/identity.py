"""Identity allocation: 3 agents of one cluster allocating the same label sets at once.

    .venv/bin/python bench/identity.py [--labels 1000] [--agents 3] [--json FILE]

Every agent allocates every label set concurrently (the race the allocator must win); reports
allocations per second over all agents, latency p50/p99, and that they agreed.
"""

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from common import machine, percentile_ms, progress, report

from meshagent.cli import build_agent
from meshagent_dev.etcd import EtcdServer


async def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="ma-bench-ids-", dir="/tmp"))
    server = EtcdServer("ids", workdir=workdir / "etcd").start()
    agents, tasks = [], []
    try:
        config = server.client_config(workdir / "etcd.yaml")
        for n in range(args.agents):
            agent = build_agent(["--plugins", "etcd", "--etcd-config", str(config),
                                 "--cluster-name", "cluster1", "--cluster-id", "101",
                                 "--node-name", f"node{n}", "--socket-path",
                                 str(workdir / f"a{n}.sock"), "--state-dir",
                                 str(workdir / f"s{n}")], {})
            agents.append(agent)
            tasks.append(asyncio.create_task(agent.run()))
        while not all(a.ready for a in agents):
            await asyncio.sleep(0.05)
        sets = [frozenset({f"k8s:app=bench{i}", "k8s:io.kubernetes.pod.namespace=default",
                           "k8s:io.cilium.k8s.policy.cluster=cluster1"})
                for i in range(args.labels)]
        latencies = []

        async def timed(allocator, labels):
            start = time.perf_counter()
            identity = await allocator.allocate(labels)
            latencies.append(time.perf_counter() - start)
            return identity.id

        progress(f"{args.agents} agents allocating {args.labels} label sets each, concurrently")
        started = time.perf_counter()
        results = await asyncio.gather(*(asyncio.gather(*(
            timed(a.identity_allocator, s) for s in sets)) for a in agents))
        took = time.perf_counter() - started
        agreed = all(r == results[0] for r in results) and len(set(results[0])) == args.labels
    finally:
        for agent in agents:
            agent.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.cleanup()
    ordered = sorted(latencies)
    return {"machine": machine(), "agents": args.agents, "label_sets": args.labels,
            "allocations": len(latencies), "seconds": round(took, 2),
            "allocations_per_s": round(len(latencies) / took, 1),
            "p50_ms": percentile_ms(ordered, 0.50), "p99_ms": percentile_ms(ordered, 0.99),
            "all_agents_agree_and_ids_distinct": agreed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    report(result, args.json)


if __name__ == "__main__":
    main()
