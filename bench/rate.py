"""The highest sustained remote update rate, for the agent and for a bare watcher, side by side.

A probe: a fresh etcd (the remote cluster2: its cluster config and one node whose pod CIDR
holds every address written), a fresh subject watching it, and ``--writers`` writer processes
putting, between them, ``rate`` new ipcache entries per second for ``--seconds`` (each put its
own etcd revision, so one watch event per update; each value carries its put time). The probe
passes when the subject received every update within the probe and ``--drain`` seconds after
it, with a p99 put → received latency ≤ ``--p99-ms`` over the updates put after the first
``--warmup`` seconds (a sustained rate, not the subject's first moments). Subjects:

- ``bare``, the watch floor: the etcd plugin's watch of ``cilium/state/ip/v1/`` and
  ``json.loads`` of every value (what the agent must do at least), received once decoded;
- ``agent``: the agent (cluster1, memory kvstore, eBPF datapath) with cluster2 as its remote,
  received once the eBPF datapath has written the entry into the BPF ipcache.

For each subject the rate doubles from ``--start`` until a rate fails, then is bisected until
the highest passing and the lowest failing rate are at most 2 × ``--precision`` apart; a rate
fails when its probe fails ``1 + --retries`` times in a row. Goal: the
agent's highest passing rate ≥ 80% of the bare watcher's.

    .venv/bin/python bench/rate.py [--seconds 10] [--subjects bare,agent] [--json FILE]
"""

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from common import BpfFs, machine, percentile_ms, progress, report

from meshagent.kvstore import keys as kvkeys
from meshagent_dev.etcd import EtcdServer

HERE = Path(__file__).resolve()

# writer ``index`` of ``count`` puts the global updates index, index + count, ... of a stream
# of ``rate`` a second (the whole stream's rate) from the wall-clock time ``start_at`` on
WRITER = r'''
import asyncio, json, sys, time
from meshagent.plugins.etcd.client import EtcdKVStore
from meshagent.plugins.etcd.config import load_etcd_config
config, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
index, count, start_at = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
async def main():
    store = EtcdKVStore(load_etcd_config(config))
    await store.get("cilium/cluster-config/cluster2")  # connected before the start
    await asyncio.sleep(max(0, start_at - time.time()))
    start = time.monotonic(); n = index; written = 0; pending = set()
    while (due := n / rate) < seconds:
        delay = start + due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        ip = f"10.{210 + n // 65536}.{(n // 256) % 256}.{n % 256}"
        value = json.dumps({"IP": ip, "ID": (102 << 16) + 256 + n % 1000, "HostIP": "10.98.0.1",
                            "K8sPodName": f"{time.time():.6f}"}, separators=(",", ":"))
        task = asyncio.ensure_future(store.put(f"cilium/state/ip/v1/default/{ip}",
                                               value.encode()))
        pending.add(task); task.add_done_callback(pending.discard)
        n += count; written += 1
    issued = time.monotonic() - start
    await asyncio.gather(*pending)
    print(written, issued)
asyncio.run(main())
'''

REMOTE = [
    (kvkeys.cluster_config_key("cluster2"), b'{"id":102}'),
    # the node whose pod CIDR (10.208.0.0/12) holds every address written
    (kvkeys.node_key("cluster2", "node1"), json.dumps({
        "Name": "node1", "Cluster": "cluster2", "ClusterID": 102,
        "IPAddresses": [{"Type": "InternalIP", "IP": "10.98.0.1"}],
        "IPv4AllocCIDR": {"IP": "10.208.0.0", "Mask": "//AAAA=="}}).encode()),
]


async def bare(config: Path, workdir: Path, arrivals: list[tuple[float, float]]
               ) -> AsyncIterator[None]:
    """Watch the ipcache prefix from the current revision and decode every value."""
    from meshagent.plugins.etcd.client import EtcdKVStore
    from meshagent.plugins.etcd.config import load_etcd_config
    store = EtcdKVStore(load_etcd_config(config))
    listing = await store.list_prefix(kvkeys.IPCACHE)
    watching = asyncio.Event()

    async def watch():
        events = store.watch(kvkeys.IPCACHE, after_revision=listing.revision)
        watching.set()
        async for event in events:
            put = float(json.loads(event.value)["K8sPodName"])
            arrivals.append((put, time.time()))
    task = asyncio.create_task(watch())
    await watching.wait()
    await asyncio.sleep(0.5)  # the watch stream is open
    try:
        yield
    finally:
        task.cancel()
        await store.close()


async def agent(config: Path, workdir: Path, arrivals: list[tuple[float, float]]
               ) -> AsyncIterator[None]:
    """The agent in this process, timing what its eBPF datapath writes."""
    from common import agent_command, timed_ebpf_apply

    from meshagent.cli import build_agent
    bpffs = BpfFs()
    mesh = workdir / "mesh"
    mesh.mkdir()
    (mesh / "cluster2").write_text(config.read_text() + "kvstore: etcd\n")
    try:
        with timed_ebpf_apply(arrivals):
            daemon = build_agent(agent_command(mesh, workdir / "a.sock", workdir / "state",
                                               bpffs.path)[1:], {})
            task = asyncio.create_task(daemon.run())
            while not daemon.datapath_synced.is_set():
                if task.done():
                    await task
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the remote's watches are open
            try:
                yield
            finally:
                daemon.stop()
                await task
    finally:
        bpffs.close()


SUBJECTS = {"bare": bare, "agent": agent}


async def subject_main(name: str, config: Path, workdir: Path) -> None:
    """A subject process: says ``ready`` once it watches, then reads the number of updates
    written from stdin, waits for them (``drain`` seconds at most) and prints what it saw."""
    arrivals: list[tuple[float, float]] = []  # (put time, arrival time) of each update
    running = SUBJECTS[name](config, workdir, arrivals)
    await anext(running)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    written, drain, counted_from = (float(x) for x in (await loop.run_in_executor(
        None, sys.stdin.readline)).split())
    deadline = time.monotonic() + drain
    while len(arrivals) < written and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    received = sorted(arrived - put for put, arrived in arrivals if put >= counted_from)
    await anext(running, None)
    print(json.dumps({"received": len(arrivals),
                      "p50_ms": percentile_ms(received, 0.5) if received else None,
                      "p99_ms": percentile_ms(received, 0.99) if received else None,
                      "max_ms": round(received[-1] * 1000, 1) if received else None}),
          flush=True)


def probe(name: str, rate: int, args) -> dict:
    """One probe of ``name`` at ``rate`` updates a second, on a fresh etcd."""
    workdir = Path(tempfile.mkdtemp(prefix=f"ma-bench-rate-{name}-", dir="/tmp"))
    server = EtcdServer(f"rate{name}", workdir=workdir / "etcd").start()
    subject = None
    try:
        config = server.client_config(workdir / "remote.yaml")
        for key, value in REMOTE:
            server.etcdctl("put", key, value.decode())
        subject = subprocess.Popen([sys.executable, str(HERE), "--subject", name, "--config",
                                    str(config), "--workdir", str(workdir)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   cwd=HERE.parent)
        if subject.stdout.readline().strip() != "ready":
            raise SystemExit(f"{name} did not start")
        start_at = time.time() + 0.5
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(config), str(rate),
                                     str(args.seconds), str(i), str(args.writers),
                                     str(start_at)], stdout=subprocess.PIPE, text=True)
                   for i in range(args.writers)]
        outputs = [w.communicate()[0].split() for w in writers]
        if any(w.returncode for w in writers):
            raise SystemExit(f"a writer failed at {rate}/s")
        written = sum(int(out[0]) for out in outputs)
        issued = max(float(out[1]) for out in outputs)  # when the last put was issued
        subject.stdin.write(f"{written} {args.drain} {start_at + args.warmup}\n")
        subject.stdin.flush()
        seen = json.loads(subject.stdout.readline())
        subject.wait(30)
    finally:
        if subject is not None and subject.poll() is None:
            subject.kill()
            subject.wait()
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"offered_per_s": rate, "written": written,
              # what the writers reached: below the offered rate, the writers were the bound
              "written_per_s": round(written / max(issued, args.seconds)), **seen,
              "kept_up": seen["received"] >= written}
    result["passed"] = result["kept_up"] and seen["p99_ms"] is not None and (
        seen["p99_ms"] <= args.p99_ms)
    progress(f"  {name} at {rate}/s: wrote {written} ({result['written_per_s']}/s), received"
             f" {seen['received']}, p50 {seen['p50_ms']} ms, p99 {seen['p99_ms']} ms:"
             f" {'pass' if result['passed'] else 'FAIL'}")
    return result


def search(name: str, args) -> dict:
    """Double from ``--start`` until a probe fails, then bisect."""
    probes = []

    def passes(rate: int) -> bool:
        """A probe, repeated ``--retries`` times while it fails: one stall of a shared
        machine is not the subject's bound, a rate it cannot sustain fails every time."""
        for _ in range(1 + args.retries):
            probes.append(probe(name, rate, args))
            if probes[-1]["passed"]:
                return True
        return False
    low, high, rate = 0, None, args.start
    while high is None:
        if passes(rate):
            low = rate
            if rate >= args.ceiling:
                break
            rate = min(2 * rate, args.ceiling)
        else:
            high = rate
    while high is not None and high - low > 2 * args.precision:
        middle = (low + high) // 2 // 50 * 50
        if passes(middle):
            low = middle
        else:
            high = middle
    failing = next((p for p in reversed(probes) if p["offered_per_s"] == high), None)
    return {"sustained_per_s": low, "first_failing_per_s": high,
            "probes": sorted(probes, key=lambda p: p["offered_per_s"]),
            # the writers fell short at the first failing rate: the bound was theirs, not the
            # subject's (or the subject passed every rate up to --ceiling)
            "writer_bound": failing is None or failing["written_per_s"] < 0.95 * failing[
                "offered_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", default="bare,agent")
    parser.add_argument("--seconds", type=float, default=10, help="length of each probe")
    parser.add_argument("--drain", type=float, default=2,
                        help="seconds after a probe for the last updates to arrive")
    parser.add_argument("--warmup", type=float, default=1,
                        help="seconds at the start of a probe whose updates must arrive but"
                             " are not in the latencies")
    parser.add_argument("--writers", type=int, default=2, help="writer processes")
    parser.add_argument("--start", type=int, default=1000, help="the first rate probed")
    parser.add_argument("--ceiling", type=int, default=32000, help="the highest rate probed")
    parser.add_argument("--precision", type=int, default=250, help="± updates/s")
    parser.add_argument("--retries", type=int, default=1,
                        help="times a failing probe is repeated before its rate counts as failed")
    parser.add_argument("--p99-ms", type=float, default=100)
    parser.add_argument("--json")
    parser.add_argument("--subject", choices=SUBJECTS, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subject:
        asyncio.run(subject_main(args.subject, args.config, args.workdir))
        return
    started = time.monotonic()
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "seconds": args.seconds, "drain": args.drain, "warmup": args.warmup,
              "writers": args.writers,
              "p99_ms_goal": args.p99_ms, "precision_per_s": args.precision,
              "retries": args.retries}
    for name in args.subjects.split(","):
        progress(f"{name}: from {args.start}/s")
        result[name] = search(name, args)
    if "bare" in result and "agent" in result and result["bare"]["sustained_per_s"]:
        ratio = result["agent"]["sustained_per_s"] / result["bare"]["sustained_per_s"]
        result["agent_over_bare"] = round(ratio, 2)
        result["goal_agent_ge_80pct_of_bare"] = ratio >= 0.8
    result["wall_seconds"] = round(time.monotonic() - started)
    report(result, args.json)


if __name__ == "__main__":
    main()
