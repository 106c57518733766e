"""Datapath overhead: four nodes side by side, measured in interleaved rounds of one run.

  (a) no programs (control plane only),
  (b) meshagent's eBPF datapath enforcing an allow policy, with 10,000 extra ipcache entries and
      1,000 extra policy entries loaded,
  (c) the same policy as iptables rules in the node (stateful: established first, then one
      ACCEPT per allowed source — 1,000 decoys and the real one last — then DROP),
  (d) meshagent's nftables datapath enforcing the same policy, with the same 10,000 extra
      ipcache entries and 1,000 extra policy elements.

Each node is its own network namespace with a client and a server pod, built once; every round
measures the four one after the other in a shuffled order — iperf3 TCP throughput and
redis-benchmark PING rate from client to server — and takes each node's ratio to (a) of that
same round. The report gives the median of those per-round ratios (and of the raw figures), so
that the machine drifting between rounds does not pass for a difference between setups.
Goals: (b) ≥ 95% of (a), and (b) ≥ (c); (d) is reported beside them.

    .venv/bin/python bench/datapath.py [--rounds 9] [--seconds 3] [--requests 50000] [--json F]

Needs root. Builds its namespaces with a per-run prefix and removes them (and its bpffs) after.
"""

import argparse
import json
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report

from meshagent_dev.lab import REDIS_SERVER
from meshagent_dev.netlab import NetLab

MESHAGENT = str(Path(sys.executable).with_name("meshagent"))
POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
"""
SETUPS = {"a_no_programs": ("memory", False), "b_meshagent_ebpf": ("memory,ebpf", False),
          "c_iptables": ("memory", True), "d_meshagent_nftables": ("memory,nftables", False)}
METRICS = ("iperf3_gbit_s", "redis_ping_rps")


def cli(sock: Path, *args: str) -> str:
    out = subprocess.run([MESHAGENT, *args, "--socket-path", str(sock)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"meshagent {' '.join(args)} failed: {out.stderr}")
    return out.stdout


def wait_ready(sock: Path, proc) -> None:
    for _ in range(300):
        out = subprocess.run([MESHAGENT, "status", "-o", "json", "--socket-path", str(sock)],
                             capture_output=True, text=True)
        if out.stdout and json.loads(out.stdout)["ready"]:
            return
        if proc.poll() is not None:
            raise SystemExit("agent exited")
        time.sleep(0.1)
    raise SystemExit("agent not ready")


def build(lab: NetLab, workdir: Path, key: str) -> tuple[str, str]:
    """One node with its agent, a client and a server pod; returns (client ns, server IP)."""
    plugins, iptables = SETUPS[key]
    node = lab.ns(f"node-{key[0]}")
    sock = workdir / f"{key}.sock"
    bpffs = workdir / f"bpffs-{key}"
    extra = []
    if "ebpf" in plugins:
        bpffs.mkdir()
        subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
        extra = ["--ebpf-bpf-root", str(bpffs)]
    proc = lab.spawn(node, MESHAGENT, "--plugins", plugins, "--socket-path", str(sock),
                     "--state-dir", str(workdir / f"{key}-state"), "--pod-cidr", "10.1.1.0/24",
                     "--cluster-name", "bench", "--cluster-id", "1", *extra,
                     log=workdir / f"{key}.log")
    wait_ready(sock, proc)
    server, client = lab.ns(f"server-{key[0]}"), lab.ns(f"client-{key[0]}")
    server_ep = json.loads(cli(sock, "endpoint", "create", "--netns", server, "--namespace",
                               "default", "--labels", "app=server", "-o", "json"))
    server_ip = server_ep["ipv4"]
    client_ip = json.loads(cli(sock, "endpoint", "create", "--netns", client, "--namespace",
                               "default", "--labels", "app=client", "-o", "json"))["ipv4"]
    lab.spawn(server, "iperf3", "-s", log=workdir / f"{key}-iperf.log")
    lab.spawn(server, *REDIS_SERVER, log=workdir / f"{key}-redis.log")
    if plugins != "memory":
        (workdir / "policy.yaml").write_text(POLICY)
        cli(sock, "policy", "import", str(workdir / "policy.yaml"))
        time.sleep(1)
    if "ebpf" in plugins:
        load_extra_entries(bpffs / "meshagent")
    if "nftables" in plugins:
        load_extra_elements(lab, node, server_ep["id"])
    if iptables:
        load_iptables(lab, node, client_ip, server_ip)
    return client, server_ip


def load_extra_entries(pin_dir: Path) -> None:
    """10,000 ipcache and 1,000 policy entries that match nothing of the benchmark's."""
    from meshagent.plugins.ebpf.maps import (
        IPCacheKey,
        IPCacheValue,
        PinnedMap,
        PolicyKey,
        PolicyValue,
        ip_bytes,
    )
    ipcache, policy = PinnedMap(pin_dir, "ipcache"), PinnedMap(pin_dir, "policy")
    for i in range(10_000):
        ipcache.put(IPCacheKey(32, ip_bytes(f"10.200.{i // 250}.{i % 250 + 1}")),
                    IPCacheValue(70000 + i, 0))
    for i in range(1_000):
        policy.put(PolicyKey(96, 999, 70000 + i, 0, 6, 6379), PolicyValue(1))


def load_extra_elements(lab: NetLab, node: str, server: int) -> None:
    """The same 10,000 ipcache and 1,000 policy entries as (b), as table elements."""
    t = "netdev meshagent"
    ipcache = ", ".join(f"10.200.{i // 250}.{i % 250 + 1} : {70000 + i}" for i in range(10_000))
    policy = ", ".join(f"{70000 + i} . 6 . 0:18eb-0:18eb : goto denied_{server}_in"
                       for i in range(1_000))
    lab.exec(node, "nft", "-f", "-", input=f"add element {t} ipcache4 {{ {ipcache} }}\n"
             f"add element {t} spec4_{server}_in {{ {policy} }}\n")


def load_iptables(lab: NetLab, node: str, client_ip: str, server_ip: str) -> None:
    rules = ["*filter", ":FORWARD DROP [0:0]",
             "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
    rules += [f"-A FORWARD -s 10.200.{i // 250}.{i % 250 + 1}/32 -d {server_ip}/32 -j ACCEPT"
              for i in range(1_000)]
    rules += [f"-A FORWARD -s {client_ip}/32 -d {server_ip}/32 -j ACCEPT",
              f"-A FORWARD -s {server_ip}/32 -j ACCEPT", "COMMIT", ""]
    lab.exec(node, "iptables-restore", input="\n".join(rules))


def measure(lab: NetLab, client: str, server_ip: str, seconds: int, requests: int) -> dict:
    iperf = lab.exec(client, "iperf3", "-c", server_ip, "-t", str(seconds), "-J", timeout=120)
    gbits = json.loads(iperf.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    redis = lab.exec(client, "redis-benchmark", "-h", server_ip, "-t", "ping", "-n",
                     str(requests), "-q", "-c", "20", timeout=120)
    rates = [float(x) for x in re.findall(r"([\d.]+) requests per second", redis.stdout)]
    return {"iperf3_gbit_s": round(gbits, 2), "redis_ping_rps": round(max(rates), 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=9,
                        help="rounds of a, b, c, d in a shuffled order; medians are reported")
    parser.add_argument("--json")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ma-bench-", dir="/tmp"))
    print(f"datapath benchmark on {platform.node()} ({platform.machine()}), {args.seconds}s"
          f" iperf3 and {args.requests} redis PINGs per node and round, {args.rounds} rounds")
    lab = NetLab()
    try:
        nodes = {key: build(lab, workdir, key) for key in SETUPS}
        time.sleep(1)
        rng = random.Random(1)
        samples: dict[str, list[dict]] = {key: [] for key in SETUPS}
        ratios: dict[str, list[dict]] = {key: [] for key in SETUPS}
        for round_ in range(args.rounds):
            order = list(SETUPS)
            rng.shuffle(order)
            got = {key: measure(lab, *nodes[key], args.seconds, args.requests) for key in order}
            for key in SETUPS:
                samples[key].append(got[key])
                ratios[key].append({m: got[key][m] / got["a_no_programs"][m] for m in METRICS})
            print(f"  round {round_ + 1}: " + ", ".join(
                f"{key[0]} {got[key]['iperf3_gbit_s']} Gbit/s {got[key]['redis_ping_rps']:.0f}/s"
                for key in SETUPS), flush=True)
    finally:
        lab.cleanup()
        for key in SETUPS:
            subprocess.run(["umount", "-l", str(workdir / f"bpffs-{key}")], check=False,
                           capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    results = {key: {m: statistics.median(s[m] for s in runs) for m in METRICS}
               for key, runs in samples.items()}
    ratio = {key: {m: round(statistics.median(r[m] for r in runs), 3) for m in METRICS}
             for key, runs in ratios.items()}
    b_over_c = {m: round(statistics.median(b[m] / c[m] for b, c in zip(
        ratios["b_meshagent_ebpf"], ratios["c_iptables"])), 3) for m in METRICS}
    d_over_c = {m: round(statistics.median(d[m] / c[m] for d, c in zip(
        ratios["d_meshagent_nftables"], ratios["c_iptables"])), 3) for m in METRICS}
    result = {"results": results, "ratio_to_a": ratio, "b_over_c": b_over_c,
              "d_over_c": d_over_c,
              "rounds": args.rounds, "samples": samples,
              "goal_b_ge_95pct": all(v >= 0.95 for v in ratio["b_meshagent_ebpf"].values()),
              "goal_b_ge_c": all(v >= 1.0 for v in b_over_c.values())}
    report(result, args.json)


if __name__ == "__main__":
    main()
