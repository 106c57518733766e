"""The eBPF datapath with real packets: namespaces as node and pods, programs on their veths.

Privileged: root, BPF, tc. Each test mounts its own bpffs (so pinned maps never mix between
tests) and builds namespaces with a per-run prefix; everything is removed afterwards.
"""

import json
import os
import subprocess
import time

import pytest
from conftest import run_cli
from nettraffic import BIG_UDP_CLIENT, BIG_UDP_SERVER, CLIENT, LOOP, SERVER
from test_endpoints import NodeAgent

from meshagent_dev.etcd import EtcdServer
from meshagent_dev.netlab import NetLab, can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

PY = "/usr/bin/python3"


@pytest.fixture
def lab():
    lab = NetLab()
    yield lab
    lab.cleanup()
    if getattr(lab, "etcd", None):
        lab.etcd.stop()


class Cluster1Node:
    """One node of cluster1 with the ebpf datapath and a few pods."""

    def __init__(self, lab, short_tmp, bpffs, *extra):
        self.lab = lab
        self.tmp = short_tmp
        self.bpffs = bpffs
        self.node = lab.ns("node1")
        self.agent = NodeAgent(lab, self.node, short_tmp, "--plugins", "memory,ebpf",
                               "--ebpf-bpf-root", str(bpffs), "--cluster-name", "cluster1",
                               "--cluster-id", "101", "--node-name", "node1",
                               "--pod-cidr", "10.1.1.0/24", *extra)
        self.pods = {}

    def pod(self, name: str, labels: str, namespace: str = "default") -> dict:
        ns = self.lab.ns(name)
        endpoint = self.agent.create(ns, labels, namespace)
        self.pods[name] = (ns, endpoint)
        return endpoint

    def serve(self, name: str, tcp: str = "6379,7000", udp: str = "5353") -> None:
        ns, _ = self.pods[name]
        proc = self.lab.spawn(ns, PY, "-c", SERVER, tcp, udp, log=self.tmp / f"{name}.srv")
        deadline = time.monotonic() + 5
        while "ready" not in (self.tmp / f"{name}.srv").read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)

    def talk(self, src: str, dst: str, port: int, proto: str = "tcp", sport: int = 0,
             timeout: float = 1.0) -> str:
        ns, _ = self.pods[src]
        target = dst if dst[0].isdigit() else self.pods[dst][1]["ipv4"]
        result = self.lab.exec(ns, PY, "-c", CLIENT, proto, target, str(port), str(sport),
                               str(timeout), check=False)
        return result.stdout.strip()

    def policy(self, text: str, name: str = "p.yaml") -> None:
        path = self.tmp / name
        path.write_text(text)
        result = self.agent.cli("policy", "import", str(path))
        assert result.returncode == 0, result.stderr
        self.wait_revision()

    def wait_revision(self, settle: float = 0.3) -> None:
        time.sleep(settle)  # the agent applies map changes asynchronously; they land in ms

    def bpf(self, *args: str):
        return run_cli("bpf", *args, "--bpf-root", str(self.bpffs))


def db_policy(extra: str = "") -> str:
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: db}}
spec:
  endpointSelector: {{matchLabels: {{app: protected-db}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: employee}}}}]
    toPorts:
    - ports: [{{port: "6379", protocol: TCP}}, {{port: "5353", protocol: UDP}}]
{extra}"""


@pytest.fixture
def node(lab, short_tmp, bpffs):
    n = Cluster1Node(lab, short_tmp, bpffs)
    n.pod("db", "app=protected-db")
    n.pod("employee", "app=employee")
    n.pod("stranger", "app=stranger")
    n.serve("db")
    return n


def test_allow_and_deny_by_identity_and_port_tcp_and_udp(node):
    assert node.talk("stranger", "db", 6379) == "ok"  # no policy yet
    node.policy(db_policy())
    assert node.talk("employee", "db", 6379) == "ok"  # and its replies came back
    assert node.talk("stranger", "db", 6379) == "timeout"
    assert node.talk("employee", "db", 5353, "udp") == "ok"
    assert node.talk("stranger", "db", 5353, "udp") == "timeout"
    assert node.talk("employee", "db", 7000) == "timeout"  # port not allowed
    status = json.loads(node.agent.cli("status", "-o", "json").stdout)
    datapath = next((s for s in status["sections"] if s["name"] == "Datapath"), None)
    assert datapath, [s["name"] + ": " + s["summary"] for s in status["sections"]]
    assert datapath["summary"].startswith("ebpf: programs attached on 3/3 endpoints, synced")
    assert "policy denied (by default)" in datapath["summary"]


def test_deny_beats_allow(node):
    node.policy(db_policy("""  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: employee}}]
    toPorts: [{ports: [{port: "6379", protocol: TCP}]}]
"""))
    assert node.talk("employee", "db", 6379) == "timeout"
    assert node.talk("employee", "db", 5353, "udp") == "ok"


def first_drop(node, provoke) -> dict:
    """The first drop event ``meshagent monitor`` shows while ``provoke()`` (which must return
    True) is repeated: the monitor may take a moment to subscribe."""
    out = node.tmp / "monitor.out"
    monitor = subprocess.Popen(
        [str(__import__("conftest").MESHAGENT), "monitor", "--type", "drop", "--count", "1",
         "-o", "json", "--socket-path", str(node.agent.socket)], stdout=open(out, "w"),
        text=True)
    try:
        for _ in range(20):
            assert provoke()
            if monitor.poll() is not None:
                break
            time.sleep(0.2)
        monitor.wait(timeout=5)
    finally:
        monitor.kill()
    return json.loads(out.read_text().splitlines()[0])


def test_drop_events_through_monitor(node):
    node.policy(db_policy())
    event = first_drop(node, lambda: node.talk("stranger", "db", 6379) == "timeout")
    assert event["reason"] == "policy denied (by default)"
    assert event["direction"] == "ingress" and event["protocol"] == "tcp"
    assert "SYN" in event["tcp_flags"]
    assert event["destination"]["port"] == 6379
    assert event["source"]["ip"] == node.pods["stranger"][1]["ipv4"]
    assert event["source"]["identity"] == node.pods["stranger"][1]["identity"]
    assert event["source"]["cluster"] == "cluster1"
    text = run_cli("monitor", "--help").stdout
    assert "--type" in text


def test_bpf_commands_read_pinned_maps_while_the_agent_is_down(node):
    node.policy(db_policy())
    assert node.talk("employee", "db", 6379) == "ok"
    db = node.pods["db"][1]
    node.agent.stop()
    ipcache = json.loads(node.bpf("ipcache", "list", "-o", "json").stdout)
    assert {"prefix": f"{db['ipv4']}/32", "identity": db["identity"]} in ipcache
    policy = json.loads(node.bpf("policy", "get", str(db["id"]), "-o", "json").stdout)
    employee = node.pods["employee"][1]
    assert {"direction": "ingress", "identity": employee["identity"], "protocol": "tcp",
            "port": 6379, "verdict": "allow"} in policy
    ct = json.loads(node.bpf("ct", "list", "-o", "json").stdout)
    assert any(c["destination"] == f"{db['ipv4']}:6379" for c in ct)
    metrics = {m["reason"]: m for m in json.loads(node.bpf("metrics", "-o", "json").stdout)}
    assert metrics["forwarded"]["packets"] > 0
    # the programs stayed attached: enforcement goes on without the agent
    assert node.talk("employee", "db", 6379) == "ok"
    assert node.talk("stranger", "db", 6379) == "timeout"


def test_cidr_rules_with_real_packets(lab, short_tmp, bpffs):
    node = Cluster1Node(lab, short_tmp, bpffs)
    node.pod("employee", "app=employee")
    node.pod("stranger", "app=stranger")
    ext = lab.ns("ext")  # outside the cluster: no endpoint, no identity of its own
    subprocess.run(["ip", "link", "add", "ext0", "netns", node.node, "type", "veth", "peer",
                    "name", "eth0", "netns", ext], check=True)
    lab.exec(node.node, "ip", "addr", "add", "192.168.77.1/24", "dev", "ext0")
    lab.exec(node.node, "ip", "link", "set", "ext0", "up")
    for address in ("192.168.77.2/24", "192.168.77.3/24"):
        lab.exec(ext, "ip", "addr", "add", address, "dev", "eth0")
    lab.exec(ext, "ip", "link", "set", "eth0", "up")
    lab.exec(ext, "ip", "route", "add", "default", "via", "192.168.77.1")
    proc = lab.spawn(ext, PY, "-c", SERVER, "8080", "5300", log=short_tmp / "ext.srv")
    deadline = time.monotonic() + 5
    while "ready" not in (short_tmp / "ext.srv").read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    assert node.talk("employee", "192.168.77.3", 8080) == "ok"
    node.policy("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: egress-cidr}
spec:
  endpointSelector: {matchLabels: {app: employee}}
  egress:
  - toCIDRSet: [{cidr: 192.168.77.0/24, except: [192.168.77.3/32]}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""")
    assert node.talk("employee", "192.168.77.2", 8080) == "ok"
    assert node.talk("employee", "192.168.77.3", 8080) == "timeout"  # the except
    assert node.talk("employee", "192.168.77.2", 5300, "udp") == "timeout"  # not that port
    assert node.talk("stranger", "192.168.77.3", 8080) == "ok"  # no egress policy
    prefixes = {e["prefix"] for e in json.loads(node.bpf("ipcache", "list", "-o", "json").stdout)}
    assert {"192.168.77.0/24", "192.168.77.3/32"} <= prefixes


UDP_LISTEN = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
s.sendto(b"open", (sys.argv[2], int(sys.argv[3])))
with open(sys.argv[4], "a") as out:
    while True:
        data, _ = s.recvfrom(100); out.write(data.decode() + "\n"); out.flush()
"""
UDP_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))
"""
UDP_KEEP_SENDING = r"""
import socket, sys, threading, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
def send():
    end = time.monotonic() + float(sys.argv[5])
    while time.monotonic() < end:
        s.sendto(b"tick", (sys.argv[2], int(sys.argv[3]))); time.sleep(0.5)
threading.Thread(target=send, daemon=True).start()
with open(sys.argv[4], "a") as out:
    while True:
        data, _ = s.recvfrom(100); out.write(data.decode() + "\n"); out.flush()
"""
CLOSED_INGRESS = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: employee-closed}
spec:
  endpointSelector: {matchLabels: {app: employee}}
  ingress:
  - {}
"""


def test_conntrack_replies_pass_policy_judges_tracked_flows_entries_expire(lab, short_tmp,
                                                                           bpffs):
    node = Cluster1Node(lab, short_tmp, bpffs, "--ebpf-ct-timeout-any", "2")
    node.pod("db", "app=protected-db")
    node.pod("employee", "app=employee")
    node.serve("db")
    udp = ', {port: "5353", protocol: UDP}'
    node.policy(db_policy().replace(udp, udp + ', {port: "5354", protocol: UDP}'))
    node.policy(CLOSED_INGRESS, "closed.yaml")  # only replies of its own flows reach employee
    assert node.talk("employee", "db", 5353, "udp", sport=40000) == "ok"  # the reply came back
    # as in Cilium, conntrack lets replies through; every other packet is judged by the
    # policy of the moment, so a tracked flow stops as soon as policy no longer allows it
    node.policy(db_policy().replace(udp, ', {port: "5354", protocol: UDP}'))
    assert node.talk("employee", "db", 5353, "udp", sport=40000) == "timeout"
    # a reply after the flow's entry expired (2 s idle) is judged as new traffic: refused
    employee_ns, employee = node.pods["employee"]
    db_ns, db = node.pods["db"]
    got = short_tmp / "employee.got"
    got.write_text("")
    lab.spawn(employee_ns, PY, "-c", UDP_LISTEN, "40001", db["ipv4"], "5354", str(got),
              log=short_tmp / "listen.log")
    time.sleep(0.5)
    lab.exec(db_ns, PY, "-c", UDP_SEND, "5354", employee["ipv4"], "40001", "early")
    time.sleep(3)
    lab.exec(db_ns, PY, "-c", UDP_SEND, "5354", employee["ipv4"], "40001", "late")
    time.sleep(0.5)
    assert got.read_text().split() == ["early"]
    # but the two halves of a flow live together: while the employee keeps sending, a reply
    # 3.5 s after the flow began (and after its previous reply) still passes
    kept = short_tmp / "employee.kept"
    kept.write_text("")
    lab.spawn(employee_ns, PY, "-c", UDP_KEEP_SENDING, "40002", db["ipv4"], "5354", str(kept),
              "5", log=short_tmp / "keep.log")
    time.sleep(3.5)
    lab.exec(db_ns, PY, "-c", UDP_SEND, "5354", employee["ipv4"], "40002", "still-tracked")
    time.sleep(0.5)
    assert kept.read_text().split() == ["still-tracked"]


def test_agent_restart_under_traffic_drops_nothing_allowed_passes_nothing_denied(
        lab, short_tmp, bpffs):
    # a real kvstore: policies and identities outlive the agent, as they do in a cluster
    underlay = lab.underlay()
    lab.bridge_address(underlay, "10.99.0.1/24")
    etcd = EtcdServer("dp", netns=underlay, host="10.99.0.1", workdir=short_tmp / "etcd").start()
    lab.etcd = etcd
    config = etcd.client_config(short_tmp / "etcd.yaml")
    node = Cluster1Node.__new__(Cluster1Node)
    node.lab, node.tmp, node.bpffs, node.pods = lab, short_tmp, bpffs, {}
    node.node = lab.ns("node1")
    lab.attach(node.node, underlay, "10.99.0.11/24")
    node.agent = NodeAgent(lab, node.node, short_tmp, "--plugins", "etcd,ebpf",
                           "--etcd-config", str(config), "--ebpf-bpf-root", str(bpffs),
                           "--cluster-name", "cluster1", "--cluster-id", "101",
                           "--node-name", "node1", "--node-ip", "10.99.0.11",
                           "--pod-cidr", "10.1.1.0/24")
    for name, labels in (("db", "app=protected-db"), ("employee", "app=employee"),
                         ("stranger", "app=stranger")):
        node.pod(name, labels)
    node.serve("db")
    node.policy(db_policy())
    db_ip = node.pods["db"][1]["ipv4"]
    loops = {}
    for who in ("employee", "stranger"):
        ns, _ = node.pods[who]
        out = node.tmp / f"{who}.count"
        loops[who] = (node.lab.spawn(ns, PY, "-c", LOOP, db_ip, "6379", "12", str(out),
                                     log=node.tmp / f"{who}.loop"), out)
    time.sleep(2)
    node.agent.stop()
    time.sleep(1)
    node.agent.start()
    for proc, _ in loops.values():
        proc.wait(timeout=30)
    employee_ok, employee_failed = map(int, loops["employee"][1].read_text().split())
    stranger_ok, stranger_failed = map(int, loops["stranger"][1].read_text().split())
    print(f"employee: {employee_ok} ok, {employee_failed} failed; stranger: {stranger_ok} got"
          f" through, {stranger_failed} refused")
    assert employee_ok > 50 and employee_failed == 0
    assert stranger_ok == 0 and stranger_failed > 0
    assert node.talk("employee", "db", 6379) == "ok"  # and after the restart, still right
    assert node.talk("stranger", "db", 6379) == "timeout"


def test_a_datapath_that_cannot_start_says_why(lab, short_tmp):
    node = lab.ns("node1")
    not_a_dir = short_tmp / "file"
    not_a_dir.write_text("x")
    agent_args = ["--plugins", "memory,ebpf", "--ebpf-bpf-root", str(not_a_dir / "bpf")]
    proc = lab.spawn(node, str(__import__("conftest").MESHAGENT), "--socket-path",
                     str(short_tmp / "a.sock"), "--state-dir", str(short_tmp / "st"),
                     *agent_args, log=short_tmp / "agent.log")
    deadline = time.monotonic() + 15
    while True:
        result = run_cli("status", "-o", "json", "--socket-path", str(short_tmp / "a.sock"))
        if result.stdout:
            sections = {s["name"]: s for s in json.loads(result.stdout)["sections"]}
            if "Datapath" in sections and "NOT enforcing" in sections["Datapath"]["summary"]:
                break
        assert time.monotonic() < deadline and proc.poll() is None, (short_tmp / "agent.log").read_text()
        time.sleep(0.2)
    assert sections["Datapath"]["health"] == "Failure"
    assert "is unusable" in sections["Datapath"]["summary"]
    assert json.loads(result.stdout)["ready"] is False
    assert result.returncode == 1  # status reports the failure


SPOOF_UDP = r"""
import socket, struct, sys
src, dst, dport = sys.argv[1], sys.argv[2], int(sys.argv[3])
udp = struct.pack("!HHHH", 40000, dport, 12, 0) + b"ping"
h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                socket.inet_aton(src), socket.inet_aton(dst))
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).sendto(h + udp, (dst, 0))
"""


def test_a_spoofed_source_is_dropped_shown_and_counted(lab, short_tmp, bpffs):
    port = 20000 + int.from_bytes(os.urandom(2), "big") % 30000  # inside the node's own netns
    node = Cluster1Node(lab, short_tmp, bpffs, "--prometheus-serve-addr", f"127.0.0.1:{port}")
    node.pod("db", "app=protected-db")
    node.pod("employee", "app=employee")
    node.pod("stranger", "app=stranger")
    node.serve("db")
    node.policy(db_policy())  # the employee may reach db on UDP 5353, the stranger may not
    stranger_ns, _ = node.pods["stranger"]
    employee, db = node.pods["employee"][1]["ipv4"], node.pods["db"][1]["ipv4"]

    def spoof() -> bool:
        lab.exec(stranger_ns, PY, "-c", SPOOF_UDP, employee, db, "5353")
        return True
    event = first_drop(node, spoof)
    assert event["reason"] == "spoofed source address", event
    assert event["direction"] == "egress" and event["source"]["ip"] == employee
    metrics = lab.exec(node.node, PY, "-c", "import urllib.request, sys; print(urllib.request."
                       f"urlopen('http://127.0.0.1:{port}/metrics').read().decode())").stdout
    assert 'meshagent_drop_count_total{reason="spoofed source address"}' in metrics
    assert "meshagent_forward_count_total" in metrics


def test_a_fragmented_datagram_between_pods_of_a_node_arrives_whole(node):
    """Local delivery redirects every fragment into the destination pod: the first one with its
    ports, the later ones by the ports it left behind."""
    ns, db = node.pods["db"]
    node.lab.spawn(ns, PY, "-c", BIG_UDP_SERVER, "5354", log=node.tmp / "big.srv")
    node.policy(db_policy().replace('"5353"', '"5354"'))
    time.sleep(0.5)
    employee_ns, stranger_ns = node.pods["employee"][0], node.pods["stranger"][0]
    sent = node.lab.exec(employee_ns, PY, "-c", BIG_UDP_CLIENT, db["ipv4"], "5354", "4000")
    assert sent.stdout.strip() == "4000"
    refused = node.lab.exec(stranger_ns, PY, "-c", BIG_UDP_CLIENT, db["ipv4"], "5354", "4000")
    assert refused.stdout.strip() == "timeout"


RAW_FRAME = r'''
import socket, struct, sys
ethertype = int(sys.argv[1], 16)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
src = s.getsockname()[4]
ipv6 = struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64, bytes(15) + b"\x01", bytes(15) + b"\x02")
for _ in range(int(sys.argv[2])):
    s.send(b"\xff" * 6 + src + struct.pack("!H", ethertype) + ipv6 + bytes(8))
'''


def test_a_frame_of_another_family_never_passes_unjudged(node):
    """Pods are IPv4-only (no IPv6 on their interfaces): an IPv6 packet a pod sends anyway
    does not carry an address of its own and is dropped as spoofed; a frame neither IP nor ARP
    is dropped and counted; ARP keeps working (the pods still talk)."""
    ns, _ = node.pods["stranger"]
    assert node.lab.exec(ns, "cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6").stdout.strip() \
        == "1"

    def dropped(reason: str) -> int:
        metrics = json.loads(node.bpf("metrics", "-o", "json").stdout)
        return sum(m["packets"] for m in metrics if m["reason"].startswith(reason))
    before = dropped("unsupported L3"), dropped("spoofed")
    node.lab.exec(ns, PY, "-c", RAW_FRAME, "88b5", "5")
    node.lab.exec(ns, PY, "-c", RAW_FRAME, "86dd", "3")
    assert (dropped("unsupported L3") - before[0], dropped("spoofed") - before[1]) == (5, 3)
    node.lab.exec(ns, "ip", "neigh", "flush", "all")
    assert node.talk("stranger", "db", 6379) == "ok"  # no policy yet; ARP resolved again
