"""Datapath overhead: five nodes side by side, measured in interleaved rounds of one run.

  (a) no programs (control plane only),
  (b) meshagent's eBPF datapath enforcing an allow policy, with 10,000 extra ipcache entries and
      1,000 extra policy entries loaded, reporting flows (``--enable-hubble=true``, the default),
  (c) the same policy as iptables rules in the node (stateful: established first, then one
      ACCEPT per allowed source — 1,000 decoys and the real one last — then DROP),
  (d) meshagent's nftables datapath enforcing the same policy, with the same 10,000 extra
      ipcache entries and 1,000 extra policy elements, reporting flows,
  (e) (b) without flows (``--enable-hubble=false``: the datapath reports drops only).

Each node is its own network namespace with a client and a server pod, built once. Every round
takes three measurements — iperf3 TCP throughput, the redis-benchmark PING rate over kept-alive
connections, and the new-connection rate (redis-benchmark ``-k 0``: every PING on a new
connection: connect, PING, PONG, close by the client) — each of the five nodes one after the
other, in a new shuffled order for each measurement, and takes each node's ratio to (a) of that
same round. The report gives the median of
those per-round ratios (and of the raw figures), so that the machine drifting between rounds
does not pass for a difference between setups. Goals: (b) ≥ 95% of (a) in throughput and request
rate, (b) ≥ (c) in both, and (b) ≥ 90% of (a) in new connections per second.

Beside the rates: the agent's CPU time per 1,000 new connections (what reporting flows costs
the node), and the flows its observer processed and lost, from its Prometheus metrics
(``hubble_flows_processed_total``, ``hubble_lost_events_total``; absent from a build without
them, reported as null).

    .venv/bin/python bench/datapath.py [--rounds 9] [--seconds 2] [--requests 50000]
        [--connections 20000] [--json F]

Needs root. Builds its namespaces with a per-run prefix and removes them (and its bpffs) after.
"""

import argparse
import json
import os
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

import attrs
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
METRICS_PORT = 9962  # in each node's own namespace
CONNECTION_PORT = 7000  # round r's new connections go to CONNECTION_PORT + r


@attrs.frozen
class Setup:
    plugins: str  # the agent's --plugins
    iptables: bool = False  # the policy as iptables rules in the node
    flows: bool = True  # the agent's --enable-hubble


SETUPS = {"a_no_programs": Setup("memory"),
          "b_meshagent_ebpf": Setup("memory,ebpf"),
          "c_iptables": Setup("memory", iptables=True),
          "d_meshagent_nftables": Setup("memory,nftables"),
          "e_meshagent_ebpf_no_flows": Setup("memory,ebpf", flows=False)}
METRICS = ("iperf3_gbit_s", "redis_ping_rps", "new_conn_per_s")


@attrs.frozen
class Node:
    namespace: str
    client: str  # the client pod's namespace
    server_ip: str
    agent_pid: int


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


def build(lab: NetLab, workdir: Path, key: str, rounds: int) -> Node:
    """One node with its agent, a client and a server pod."""
    setup = SETUPS[key]
    node = lab.ns(f"node-{key[0]}")
    sock = workdir / f"{key}.sock"
    bpffs = workdir / f"bpffs-{key}"
    extra = []
    if "ebpf" in setup.plugins:
        bpffs.mkdir()
        subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
        extra = ["--ebpf-bpf-root", str(bpffs)]
    proc = lab.spawn(node, MESHAGENT, "--plugins", setup.plugins, "--socket-path", str(sock),
                     "--state-dir", str(workdir / f"{key}-state"), "--pod-cidr", "10.1.1.0/24",
                     "--cluster-name", "bench", "--cluster-id", "1",
                     "--enable-hubble", str(setup.flows).lower(),
                     "--prometheus-serve-addr", f"127.0.0.1:{METRICS_PORT}", *extra,
                     log=workdir / f"{key}.log")
    wait_ready(sock, proc)
    server, client = lab.ns(f"server-{key[0]}"), lab.ns(f"client-{key[0]}")
    server_ep = json.loads(cli(sock, "endpoint", "create", "--netns", server, "--namespace",
                               "default", "--labels", "app=server", "-o", "json"))
    server_ip = server_ep["ipv4"]
    client_ip = json.loads(cli(sock, "endpoint", "create", "--netns", client, "--namespace",
                               "default", "--labels", "app=client", "-o", "json"))["ipv4"]
    # Every new connection must be new to the datapath too, never a reused address and port
    # pair that conntrack still holds: each round opens its connections to a server port of
    # its own, from ports never reused within it (TIME_WAIT is kept; the range holds them).
    lab.exec(client, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
    lab.spawn(server, "iperf3", "-s", log=workdir / f"{key}-iperf.log")
    lab.spawn(server, *REDIS_SERVER, log=workdir / f"{key}-redis.log")
    for round_ in range(rounds):
        lab.spawn(server, "redis-server", "--port", str(CONNECTION_PORT + round_), "--save", "",
                  "--appendonly", "no", "--protected-mode", "no",
                  log=workdir / f"{key}-redis-{round_}.log")
    if setup.plugins != "memory":
        (workdir / "policy.yaml").write_text(POLICY)
        cli(sock, "policy", "import", str(workdir / "policy.yaml"))
        time.sleep(1)
    if "ebpf" in setup.plugins:
        load_extra_entries(bpffs / "meshagent")
    if "nftables" in setup.plugins:
        load_extra_elements(lab, node, server_ep["id"])
    if setup.iptables:
        load_iptables(lab, node, client_ip, server_ip)
    return Node(node, client, server_ip, proc.pid)
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
    deny = f"drop_policy_deny_l3l4_{server}_in"
    policy = ", ".join(f"{70000 + i} . 6 . 0:18eb-0:18eb : goto {deny}" for i in range(1_000))
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


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(lab: NetLab, node: Node, args, round_: int) -> dict:
    iperf = lab.exec(node.client, "iperf3", "-c", node.server_ip, "-t", str(args.seconds), "-J",
                     timeout=120)
    gbits = json.loads(iperf.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    return {"iperf3_gbit_s": round(gbits, 2)}


def request_rate(lab: NetLab, node: Node, args, round_: int) -> dict:
    redis = lab.exec(node.client, "redis-benchmark", "-h", node.server_ip, "-t", "ping", "-n",
                     str(args.requests), "-q", "-c", "20", timeout=120)
    rates = [float(x) for x in re.findall(r"([\d.]+) requests per second", redis.stdout)]
    return {"redis_ping_rps": round(max(rates), 0)}


def connection_rate(lab: NetLab, node: Node, args, round_: int) -> dict:
    """New connections per second, each a PING on a connection of its own; and the agent's CPU
    time meanwhile, per 1,000 connections."""
    cpu = cpu_seconds(node.agent_pid)
    conns = lab.exec(node.client, "redis-benchmark", "-h", node.server_ip, "-p",
                     str(CONNECTION_PORT + round_), "-t", "ping_inline", "-n",
                     str(args.connections), "-q", "-c", "20", "-k", "0", timeout=120)
    agent_cpu = cpu_seconds(node.agent_pid) - cpu
    rate = float(re.findall(r"([\d.]+) requests per second", conns.stdout)[-1])
    return {"new_conn_per_s": round(rate, 0),
            "agent_cpu_ms_per_1000_conn": round(agent_cpu * 1e6 / args.connections, 1)}


def flow_counters(lab: NetLab, node: Node) -> dict:
    """The agent's flows processed and events lost, summed over labels; None when its metrics
    have no such series (a build that reports no flows)."""
    scrape = lab.exec(node.namespace, sys.executable, "-c",
                      "import urllib.request; print(urllib.request.urlopen("
                      f"'http://127.0.0.1:{METRICS_PORT}/metrics', timeout=10).read().decode())")
    counters = {}
    for name in ("hubble_flows_processed_total", "hubble_lost_events_total"):
        values = [float(line.rsplit(" ", 1)[1]) for line in scrape.stdout.splitlines()
                  if re.match(rf"{name}(\{{| )", line)]
        counters[name] = int(sum(values)) if values else None
    return counters


def paired(ratios: dict, top: str, bottom: str) -> dict:
    """Median over rounds of ``top``'s rate over ``bottom``'s, per metric."""
    return {m: round(statistics.median(t[m] / b[m] for t, b in zip(ratios[top], ratios[bottom])),
                     3) for m in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=2, help="iperf3 seconds per node and round")
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--connections", type=int, default=20000,
                        help="new connections per node and round")
    parser.add_argument("--rounds", type=int, default=9,
                        help="rounds of every setup in a shuffled order; medians are reported")
    parser.add_argument("--json")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ma-bench-", dir="/tmp"))
    print(f"datapath benchmark on {platform.node()} ({platform.machine()}), {args.seconds}s"
          f" iperf3, {args.requests} redis PINGs and {args.connections} new connections per"
          f" node and round, {args.rounds} rounds")
    lab = NetLab()
    started, load_before = time.monotonic(), os.getloadavg()[0]
    try:
        nodes = {key: build(lab, workdir, key, args.rounds) for key in SETUPS}
        time.sleep(1)
        rng = random.Random(1)
        samples: dict[str, list[dict]] = {key: [] for key in SETUPS}
        ratios: dict[str, list[dict]] = {key: [] for key in SETUPS}
        for round_ in range(args.rounds):
            # one measurement after another, every setup in a new order for each: the five
            # figures a ratio is taken between are measured within seconds of each other
            got: dict[str, dict] = {key: {} for key in SETUPS}
            for measure in (throughput, request_rate, connection_rate):
                order = list(SETUPS)
                rng.shuffle(order)
                for key in order:
                    got[key] |= measure(lab, nodes[key], args, round_)
            for key in SETUPS:
                samples[key].append(got[key])
                ratios[key].append({m: got[key][m] / got["a_no_programs"][m] for m in METRICS})
            print(f"  round {round_ + 1}: " + ", ".join(
                f"{key[0]} {got[key]['iperf3_gbit_s']} Gbit/s {got[key]['redis_ping_rps']:.0f}/s"
                f" {got[key]['new_conn_per_s']:.0f} conn/s" for key in SETUPS), flush=True)
        flows = {key: flow_counters(lab, node) for key, node in nodes.items()}
    finally:
        lab.cleanup()
        for key in SETUPS:
            subprocess.run(["umount", "-l", str(workdir / f"bpffs-{key}")], check=False,
                           capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    results = {key: {m: statistics.median(s[m] for s in runs) for m in METRICS}
               for key, runs in samples.items()}
    agent_cpu = {key: statistics.median(s["agent_cpu_ms_per_1000_conn"] for s in runs)
                 for key, runs in samples.items()}
    ratio = {key: {m: round(statistics.median(r[m] for r in runs), 3) for m in METRICS}
             for key, runs in ratios.items()}
    spread = {key: {m: [round(min(r[m] for r in runs), 3), round(max(r[m] for r in runs), 3)]
                    for m in METRICS} for key, runs in ratios.items()}
    b_over_c = paired(ratios, "b_meshagent_ebpf", "c_iptables")
    d_over_c = paired(ratios, "d_meshagent_nftables", "c_iptables")
    b_over_e = paired(ratios, "b_meshagent_ebpf", "e_meshagent_ebpf_no_flows")
    b = ratio["b_meshagent_ebpf"]
    result = {"results": results, "ratio_to_a": ratio, "ratio_to_a_min_max": spread,
              "b_over_c": b_over_c, "d_over_c": d_over_c, "b_over_e": b_over_e,
              "agent_cpu_ms_per_1000_conn": agent_cpu,
              # one clock tick of CPU time over one node's connections of a round
              "agent_cpu_resolution_ms_per_1000_conn":
                  round(1e6 / os.sysconf("SC_CLK_TCK") / args.connections, 2),
              "flows": flows,
              "rounds": args.rounds, "seconds": args.seconds, "requests": args.requests,
              "connections": args.connections,
              "wall_seconds": round(time.monotonic() - started), "samples": samples,
              "load_average_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
              "cores": os.cpu_count(),
              "goal_b_ge_95pct": b["iperf3_gbit_s"] >= 0.95 and b["redis_ping_rps"] >= 0.95,
              "goal_b_ge_c": b_over_c["iperf3_gbit_s"] >= 1 and b_over_c["redis_ping_rps"] >= 1,
              "goal_b_conn_ge_90pct": b["new_conn_per_s"] >= 0.90}
    report(result, args.json)


if __name__ == "__main__":
    main()
