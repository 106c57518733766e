"""``meshagent lab``: the seed's two clusters on one Linux machine, entirely in namespaces.

Two clusters — cluster1 (id 101) and cluster2 (id 102) — each with its own etcd over TLS with
client certificates (etcd auth on: each certificate's CN is an etcd user, and what the other
cluster is given is the read-only ``remote``) and N nodes; every node and etcd is a network
namespace joined to one underlay bridge (direct routing, as in the seed); pods are namespaces
wired by the node's agent. Each node runs ``meshagent --plugins etcd,ebpf --cluster-id=… --cluster-name=…
--clustermesh-config=…`` inside its namespace. Nothing is linked to the root namespace, so no
traffic leaves. The lab's state is a JSON file in its directory, so ``up``, ``pod``, ``exec``,
``status`` and ``down`` can run as separate commands; ``down`` also cleans up after a failure.

Every agent also serves Hubble's API on its node IP, port 4244, with mutual TLS: one Hubble
CA for both clusters (Cilium's rule for Hubble across a ClusterMesh), a server certificate per
node for Cilium's name ``<node>.<cluster>.hubble-grpc.cilium.io`` and a client certificate
for the CLI; ``meshagent lab observe`` runs ``meshagent observe --mesh`` with them in
cluster1's first node.
"""

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from meshagent.errors import MeshagentError, UsageError

DEFAULT_DIR = Path("/tmp/meshagent-lab")
CLUSTERS = {"cluster1": 101, "cluster2": 102}
# the seed's protected-db: redis on 6379, no persistence, answering other pods
REDIS_SERVER = ("redis-server", "--port", "6379", "--save", "", "--appendonly", "no",
                "--protected-mode", "no")
UNDERLAY_CIDR = 16  # 10.99.0.0/16: every node and etcd on one L2 segment
UNDERLAY_CIDR6 = 64  # fd00:99::/64 beside it, in a dual-stack lab
KVSTOREMESH_ETCD = "kvstoremesh-etcd.yaml"
HUBBLE_PORT = 4244  # Cilium's hubble-listen-address port
HUBBLE_DIR = "hubble"  # <dir>/hubble: ca.crt, client.crt/.key, <cluster>-<node>.crt/.key
CILIUM_CLUSTER = "cluster2"  # the cluster --cilium-peer makes a Cilium one
# --dns: the lab's "outside" is TEST-NET-1 (RFC 5737), outside every pod CIDR and node address,
# so the agents' ipcache knows none of it (world). The underlay namespace routes it: its bridge
# gets UNDERLAY_ROUTER, a second bridge holds the outside hosts, and every node routes
# OUTSIDE_NET via UNDERLAY_ROUTER while the underlay routes each pod CIDR via its node.
OUTSIDE_NET = "192.0.2.0/24"
OUTSIDE_ROUTER = "192.0.2.1"
UNDERLAY_ROUTER = "10.99.0.254"
DNS_SERVER = "192.0.2.53"
DNS_TTL = 60  # seconds, every outside name unless it gives its own
DEFAULT_OUTSIDE = ("allowed.example.com", "other.example.com")
DNS_DOMAIN = "example.com"  # dnsmasq answers NXDOMAIN for its other names, REFUSED elsewhere
NETNS_ETC = Path("/etc/netns")  # ip netns exec bind-mounts /etc/netns/<ns>/* over /etc/*


class LabError(MeshagentError):
    pass


@attrs.frozen
class OutsideHost:
    """A host outside the clusters, with a name in the lab's DNS server."""

    name: str
    ttl: int = DNS_TTL  # seconds, in the DNS server's answers

    @classmethod
    def parse(cls, text: str, ttl: int = DNS_TTL) -> "OutsideHost":
        """``NAME`` or ``NAME:TTL`` (the command line's form)."""
        name, _, own = text.partition(":")
        if own and not own.isdigit():
            raise UsageError(f"--outside {text}: TTL {own!r} is not a number of seconds")
        return cls(name.lower().rstrip("."), int(own) if own else ttl)


def _check_outside(hosts: Sequence[OutsideHost]) -> None:
    names = [host.name for host in hosts]
    if len(set(names)) != len(names):
        raise UsageError(f"--outside: a name given twice in {', '.join(names)}")
    for name in names:
        if not name.endswith(f".{DNS_DOMAIN}"):
            raise UsageError(f"--outside {name}: the lab's DNS server holds names under"
                             f" {DNS_DOMAIN} only")
    if len(names) > 40:
        raise UsageError("--outside: at most 40 hosts")


def _run(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, **kwargs)


DATAPATHS = ("ebpf", "nftables")


class Lab:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.state_file = self.dir / "lab.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    # -- state ------------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return bool(self.state.get("ready"))

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def _ns(self, name: str) -> str:
        full = f"{self.state['prefix']}-{name}"
        _run("ip", "netns", "add", full)
        self.state.setdefault("namespaces", []).append(full)
        self.save()
        _run("ip", "netns", "exec", full, "ip", "link", "set", "lo", "up")
        return full

    def _spawn(self, ns: str, name: str, cmd: list[str]) -> int:
        log = open(self.dir / "logs" / f"{name}.log", "a")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={k: v for k, v in os.environ.items()
                                     if not k.startswith("MESHAGENT_")})
        self.state.setdefault("pids", {})[name] = proc.pid
        self.save()
        return proc.pid

    def _attach(self, ns: str, address: str, address6: str | None = None) -> None:
        n = len(self.state.setdefault("links", []))
        outer = f"{self.state['prefix'][:7]}u{n}"
        _run("ip", "link", "add", outer, "netns", self.state["underlay"], "type", "veth", "peer",
             "name", "uplink0", "netns", ns)
        self.state["links"].append(outer)
        _run("ip", "netns", "exec", self.state["underlay"], "ip", "link", "set", outer, "master",
             "br0", "up")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/{UNDERLAY_CIDR}", "dev",
             "uplink0")
        if address6 is not None:
            _run("ip", "netns", "exec", ns, "ip", "-6", "addr", "add",
                 f"{address6}/{UNDERLAY_CIDR6}", "dev", "uplink0", "nodad")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "uplink0", "up")

    # -- up -------------------------------------------------------------------------------------

    def bring_up(self, nodes: int, agent_args: Sequence[str] = (),
                 dual_stack: bool = False, datapath: str = "ebpf",
                 kvstoremesh: bool = False, cilium_peer: bool = False,
                 outside: Sequence[OutsideHost] = ()) -> None:
        """Both clusters with ``nodes`` nodes each; ``agent_args`` go to every agent (more
        plugins, another policy resolver). ``dual_stack``: nodes and pods get IPv6 addresses
        too (underlay fd00:99::/64, pod CIDRs fd00:<cluster>:<node>::/64). ``kvstoremesh``:
        each cluster runs ``meshagent kvstoremesh`` (in a namespace of its own), which alone
        dials the other cluster's etcd; the agents' clustermesh files point at their own etcd,
        where it caches the other cluster. ``cilium_peer``: cluster2 is a Cilium cluster as
        its etcd shows it — written by :mod:`meshagent_dev.cilium` exactly as Cilium 1.17
        writes it, no meshagent agent in it — with its node ``worker1`` and its pod
        ``employee-c2`` (Cilium's ``employee-0``, 10.2.1.5, identity 6685228) as real
        namespaces (docs/cilium.md). ``outside``: a DNS server (dnsmasq) and these hosts, each
        in a namespace of its own running redis, at world addresses the underlay routes; the
        server holds their names and every pod resolves through it (docs/lab.md)."""
        if cilium_peer and (kvstoremesh or dual_stack or nodes != 1):
            raise LabError("--cilium-peer goes with one node per cluster, IPv4, no KVStoreMesh")
        _check_outside(outside)
        if self.up:
            print(f"lab already up in {self.dir} ({self.state['nodes_per_cluster']} node(s) per"
                  " cluster); 'meshagent lab down' first to rebuild")
            return
        if self.state:
            self.tear_down(quiet=True)  # leftovers of a failed run
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, BPF)")
        from meshagent_dev.etcd import EtcdServer
        self.state = {"prefix": "mal" + secrets.token_hex(2), "nodes_per_cluster": nodes,
                      "clusters": {}, "nodes": {}, "pods": {}, "agent_args": list(agent_args),
                      "dual_stack": dual_stack, "datapath": datapath,
                      "kvstoremesh": kvstoremesh, "cilium_peer": cilium_peer}
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.save()
        try:
            self.state["underlay"] = self._ns("underlay")
            _run("ip", "netns", "exec", self.state["underlay"], "ip", "link", "add", "br0",
                 "type", "bridge")
            _run("ip", "netns", "exec", self.state["underlay"], "ip", "link", "set", "br0", "up")
            if outside:
                self._start_outside(outside)
            etcd = {}
            for cluster, cluster_id in CLUSTERS.items():
                n = cluster_id - 100
                ns = self._ns(f"etcd{n}")
                address = f"10.99.{n}.250"
                self._attach(ns, address)
                server = EtcdServer(f"etcd{n}", tls=True, workdir=self.dir / cluster / "etcd",
                                    netns=ns, host=address, auth=cluster)
                server.start()
                self.state.setdefault("pids", {})[f"etcd{n}"] = server.proc.pid
                etcd[cluster] = server
                self.state["clusters"][cluster] = {"id": cluster_id, "etcd": server.url}
                self.save()
            for cluster, server in etcd.items():
                base = self.dir / cluster
                mesh = base / "clustermesh"
                mesh.mkdir(parents=True, exist_ok=True)
                (base / "kvstoremesh").mkdir(exist_ok=True)
                # who is who in etcd: docs/clustermesh.md, meshagent_dev.etcd_roles. What
                # dials the other cluster is that cluster's read-only "remote"
                for other, other_server in etcd.items():
                    if other == cluster:
                        continue
                    if kvstoremesh:  # KVStoreMesh dials the other etcd; agents read ours
                        other_server.client_config(base / "kvstoremesh" / other, user="remote")
                        server.client_config(mesh / other, user="local")
                    else:  # the seed's layout: cluster2, cluster2-etcd-client*.
                        other_server.client_config(mesh / other, user="remote")
                server.client_config(base / "etcd.yaml", key="trusted-ca-file", user="agent")
                if kvstoremesh:
                    server.client_config(base / KVSTOREMESH_ETCD, key="trusted-ca-file",
                                         user="kvstoremesh")
            if kvstoremesh:
                for cluster, cluster_id in CLUSTERS.items():
                    n = cluster_id - 100
                    self._attach(self._ns(f"kvm{n}"), f"10.99.{n}.240")
                    self.start_kvstoremesh(cluster)
            self._hubble_ca()
            for cluster, cluster_id in CLUSTERS.items():
                if cilium_peer and cluster == CILIUM_CLUSTER:
                    self._start_cilium_cluster(etcd[cluster])
                    continue
                for i in range(1, nodes + 1):
                    self._start_node(cluster, cluster_id, i)
            self.wait_ready()
            self.state["ready"] = True
            self.save()
        except BaseException:
            print(f"lab: bring-up failed; logs in {self.dir / 'logs'}; tearing down",
                  file=sys.stderr)
            self.tear_down(quiet=True)
            raise

    def _start_node(self, cluster: str, cluster_id: int, i: int) -> None:
        n = cluster_id - 100
        name = f"{cluster}-node{i}"
        ns = self._ns(f"c{n}n{i}")
        node_ip = f"10.99.{n}.{i}"
        dual = self.state.get("dual_stack", False)
        node_ip6 = f"fd00:99::{n}:{i}" if dual else None
        self._attach(ns, node_ip, node_ip6)
        bpffs = self.dir / "bpffs" / name
        bpffs.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "bpf", "-o", "mode=0700", "bpf", str(bpffs))
        self.state.setdefault("mounts", []).append(str(bpffs))
        node = {"cluster": cluster, "ns": ns, "ip": node_ip, "pod_cidr": f"10.{n}.{i}.0/24",
                "ip6": node_ip6, "pod_cidr6": f"fd00:{n}:{i}::/64" if dual else None,
                "socket": str(self.dir / "run" / f"{name}.sock"),
                "state_dir": str(self.dir / "run" / f"{name}-state"), "bpffs": str(bpffs),
                "name": f"node{i}"}
        (self.dir / "run").mkdir(exist_ok=True)
        if self.state.get("dns"):
            self._route_outside(ns, node_ip, node["pod_cidr"])
        self._hubble_server_cert(cluster, node["name"])
        self.state["nodes"][name] = node
        self.save()
        self.start_agent(name)

    def _start_cilium_cluster(self, server) -> None:
        """cluster2 as a Cilium cluster: its etcd holds what Cilium's agents and
        clustermesh-apiserver write (the golden values of meshagent_dev.cilium); its node
        worker1 routes cluster1's pod CIDRs over the underlay, and its pod employee-c2 sits
        behind it at the address and with the identity its ipcache entry gives."""
        from meshagent_dev import cilium
        for key, value in cilium.golden().items():
            server.etcdctl("put", key, value.decode())
        node_ns = self._ns("c2w1")
        self._attach(node_ns, cilium.NODE_IPV4)
        _run("ip", "netns", "exec", node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i in range(1, self.state["nodes_per_cluster"] + 1):  # cluster1's nodes
            _run("ip", "netns", "exec", node_ns, "ip", "route", "add", f"10.1.{i}.0/24", "via",
                 f"10.99.1.{i}")
        pod_ns = self._ns("pod-employee-c2")
        host_side = f"{self.state['prefix'][:7]}lxc"
        _run("ip", "link", "add", host_side, "netns", node_ns, "type", "veth", "peer", "name",
             "eth0", "netns", pod_ns)
        router = str(ipaddress.ip_network(cilium.NODE_POD_CIDRS[0])[1])  # as cilium_host
        _run("ip", "netns", "exec", node_ns, "ip", "addr", "add", f"{router}/24", "dev",
             host_side)
        _run("ip", "netns", "exec", node_ns, "ip", "link", "set", host_side, "up")
        _run("ip", "netns", "exec", pod_ns, "ip", "addr", "add", f"{cilium.ENDPOINT_IP}/24",
             "dev", "eth0")
        _run("ip", "netns", "exec", pod_ns, "ip", "link", "set", "eth0", "up")
        _run("ip", "netns", "exec", pod_ns, "ip", "route", "add", "default", "via", router)
        self.state["cilium_nodes"] = {f"{CILIUM_CLUSTER}-{cilium.NODE_NAME}": {
            "cluster": CILIUM_CLUSTER, "ns": node_ns, "ip": cilium.NODE_IPV4}}
        self.state["pods"]["employee-c2"] = {
            "ns": pod_ns, "node": f"{CILIUM_CLUSTER}-{cilium.NODE_NAME}",
            "ip": cilium.ENDPOINT_IP, "ip6": None, "endpoint": None,
            "identity": cilium.IDENTITY_ID, "cilium": True}
        self.save()

    # -- the outside: a DNS server and hosts with names ------------------------------------------

    def _start_outside(self, hosts: Sequence[OutsideHost]) -> None:
        """The underlay becomes the router to OUTSIDE_NET; dnsmasq and each host get a
        namespace on its second bridge; the hosts run redis (as the seed's pods do)."""
        underlay = self.state["underlay"]
        _run("ip", "netns", "exec", underlay, "ip", "addr", "add", f"{UNDERLAY_ROUTER}/"
             f"{UNDERLAY_CIDR}", "dev", "br0")
        _run("ip", "netns", "exec", underlay, "ip", "link", "add", "wan0", "type", "bridge")
        prefix = ipaddress.ip_network(OUTSIDE_NET).prefixlen
        _run("ip", "netns", "exec", underlay, "ip", "addr", "add", f"{OUTSIDE_ROUTER}/{prefix}",
             "dev", "wan0")
        _run("ip", "netns", "exec", underlay, "ip", "link", "set", "wan0", "up")
        _run("ip", "netns", "exec", underlay, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        dns = {"ip": DNS_SERVER, "ns": self._outside_ns("dns", DNS_SERVER), "hosts": {}}
        self.state["dns"] = dns
        for i, host in enumerate(hosts):
            address = str(ipaddress.ip_network(OUTSIDE_NET)[10 + i])
            ns = self._outside_ns(f"out{i}", address)
            dns["hosts"][host.name] = {"ip": address, "ns": ns, "ttl": host.ttl}
            self.save()
            self._spawn(ns, f"outside-{host.name}", list(REDIS_SERVER))
        self.save()
        self._spawn(dns["ns"], "dnsmasq", self.dnsmasq_command())
        self._wait_dns()

    def _outside_ns(self, name: str, address: str) -> str:
        ns = self._ns(name)
        n = len(self.state.setdefault("links", []))
        outer = f"{self.state['prefix'][:7]}w{n}"
        _run("ip", "link", "add", outer, "netns", self.state["underlay"], "type", "veth", "peer",
             "name", "eth0", "netns", ns)
        self.state["links"].append(outer)
        _run("ip", "netns", "exec", self.state["underlay"], "ip", "link", "set", outer, "master",
             "wan0", "up")
        prefix = ipaddress.ip_network(OUTSIDE_NET).prefixlen
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/{prefix}", "dev", "eth0")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        _run("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", OUTSIDE_ROUTER)
        return ns

    def dnsmasq_command(self) -> list[str]:
        """dnsmasq with nothing of this machine's: no config file, resolv.conf or hosts file;
        in the foreground on port 53 of its own namespace, every query logged (logs/dnsmasq.log)."""
        dns = self.state["dns"]
        records = [f"--host-record={name},{host['ip']},{host['ttl']}"
                   for name, host in dns["hosts"].items()]
        return ["dnsmasq", "--conf-file=/dev/null", "--keep-in-foreground", "--no-resolv",
                "--no-hosts", "--port=53", f"--listen-address={dns['ip']}", "--bind-interfaces",
                "--log-queries", "--log-facility=-", "--pid-file=",
                f"--local=/{DNS_DOMAIN}/", *records]

    def _wait_dns(self, timeout: float = 10) -> None:
        """Until dnsmasq answers for the first host (asked from the underlay, the router)."""
        dns = self.state["dns"]
        name = next(iter(dns["hosts"]), DNS_DOMAIN)
        deadline = time.monotonic() + timeout
        while True:
            out = _run("ip", "netns", "exec", self.state["underlay"], "dig", "+time=1",
                       "+tries=1", f"@{dns['ip']}", name, check=False)
            if "status: NOERROR" in out.stdout or "status: NXDOMAIN" in out.stdout:
                return
            if time.monotonic() > deadline:
                raise LabError(f"dnsmasq did not answer within {timeout:.0f}s (see"
                               f" {self.dir / 'logs' / 'dnsmasq.log'})")
            time.sleep(0.1)

    def _route_outside(self, node_ns: str, node_ip: str, pod_cidr: str) -> None:
        """The node reaches OUTSIDE_NET through the underlay, which routes the node's pod CIDR
        back to it (replies, and the DNS proxy's queries from the node)."""
        _run("ip", "netns", "exec", node_ns, "ip", "route", "add", OUTSIDE_NET, "via",
             UNDERLAY_ROUTER)
        _run("ip", "netns", "exec", self.state["underlay"], "ip", "route", "add", pod_cidr,
             "via", node_ip)

    def _resolv_conf(self, ns: str) -> None:
        """The pod resolves through the lab's DNS server: ``ip netns exec`` mounts this file over
        /etc/resolv.conf. One try of two seconds, so a dropped query fails fast."""
        directory = NETNS_ETC / ns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text(
            f"nameserver {self.state['dns']['ip']}\noptions timeout:2 attempts:1\n")

    # -- Hubble ---------------------------------------------------------------------------------

    @property
    def hubble_dir(self) -> Path:
        return self.dir / HUBBLE_DIR

    def _hubble_ca(self) -> None:
        """One Hubble CA for both clusters, and the CLI's client certificate."""
        import trustme
        from meshagent_dev.etcd import write_key
        self.hubble_dir.mkdir(parents=True, exist_ok=True)
        self._ca = trustme.CA(organization_name="meshagent lab Hubble CA")
        self._ca.cert_pem.write_to_path(str(self.hubble_dir / "ca.crt"))
        client = self._ca.issue_cert("hubble-cli.meshagent-lab.hubble-relay.cilium.io")
        write_key(client.private_key_pem, self.hubble_dir / "client.key")
        client.cert_chain_pems[0].write_to_path(str(self.hubble_dir / "client.crt"))

    def _hubble_server_cert(self, cluster: str, node: str) -> None:
        """The node's server certificate, for the name Cilium's peer service gives it."""
        from meshagent_dev.etcd import write_key
        cert = self._ca.issue_cert(hubble_server_name(cluster, node))
        write_key(cert.private_key_pem, self.hubble_dir / f"{cluster}-{node}.key")
        cert.cert_chain_pems[0].write_to_path(str(self.hubble_dir / f"{cluster}-{node}.crt"))

    def hubble_args(self, name: str) -> list[str]:
        """The agent's Hubble options: TCP on the node IP with mutual TLS (its unix socket is
        the default, beside its API socket)."""
        node = self.state["nodes"][name]
        cert = self.hubble_dir / f"{node['cluster']}-{node['name']}"
        return ["--hubble-listen-address", f"{node['ip']}:{HUBBLE_PORT}",
                "--hubble-tls-cert-file", f"{cert}.crt", "--hubble-tls-key-file", f"{cert}.key",
                "--hubble-tls-client-ca-files", str(self.hubble_dir / "ca.crt")]

    def observe_command(self, args: Sequence[str] = (), node: str = "cluster1-node1") -> list[str]:
        """``meshagent observe --mesh ARGS`` as run in ``node``'s namespace, with the lab's
        client certificate (for :func:`subprocess.run`)."""
        self._require_up()
        if node not in self.state["nodes"]:
            raise UsageError(f"no node {node}; nodes: {', '.join(self.state['nodes'])}")
        return ["ip", "netns", "exec", self.state["nodes"][node]["ns"],
                str(Path(sys.executable).with_name("meshagent")), "observe", "--mesh",
                "--socket-path", self.state["nodes"][node]["socket"],
                "--tls-ca-cert-files", str(self.hubble_dir / "ca.crt"),
                "--tls-client-cert-file", str(self.hubble_dir / "client.crt"),
                "--tls-client-key-file", str(self.hubble_dir / "client.key"), *args]

    def agent_command(self, name: str) -> list[str]:
        node = self.state["nodes"][name]
        cluster = node["cluster"]
        base = self.dir / cluster
        datapath = self.state.get("datapath", "ebpf")
        own = ["--ebpf-bpf-root", node["bpffs"]] if datapath == "ebpf" else []
        return [str(Path(sys.executable).with_name("meshagent")), "--plugins",
                f"etcd,{datapath}",
                f"--cluster-id={CLUSTERS[cluster]}", f"--cluster-name={cluster}",
                f"--clustermesh-config={base / 'clustermesh'}",
                "--etcd-config", str(base / "etcd.yaml"), "--node-name", node["name"],
                "--node-ip", _both(node["ip"], node.get("ip6"), ","),
                "--pod-cidr", _both(node["pod_cidr"], node.get("pod_cidr6"), ","),
                "--auto-direct-node-routes", *own,
                "--socket-path", node["socket"], "--state-dir", node["state_dir"],
                *self.hubble_args(name), *self.state.get("agent_args", ()),
                *node.get("agent_args", ())]

    def kvstoremesh_socket(self, cluster: str) -> str:
        return str(self.dir / "run" / f"kvstoremesh-{cluster}.sock")

    def start_kvstoremesh(self, cluster: str) -> None:
        """``meshagent kvstoremesh`` of ``cluster``, in its own namespace."""
        base = self.dir / cluster
        (self.dir / "run").mkdir(exist_ok=True)
        n = CLUSTERS[cluster] - 100
        ns = f"{self.state['prefix']}-kvm{n}"
        self._spawn(ns, f"kvstoremesh-{cluster}", [
            str(Path(sys.executable).with_name("meshagent")), "kvstoremesh", "--plugins", "etcd",
            f"--cluster-id={CLUSTERS[cluster]}", f"--cluster-name={cluster}",
            f"--clustermesh-config={base / 'kvstoremesh'}",
            "--etcd-config", str(base / KVSTOREMESH_ETCD),
            "--kvstoremesh-socket-path", self.kvstoremesh_socket(cluster)])

    def stop_kvstoremesh(self, cluster: str, sig: int = signal.SIGTERM) -> None:
        pid = self.state["pids"].pop(f"kvstoremesh-{cluster}", None)
        self.save()
        if pid:
            _kill(pid, sig, wait=10)

    def start_agent(self, name: str) -> None:
        self._spawn(self.state["nodes"][name]["ns"], f"agent-{name}", self.agent_command(name))

    def restart_agent(self, name: str, extra_args: Sequence[str]) -> None:
        """Start ``name``'s agent again with ``extra_args`` after the lab's own (kept for later
        restarts): options of one node, such as its labels; returns once every agent is
        ready."""
        self.state["nodes"][name]["agent_args"] = list(extra_args)
        self.save()
        self.stop_agent(name)
        self.start_agent(name)
        self.wait_ready()

    def stop_agent(self, name: str) -> None:
        pid = self.state["pids"].pop(f"agent-{name}", None)
        self.save()
        if pid:
            _kill(pid, signal.SIGTERM, wait=10)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every agent is ready and sees its remote cluster."""
        from meshagent.client import AgentClient
        deadline = time.monotonic() + timeout
        for name, node in self.state["nodes"].items():
            while True:
                try:
                    status = AgentClient(Path(node["socket"])).get("/status")
                    mesh = next(s for s in status["sections"] if s["name"] == "ClusterMesh")
                    if status["ready"] and mesh["summary"].startswith("1/1"):
                        break
                except MeshagentError:
                    pass
                pid = self.state.get("pids", {}).get(f"agent-{name}")
                if pid is None or _exited(pid):  # e.g. an option it does not know
                    log = self.dir / "logs" / f"agent-{name}.log"
                    tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
                    raise LabError(f"agent {name} exited: " + " / ".join(tail))
                if time.monotonic() > deadline:
                    raise LabError(f"agent {name} not ready within {timeout:.0f}s (see"
                                   f" {self.dir / 'logs' / f'agent-{name}.log'})")
                time.sleep(0.2)

    # -- pods -----------------------------------------------------------------------------------

    def _require_up(self) -> None:
        if not self.state.get("nodes"):
            raise LabError(f"no lab in {self.dir}: run 'meshagent lab up' first"
                           " (or give its --dir)")

    def node_socket(self, node: str) -> str:
        self._require_up()
        if node not in self.state["nodes"]:
            raise UsageError(f"no node {node}; nodes: {', '.join(self.state['nodes'])}")
        return self.state["nodes"][node]["socket"]

    def pod_create(self, name: str, node: str, namespace: str, labels: str) -> dict:
        import asyncio

        from meshagent.client import AgentClient
        self._require_up()
        if name in self.state["pods"]:
            raise UsageError(f"pod {name} exists already")
        if node not in self.state["nodes"]:
            raise UsageError(f"no node {node}; nodes: {', '.join(self.state['nodes'])}")
        ns = self._ns(f"pod-{name}")
        if self.state.get("dns"):
            self._resolv_conf(ns)
        client = AgentClient(Path(self.state["nodes"][node]["socket"]))
        endpoint = asyncio.run(client.request("POST", "/endpoints", json={
            "netns": ns, "namespace": namespace, "labels": labels, "pod_name": name},
            ok=(201,)))
        self.state["pods"][name] = {"ns": ns, "node": node, "ip": endpoint["ipv4"],
                                    "ip6": endpoint.get("ipv6"),
                                    "endpoint": endpoint["id"], "identity": endpoint["identity"]}
        self.save()
        return self.state["pods"][name]

    def pod_exec(self, name: str, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        self._require_up()
        if not command:
            raise UsageError("no command given: meshagent lab exec POD -- COMMAND...")
        if name not in self.state["pods"]:
            raise UsageError(f"no pod {name}; pods: {', '.join(self.state['pods']) or 'none'}")
        return subprocess.run(["ip", "netns", "exec", self.state["pods"][name]["ns"], *command],
                              **kwargs)

    def pod_spawn(self, name: str, label: str, command: list[str]) -> int:
        return self._spawn(self.state["pods"][name]["ns"], label, command)

    # -- down -----------------------------------------------------------------------------------

    def tear_down(self, quiet: bool = False) -> None:
        if not self.state:
            if not quiet:
                print("lab: nothing to tear down")
            return
        for _name, pid in sorted(self.state.get("pids", {}).items(),
                                key=lambda kv: kv[0].startswith("etcd")):
            _kill(pid, signal.SIGTERM, wait=5)
        for ns in reversed(self.state.get("namespaces", [])):
            _run("ip", "netns", "del", ns, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        for mount in self.state.get("mounts", []):
            _run("umount", "-l", mount, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.state = {}
        if not quiet:
            print("lab: torn down")

    def describe(self) -> str:
        if not self.state:
            return f"lab: down (no state in {self.dir})"
        lines = [f"lab: {'up' if self.up else 'incomplete'} in {self.dir}"]
        for cluster, info in self.state.get("clusters", {}).items():
            lines.append(f"  {cluster} (id {info['id']}), etcd {info['etcd']}")
            if self.state.get("kvstoremesh"):
                pid = self.state.get("pids", {}).get(f"kvstoremesh-{cluster}")
                alive = pid is not None and _alive(pid)
                lines.append(f"    kvstoremesh {'running' if alive else 'NOT running'},"
                             f" socket {self.kvstoremesh_socket(cluster)}")
        for name, node in self.state.get("nodes", {}).items():
            pid = self.state.get("pids", {}).get(f"agent-{name}")
            alive = pid is not None and _alive(pid)
            ips = _both(node["ip"], node.get("ip6"))
            pods = _both(node["pod_cidr"], node.get("pod_cidr6"))
            lines.append(f"  {name}: {ips}, pods {pods}, agent"
                         f" {'running' if alive else 'NOT running'}, socket {node['socket']}")
        for name, pod in self.state.get("pods", {}).items():
            ips = _both(pod["ip"], pod.get("ip6"))
            lines.append(f"  pod {name} on {pod['node']}: {ips} (identity"
                         f" {pod['identity']})")
        if self.state.get("dns"):
            dns = self.state["dns"]
            lines.append(f"  DNS server {dns['ip']}:53 (dnsmasq, every pod's resolv.conf; queries"
                         f" in {self.dir / 'logs' / 'dnsmasq.log'})")
            for name, host in dns["hosts"].items():
                lines.append(f"  outside host {name}: {host['ip']} (redis on 6379, TTL"
                             f" {host['ttl']}s)")
        if self.state.get("nodes"):
            lines.append(f"  flows: meshagent lab observe -- [observe flags] (observe --mesh from"
                         f" cluster1-node1; Hubble on every node IP:{HUBBLE_PORT}, mutual TLS,"
                         f" certificates in {self.hubble_dir})")
        return "\n".join(lines)


def hubble_server_name(cluster: str, node: str) -> str:
    """Cilium's TLS server name of a node's Hubble server (pkg/hubble/peer)."""
    return f"{node.replace('.', '-')}.{cluster.replace('.', '-')}.hubble-grpc.cilium.io"


def _both(ipv4: str, ipv6: str | None, sep: str = ", ") -> str:
    """A node's or pod's IPv4 value, and its IPv6 one in a dual-stack lab."""
    return f"{ipv4}{sep}{ipv6}" if ipv6 else ipv4


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _exited(pid: int) -> bool:
    """Whether ``pid`` is gone; reaps it if it is our child (a zombie still answers kill 0)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        return not _alive(pid)


def _kill(pid: int, sig: int, wait: float) -> None:
    try:
        os.killpg(pid, sig)
    except OSError:
        try:
            os.kill(pid, sig)
        except OSError:
            return
    deadline = time.monotonic() + wait
    while _alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


# -- CLI --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the lab's state directory")
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="build the two clusters (idempotent)")
    up.add_argument("--nodes", type=int, default=1, help="nodes per cluster")
    up.add_argument("--dual-stack", action="store_true",
                    help="IPv6 too: nodes and pods get an address of each family")
    up.add_argument("--datapath", choices=DATAPATHS, default="ebpf",
                    help="the agents' datapath plugin (docs/nftables.md)")
    up.add_argument("--kvstoremesh", action="store_true",
                    help="run KVStoreMesh per cluster; agents read the other cluster from"
                         " their own etcd (docs/kvstoremesh.md)")
    up.add_argument("--cilium-peer", action="store_true",
                    help="cluster2 is a Cilium cluster: its etcd written as Cilium 1.17 writes"
                         " it, its pod employee-c2 a namespace (docs/cilium.md)")
    up.add_argument("--dns", action="store_true",
                    help="run a DNS server (dnsmasq) and outside hosts (redis) at world"
                         f" addresses in {OUTSIDE_NET}; every pod resolves through it")
    up.add_argument("--outside", action="append", metavar="NAME[:TTL]",
                    help=f"an outside host under {DNS_DOMAIN} (repeat; implies --dns; default"
                         f" {' and '.join(DEFAULT_OUTSIDE)})")
    up.add_argument("--dns-ttl", type=int, default=DNS_TTL,
                    help="the TTL of the DNS server's answers, seconds, where a host gives none")
    sub.add_parser("down", help="stop everything and remove the namespaces")
    sub.add_parser("status", help="what is running")
    pod = sub.add_parser("pod", help="create a pod on a node")
    pod.add_argument("name")
    pod.add_argument("--node", required=True, help="e.g. cluster1-node1")
    pod.add_argument("--namespace", default="default")
    pod.add_argument("--labels", default="")
    ex = sub.add_parser("exec", help="run a command in a pod's network namespace")
    ex.add_argument("name")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    sock = sub.add_parser("socket", help="print a node agent's API socket (for --socket-path)")
    sock.add_argument("node")
    obs = sub.add_parser("observe", help="meshagent observe --mesh from a node, with the lab's"
                         " Hubble certificates: lab observe [--node N] -- [observe flags]")
    obs.add_argument("--node", default="cluster1-node1", help="where to run it")
    obs.add_argument("args", nargs=argparse.REMAINDER,
                     help="after --: meshagent observe's flags (--to-pod, -o json, -f...)")
    for p in sub.choices.values():
        p.add_argument("--dir", type=Path, default=argparse.SUPPRESS)


def _exec_options(args: argparse.Namespace) -> list[str]:
    """The command of ``lab exec POD [--dir D] -- COMMAND``: argparse hands everything after
    the pod name over as the command, options meant for ``lab exec`` included."""
    command = args.command
    if "--" not in command:
        return command
    split = command.index("--")
    options = command[:split]
    while options:
        option = options.pop(0)
        if option == "--dir" and options:
            args.dir = Path(options.pop(0))
        elif option.startswith("--dir="):
            args.dir = Path(option.removeprefix("--dir="))
        else:
            raise UsageError(f"lab exec: unexpected {option!r} before '--' (only --dir DIR)")
    return command[split + 1:]


def run(args: argparse.Namespace) -> int:
    command = _exec_options(args) if args.action == "exec" else []
    lab = Lab(args.dir)
    if args.action == "up":
        names = args.outside or (DEFAULT_OUTSIDE if args.dns else ())
        outside = [OutsideHost.parse(name, args.dns_ttl) for name in names]
        lab.bring_up(args.nodes, dual_stack=args.dual_stack, datapath=args.datapath,
                     kvstoremesh=args.kvstoremesh, cilium_peer=args.cilium_peer,
                     outside=outside)
        print(lab.describe())
    elif args.action == "down":
        lab.tear_down()
    elif args.action == "status":
        print(lab.describe())
        return 0 if lab.up else 1
    elif args.action == "pod":
        pod = lab.pod_create(args.name, args.node, args.namespace, args.labels)
        ips = _both(pod["ip"], pod.get("ip6"))
        print(f"pod {args.name} on {args.node}: {ips} (identity {pod['identity']})")
    elif args.action == "exec":
        return lab.pod_exec(args.name, command).returncode
    elif args.action == "socket":
        print(lab.node_socket(args.node))
    elif args.action == "observe":
        extra = args.args[1:] if args.args[:1] == ["--"] else args.args
        return subprocess.run(lab.observe_command(extra, args.node)).returncode
    return 0
