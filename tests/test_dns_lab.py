"""The lab's DNS server and outside hosts (``lab up --dns``), then issue 33's "Done when" for
DNS-aware egress end to end: real agents, real namespaces, dnsmasq, redis on the outside hosts.

One lab per datapath for the module; the tests run in order.
"""

import ipaddress
import subprocess

import pytest
from conftest import lab_up

from meshagent_dev.lab import DNS_SERVER, NETNS_ETC, OUTSIDE_NET, Lab, OutsideHost
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

ALLOWED, OTHER = "allowed.example.com", "other.example.com"


@pytest.fixture(scope="module", params=["ebpf", "nftables"])
def lab(request, tmp_path_factory):
    outside = [OutsideHost(ALLOWED), OutsideHost(OTHER)]
    with lab_up(tmp_path_factory, f"dns-{request.param}", nodes=1, datapath=request.param,
                outside=outside) as lab:
        lab.pod_create("client", "cluster1-node1", "default", "app=client")
        lab.pod_create("client-c2", "cluster2-node1", "default", "app=client")
        yield lab


def dig(lab: Lab, pod: str, name: str) -> tuple[str, list[str]]:
    """The status of a lookup from ``pod`` through its resolv.conf, and the A records;
    ("timeout", []) when no answer came."""
    out = lab.pod_exec(pod, ["dig", "+time=2", "+tries=1", name, "A"], capture_output=True,
                       text=True, timeout=10)
    if "status: " not in out.stdout:
        return "timeout", []
    status = out.stdout.split("status: ", 1)[1].split(",", 1)[0]
    records = [line.split()[-1] for line in out.stdout.splitlines()
               if line and not line.startswith(";") and "\tA\t" in line]
    return status, records


def redis(lab: Lab, pod: str, host: str) -> str:
    """``redis-cli -h HOST ping`` from ``pod``: PONG, an error, or "timeout"."""
    try:
        out = lab.pod_exec(pod, ["redis-cli", "-h", host, "-p", "6379", "ping"],
                           capture_output=True, text=True, timeout=4)
    except subprocess.TimeoutExpired:
        return "timeout"
    return (out.stdout + out.stderr).strip()


def test_lab_pods_resolve_through_its_dns_server(lab):
    hosts = lab.state["dns"]["hosts"]
    assert lab.state["dns"]["ip"] == DNS_SERVER
    for pod in ("client", "client-c2"):
        resolv = NETNS_ETC / lab.state["pods"][pod]["ns"] / "resolv.conf"
        assert resolv.read_text().startswith(f"nameserver {DNS_SERVER}\n")
        assert dig(lab, pod, ALLOWED) == ("NOERROR", [hosts[ALLOWED]["ip"]])
        assert dig(lab, pod, OTHER) == ("NOERROR", [hosts[OTHER]["ip"]])
        assert dig(lab, pod, "nothing.example.com") == ("NXDOMAIN", [])
        assert dig(lab, pod, "cilium.io") == ("REFUSED", [])  # no upstream: nothing leaves
        # redis on the outside hosts, by name, from both clusters: no policy yet
        assert redis(lab, pod, ALLOWED) == "PONG"
        assert redis(lab, pod, OTHER) == "PONG"
    log = (lab.dir / "logs" / "dnsmasq.log").read_text()
    assert f"query[A] {ALLOWED} from {lab.state['pods']['client']['ip']}" in log
    assert all(ipaddress.ip_address(host["ip"]) in ipaddress.ip_network(OUTSIDE_NET)
               for host in hosts.values())


def test_lab_answers_carry_the_configured_ttl(lab):
    out = lab.pod_exec("client", ["dig", "+noall", "+answer", ALLOWED], capture_output=True,
                       text=True, timeout=10)
    name, ttl, *_ = out.stdout.split()
    assert (name, int(ttl)) == (f"{ALLOWED}.", lab.state["dns"]["hosts"][ALLOWED]["ttl"])
