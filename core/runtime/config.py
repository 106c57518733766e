"""The agent's resolved configuration: core options, their validation, and access for plugins."""

import ipaddress
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from meshagent.client import DEFAULT_SOCKET
from meshagent.errors import UsageError
from meshagent.model.cluster import ClusterInfo
from meshagent.model.identity import LABEL_KEY, LABEL_VALUE
from meshagent.runtime.options import CONFIG_DIR, ParsedOptions, Parser, parse_bool, parse_list

DEFAULT_PLUGINS = ("etcd", "ebpf")
DEFAULT_RUN_DIR = DEFAULT_SOCKET.parent  # /var/run/meshagent
DEFAULT_HUBBLE_SOCKET = DEFAULT_RUN_DIR / "hubble.sock"  # Cilium: /var/run/cilium/hubble.sock


def parse_cidrs(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDRs of either family, IPv4 ones first (a dual-stack node has one of each)."""
    cidrs = [ipaddress.ip_network(word) for word in parse_list(text)]
    return tuple(sorted(cidrs, key=lambda c: c.version))


def parse_node_ips(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """At most one address of each family, IPv4 first: ``10.0.0.1``, ``fd00::1`` or both."""
    addresses = [ipaddress.ip_address(word) for word in parse_list(text)]
    if len({a.version for a in addresses}) != len(addresses):
        raise ValueError("give at most one address of each family (IPv4,IPv6)")
    return tuple(sorted(addresses, key=lambda a: a.version))


def parse_node_labels(text: str) -> tuple[tuple[str, str], ...]:
    """``key=value,...`` as Kubernetes labels, sorted by key."""
    labels = {}
    for word in parse_list(text):
        key, sep, value = word.partition("=")
        if not sep or not LABEL_KEY.match(key) or not LABEL_VALUE.match(value):
            raise ValueError(f"{word!r} is not a Kubernetes label key=value")
        labels[key] = value
    return tuple(sorted(labels.items()))


def parse_listen_address(text: str) -> tuple[str, int]:
    """``:4244`` (every address), ``10.0.0.1:4244`` or ``[fd00::1]:4244`` -> (host, port),
    host as gRPC takes it; ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not [HOST]:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return "[::]", int(port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: HOST must be an IP address") from None
    return (f"[{host}]" if ":" in host else host), int(port)


def parse_event_buffer_capacity(text: str | int) -> int:
    """Cilium's rule for ``hubble-event-buffer-capacity``: one less than a power of two, at
    most 65535 (1, 3, 7, ..., 4095, ..., 65535)."""
    number = int(text)
    if number < 1 or number > 65535 or number & (number + 1):
        raise ValueError(f"{number} is not one less than a power of two between 1 and 65535"
                         " (e.g. 4095)")
    return number


def add_bootstrap_options(parser: Parser) -> None:
    """Options read before any plugin loads: which plugins, and where the config dir is."""
    parser.addoption(
        "plugins", type=parse_list, default=DEFAULT_PLUGINS,
        help="plugins to load (allow-list; every other installed plugin is blocked)",
    )
    parser.addoption(
        CONFIG_DIR, type=str, default="",
        help="directory with one file per option (file name = option name), as a ConfigMap mount",
    )


def add_core_options(parser: Parser) -> None:
    add_bootstrap_options(parser)
    parser.addoption("cluster-name", type=str, default="default",
                     help="name of this cluster, unique in the mesh")
    parser.addoption("cluster-id", type=int, default=0,
                     help="id of this cluster, unique in the mesh (0 = not in a mesh)")
    parser.addoption("max-connected-clusters", type=int, default=255,
                     help="largest mesh size (255 or 511); must be the same in every cluster")
    parser.addoption("node-name", type=str, default="",
                     help="name of this node (default: the host name)")
    parser.addoption("node-ip", type=parse_node_ips, default=(),
                     help="this node's address, published with the node: IPv4, IPv6 or both"
                          " (comma-separated, one of each family)")
    parser.addoption("pod-cidr", type=parse_cidrs, default=(),
                     help="this node's pod CIDR(s), comma-separated, IPv4 and/or IPv6,"
                          " published with the node")
    parser.addoption("local-node-labels", type=parse_node_labels, default=(),
                     help="this node's labels (key=value, comma-separated), published with the"
                          " node (its Labels) for fromNodes/toNodes selectors")
    parser.addoption("enable-node-selector-labels", type=parse_bool, default=False,
                     help="allow fromNodes/toNodes in policies: every other node's address gets"
                          " the identity of its labels (node:key=value, reserved:remote-node,"
                          " its cluster)")
    parser.addoption("auto-direct-node-routes", type=parse_bool, default=False,
                     help="route every other node's pod CIDR via that node's IP (nodes on one"
                          " L2 network)")
    parser.addoption("node-route-delete-grace", type=float, default=30.0,
                     help="seconds a gone node keeps its route (an agent restart revokes and"
                          " republishes its node; its pods stay reachable meanwhile)")
    parser.addoption("kvstore-lease-ttl", type=float, default=900.0,
                     help="seconds the node's kvstore keys outlive a dead agent (Cilium: 15 min)")
    parser.addoption("identity-gc-interval", type=float, default=900.0,
                     help="seconds between identity garbage collections; an identity no node"
                          " uses is deleted after two of them")
    parser.addoption("policy-default-local-cluster", type=parse_bool, default=True,
                     help="a peer selector without io.cilium.k8s.policy.cluster matches only"
                          " the local cluster (false: every cluster)")
    parser.addoption("policy-audit-mode", type=parse_bool, default=False,
                     help="every endpoint in policy audit mode unless it says otherwise"
                          " (meshagent endpoint config ID PolicyAuditMode=...): traffic the"
                          " policy would drop passes and is reported with verdict AUDIT")
    parser.addoption("enable-hubble", type=parse_bool, default=True,
                     help="the datapath reports flow events (new connections, TCP SYN/FIN/RST,"
                          " drops) for meshagent observe and the Hubble API; false: drops only")
    parser.addoption("hubble-socket-path", type=str, default="",
                     help="unix socket of the Hubble API (Observer and Peer gRPC services);"
                          f" default {DEFAULT_HUBBLE_SOCKET}, or <name>-hubble.sock beside a"
                          " --socket-path of another name (one per agent)")
    parser.addoption("hubble-listen-address", type=str, default="",
                     help="also serve the Hubble API on TCP at [HOST]:PORT, e.g. :4244 (every"
                          " address); with TLS unless --hubble-disable-tls; off when empty")
    parser.addoption("hubble-tls-cert-file", type=str, default="",
                     help="the Hubble server's certificate (PEM), for --hubble-listen-address")
    parser.addoption("hubble-tls-key-file", type=str, default="",
                     help="the Hubble server's private key (PEM), for --hubble-listen-address")
    parser.addoption("hubble-tls-client-ca-files", type=parse_list, default=(),
                     help="CA certificates (PEM files, comma-separated) that sign Hubble"
                          " clients' certificates: given, a client must show one (mutual TLS)")
    parser.addoption("hubble-disable-tls", type=parse_bool, default=False,
                     help="serve --hubble-listen-address without TLS (anyone who reaches it"
                          " reads every flow)")
    parser.addoption("hubble-event-buffer-capacity", type=parse_event_buffer_capacity,
                     default=4095,
                     help="flows the agent keeps for meshagent observe and the Hubble API (the"
                          " oldest go first); one less than a power of two, at most 65535")
    parser.addoption("datapath-sync-timeout", type=float, default=30.0,
                     help="seconds to wait for remote clusters before the first datapath"
                          " update after start (the datapath changes nothing before it)")
    parser.addoption("clustermesh-config", type=str, default="",
                     help="directory with one kvstore config file per remote cluster, named"
                          " after it; watched for changes")
    parser.addoption("clustermesh-cache-ttl", type=float, default=0.0,
                     help="drop a remote cluster's entries after it was unreachable this many"
                          " seconds (0: keep them until it is back)")
    parser.addoption("clustermesh-read-cache", type=parse_bool, default=False,
                     help="read every remote cluster from the KVStoreMesh cache in the local"
                          " kvstore, never from its own (the files in --clustermesh-config"
                          " then only name the clusters); a file pointing at a kvstore whose"
                          " cluster config says 'cached' is read that way without it")
    parser.addoption("state-dir", type=Path, default=DEFAULT_RUN_DIR / "state",
                     help="where the agent keeps state across restarts")
    parser.addoption("socket-path", type=Path, default=DEFAULT_SOCKET,
                     help="unix socket of the agent API")
    parser.addoption("log-format", type=str, default="text", choices=("text", "json"),
                     help="log line format")
    parser.addoption("debug", type=parse_bool, default=False, help="log debug messages")
    parser.addoption("prometheus-serve-addr", type=str, default="",
                     help="serve Prometheus metrics at HOST:PORT; :PORT binds every address of"
                          " the node; off when empty")
    parser.addoption("shutdown-timeout", type=float, default=3.0,
                     help="seconds to let controllers finish after SIGTERM before cancelling")
    add_fqdn_options(parser)
    for slot in ("kvstore", "identity-allocator", "policy-resolver", "datapath"):
        parser.addoption(slot, type=str, default="",
                         help=f"{slot} provider to use (default: the only one the plugins offer)")


def add_fqdn_options(parser: Parser) -> None:
    """The DNS proxy's options (docs/dns.md): Cilium's names and defaults, durations in
    seconds as every meshagent option."""
    parser.addoption("enable-dns-proxy", type=parse_bool, default=True,
                     help="run the DNS proxy when the policy resolver offers DNS rules and a"
                          " datapath is loaded (false: rules: dns and toFQDNs allow nothing)")
    parser.addoption("tofqdns-proxy-port", type=int, default=0,
                     help="port of the DNS proxy, UDP and TCP (0: the one it had before the"
                          " restart if free, else any)")
    parser.addoption("tofqdns-min-ttl", type=int, default=0,
                     help="seconds an answered address stays allowed at least (0: the TTL the"
                          " server gave)")
    parser.addoption("tofqdns-endpoint-max-ip-per-hostname", type=int, default=1000,
                     help="addresses an endpoint keeps per name (the earliest-expiring go"
                          " first)")
    parser.addoption("tofqdns-idle-connection-grace-period", type=float, default=0.0,
                     help="seconds an address stays allowed after its TTL, for connections"
                          " still idle then")
    parser.addoption("tofqdns-proxy-response-max-delay", type=float, default=0.1,
                     help="seconds an answer waits for the datapath to allow its addresses"
                          " before the pod gets it anyway")
    parser.addoption("tofqdns-dns-reject-response-code", type=str, default="refused",
                     choices=("refused", "nameError"),
                     help="the answer to a question the rules refuse")
    parser.addoption("dnsproxy-concurrency-limit", type=int, default=0,
                     help="questions the proxy handles at once (more: SERVFAIL; 0: no limit)")
    parser.addoption("tofqdns-gc-interval", type=float, default=60.0,
                     help="seconds between the DNS garbage collections that let expired"
                          " addresses go (Cilium: one minute)")


def default_hubble_socket(socket_path: Path) -> Path:
    """The default agent's Hubble socket is Cilium's name in our run dir; an agent given its
    own API socket (tests, the lab: several agents in one directory) gets one beside it."""
    if socket_path == DEFAULT_SOCKET:
        return DEFAULT_HUBBLE_SOCKET
    return socket_path.with_name(f"{socket_path.stem}-hubble.sock")


@attrs.frozen
class Config:
    """Every option's value and where it came from; built once, read by everyone."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    cluster: ClusterInfo
    unknown_config_files: tuple[str, ...] = ()

    @classmethod
    def from_parsed(cls, parsed: ParsedOptions) -> "Config":
        """Validate the core options; raises UsageError naming option, value and rule."""
        values = dict(parsed.values)
        cluster = ClusterInfo(
            name=values["cluster-name"],
            id=values["cluster-id"],
            max_connected_clusters=values["max-connected-clusters"],
        )
        if not values["node-name"]:
            values["node-name"] = socket.gethostname()
        if mesh_dir := values["clustermesh-config"]:
            if not Path(mesh_dir).is_dir():
                raise UsageError(f"invalid --clustermesh-config={mesh_dir!r}: not a directory")
            if cluster.id == 0:
                raise UsageError("--clustermesh-config needs a --cluster-id (1.."
                                 f"{cluster.max_connected_clusters}) unique in the mesh")
        if not values["hubble-socket-path"]:
            values["hubble-socket-path"] = default_hubble_socket(Path(values["socket-path"]))
        if listen := values["hubble-listen-address"]:
            try:
                parse_listen_address(listen)
            except ValueError as exc:
                raise UsageError(f"invalid --hubble-listen-address: {exc}") from None
        if values["hubble-listen-address"] and not values["hubble-disable-tls"] and not (
                values["hubble-tls-cert-file"] and values["hubble-tls-key-file"]):
            raise UsageError("--hubble-listen-address needs --hubble-tls-cert-file and"
                             " --hubble-tls-key-file (or --hubble-disable-tls)")
        if values["kvstore-lease-ttl"] < 1:
            raise UsageError(f"invalid --kvstore-lease-ttl={values['kvstore-lease-ttl']}:"
                             " must be at least 1 second")
        return cls(values, dict(parsed.sources), cluster, parsed.unknown_config_files)

    def get(self, name: str) -> Any:
        try:
            return self.values[name.removeprefix("--")]
        except KeyError:
            raise KeyError(f"no option --{name} (is its plugin loaded?)") from None

    @property
    def plugins(self) -> tuple[str, ...]:
        return self.values["plugins"]

    @property
    def node_name(self) -> str:
        return self.values["node-name"]

    @property
    def state_dir(self) -> Path:
        return Path(self.values["state-dir"])

    @property
    def socket_path(self) -> Path:
        return Path(self.values["socket-path"])
