"""What meshagent does today, in one run: two clusters meshed over etcd with TLS.

cluster1 (id 101) and cluster2 (id 102) each get their own etcd (client-certificate TLS, on
loopback, free ports) and one agent; each agent's clustermesh directory is laid out as the
seed's (cluster2, cluster2-etcd-client-ca.crt, -client.crt, -client.key). The demo shows
`meshagent status` (ClusterMesh 1/1 ready), `meshagent node list`, then removes cluster2's file
and shows its node withdrawn, and stops everything. The seed's protected-db / employee /
stranger scenario joins once endpoints, policy and the datapath exist.
"""

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meshagent.testing.etcd import EtcdServer

BIN = Path(sys.executable).parent / "meshagent"


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def cli(*args: str) -> str:
    out = subprocess.run([str(BIN), *args], capture_output=True, text=True)
    print(out.stdout + out.stderr, end="", flush=True)
    return out.stdout


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="meshagent-demo-", dir="/tmp"))
    servers, agents = [], []
    try:
        step("two etcd servers with client-certificate TLS, one per cluster")
        etcd = {n: EtcdServer(f"etcd{n}", tls=True, workdir=work / f"etcd{n}").start()
                for n in (1, 2)}
        servers.extend(etcd.values())
        for n, server in etcd.items():
            print(f"cluster{n}: {server.url}")

        socks = {}
        for n, other in ((1, 2), (2, 1)):
            mesh = work / f"cluster{n}" / "clustermesh"
            mesh.mkdir(parents=True)
            etcd[other].client_config(mesh / f"cluster{other}")  # the seed's file layout
            own = etcd[n].client_config(work / f"cluster{n}" / "etcd.yaml")
            socks[n] = work / f"cluster{n}" / "agent.sock"
            cmd = [str(BIN), "--plugins", "etcd", f"--cluster-id={100 + n}",
                   f"--cluster-name=cluster{n}", f"--clustermesh-config={mesh}",
                   "--etcd-config", str(own), "--node-name", "node1",
                   "--node-ip", f"10.{n}.{n}.1", "--pod-cidr", f"10.{n}.0.0/24",
                   "--socket-path", str(socks[n]), "--state-dir", str(work / f"cluster{n}/state")]
            if n == 1:
                step("cluster1's clustermesh directory, as in the seed")
                cli_ls = sorted(p.name for p in mesh.iterdir())
                print("\n".join(cli_ls))
                print((mesh / "cluster2").read_text(), end="")
            step(f"start the cluster{n} agent: meshagent --plugins etcd --cluster-id={100 + n}"
                 f" --cluster-name=cluster{n} --clustermesh-config=...")
            log = open(work / f"cluster{n}" / "agent.log", "w")
            agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))

        started = time.monotonic()
        for n in (1, 2):
            wait(lambda n=n: "1/1 remote clusters ready" in subprocess.run(
                [str(BIN), "status", "--socket-path", str(socks[n])], capture_output=True,
                text=True).stdout, 30, f"cluster{n} to see its peer")
        print(f"both clusters see each other after {time.monotonic() - started:.1f}s")

        step("meshagent status --verbose (cluster1)")
        cli("status", "--verbose", "--socket-path", str(socks[1]))
        step("meshagent node list (cluster1): nodes of both clusters")
        cli("node", "list", "--socket-path", str(socks[1]))

        step("remove cluster2's file from cluster1's clustermesh directory: withdrawn, no restart")
        (work / "cluster1" / "clustermesh" / "cluster2").unlink()
        wait(lambda: "cluster2/" not in subprocess.run(
            [str(BIN), "node", "list", "--socket-path", str(socks[1])], capture_output=True,
            text=True).stdout, 10, "cluster2 to be withdrawn")
        cli("node", "list", "--socket-path", str(socks[1]))

        step("SIGTERM: agents stop cleanly (their leases are revoked)")
        for proc in agents:
            proc.send_signal(signal.SIGTERM)
        for proc in agents:
            print(f"agent {proc.pid} exited {proc.wait(10)}")
        return 0
    finally:
        for proc in agents:
            if proc.poll() is None:
                proc.kill()
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
