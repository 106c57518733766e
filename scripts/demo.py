"""The seed's story in one command: two clusters, protected-db, employee, stranger.

Builds the lab (two dual-stack clusters in network namespaces, each with its own TLS etcd,
meshed by the seed's clustermesh directory layout), runs redis in protected-db, checks
redis-cli ping from the three clients over IPv4 and IPv6 before and after importing the seed's
l4-policy.yaml unchanged, shows the stranger's dropped SYN, status and node list, and the flows
to protected-db from every node (``meshagent observe --mesh``) — and exits non-zero if any
verdict differs from the seed's. Tears the lab down at the end (also on failure).
``--kvstoremesh``: each cluster runs KVStoreMesh, and the demo shows the agents hold no
connection to the other cluster's etcd.
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meshagent_dev.lab import DATAPATHS, REDIS_SERVER, Lab

HERE = Path(__file__).resolve().parent
POLICY = HERE.parent / "contrib" / "seed" / "l4-policy.yaml"  # the seed's, byte for byte
BIN = str(Path(sys.executable).with_name("meshagent"))
CLIENTS = (("employee-0 (cluster1, default)", "employee-c1", "PONG"),
           ("stranger-0 (cluster1, default)", "stranger", "timeout"),
           ("employee-0 (cluster2, istio-space)", "employee-c2", "PONG"))


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(*args: str, names: dict[str, str] | None = None) -> str:
    shown = [(names or {}).get(a, a) for a in args]
    print(f"$ meshagent {' '.join(shown)}", flush=True)
    out = subprocess.run([BIN, *args], capture_output=True, text=True)
    print(out.stdout + out.stderr, end="", flush=True)
    return out.stdout


def ping(lab: Lab, pod: str, db_ip: str) -> str:
    try:
        out = lab.pod_exec(pod, ["redis-cli", "-h", db_ip, "-p", "6379", "ping"],
                           capture_output=True, text=True, timeout=3)
        return out.stdout.strip() or out.stderr.strip()
    except subprocess.TimeoutExpired:
        return "timeout"


def check(lab: Lab, db_ip: str, expected: dict[str, str]) -> bool:
    ok = True
    for title, pod, _ in CLIENTS:
        got = ping(lab, pod, db_ip)
        mark = "✓" if got == expected[pod] else "✗ expected " + expected[pod]
        print(f"  {title:38} redis-cli -h {db_ip} -p 6379 ping  →  {got}   {mark}", flush=True)
        ok &= got == expected[pod]
    return ok


def show_connections(lab: Lab) -> bool:
    """The TCP connections of cluster1's agent: to its own etcd, none to cluster2's."""
    step("cluster1-node1's TCP connections (ss -tn): its own etcd only, never cluster2's")
    ns = lab.state["nodes"]["cluster1-node1"]["ns"]
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htn", "state", "established"],
                         capture_output=True, text=True).stdout
    print(out, end="")
    peers = {line.split()[-1].replace("[::ffff:", "").replace("]", "")
             for line in out.splitlines()}
    own, other = (lab.state["clusters"][c]["etcd"].split("//")[1] for c in ("cluster1", "cluster2"))
    return own in peers and other not in peers


def show_flows(lab: Lab) -> bool:
    """The story as Hubble tells it, from every node of both clusters: the stranger's SYN
    dropped (and the employees' connections, where the datapath reports them)."""
    args = ["--to-pod", "default/protected-db", "--last", "8", "--print-node-name"]
    step("the flows to protected-db, from every node of both clusters (Hubble's API, mutual"
         " TLS): meshagent observe --mesh")
    print(f"$ meshagent lab observe -- {' '.join(args)}", flush=True)
    out = subprocess.run(lab.observe_command(args), capture_output=True, text=True)
    print(out.stdout + out.stderr, end="", flush=True)
    seen = out.returncode == 0 and "default/stranger" in out.stdout and "DROPPED" in out.stdout
    if not seen:
        print("the stranger's dropped SYN is not among the flows ✗")
    return seen


def main(argv: list[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datapath", choices=DATAPATHS, default="ebpf",
                        help="the agents' datapath plugin")
    parser.add_argument("--kvstoremesh", action="store_true",
                        help="each cluster runs KVStoreMesh; agents read the other cluster from"
                             " their own etcd")
    parser.add_argument("--cilium-peer", action="store_true",
                        help="cluster2 is a Cilium cluster as its etcd shows it (IPv4;"
                             " docs/cilium.md)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-demo-", dir="/tmp"))
    lab = Lab(workdir / "lab")
    ok = True
    try:
        peer = args.cilium_peer
        step("build the lab: cluster1 (id 101) and cluster2 (id 102), "
             + ("cluster2 a Cilium 1.17 cluster as its etcd shows it, IPv4" if peer
                else "dual stack") + ", each with its own etcd (TLS, auth on: the other cluster"
             f" reads it as the read-only user 'remote'); the {args.datapath} datapath"
             + ("; KVStoreMesh in each cluster" if args.kvstoremesh else ""))
        lab.bring_up(nodes=1, dual_stack=not peer, datapath=args.datapath,
                     kvstoremesh=args.kvstoremesh, cilium_peer=peer)
        print(lab.describe())
        mesh = workdir / "lab" / "cluster1" / (
            "kvstoremesh" if args.kvstoremesh else "clustermesh")
        step(f"cluster1's {'KVStoreMesh' if args.kvstoremesh else 'clustermesh'} directory,"
             " laid out as the seed's")
        print("\n".join(sorted(p.name for p in mesh.iterdir())))
        print((mesh / "cluster2").read_text(), end="")
        s1 = lab.state["nodes"]["cluster1-node1"]["socket"]
        if args.kvstoremesh:
            ok &= show_connections(lab)
        print(f"agents run as: {' '.join(lab.agent_command('cluster1-node1')[:6])} ...")

        step("create the pods (the seed's protected-db, employee ×2, stranger)")
        db = lab.pod_create("protected-db", "cluster1-node1", "default", "app=protected-db")
        lab.pod_create("employee-c1", "cluster1-node1", "default", "app=employee")
        lab.pod_create("stranger", "cluster1-node1", "default", "app=stranger")
        if not peer:  # the Cilium cluster's employee-0 is there already
            lab.pod_create("employee-c2", "cluster2-node1", "istio-space", "app=employee")
        print(lab.describe().split("\n", 1)[1])
        families = ("ip",) if peer else ("ip", "ip6")
        lab.pod_spawn("protected-db", "redis", list(REDIS_SERVER))
        time.sleep(0.5)

        step("4.2 connectivity test, no policy yet: PONG ×3"
             + ("" if peer else ", over IPv4 and IPv6"))
        for address in (db[f] for f in families):
            ok &= check(lab, address, {pod: "PONG" for _, pod, _ in CLIENTS})

        step("4.3 apply the seed's l4-policy.yaml (unchanged) in cluster1")
        print(POLICY.read_text(), end="")
        names = {s1: "<cluster1-node1>", str(POLICY): "l4-policy.yaml"}
        show("policy", "import", str(POLICY), "--socket-path", s1, names=names)
        monitor = subprocess.Popen([BIN, "monitor", "--type", "drop", "--count", "1",
                                    "--socket-path", s1], stdout=subprocess.PIPE, text=True)
        time.sleep(1)

        step("4.4 test and observe: PONG / timeout / PONG"
             + ("" if peer else ", over IPv4 and IPv6"))
        for address in (db[f] for f in families):
            ok &= check(lab, address, {pod: verdict for _, pod, verdict in CLIENTS})

        step("the stranger's SYN, dropped on protected-db's node (meshagent monitor --type drop)")
        try:
            out, _ = monitor.communicate(timeout=10)
            print(out, end="")
            ok &= "SYN" in out and "6379" in out
        except subprocess.TimeoutExpired:
            monitor.kill()
            print("no drop event seen ✗")
            ok = False

        step("meshagent status (cluster1)")
        status = show("status", "--socket-path", s1, names=names)
        ok &= "1/1 remote clusters ready" in status
        if args.kvstoremesh:
            step("meshagent kvstoremesh status (cluster1)")
            socket = lab.kvstoremesh_socket("cluster1")
            show("kvstoremesh", "status", "--socket-path", socket,
                 names={socket: "<cluster1-kvstoremesh>"})
        step("meshagent node list (cluster1)")
        show("node", "list", "--socket-path", s1, names=names)
        step("why the stranger is refused: meshagent policy trace")
        show("policy", "trace", "--src-ip", lab.state["pods"]["stranger"]["ip"],
             "--dst-endpoint", str(db["endpoint"]), "--dport", "6379/TCP", "--socket-path", s1,
             names=names)
        ok &= show_flows(lab)
    except Exception as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        ok = False
    finally:
        step("tear down")
        lab.tear_down()
    took = time.monotonic() - started
    print(f"\n{'all verdicts as in the seed' if ok else 'VERDICTS DIFFER FROM THE SEED'}"
          f" ({took:.0f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
