"""A small real network for the DNS proxy's tests and bench/dnsproxy.py: a "pod" namespace
behind a veth from a "host" namespace, where nftables TPROXYs the pod's DNS (UDP and TCP 53,
to any server, both families) to the proxy's port, as the datapaths do; a real DNS server
(dnspython here, dnsmasq in the bench) answers on 192.0.2.53 and fd00:53::53 in a "server"
namespace behind another veth. The caller's thread enters the host namespace, so the proxy's
sockets live there; the server's are opened in its own."""

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import secrets
import struct
import subprocess

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

SERVER4, SERVER6 = "192.0.2.53", "fd00:53::53"
POD4, POD6 = "10.77.0.2", "fd77::2"
HOST4, HOST6 = "10.77.0.1", "fd77::1"
CLONE_NEWNET = 0x40000000

#: the zone the test server answers: name -> (type, values, ttl)
ZONE = {
    "allowed.example.com.": [("A", ["203.0.113.10"], 30)],
    "other.example.com.": [("A", ["203.0.113.20"], 30)],
    "six.example.com.": [("AAAA", ["2001:db8::10"], 30)],
    "alias.example.com.": [("CNAME", ["allowed.example.com."], 20),
                           ("A", ["203.0.113.10"], 30)],
    "many.example.com.": [("A", [f"203.0.113.{i}" for i in range(100, 104)], 30)],
}


def sh(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


@contextlib.contextmanager
def dns_network(port: int):
    """The namespaces and TPROXY rules to ``port``; yields (host ns, pod ns) with this
    thread inside the host namespace."""
    tag = secrets.token_hex(3)
    host, pod, server = f"dnsh-{tag}", f"dnsp-{tag}", f"dnss-{tag}"
    for ns in (host, pod, server):
        sh("ip", "netns", "add", ns)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        sh("ip", "link", "add", f"vh{tag}", "netns", host, "type", "veth", "peer", "name",
           "eth0", "netns", pod)
        sh("ip", "link", "add", f"vs{tag}", "netns", host, "type", "veth", "peer", "name",
           "eth0", "netns", server)
        for cmd in (f"ip link set lo up", f"ip link set vh{tag} up",
                    f"ip addr add {HOST4}/24 dev vh{tag}",
                    f"ip -6 addr add {HOST6}/64 dev vh{tag} nodad",
                    f"ip link set vs{tag} up", f"ip addr add 192.0.2.1/24 dev vs{tag}",
                    f"ip -6 addr add fd00:53::1/64 dev vs{tag} nodad",
                    "ip rule add fwmark 0x200 lookup 100",
                    "ip route add local 0.0.0.0/0 dev lo table 100",
                    "ip -6 rule add fwmark 0x200 lookup 100",
                    "ip -6 route add local ::/0 dev lo table 100",
                    "sysctl -qw net.ipv4.ip_forward=1",
                    "sysctl -qw net.ipv6.conf.all.forwarding=1"):
            sh(*cmd.split(), ns=host)
        for cmd in ("ip link set lo up", "ip link set eth0 up",
                    f"ip addr add {POD4}/24 dev eth0", f"ip -6 addr add {POD6}/64 dev eth0 nodad",
                    f"ip route add default via {HOST4}", f"ip -6 route add default via {HOST6}"):
            sh(*cmd.split(), ns=pod)
        for cmd in ("ip link set lo up", "ip link set eth0 up",
                    f"ip addr add {SERVER4}/24 dev eth0",
                    f"ip -6 addr add {SERVER6}/64 dev eth0 nodad",
                    "ip route add default via 192.0.2.1",
                    "ip -6 route add default via fd00:53::1"):
            sh(*cmd.split(), ns=server)
        rules = f"""
table inet dnstest {{
  chain pre {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "vh{tag}" meta nfproto ipv4 meta l4proto {{ udp, tcp }} th dport 53 \\
        tproxy ip to :{port} meta mark set 0x200 accept
    iifname "vh{tag}" meta nfproto ipv6 meta l4proto {{ udp, tcp }} th dport 53 \\
        tproxy ip6 to :{port} meta mark set 0x200 accept
  }}
}}
"""
        subprocess.run(["ip", "netns", "exec", host, "nft", "-f", "-"], input=rules,
                       text=True, check=True, capture_output=True)
        with open(f"/run/netns/{host}") as handle:
            _setns(handle.fileno())
        yield host, pod, server
    finally:
        _setns(original)
        os.close(original)
        for ns in (pod, server, host):
            sh("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def inside(ns: str):
    """This thread in namespace ``ns`` for a while (sockets opened then stay there)."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        with open(f"/run/netns/{ns}") as handle:
            _setns(handle.fileno())
        yield
    finally:
        _setns(back)
        os.close(back)


def free_port() -> int:
    """A port free for UDP and TCP alike in the current namespace."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("0.0.0.0", 0))
        return udp.getsockname()[1]


def answer(query: dns.message.Message) -> dns.message.Message | None:
    """The zone's answer (None: the server stays silent, for ``slow.`` names)."""
    response = dns.message.make_response(query)
    name = query.question[0].name.to_text().lower()
    if name.startswith("slow."):
        return None
    records = ZONE.get(name)
    if records is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response
    owner = name
    for kind, values, ttl in records:
        response.answer.append(dns.rrset.from_text_list(owner, ttl, "IN", kind, values))
        if kind == "CNAME":
            owner = values[0]
    return response


class _UDPServer(asyncio.DatagramProtocol):
    def __init__(self, log: list):
        self.log = log

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        query = dns.message.from_wire(data)
        self.log.append(("UDP", addr[0], query.id, query.question[0].name.to_text()))
        response = answer(query)
        if response is not None:
            self.transport.sendto(response.to_wire(), addr)


@contextlib.asynccontextmanager
async def dns_server(ns: str):
    """The zone on SERVER4 and SERVER6 in namespace ``ns``, UDP and TCP port 53; yields the
    queries it got (protocol, client address, message id, name)."""
    import socket
    loop = asyncio.get_running_loop()
    log: list = []
    closers = []

    async def tcp_client(reader, writer):
        try:
            while True:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                query = dns.message.from_wire(await reader.readexactly(size))
                log.append(("TCP", writer.get_extra_info("peername")[0], query.id,
                            query.question[0].name.to_text()))
                response = answer(query)
                if response is None:
                    continue
                wire = response.to_wire()
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    for address in (SERVER4, SERVER6):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with inside(ns):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((address, 53))
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.bind((address, 53))
            tcp.listen(16)
        transport, _ = await loop.create_datagram_endpoint(lambda: _UDPServer(log), sock=udp)
        closers.append(transport.close)
        server = await asyncio.start_server(tcp_client, sock=tcp)
        closers.append(server.close)
    try:
        yield log
    finally:
        for close in closers:
            close()


async def dig(pod: str, server: str, name: str, *extra: str) -> str:
    """``dig`` in the pod's namespace: its whole output."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", pod, "dig", f"@{server}", name, "+tries=1", "+time=2", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return out.decode()


def status_of(output: str) -> str:
    """dig's ``status: NOERROR`` word, or "timeout"."""
    for line in output.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    return "timeout"


def addresses(output: str) -> list[str]:
    """The A/AAAA addresses of dig's answer section."""
    found = []
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[3] in ("A", "AAAA") and not line.startswith(";"):
            found.append(str(ipaddress.ip_address(parts[4])))
    return found
