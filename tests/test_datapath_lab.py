"""The kernel enforces what the policy says, with real traffic across the lab's two clusters:
port ranges of any width (allow and deny), fragments (a tiny-fragment SYN is not answered, a
4,000-byte datagram arrives whole) and source checks (a spoofed packet is dropped and shown).

client runs in cluster1, echo in cluster2; one lab for the module, tests in order.
"""

import json
import subprocess
import time

import pytest
from conftest import MESHAGENT, lab_up, run_cli
from nettraffic import BIG_UDP_CLIENT, BIG_UDP_SERVER, CLIENT, SERVER

from meshagent_dev.lab import Lab
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

PY = "/usr/bin/python3"
TCP_PORTS = "4095,4096,8080,8191,8192,31000"

UDP_LOG = r'''
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
with open(sys.argv[2], "a") as out:
    while True:
        data, peer = s.recvfrom(100); out.write(f"{data.decode()} {peer[0]}\n"); out.flush()
'''
# A SYN sent by hand: whole, or as two fragments whose first holds 16 of the 20 TCP header
# bytes (RFC 1858's tiny fragment). Prints whether the server answered (SYN-ACK or RST).
RAW_SYN = r'''
import socket, struct, sys, time
src, dst, dport, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sport = 45678
def csum(data):
    if len(data) % 2: data += b"\0"
    s = sum(struct.unpack(f"!{len(data)//2}H", data))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
def ip(payload, flags):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 4242, flags, 64, 6, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack("!H", csum(h)) + h[12:] + payload
sniff = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP); sniff.settimeout(0.2)
out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
if mode == "whole":
    out.sendto(ip(tcp, 0), (dst, 0))
else:
    out.sendto(ip(tcp[:16], 0x2000), (dst, 0))
    out.sendto(ip(tcp[16:], 2), (dst, 0))
end = time.monotonic() + 2
while time.monotonic() < end:
    try:
        packet = sniff.recv(100)
    except socket.timeout:
        continue
    h = (packet[0] & 0xF) * 4
    s, d = struct.unpack_from("!HH", packet, h)
    if socket.inet_ntoa(packet[12:16]) == dst and s == dport and d == sport:
        print("answered"); sys.exit(0)
print("no answer")
'''
SPOOF_UDP = r'''
import socket, struct, sys
src, dst, dport, text = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
udp = struct.pack("!HHHH", 40000, dport, 8 + len(text), 0) + text
h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 777, 0, 64, 17, 0,
                socket.inet_aton(src), socket.inet_aton(dst))
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).sendto(h + udp, (dst, 0))
'''


def cnp(name: str, spec: str) -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n" \
           f"spec:\n{body}\n"


CLIENT_EGRESS = cnp("client-egress", """
endpointSelector: {matchLabels: {app: client}}
egress:
- toEntities: [all]
egressDeny:
- toPorts: [{ports: [{port: "4096", endPort: 8191, protocol: TCP}]}]
""")
ECHO_INGRESS = cnp("echo-ingress", """
endpointSelector: {matchLabels: {app: echo}}
ingress:
- fromEndpoints: [{matchLabels: {app: client, io.cilium.k8s.policy.cluster: cluster1}}]
  toPorts:
  - ports:
    - {port: "30000", endPort: 32767, protocol: TCP}
    - {port: "8192", protocol: TCP}
    - {port: "5353", endPort: 5354, protocol: UDP}
""")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_up(tmp_path_factory, "dpl", nodes=1) as lab:
        lab.pod_create("client", "cluster1-node1", "default", "app=client")
        lab.pod_create("employee", "cluster1-node1", "default", "app=employee")
        lab.pod_create("echo", "cluster2-node1", "default", "app=echo")
        lab.pod_spawn("echo", "tcp", [PY, "-c", SERVER, TCP_PORTS, "5300"])
        lab.pod_spawn("echo", "udp", [PY, "-c", BIG_UDP_SERVER, "5353"])
        lab.pod_spawn("echo", "udplog", [PY, "-c", UDP_LOG, "5354",
                                         str(lab.dir / "echo-5354.log")])
        time.sleep(1)
        yield lab


def in_pod(lab: Lab, pod: str, script: str, *args: str) -> str:
    result = lab.pod_exec(pod, [PY, "-c", script, *args], capture_output=True, text=True,
                          timeout=20)
    return result.stdout.strip()


def talk(lab: Lab, port: int) -> str:
    echo = lab.state["pods"]["echo"]["ip"]
    return in_pod(lab, "client", CLIENT, "tcp", echo, str(port), "0", "1.0")


def import_policy(lab: Lab, node: str, text: str) -> None:
    path = lab.dir / f"policy-{abs(hash(text))}.yaml"
    path.write_text(text)
    result = run_cli("policy", "import", str(path), "--socket-path",
                     lab.state["nodes"][node]["socket"])
    assert result.returncode == 0, result.stderr
    time.sleep(1)


def test_1_a_deny_range_beats_allow_all_egress(lab):
    assert [talk(lab, p) for p in (8080, 4095, 8192)] == ["ok"] * 3
    import_policy(lab, "cluster1-node1", CLIENT_EGRESS)
    assert [talk(lab, p) for p in (8080, 4096, 8191)] == ["timeout"] * 3
    assert [talk(lab, p) for p in (4095, 8192)] == ["ok"] * 2


def test_2_an_allow_range_across_clusters(lab):
    import_policy(lab, "cluster2-node1", ECHO_INGRESS)
    assert talk(lab, 31000) == "ok"  # 30000-32767, allowed by cluster2's policy
    assert talk(lab, 4095) == "timeout"  # now outside what echo allows


def test_3_a_4000_byte_datagram_arrives_whole_over_a_1500_byte_mtu(lab):
    mtu = lab.pod_exec("client", ["cat", "/sys/class/net/eth0/mtu"], capture_output=True,
                       text=True).stdout.strip()
    assert mtu == "1500"
    echo = lab.state["pods"]["echo"]["ip"]
    assert in_pod(lab, "client", BIG_UDP_CLIENT, echo, "5353", "4000") == "4000"
    assert in_pod(lab, "client", BIG_UDP_CLIENT, echo, "5300", "4000") == "timeout"  # denied


def test_4_a_tiny_fragment_syn_is_not_answered(lab):
    client, echo = lab.state["pods"]["client"]["ip"], lab.state["pods"]["echo"]["ip"]
    # the same SYN, whole, to an allowed port is answered: the probe itself works
    assert in_pod(lab, "client", RAW_SYN, client, echo, "8192", "whole") == "answered"
    # to a denied port, split so that its first fragment holds 16 of 20 TCP header bytes
    assert in_pod(lab, "client", RAW_SYN, client, echo, "8080", "tiny") == "no answer"
    assert in_pod(lab, "client", RAW_SYN, client, echo, "8192", "tiny") == "no answer"
    assert drops(lab, "cluster1-node1")["tiny fragment (splits the transport header)"] >= 4


def drops(lab: Lab, node: str) -> dict[str, int]:
    """Packets per reason, read from the node's pinned metrics map."""
    metrics = json.loads(run_cli("bpf", "metrics", "--bpf-root", lab.state["nodes"][node]["bpffs"],
                                 "-o", "json").stdout)
    return {m["reason"]: m["packets"] for m in metrics}


def test_5_a_spoofed_source_is_dropped_and_shown(lab):
    client, echo = lab.state["pods"]["client"]["ip"], lab.state["pods"]["echo"]["ip"]
    employee = lab.state["pods"]["employee"]["ip"]
    node = lab.state["nodes"]["cluster1-node1"]
    monitor_out = lab.dir / "monitor.out"
    monitor = subprocess.Popen([MESHAGENT, "monitor", "--type", "drop", "-o", "json",
                                "--socket-path", node["socket"]], stdout=open(monitor_out, "w"))
    try:
        time.sleep(1)
        in_pod(lab, "client", SPOOF_UDP, employee, echo, "5354", "spoofed")
        in_pod(lab, "client", SPOOF_UDP, client, echo, "5354", "honest")
        time.sleep(1)
    finally:
        monitor.kill()
    assert (lab.dir / "echo-5354.log").read_text().split() == ["honest", client]
    events = [json.loads(line) for line in monitor_out.read_text().splitlines()]
    spoofed = [e for e in events if e["reason"] == "spoofed source address"]
    assert spoofed and spoofed[0]["source"]["ip"] == employee, events
    assert drops(lab, "cluster1-node1")["spoofed source address"] >= 1
