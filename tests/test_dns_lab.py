"""The lab's DNS server and outside hosts (``lab up --dns``), then issue 33's "Done when" for
DNS-aware egress end to end: real agents, real namespaces, dnsmasq, redis on the outside hosts.

One lab per datapath for the module; the tests run in order. Pods on cluster1-node1: ``strict``
may ask only for allowed.example.com, ``lenient`` for any name; both may reach allowed.example.com
(and ``lenient`` short.example.com, whose answers live two seconds) by name, on redis's port.
``client`` has no policy. ``svc-client`` may reach the backends of a Service (``toServices``)
as they change (ICMP rules have their own lab test, test_icmp_lab.py).
"""

import ipaddress
import json
import re
import subprocess
import sys
import time

import pytest
from conftest import MESHAGENT, lab_up, run_cli

from meshagent_dev.lab import DNS_SERVER, NETNS_ETC, OUTSIDE_NET, REDIS_SERVER, Lab, OutsideHost
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

ALLOWED, OTHER, SHORT = "allowed.example.com", "other.example.com", "short.example.com"
SHORT_TTL = 2
NODE = "cluster1-node1"
# the DNS proxy collects expired addresses every second here (Cilium: every minute), and uses
# the servers' TTLs as they are (Cilium's default)
AGENT_ARGS = ("--tofqdns-min-ttl=0", "--tofqdns-gc-interval=1")


def cnp(name: str, app: str, dns: str, fqdns: str) -> str:
    """A policy for pods ``app``: DNS (port 53, UDP and TCP, any server) for the ``dns`` rules,
    redis (6379/TCP) to the ``fqdns`` selectors; nothing else out."""
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: {app}}}}}
  egress:
  - toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: [{dns}]
  - toFQDNs: [{fqdns}]
    toPorts:
    - ports: [{{port: "6379", protocol: TCP}}]
"""


STRICT = cnp("fqdn-strict", "strict", f"{{matchName: {ALLOWED}}}", f"{{matchName: {ALLOWED}}}")
LENIENT = cnp("fqdn-lenient", "lenient", '{matchPattern: "*"}',
              f"{{matchName: {ALLOWED}}}, {{matchPattern: 'short.*.com'}}")

# one connection to redis at argv[1], by name: PING when it opens and again once argv[2] exists
HELD_CONNECTION = r'''
import os, socket, sys, time
conn = socket.create_connection((sys.argv[1], 6379), timeout=3)
def ping():
    try:
        conn.sendall(b"PING\r\n")
        return conn.recv(100).decode().strip()
    except OSError as error:
        return type(error).__name__
print(ping(), flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
print(ping(), flush=True)
'''


@pytest.fixture(scope="module", params=["ebpf", "nftables"])
def lab(request, tmp_path_factory):
    outside = [OutsideHost(ALLOWED), OutsideHost(OTHER), OutsideHost(SHORT, SHORT_TTL)]
    with lab_up(tmp_path_factory, f"dns-{request.param}", nodes=1, datapath=request.param,
                outside=outside, agent_args=AGENT_ARGS) as lab:
        lab.pod_create("client", NODE, "default", "app=client")
        lab.pod_create("client-c2", "cluster2-node1", "default", "app=client")
        lab.pod_create("strict", NODE, "default", "app=strict")
        lab.pod_create("lenient", NODE, "default", "app=lenient")
        lab.pod_create("svc-client", NODE, "default", "app=svc-client")
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


# -- issue 33, "Done when" ------------------------------------------------------------------------


def ip_of(lab: Lab, name: str) -> str:
    return lab.state["dns"]["hosts"][name]["ip"]


def socket_of(lab: Lab) -> str:
    return lab.state["nodes"][NODE]["socket"]


def dnsmasq_queries(lab: Lab, name: str) -> int:
    """How many questions for ``name`` reached the DNS server."""
    log = (lab.dir / "logs" / "dnsmasq.log").read_text()
    return sum(f"] {name} from " in line for line in log.splitlines())


def fqdn_cache(lab: Lab) -> str:
    result = run_cli("fqdn", "cache", "list", "--socket-path", socket_of(lab))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_fqdn_policy_allows_the_looked_up_name_and_nothing_else(lab, tmp_path):
    for name, text in (("strict", STRICT), ("lenient", LENIENT)):
        (tmp_path / f"{name}.yaml").write_text(text)
        result = run_cli("policy", "import", str(tmp_path / f"{name}.yaml"), "--wait",
                         "--socket-path", socket_of(lab))
        assert result.returncode == 0, result.stderr
    monitor_out = tmp_path / "monitor.out"
    monitor = subprocess.Popen([MESHAGENT, "monitor", "--socket-path", socket_of(lab)],
                               stdout=open(monitor_out, "w"), stderr=subprocess.STDOUT)
    time.sleep(1)  # listening
    # no lookup through the proxy yet: the allowed host's address is not reachable
    for pod in ("strict", "lenient"):
        assert redis(lab, pod, ip_of(lab, ALLOWED)) == "timeout"
    asked = dnsmasq_queries(lab, OTHER)
    # strict: the allowed name resolves and answers; the other is REFUSED by the proxy, which
    # never asks the server
    assert dig(lab, "strict", ALLOWED) == ("NOERROR", [ip_of(lab, ALLOWED)])
    assert redis(lab, "strict", ALLOWED) == "PONG"
    assert redis(lab, "strict", ip_of(lab, ALLOWED)) == "PONG"  # looked up now
    assert dig(lab, "strict", OTHER) == ("REFUSED", [])
    assert redis(lab, "strict", OTHER) not in ("PONG", "timeout")  # no address to try
    assert redis(lab, "strict", ip_of(lab, OTHER)) == "timeout"
    assert dnsmasq_queries(lab, OTHER) == asked
    # lenient: the other name resolves, but its connection is dropped
    assert dig(lab, "lenient", OTHER) == ("NOERROR", [ip_of(lab, OTHER)])
    assert dnsmasq_queries(lab, OTHER) == asked + 1
    assert redis(lab, "lenient", OTHER) == "timeout"
    assert redis(lab, "lenient", ALLOWED) == "PONG"
    # a pod without policy is not redirected, and reaches everything
    assert redis(lab, "client", OTHER) == "PONG"
    assert f"{ALLOWED}." in fqdn_cache(lab)
    # meshagent monitor showed the DNS verdicts and the drops
    time.sleep(0.5)
    monitor.kill()
    monitor.wait()
    shown = monitor_out.read_text()
    strict_ep, lenient_ep = (lab.state["pods"][pod]["endpoint"] for pod in ("strict", "lenient"))
    assert re.search(rf"Request dns from {strict_ep} .* verdict Denied DNS Query: {OTHER}\. A",
                     shown), shown
    assert re.search(rf"Response dns to {lenient_ep} .* verdict Forwarded DNS Query: {OTHER}\."
                     rf" A .*Answer: '{ip_of(lab, OTHER)}'", shown), shown
    assert re.search(rf"drop \(.*\) endpoint {lenient_ep} egress: [0-9.:]+ ->"
                     rf" {ip_of(lab, OTHER)}:6379 tcp SYN", shown), shown


def test_a_remote_cluster_never_imports_the_fqdn_state(lab):
    def listed(node: str, what: str) -> list[dict]:
        out = run_cli(what, "list", "-o", "json", "--socket-path",
                      lab.state["nodes"][node]["socket"])
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    outside = ipaddress.ip_network(OUTSIDE_NET)
    # cluster1's node: the answered address a toFQDNs selector selects, with a node-local fqdn
    # identity (other.example.com, answered too but selected by none, stays plain world)
    local = {e["prefix"]: e["identity"] for e in listed(NODE, "ip")
             if ipaddress.ip_network(e["prefix"]).subnet_of(outside)}
    assert set(local) == {f"{ip_of(lab, ALLOWED)}/32"}
    labels = {i["id"]: i["labels"] for i in listed(NODE, "identity")}
    assert f"fqdn:{ALLOWED}" in labels[local[f"{ip_of(lab, ALLOWED)}/32"]]
    # cluster2's: none of it (its pods asked no proxy)
    assert not [e for e in listed("cluster2-node1", "ip")
                if ipaddress.ip_network(e["prefix"]).subnet_of(outside)]
    assert not [i for i in listed("cluster2-node1", "identity")
                if any(label.startswith("fqdn:") for label in i["labels"])]


def test_after_an_agent_restart_the_allowed_name_keeps_working(lab):
    lab.stop_agent(NODE)
    lab.start_agent(NODE)
    lab.wait_ready()
    # the name cache came back with the agent: its address is reachable without a new lookup
    assert f"{ALLOWED}." in fqdn_cache(lab)
    assert redis(lab, "strict", ip_of(lab, ALLOWED)) == "PONG"
    assert redis(lab, "strict", ALLOWED) == "PONG"
    assert dig(lab, "strict", OTHER) == ("REFUSED", [])
    assert redis(lab, "strict", ip_of(lab, OTHER)) == "timeout"
    assert redis(lab, "lenient", OTHER) == "timeout"


def test_an_expired_address_is_dropped_until_the_next_lookup(lab):
    assert dig(lab, "lenient", SHORT) == ("NOERROR", [ip_of(lab, SHORT)])
    assert f"{SHORT}." in fqdn_cache(lab)
    time.sleep(SHORT_TTL + 3)  # past the TTL, and a collection or two
    assert redis(lab, "lenient", ip_of(lab, SHORT)) == "timeout"
    assert redis(lab, "lenient", SHORT) == "PONG"  # looked up again


def test_an_open_connection_outlives_its_address_ttl(lab, tmp_path):
    go = tmp_path / "go"
    proc = subprocess.Popen(["ip", "netns", "exec", lab.state["pods"]["lenient"]["ns"],
                             sys.executable, "-c", HELD_CONNECTION, SHORT, str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "+PONG"
        time.sleep(SHORT_TTL + 3)
        go.touch()
        assert proc.stdout.readline().strip() == "+PONG"
    finally:
        proc.kill()
        proc.wait()


TO_SERVICES = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-db, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: svc-client}}
  egress:
  - toServices:
    - k8sService: {serviceName: db, namespace: default}
"""


def import_policy(lab: Lab, tmp_path, name: str, text: str) -> None:
    (tmp_path / f"{name}.yaml").write_text(text)
    result = run_cli("policy", "import", str(tmp_path / f"{name}.yaml"), "--wait",
                     "--socket-path", socket_of(lab))
    assert result.returncode == 0, result.stderr


def test_a_to_services_rule_follows_the_service_backends(lab, tmp_path):
    for pod in ("db-a", "db-b"):
        lab.pod_create(pod, NODE, "default", f"app={pod}")
        lab.pod_spawn(pod, f"redis-{pod}", list(REDIS_SERVER))
    a, b = (lab.state["pods"][pod]["ip"] for pod in ("db-a", "db-b"))
    time.sleep(0.5)  # redis listening

    def apply(backend: str) -> None:
        """Service default/db, whose pod selector picks ``backend`` (and its Endpoints)."""
        path = tmp_path / "service.yaml"
        ip = lab.state["pods"][backend]["ip"]
        path.write_text(f"""apiVersion: v1
kind: Service
metadata: {{name: db, namespace: default}}
spec: {{clusterIP: 10.96.0.20, ports: [{{port: 6379}}], selector: {{app: {backend}}}}}
---
apiVersion: v1
kind: Endpoints
metadata: {{name: db, namespace: default}}
subsets: [{{addresses: [{{ip: {ip}}}], ports: [{{port: 6379}}]}}]
""")
        result = run_cli("service", "apply", str(path), "--socket-path", socket_of(lab))
        assert result.returncode == 0, result.stderr

    apply("db-a")
    import_policy(lab, tmp_path, "to-services", TO_SERVICES)
    assert redis(lab, "svc-client", a) == "PONG"
    assert redis(lab, "svc-client", b) == "timeout"
    assert redis(lab, "svc-client", ip_of(lab, ALLOWED)) == "timeout"
    apply("db-b")  # the service's backends change: the rule follows them
    deadline = time.monotonic() + 10
    while redis(lab, "svc-client", b) != "PONG":
        assert time.monotonic() < deadline, "the new backend never allowed"
    assert redis(lab, "svc-client", a) == "timeout"
