"""The cost of a lookup through the DNS proxy: lookups per second and latency, through the
proxy and straight to the same server, side by side in one run.

    .venv/bin/python bench/dnsproxy.py [--seconds 5] [--concurrency 1,16] [--json FILE]

The network is meshagent_dev.dnsnet's (a pod namespace whose UDP port 53 nftables TPROXYs to
the proxy, as the datapaths do); the server is dnsmasq in its own namespace, on port 53 and,
for the straight path, on port 5353, which nothing redirects. The proxy runs in this process
with the agent's name manager: every answer is checked against a ``rules: dns`` pattern,
its name matched against a ``toFQDNs`` selector and its address given an fqdn identity and
an ipcache entry, as in the agent; there is no datapath, so the wait for one to apply the
entry is not in the figures (docs/dns.md gives the datapaths' own update cost). The client
(Python, in the pod namespace) keeps ``concurrency`` questions in flight, each a new name
(no answer is cached anywhere), for ``--seconds``; its own cost is in both paths alike.
The CPU time this process (the proxy alone) spends per answered lookup is reported beside:
it holds on a busy machine where the rates do not. Needs root.
"""

import argparse
import asyncio
import ipaddress
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, percentile_ms, progress, report

CLIENT = r"""
import asyncio, json, os, socket, struct, sys, time
server, port = sys.argv[1], int(sys.argv[2])
concurrency, seconds = int(sys.argv[3]), float(sys.argv[4])

def query(qid, name):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)

async def worker(n, latencies, errors, stop):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((server, port))
    i = 0
    while time.monotonic() < stop:
        i += 1
        qid = (n * 7919 + i) & 0xFFFF
        started = time.monotonic()
        await loop.sock_sendall(sock, query(qid, f"w{n}-{i}.example.com"))
        try:
            while True:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 2.0)
                if struct.unpack("!H", data[:2])[0] == qid:
                    break
            if data[3] & 0x0F:
                errors.append(data[3] & 0x0F)
            else:
                latencies.append(time.monotonic() - started)
        except asyncio.TimeoutError:
            errors.append("timeout")
    sock.close()

async def main():
    latencies, errors = [], []
    started = time.monotonic()
    stop = started + seconds
    await asyncio.gather(*(worker(n, latencies, errors, stop) for n in range(concurrency)))
    print(json.dumps({"seconds": time.monotonic() - started, "latencies": latencies,
                      "errors": [str(e) for e in errors]}))

asyncio.run(main())
"""


def dnsmasq(ns: str, port: int, pid_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--no-resolv",
         "--no-hosts", f"--port={port}", "--listen-address=192.0.2.53", "--bind-interfaces",
         "--address=/example.com/203.0.113.10", "--local-ttl=30", "--cache-size=0",
         f"--pid-file={pid_file}", "--user=root", "--dns-forward-max=1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def run_client(pod: str, port: int, concurrency: int, seconds: float) -> dict:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", pod, sys.executable, "-c", CLIENT, "192.0.2.53", str(port),
        str(concurrency), str(seconds), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    raw = json.loads(out)
    ordered = sorted(raw["latencies"])
    return {"lookups_per_s": round(len(ordered) / raw["seconds"]),
            "p50_ms": percentile_ms(ordered, 0.5) if ordered else None,
            "p99_ms": percentile_ms(ordered, 0.99) if ordered else None,
            "answered": len(ordered), "errors": len(raw["errors"])}


async def measure(args) -> dict:
    from meshagent_dev import dnsnet

    from meshagent.events import ChangeKind
    from meshagent.fqdn.contract import DNSRule, FQDNSelector
    from meshagent.fqdn.manager import FQDN, FQDNOptions
    from meshagent.fqdn.proxy import ProxyOptions
    from meshagent.model.endpoint import Endpoint
    from meshagent.model.ipcache import IPCache
    from meshagent.model.table import Table, Tables

    class Rules:
        revision = 1

        def dns_rules(self, endpoint_id):
            return (DNSRule(53, "ANY", None, (FQDNSelector(match_pattern="*.example.com"),)),)

        def fqdn_selectors(self):
            return frozenset({FQDNSelector(match_pattern="*.example.com")})

    port = dnsnet.free_port()
    runs = []
    with dnsnet.dns_network(port) as (_host, pod, server), \
            tempfile.TemporaryDirectory() as tmp:
        servers = [dnsmasq(server, p, Path(tmp) / f"dnsmasq{p}.pid") for p in (53, 5353)]
        tables = Tables(nodes=Table("node", lambda *a: None),
                        identities=Table("identity", lambda *a: None),
                        ipcache=IPCache("bench", notify_many=lambda batch: None),
                        services=Table("service", lambda *a: None))

        async def applied():
            pass
        fqdn = FQDN("bench", tables, Rules(), FQDNOptions(ProxyOptions(port=port)), Path(tmp),
                    datapath_applied=applied, set_proxy_port=lambda p: None,
                    publish=lambda record: None)
        fqdn.meshagent_endpoint_changed(ChangeKind.UPSERT, Endpoint(
            1, "default", frozenset(), ipaddress.IPv4Address(dnsnet.POD4), 1000))
        await fqdn.proxy.start()
        try:
            await asyncio.sleep(0.5)  # dnsmasq up
            for concurrency in args.concurrency:
                for path, target in (("direct", 5353), ("proxy", 53)):
                    progress(f"{path}, {concurrency} in flight, {args.seconds:g}s")
                    cpu = time.process_time()
                    result = await run_client(pod, target, concurrency, args.seconds)
                    # this process runs the proxy (and nothing else meanwhile)
                    spent = time.process_time() - cpu
                    result["proxy_cpu_ms_per_lookup"] = round(
                        1000 * spent / max(1, result["answered"]), 3)
                    runs.append({"path": path, "concurrency": concurrency, **result})
                    progress(json.dumps(runs[-1]))
        finally:
            await fqdn.proxy.stop()
            for proc in servers:
                proc.terminate()
                proc.wait()
        names = len({n for e in fqdn.names.endpoints.values() for n, _ in e.pairs()})
    return {"bench": "dns", "machine": machine(), "seconds": args.seconds, "runs": runs,
            "names_cached": names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=lambda t: [int(x) for x in t.split(",")],
                        default=[1, 16])
    parser.add_argument("--json")
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    lines = [f"{'path':8} {'in flight':>9} {'lookups/s':>10} {'p50 ms':>7} {'p99 ms':>7}"
             f" {'errors':>6} {'proxy CPU ms/lookup':>20}"]
    for r in result["runs"]:
        lines.append(f"{r['path']:8} {r['concurrency']:>9} {r['lookups_per_s']:>10}"
                     f" {r['p50_ms']!s:>7} {r['p99_ms']!s:>7} {r['errors']:>6}"
                     f" {r['proxy_cpu_ms_per_lookup']:>20}")
    report(result, args.json, "\n".join(lines))


if __name__ == "__main__":
    main()
