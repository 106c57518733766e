"""The agent's CPU time per flow event of the eBPF datapath: reading the perf buffers, decoding
each record and handing a FlowEvent to the sink (a hub with one counting subscriber).

The eBPF plugin's programs are compiled and pinned on a private bpffs (attached nowhere); a
child process runs ``from_container`` with BPF_PROG_TEST_RUN on a frame whose source is not
the endpoint's (a drop event per run), ``--burst`` runs at a time (8: the events of one new
TCP connection), at ``--rate`` events per second. The agent's process (an asyncio loop, as in
the agent) counts what arrives; its CPU time (getrusage, the child excluded) over the events
is the figure.

    .venv/bin/python bench/ebpf_events.py [--events 200000] [--rate 40000] [--burst 8]

Needs root.
"""

import argparse
import asyncio
import ctypes as ct
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

ENDPOINT_IP = "10.200.0.1"


def generate(pin_dir: str, events: int, rate: float, burst: int) -> None:
    """The child: ``events`` program runs, ``burst`` at a time, paced to ``rate``."""
    from meshagent.plugins.ebpf.testrun import ProgramRunner
    from meshagent.testing.packets import TCP, Packet
    runner = ProgramRunner(Path(pin_dir))
    frame = Packet("10.200.9.9", "10.200.0.2", TCP, 40000, 80).frame()
    start = time.perf_counter()
    for n in range(0, events, burst):
        for _ in range(min(burst, events - n)):
            runner.run("from_container", frame)
        ahead = start + (n + burst) / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    runner.close()


async def measure(args, bpffs: Path) -> dict:
    from meshagent.datapath.events import FlowEvents
    from meshagent.plugins.ebpf.datapath import EbpfDatapath, EbpfSettings
    from meshagent.plugins.ebpf.maps import EndpointInfo
    from meshagent.plugins.ebpf.testrun import LOOPBACK_IFINDEX, NoAttacher
    sink = FlowEvents()
    received = [0]

    def count(_event) -> None:
        received[0] += 1
    sink.subscribe(count)
    settings = EbpfSettings(bpffs, ipcache_max=1024, policy_max=1024, ct_tcp_max=1024,
                            ct_any_max=1024)
    if args.wakeup is not None:
        settings = attrs.evolve(settings, event_wakeup=args.wakeup)
    datapath = EbpfDatapath(settings,
                            sink, attacher=NoAttacher())
    await datapath.start()
    info = EndpointInfo(endpoint_id=1, identity=1000, ifindex=LOOPBACK_IFINDEX)
    info.ipv4[:] = bytes(int(part) for part in ENDPOINT_IP.split("."))
    datapath.maps["endpoints"].put(ct.c_uint32(LOOPBACK_IFINDEX), info)
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--generate", str(datapath.pin_dir), "--events",
        str(args.events), "--rate", str(args.rate), "--burst", str(args.burst))
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await child.wait()
    deadline = time.perf_counter() + 5
    while received[0] + sink.lost_total < args.events and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    await datapath.stop()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wakeup": getattr(settings, "event_wakeup", 1), "events": args.events, "received": received[0], "lost": sink.lost_total,
            "seconds": round(elapsed, 2), "agent_cpu_s": round(cpu, 3),
            "us_per_event": round(cpu / max(1, received[0]) * 1e6, 2),
            "voluntary_switches": after.ru_nvcsw - before.ru_nvcsw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200000)
    parser.add_argument("--rate", type=float, default=40000, help="events per second")
    parser.add_argument("--burst", type=int, default=8, help="program runs back to back")
    parser.add_argument("--wakeup", type=int, default=None,
                        help="records in a ring that wake the agent (default: the plugin's)")
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.events, args.rate, args.burst)
        return
    tmp = Path(tempfile.mkdtemp(prefix="ma-evbench-", dir="/tmp"))
    bpffs = tmp / "bpffs"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    try:
        print(asyncio.run(measure(args, bpffs)))
    finally:
        subprocess.run(["umount", "-l", str(bpffs)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
