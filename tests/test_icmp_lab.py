"""ICMP rules with real traffic, on each datapath (``meshagent lab up``, dual stack): the seed's
protected-db (redis, default deny at ingress) gets an ``icmps`` echo rule; the stranger's ping
then passes over both families and nothing else does — not its redis connection, not a
timestamp request — until a rule allows the timestamp too; a deny of echo for the stranger
closes IPv4 ping again and leaves IPv6's."""

import sys
import time

import pytest
from conftest import lab_up, redis_ping, run_cli, seed_scene

from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root and ip netns")]

#: an ICMP timestamp request (type 13) to argv[1] from a raw socket; prints "reply" when a
#: timestamp reply (type 14) comes back within a second, else "timeout"
TIMESTAMP = r'''
import socket, struct, sys, time
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total & 0xFFFF) + (total >> 16)
    return ~(total + (total >> 16)) & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(0.2)
body = struct.pack("!BBHHHIII", 13, 0, 0, 0x3a3a, 1, 0, 0, 0)
body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
s.sendto(body, (sys.argv[1], 0))
deadline = time.monotonic() + 1
while time.monotonic() < deadline:
    try:
        packet, (source, _) = s.recvfrom(1500)
    except socket.timeout:
        continue
    header = (packet[0] & 0xF) * 4
    if source == sys.argv[1] and packet[header] == 14:
        print("reply"); break
else:
    print("timeout")
'''


def policy(name: str, spec: str) -> str:
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n"
            f"  namespace: default\nspec:\n  endpointSelector:\n    matchLabels:\n"
            f"      app: protected-db\n{spec}")


PING = policy("db-ping", """  ingress:
  - icmps:
    - fields:
      - type: EchoRequest
      - {type: EchoRequest, family: IPv6}
""")
TIMESTAMPS = policy("db-timestamps", """  ingress:
  - icmps:
    - fields: [{type: Timestamp}]
""")
NO_PING_FOR_THE_STRANGER = policy("db-no-ping-for-the-stranger", """  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: stranger}}]
    icmps:
    - fields: [{type: 8}]
""")


@pytest.fixture(scope="module", params=["ebpf", "nftables"])
def lab(request, tmp_path_factory):
    with lab_up(tmp_path_factory, f"icmp-{request.param[:3]}", nodes=1, dual_stack=True,
                datapath=request.param) as lab:
        seed_scene(lab)
        yield lab


def apply(lab, tmp_path, text: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    result = run_cli("policy", "import", str(path), "--socket-path",
                     lab.state["nodes"]["cluster1-node1"]["socket"])
    assert result.returncode == 0, result.stderr
    time.sleep(1)


def ping(lab, pod: str, family: int) -> bool:
    db = lab.state["pods"]["protected-db"]["ip6" if family == 6 else "ip"]
    result = lab.pod_exec(pod, ["ping", f"-{family}", "-c", "1", "-W", "1", db],
                          capture_output=True, text=True, timeout=10)
    return result.returncode == 0


def trace(lab, family: str, dport: str) -> int:
    """``policy trace`` from the stranger's address to protected-db: its exit code (0 allowed,
    1 denied); the type travels as the port."""
    result = run_cli("policy", "trace", "--src-ip", lab.state["pods"]["stranger"][family],
                     "--dst-endpoint", str(lab.state["pods"]["protected-db"]["endpoint"]),
                     "--dport", dport, "--socket-path",
                     lab.state["nodes"]["cluster1-node1"]["socket"])
    assert dport in result.stdout, result.stdout + result.stderr
    return result.returncode


def timestamp(lab, pod: str) -> str:
    db = lab.state["pods"]["protected-db"]["ip"]
    return lab.pod_exec(pod, [sys.executable, "-c", TIMESTAMP, db], capture_output=True,
                        text=True, timeout=10).stdout.strip()


def test_an_echo_rule_allows_ping_and_nothing_else(lab, tmp_path):
    assert (ping(lab, "stranger", 4), ping(lab, "stranger", 6)) == (False, False)
    apply(lab, tmp_path, PING)
    assert (ping(lab, "stranger", 4), ping(lab, "stranger", 6)) == (True, True)
    assert redis_ping(lab, "stranger") == "timeout"  # TCP to the same pod: still dropped
    assert timestamp(lab, "stranger") == "timeout"  # another ICMP type: dropped
    assert [trace(lab, "ip", "8/ICMP"), trace(lab, "ip6", "128/ICMPv6"),
            trace(lab, "ip", "13/ICMP"), trace(lab, "ip", "8/TCP")] == [0, 0, 1, 1]
    apply(lab, tmp_path, TIMESTAMPS)  # the probe is answered once a rule lets it in
    assert timestamp(lab, "stranger") == "reply"
    apply(lab, tmp_path, NO_PING_FOR_THE_STRANGER)
    assert (ping(lab, "stranger", 4), ping(lab, "stranger", 6)) == (False, True)
    assert redis_ping(lab, "employee-c2") == "PONG"  # the seed still holds

