"""A pod's DNS reaches the agent's DNS proxy, its destination kept, on a real veth.

Network namespaces of this run: a node, two pods wired to it as the agent wires them (a /32
on eth0, a default route via 169.254.1.1, proxy ARP on the host side), and an "outside" host
behind the node with a UDP and TCP server on port 53. The datapath under test runs in the test
process, moved into the node's namespace, with its programs (eBPF) or chains (nftables) on the
pods' veths and its host routing for the proxy installed; the test's own transparent sockets stand in for the
DNS proxy (TCP and UDP on one port, IP_TRANSPARENT), as core/fqdn's proxy listens.

Pod ``a`` has REDIRECT entries for UDP and TCP port 53 to any peer (what a ``rules: dns`` port
rule resolves to), pod ``b`` none. Checked: a's queries (UDP and TCP, to the outside server
and to an address where nothing is) arrive at the proxy's sockets with their original
destination; the proxy's answers, sent from that destination (address and port), reach the
pod as replies of the connection; later
packets of the TCP connection go the same way; nothing of a's reaches the outside server,
while b's queries do; the datapath reports (ReportsConnections) the addresses each pod has
connections with; stopping the datapath takes the ip rule and table away. On both datapaths.
"""

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

PY = "/usr/bin/python3"
SERVER = "10.88.1.53"  # the outside host's DNS server
NOWHERE = "10.99.0.1"  # no host has it
PODS = {"a": "10.77.0.2", "b": "10.77.0.3"}
IP_TRANSPARENT, IP_RECVORIGDSTADDR = 19, 20
SOL_IP = 0

# In a pod: one UDP query and one TCP exchange of two messages; prints what came back.
CLIENT = r'''
import socket, sys
server, label = sys.argv[1], sys.argv[2]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
u.sendto(f"udp {label}".encode(), (server, 53))
try:
    data, peer = u.recvfrom(200); print("udp", data.decode(), peer[0], peer[1])
except socket.timeout:
    print("udp timeout")
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM); t.settimeout(3)
try:
    t.connect((server, 53))
    for n in (1, 2):
        t.sendall(f"tcp {label} {n}\n".encode())
        print("tcp", t.recv(200).decode().strip(), t.getpeername()[0])
except OSError as exc:
    print("tcp failed", exc)
'''
# The outside host: answers UDP and TCP on port 53 with "outside", logging what arrives.
OUTSIDE = r'''
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 53))
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("0.0.0.0", 53)); t.listen(8)
def udp():
    while True:
        data, peer = u.recvfrom(200); log.write(f"{data.decode()} from {peer[0]}\n")
        u.sendto(b"outside", peer)
def tcp():
    while True:
        c, peer = t.accept(); f = c.makefile("rb")
        for line in f:
            log.write(f"{line.decode().strip()} from {peer[0]}\n"); c.sendall(b"outside\n")
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
tcp()
'''


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class Net:
    """The run's namespaces: node, pods, outside; removed on close, also after a failure."""

    def __init__(self) -> None:
        self.prefix = f"ma-dr-{uuid.uuid4().hex[:6]}"
        self.names: list[str] = []
        self.processes: list[subprocess.Popen] = []

    def ns(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", full)
        self.names.append(full)
        sh("ip", "-n", full, "link", "set", "lo", "up")
        return full

    def build(self) -> None:
        node = self.node = self.ns("node")
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "-n", node, "addr", "add", "169.254.1.1/32", "dev", "lo")
        self.ifindex = {}
        for pod, address in PODS.items():
            netns = self.ns(pod)
            host = f"lxc{pod}"
            sh("ip", "link", "add", host, "netns", node, "type", "veth", "peer", "name",
               "eth0", "netns", netns)
            sh("ip", "-n", netns, "addr", "add", f"{address}/32", "dev", "eth0")
            sh("ip", "-n", netns, "link", "set", "eth0", "up")
            sh("ip", "-n", netns, "route", "add", "169.254.1.1", "dev", "eth0")
            sh("ip", "-n", netns, "route", "add", "default", "via", "169.254.1.1")
            sh("ip", "-n", node, "link", "set", host, "up")
            sh("ip", "netns", "exec", node, "sysctl", "-qw", f"net.ipv4.conf.{host}.proxy_arp=1")
            sh("ip", "-n", node, "route", "add", f"{address}/32", "dev", host)
            self.ifindex[pod] = int(sh("ip", "netns", "exec", node, "cat",
                                       f"/sys/class/net/{host}/ifindex"))
        outside = self.outside = self.ns("outside")
        sh("ip", "link", "add", "out0", "netns", node, "type", "veth", "peer", "name", "eth0",
           "netns", outside)
        sh("ip", "-n", node, "addr", "add", "10.88.1.1/24", "dev", "out0")
        sh("ip", "-n", node, "link", "set", "out0", "up")
        sh("ip", "-n", outside, "addr", "add", f"{SERVER}/24", "dev", "eth0")
        sh("ip", "-n", outside, "link", "set", "eth0", "up")
        sh("ip", "-n", outside, "route", "add", "default", "via", "10.88.1.1")

    def spawn(self, netns: str, *cmd: str) -> subprocess.Popen:
        process = subprocess.Popen(["ip", "netns", "exec", netns, *cmd], stdout=subprocess.PIPE,
                                   text=True)
        self.processes.append(process)
        return process

    def run_in(self, netns: str, *cmd: str) -> str:
        return subprocess.run(["ip", "netns", "exec", netns, *cmd], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def close(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], check=False)


class Proxy:
    """Transparent UDP and TCP sockets on one port in the current namespace, answering every
    query from the address it was sent to; what arrived, with its original destination."""

    def __init__(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        self.udp.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
        self.udp.bind(("0.0.0.0", 0))
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        self.tcp.bind(("0.0.0.0", self.port))
        self.tcp.listen(8)
        self.arrived: list[tuple] = []  # (protocol, text, source, original destination)
        for serve in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=serve, daemon=True).start()

    def _serve_udp(self) -> None:
        while True:
            try:
                data, ancillary, _, peer = self.udp.recvmsg(200, 64)
            except OSError:
                return
            if peer is None:  # shut down
                return
            original = None
            for level, kind, value in ancillary:
                if level == SOL_IP and kind == IP_RECVORIGDSTADDR:
                    port, raw = struct.unpack_from("!H4s", value, 2)
                    original = (socket.inet_ntoa(raw), port)
            self.arrived.append(("udp", data.decode(), peer[0], original))
            # the answer from the original destination, address and port: a transparent
            # socket bound to it (IP_PKTINFO alone would keep the proxy's port as source)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as answer:
                answer.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
                answer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                answer.bind(original)
                answer.sendto(b"proxy", peer)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn, peer), daemon=True).start()

    def _talk(self, conn: socket.socket, peer) -> None:
        original = conn.getsockname()
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                self.arrived.append(("tcp", line.decode().strip(), peer[0], original))
                conn.sendall(b"proxy\n")

    def close(self) -> None:
        for sock in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@contextlib.contextmanager
def inside(netns: str):
    """This thread (and the threads it starts) in ``netns`` until the block ends."""
    from pyroute2 import netns as pynetns
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        pynetns.setns(netns)
        yield
    finally:
        pynetns.setns(home)
        os.close(home)


@pytest.fixture
def net():
    net = Net()
    try:
        net.build()
        yield net
    finally:
        net.close()


@pytest.fixture
def bpffs():
    tmp = Path(tempfile.mkdtemp(prefix="ma-dr-", dir="/tmp"))
    root = tmp / "bpffs"
    root.mkdir()
    os.system(f"mount -t bpf bpf {root}")
    try:
        yield root
    finally:
        os.system(f"umount -l {root}")
        shutil.rmtree(tmp, ignore_errors=True)


def verdicts(redirect: bool) -> dict:
    """Everything allowed (b); or (a) egress allowed but DNS redirected, and no ingress
    allowed at all: the proxy's answers must pass as replies of the pod's connections."""
    from meshagent.policy.contract import MapKey, Verdict
    if not redirect:
        return {MapKey(d, 0, 0, 0, 0): Verdict.ALLOW for d in ("ingress", "egress")}
    out = {MapKey("egress", 0, 0, 0, 0): Verdict.ALLOW}
    out.update({MapKey("egress", 0, proto, 53, 53): Verdict.REDIRECT for proto in (6, 17)})
    return out


def make_datapath(kind: str, bpffs: Path, routes):
    if kind == "ebpf":
        from meshagent.plugins.ebpf.datapath import EbpfDatapath, EbpfSettings
        return EbpfDatapath(EbpfSettings(bpffs, ipcache_max=1024, policy_max=1024,
                                         ct_tcp_max=1024, ct_any_max=1024),
                            proxy_routes=routes)
    from meshagent.plugins.nftables.datapath import NftablesDatapath, NftablesSettings
    return NftablesDatapath(NftablesSettings(), proxy_routes=routes)


@pytest.mark.parametrize("kind", ["ebpf", "nftables"])
def test_a_pods_dns_goes_to_the_proxy_with_its_destination_and_nowhere_else(net, bpffs, kind):
    from meshagent.datapath import ReportsConnections
    from meshagent.datapath.feed import BatchFeed
    from meshagent.datapath.proxyroute import ProxyRoutes
    from meshagent.model.endpoint import Endpoint
    outside_log = Path(tempfile.mkdtemp(prefix="ma-dr-log-")) / "outside.log"
    server = net.spawn(net.outside, PY, "-c", OUTSIDE, str(outside_log))
    assert server.stdout.readline().strip() == "ready"
    with inside(net.node):
        loop = asyncio.new_event_loop()
        routes = ProxyRoutes()
        datapath = make_datapath(kind, bpffs, routes)
        proxy = Proxy()
        try:
            loop.run_until_complete(datapath.start())
            feed = BatchFeed(datapath)
            endpoints = {pod: Endpoint(n + 1, "default", frozenset(),
                                       ipaddress.IPv4Address(address), 1000 + n,
                                       ifindex=net.ifindex[pod])
                         for n, (pod, address) in enumerate(PODS.items())}

            async def setup():
                added = [feed.endpoint_added(e) for e in endpoints.values()]
                await feed.flush()
                await asyncio.gather(*added)
                await feed.reconcile({endpoints["a"].id: verdicts(True),
                                      endpoints["b"].id: verdicts(False)}, [], ())
                feed.proxy_port_changed(proxy.port)
                await feed.flush()
            loop.run_until_complete(setup())
            assert routes.installed()

            a_out = net.run_in(net.prefix + "-a", PY, "-c", CLIENT, SERVER, "a").split("\n")
            a_nowhere = net.run_in(net.prefix + "-a", PY, "-c", CLIENT, NOWHERE, "n").split("\n")
            b_out = net.run_in(net.prefix + "-b", PY, "-c", CLIENT, SERVER, "b").split("\n")
            assert isinstance(datapath, ReportsConnections)
            peers = loop.run_until_complete(datapath.connected_peers())
        finally:
            proxy.close()
            loop.run_until_complete(datapath.stop())
            loop.close()
        assert not routes.installed()  # stopped: no rule left for the next run
        assert "2004" not in sh("ip", "-n", net.node, "rule")
        assert "2004" not in sh("ip", "-n", net.node, "-6", "rule")

    # a: answered by the proxy, from the address it asked, over UDP and TCP (both messages)
    assert a_out[:3] == [f"udp proxy {SERVER} 53", f"tcp proxy {SERVER}", f"tcp proxy {SERVER}"]
    assert a_nowhere[:3] == [f"udp proxy {NOWHERE} 53", f"tcp proxy {NOWHERE}",
                             f"tcp proxy {NOWHERE}"]
    pod_a = PODS["a"]
    assert sorted(proxy.arrived) == sorted([
        ("udp", "udp a", pod_a, (SERVER, 53)), ("tcp", "tcp a 1", pod_a, (SERVER, 53)),
        ("tcp", "tcp a 2", pod_a, (SERVER, 53)), ("udp", "udp n", pod_a, (NOWHERE, 53)),
        ("tcp", "tcp n 1", pod_a, (NOWHERE, 53)), ("tcp", "tcp n 2", pod_a, (NOWHERE, 53))])
    # b: no redirect entry, so the real server answered; the server saw nothing of a's
    assert b_out[:3] == [f"udp outside {SERVER} 53", f"tcp outside {SERVER}",
                         f"tcp outside {SERVER}"]
    # the connections each pod opened, redirected or not, with the addresses it asked for
    a_id, b_id = 1, 2
    assert peers[a_id] == {ipaddress.ip_address(SERVER), ipaddress.ip_address(NOWHERE)}
    assert peers[b_id] == {ipaddress.ip_address(SERVER)}
    seen = outside_log.read_text().splitlines()
    assert sorted(seen) == sorted([f"udp b from {PODS['b']}", f"tcp b 1 from {PODS['b']}",
                                   f"tcp b 2 from {PODS['b']}"])
