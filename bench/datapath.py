"""Datapath overhead: two pods on one node, three ways, side by side in one run.

  (a) no programs (control plane only),
  (b) meshagent's eBPF datapath enforcing an allow policy, with 10,000 extra ipcache entries and
      1,000 extra policy entries loaded,
  (c) the same policy as iptables rules in the node (stateful: established first, then one
      ACCEPT per allowed source — 1,000 decoys and the real one last — then DROP).

Measures iperf3 TCP throughput and redis-benchmark PING rate from the client pod to the server
pod; reports each as a ratio to (a). Goal: (b) ≥ 95% of (a).

    .venv/bin/python bench/datapath.py [--seconds 5] [--requests 50000] [--json FILE]

Needs root. Builds its namespaces with a per-run prefix and removes them (and its bpffs) after.
"""

import argparse

import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report

from meshagent.lab import REDIS_SERVER
from meshagent.testing.netlab import NetLab

HERE = Path(__file__).resolve().parent
MESHAGENT = str(Path(sys.executable).with_name("meshagent"))
POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
"""


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


def measure(lab: NetLab, client: str, server_ip: str, seconds: int, requests: int) -> dict:
    iperf = lab.exec(client, "iperf3", "-c", server_ip, "-t", str(seconds), "-J", timeout=120)
    gbits = json.loads(iperf.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    redis = lab.exec(client, "redis-benchmark", "-h", server_ip, "-t", "ping", "-n",
                     str(requests), "-q", "-c", "20", timeout=120)
    rates = [float(x) for x in re.findall(r"([\d.]+) requests per second", redis.stdout)]
    return {"iperf3_gbit_s": round(gbits, 2), "redis_ping_rps": round(max(rates), 0)}


def scenario(name: str, args, workdir: Path, plugins: str, iptables: bool) -> dict:
    lab = NetLab()
    bpffs = workdir / f"bpffs-{name}"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    try:
        node = lab.ns("node")
        sock = workdir / f"{name}.sock"
        proc = lab.spawn(node, MESHAGENT, "--plugins", plugins, "--socket-path", str(sock),
                         "--state-dir", str(workdir / f"{name}-state"), "--pod-cidr",
                         "10.1.1.0/24", "--cluster-name", "bench", "--cluster-id", "1",
                         *(["--ebpf-bpf-root", str(bpffs)] if "ebpf" in plugins else []),
                         log=workdir / f"{name}.log")
        wait_ready(sock, proc)
        server, client = lab.ns("server"), lab.ns("client")
        server_ip = json.loads(cli(sock, "endpoint", "create", "--netns", server, "--namespace",
                                   "default", "--labels", "app=server", "-o", "json"))["ipv4"]
        client_ip = json.loads(cli(sock, "endpoint", "create", "--netns", client, "--namespace",
                                   "default", "--labels", "app=client", "-o", "json"))["ipv4"]
        lab.spawn(server, "iperf3", "-s", log=workdir / f"{name}-iperf.log")
        lab.spawn(server, *REDIS_SERVER, log=workdir / f"{name}-redis.log")
        if "ebpf" in plugins:
            (workdir / "policy.yaml").write_text(POLICY)
            cli(sock, "policy", "import", str(workdir / "policy.yaml"))
            time.sleep(1)
            load_extra_entries(bpffs / "meshagent")
        if iptables:
            load_iptables(lab, node, client_ip, server_ip)
        time.sleep(1)
        result = measure(lab, client, server_ip, args.seconds, args.requests)
        print(f"  {name:10} {result}", flush=True)
        return result
    finally:
        lab.cleanup()
        subprocess.run(["umount", "-l", str(bpffs)], check=False)


def load_extra_entries(pin_dir: Path) -> None:
    """10,000 ipcache and 1,000 policy entries that match nothing of the benchmark's."""
    from meshagent.plugins.ebpf.maps import (
        IPCacheKey, IPCacheValue, PinnedMap, PolicyKey, PolicyValue, ip_bytes,
    )
    ipcache, policy = PinnedMap(pin_dir, "ipcache"), PinnedMap(pin_dir, "policy")
    for i in range(10_000):
        ipcache.put(IPCacheKey(32, ip_bytes(f"10.200.{i // 250}.{i % 250 + 1}")),
                    IPCacheValue(70000 + i, 0))
    for i in range(1_000):
        policy.put(PolicyKey(96, 999, 70000 + i, 0, 6, 6379), PolicyValue(1))



def load_iptables(lab: NetLab, node: str, client_ip: str, server_ip: str) -> None:
    rules = ["*filter", ":FORWARD DROP [0:0]",
             "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
    rules += [f"-A FORWARD -s 10.200.{i // 250}.{i % 250 + 1}/32 -d {server_ip}/32 -j ACCEPT"
              for i in range(1_000)]
    rules += [f"-A FORWARD -s {client_ip}/32 -d {server_ip}/32 -j ACCEPT",
              f"-A FORWARD -s {server_ip}/32 -j ACCEPT", "COMMIT", ""]
    lab.exec(node, "iptables-restore", input="\n".join(rules))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of a, b, c one after the other; the median is reported")
    parser.add_argument("--json")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ma-bench-", dir="/tmp"))
    print(f"datapath benchmark on {platform.node()} ({platform.machine()}), {args.seconds}s"
          f" iperf3, {args.requests} redis PINGs per scenario, {args.rounds} interleaved rounds")
    setups = {"a_no_programs": ("baseline", "memory", False),
              "b_meshagent_ebpf": ("ebpf", "memory,ebpf", False),
              "c_iptables": ("iptables", "memory", True)}
    samples: dict[str, list[dict]] = {key: [] for key in setups}
    for round_ in range(args.rounds):
        for key, (name, plugins, iptables) in setups.items():
            samples[key].append(scenario(f"{name}{round_}", args, workdir, plugins, iptables))
    import statistics
    results = {key: {metric: statistics.median(s[metric] for s in runs)
                     for metric in runs[0]} for key, runs in samples.items()}
    base = results["a_no_programs"]
    ratios = {name: {metric: round(value / base[metric], 3) for metric, value in r.items()}
              for name, r in results.items()}
    result = {"results": results, "ratio_to_a": ratios, "rounds": args.rounds,
              "samples": samples,
              "goal_b_ge_95pct": all(v >= 0.95 for v in ratios["b_meshagent_ebpf"].values())}
    report(result, args.json)


if __name__ == "__main__":
    main()
