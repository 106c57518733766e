"""``meshagent observe``: ``hubble observe`` for meshagent, a client of Hubble's Observer API.

It speaks only Hubble's gRPC API (``observer.Observer/GetFlows``; ``peer.Peer/Notify`` with
``--mesh``), so it works as well against a real Cilium agent's Hubble or a Hubble Relay
(``--server``). Its flags, the GetFlowsRequest they make and what it prints are Hubble's
CLI's (cilium/cilium ``hubble/cmd/observe``): filters become FlowFilters
(:mod:`meshagent.observe.flowflags`) and are applied by the server, never here; the output is
:mod:`meshagent.observe.printer`. By default it asks the agent at ``--socket-path`` where its
Hubble socket is (``hubble-socket-path``) and reads that; ``--mesh`` reads every node of every
connected cluster (:mod:`meshagent.observe.mesh`).
"""

import argparse
import asyncio
import datetime
import os
import re
import sys

from meshagent.errors import MeshagentError, UsageError
from meshagent.observe import flowflags
from meshagent.observe.connect import (credentials, open_channel, rpc_error_text,
                                       wait_ready)

DEFAULT_LAST = 20  # hubble/pkg/defaults FlowPrintCount
DIAL_TIMEOUT = 5.0  # hubble/pkg/defaults DialTimeout
REQUEST_TIMEOUT = 12.0  # hubble/pkg/defaults RequestTimeout
TLS_PREFIX = "tls://"
SHORT = {"type": "-t", "namespace": "-n", "label": "-l", "all-namespaces": "-A",
         "ipv4": "-4", "ipv6": "-6"}

# -- flags ------------------------------------------------------------------------------------


class _Filter(argparse.Action):
    """A filter flag: handed to :class:`~meshagent.observe.flowflags.FlowFilterFlags` in
    command-line order (``--not`` reverses the next one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "flow_flags", None) is None:
            namespace.flow_flags = flowflags.FlowFilterFlags()
        value = values if isinstance(values, str) else flowflags.NO_VALUE.get(self.dest, "")
        namespace.flow_flags.set(self.dest, value)


def _parse_bool(text: str) -> bool:
    """A Go boolean flag's value (``strconv.ParseBool``)."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}")


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(flow_flags=None)
    sel = parser.add_argument_group("selectors")
    sel.add_argument("--all", action="store_true",
                     help="get all flows stored in the server's buffer")
    sel.add_argument("--last", type=int, default=0, metavar="N",
                     help=f"get the last N flows of the buffer (default {DEFAULT_LAST}); with"
                          " --mesh, N per node")
    sel.add_argument("--first", type=int, default=0, metavar="N",
                     help="get the first N flows of the buffer")
    sel.add_argument("-f", "--follow", action="store_true", help="follow flows as they come")
    sel.add_argument("--since", default="", help="flows since a time: relative (3s, 4m, 1h43m)"
                     " or RFC 3339 (2006-01-02T15:04:05Z07:00), 2006-01-02, 2006-01-02T15Z07:00,"
                     " 2006-01-02T15:04Z07:00, RFC 1123Z")
    sel.add_argument("--until", default="", help="flows until a time (as --since)")

    filters = parser.add_argument_group(
        "filters", "repeating a flag ORs its values; different flags are ANDed; --not X"
                   " shows the flows X does not match; applied by the server")
    filters.add_argument("--not", dest="not", action=_Filter, nargs=0,
                         help="reverses the next filter: --not --from-ip 2.2.2.2")
    for name in flowflags.filter_flags():
        names = [f"--{name}"] + ([SHORT[name]] if name in SHORT else [])
        filters.add_argument(*names, dest=name, action=_Filter,
                             nargs=0 if name in flowflags.NO_VALUE else None,
                             help=argparse.SUPPRESS if name.startswith("http") else
                             _FILTER_HELP.get(name, f"show flows matching this {name}"))
    filters.add_argument("--allowlist", action="append", default=[], metavar="JSON",
                         help="an allowlist entry as a JSON-encoded FlowFilter")
    filters.add_argument("--denylist", action="append", default=[], metavar="JSON",
                         help="a denylist entry as a JSON-encoded FlowFilter")

    fmt = parser.add_argument_group("formatting")
    fmt.add_argument("-o", "--output", default="compact",
                     choices=("compact", "dict", "json", "JSON", "jsonpb", "table", "tab"),
                     help="compact (default), dict, jsonpb (GetFlowsResponse as protobuf JSON),"
                          " json (the same), table")
    fmt.add_argument("--time-format", default="StampMilli",
                     help=f"one of {', '.join(_time_formats())} (not for json)")
    fmt.add_argument("--print-node-name", action="store_true", help="print the node name")
    fmt.add_argument("--print-policy-names", action="store_true",
                     help="print the policies that allowed or denied a policy verdict")
    fmt.add_argument("--numeric", action="store_true", help="addresses, not pod names")
    fmt.add_argument("--ip-translation", type=_parse_bool, nargs="?", const=True, default=True,
                     metavar="BOOL", help="translate addresses to pod names (default true)")
    fmt.add_argument("-D", "--debug", action="store_true",
                     help="also print informational node status events")
    fmt.add_argument("--print-raw-filters", action="store_true",
                     help="print the allowlist/denylist as YAML and exit without a request")

    srv = parser.add_argument_group("server")
    srv.add_argument("--server", default="",
                     help="a Hubble server: unix:///path, host:port or tls://host:port (default:"
                          " the agent's hubble-socket-path, asked at --socket-path)")
    srv.add_argument("--timeout", type=_duration_arg, default=DIAL_TIMEOUT, metavar="DURATION",
                     help="dialing timeout (default 5s)")
    srv.add_argument("--request-timeout", type=_duration_arg, default=REQUEST_TIMEOUT,
                     metavar="DURATION",
                     help="with --mesh and without --follow: how long one node may take to"
                          " answer (default 12s)")
    srv.add_argument("--tls", action="store_true", help="use TLS towards --server")
    srv.add_argument("--tls-allow-insecure", action="store_true",
                     help="not supported: the server's certificate is always verified")
    srv.add_argument("--tls-ca-cert-files", action="append", default=[], metavar="FILE",
                     help="CA certificates (PEM) that sign the servers' certificates")
    srv.add_argument("--tls-client-cert-file", default="", metavar="FILE",
                     help="client certificate (PEM), for mutual TLS (implies TLS)")
    srv.add_argument("--tls-client-key-file", default="", metavar="FILE",
                     help="client private key (PEM), for mutual TLS")
    srv.add_argument("--tls-server-name", default="",
                     help="the name to verify --server's certificate against")
    srv.add_argument("--mesh", action="store_true",
                     help="flows of every node of this cluster and every connected cluster:"
                          " the nodes from the server's peer service, each read over TCP with"
                          " mutual TLS, merged in time order (a relay in the CLI)")


_FILTER_HELP = {
    "from-ip": "flows from this IP or CIDR", "ip": "flows from or to this IP or CIDR",
    "to-ip": "flows to this IP or CIDR",
    "from-pod": "flows from pods of this [namespace/]name prefix (default namespace:"
                " default)",
    "pod": "flows from or to pods of this [namespace/]name prefix",
    "to-pod": "flows to pods of this [namespace/]name prefix",
    "from-label": "flows from endpoints with these labels (key1=value1, reserved:world)",
    "label": "flows from or to endpoints with these labels",
    "to-label": "flows to endpoints with these labels",
    "from-port": "flows from this port", "port": "flows from or to this port",
    "to-port": "flows to this port",
    "from-identity": "flows from this security identity (number or reserved name)",
    "identity": "flows from or to this security identity",
    "to-identity": "flows to this security identity",
    "from-cluster": "flows from endpoints of this cluster",
    "cluster": "flows from or to endpoints of this cluster",
    "to-cluster": "flows to endpoints of this cluster",
    "namespace": "flows from or to this Kubernetes namespace",
    "from-namespace": "flows from this namespace", "to-namespace": "flows to this namespace",
    "verdict": "FORWARDED, DROPPED, AUDIT, REDIRECTED, ERROR, TRACED, TRANSLATED",
    "type": "event type TYPE[:SUBTYPE]: drop, trace[:to-endpoint…], policy-verdict, capture,"
            " l7, trace-sock",
    "protocol": "L4/L7 protocol: tcp, udp, icmp, icmpv4, icmpv6, sctp",
    "traffic-direction": "ingress or egress", "node-name": "node names (cluster/node, globs)",
    "tcp-flags": "TCP flags, e.g. syn or syn,ack",
}


def _time_formats() -> tuple[str, ...]:
    from meshagent.observe.printer import TIME_FORMATS
    return TIME_FORMATS


# -- times ------------------------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
          "h": 3600.0}
_DURATION = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Go's ``time.ParseDuration``, in seconds."""
    rest, sign = text, 1.0
    if rest[:1] in "+-" and rest:
        sign, rest = (-1.0 if rest[0] == "-" else 1.0), rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f'time: invalid duration "{text}"')
    total, pos = 0.0, 0
    while pos < len(rest):
        m = _DURATION.match(rest, pos)
        if not m or m.group(1) in ("", "."):
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


_ZONE = r"(?P<zone>Z|[+-]\d\d:\d\d)"
_LAYOUTS = (
    re.compile(r"(?P<date>\d{4}-\d\d-\d\d)$"),
    re.compile(r"(?P<date>\d{4}-\d\d-\d\d)T(?P<h>\d\d)" + _ZONE + "$"),
    re.compile(r"(?P<date>\d{4}-\d\d-\d\d)T(?P<h>\d\d):(?P<m>\d\d)" + _ZONE + "$"),
    re.compile(r"(?P<date>\d{4}-\d\d-\d\d)T(?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)"
               r"(?:\.(?P<frac>\d{1,9}))?" + _ZONE + "$"),
)
_RFC1123Z = "%a, %d %b %Y %H:%M:%S %z"


def parse_time(text: str, now: datetime.datetime | None = None) -> tuple[int, int]:
    """``hubble/pkg/time.FromString``: a duration ago, or one of Hubble's absolute layouts.
    Returns (seconds, nanos) since the epoch."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        ago = parse_duration(text)
    except ValueError:
        pass
    else:
        when = now - datetime.timedelta(seconds=ago)
        return _epoch(when, when.microsecond * 1000)
    for layout in _LAYOUTS:
        m = layout.match(text)
        if not m:
            continue
        parts = m.groupdict()
        zone = parts.get("zone") or "Z"
        offset = datetime.timezone.utc if zone == "Z" else datetime.timezone(
            datetime.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            * (-1 if zone[0] == "-" else 1))
        try:
            day = datetime.date.fromisoformat(parts["date"])
            when = datetime.datetime(day.year, day.month, day.day, int(parts.get("h") or 0),
                                     int(parts.get("m") or 0), int(parts.get("s") or 0),
                                     tzinfo=offset)
        except ValueError:
            break
        return _epoch(when, int((parts.get("frac") or "0").ljust(9, "0")))
    try:
        when = datetime.datetime.strptime(text, _RFC1123Z)
        return _epoch(when, 0)
    except ValueError:
        raise UsageError(f"failed to convert {text} to time") from None


def _epoch(when: datetime.datetime, nanos: int) -> tuple[int, int]:
    seconds = int((when.replace(microsecond=0) - datetime.datetime(
        1970, 1, 1, tzinfo=datetime.timezone.utc)).total_seconds())
    return seconds, nanos


# -- the request ------------------------------------------------------------------------------


def build_request(args: argparse.Namespace, flags: flowflags.FlowFilterFlags):
    """``getFlowsRequest``: the GetFlowsRequest ``hubble observe`` sends for these flags."""
    from meshagent.observe.api.observer import observer_pb2
    first, last = args.first > 0, args.last > 0
    for a, b, both in (("first", "last", first and last), ("first", "all", first and args.all),
                       ("first", "follow", first and args.follow),
                       ("last", "all", last and args.all)):
        if both:
            raise UsageError(f"cannot set both --{a} and --{b}")
    request = observer_pb2.GetFlowsRequest(follow=args.follow, first=first)
    if args.since:
        try:
            request.since.seconds, request.since.nanos = parse_time(args.since)
        except UsageError as exc:
            raise UsageError(f"failed to parse the since time: {exc}") from None
    if args.until and not args.follow:
        try:
            request.until.seconds, request.until.nanos = parse_time(args.until)
        except UsageError as exc:
            raise UsageError(f"failed to parse the until time: {exc}") from None
    number = args.last
    if not args.since and not (args.until and not args.follow) and not first:
        if args.all:
            number = (1 << 64) - 1
        elif number == 0 and not args.follow:
            number = DEFAULT_LAST
    request.number = args.first if first else number
    request.whitelist.extend(flags.whitelist_filters()
                             + flowflags.parse_raw_filters(args.allowlist, "allowlist"))
    request.blacklist.extend(flags.blacklist_filters()
                             + flowflags.parse_raw_filters(args.denylist, "denylist"))
    return request


# -- where to connect -------------------------------------------------------------------------


def agent_hubble_target(socket_path) -> str:
    """``unix://`` + the agent's ``hubble-socket-path``, asked over its API socket."""
    from meshagent.client import AgentClient
    options = AgentClient(socket_path).get("/config")
    if "enable-hubble" in options and options["enable-hubble"]["value"] is False:
        raise MeshagentError(f"the agent at {socket_path} runs with --enable-hubble=false:"
                             " it serves no flows")
    entry = options.get("hubble-socket-path")
    if not entry or not entry.get("value"):
        raise MeshagentError(f"the agent at {socket_path} serves no Hubble API (it has no"
                             " hubble-socket-path option); give --server")
    return f"unix://{entry['value']}"


def agent_node_name(socket_path) -> str:
    """``cluster/node`` of the agent at ``socket_path`` (as Cilium's absolute node name)."""
    from meshagent.client import AgentClient
    status = AgentClient(socket_path).get("/status")
    return f"{status['cluster_name']}/{status['node_name']}"


# -- running ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    # gRPC's C core logs every failed TLS handshake on stderr; this command reports the nodes
    # it cannot reach itself, as Hubble's node status events
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from meshagent.observe.printer import Printer
    flags = args.flow_flags or flowflags.FlowFilterFlags()
    flags.check_done()
    output = args.output.lower()
    if output in ("table", "tab") and args.follow:
        raise UsageError("table output format is not compatible with follow mode")
    request = build_request(args, flags)
    if args.print_raw_filters:
        sys.stdout.write(flowflags.filters_yaml(list(request.whitelist),
                                                list(request.blacklist)))
        return 0
    printer = Printer(output, out=sys.stdout, err=sys.stderr, time_format=args.time_format,
                      node_name=args.print_node_name, policy_names=args.print_policy_names,
                      ip_translation=args.ip_translation and not args.numeric,
                      debug=args.debug)
    try:
        try:
            asyncio.run(_observe(args, request, printer))
        except KeyboardInterrupt:
            pass  # Ctrl-C ends a --follow: exit 0, as Hubble
        finally:
            printer.close()  # a table is printed at the end, after an error too
    except BrokenPipeError:  # | head: the reader has what it wanted; nothing to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


async def _observe(args: argparse.Namespace, request, printer) -> None:
    import grpc

    from meshagent.observe.api.observer import observer_pb2_grpc
    server = args.server
    tls = args.tls or server.startswith(TLS_PREFIX)
    target = server.removeprefix(TLS_PREFIX) if server else agent_hubble_target(
        args.socket_path)
    if args.mesh:
        from meshagent.observe.mesh import observe_mesh
        node_name = "" if server else agent_node_name(args.socket_path)
        local = open_channel(target, credentials(args) if tls and server else None,
                             args.tls_server_name)
        async with local:
            await wait_ready(local, target, args.timeout)
            peer_creds = credentials(args)
            async for response in observe_mesh(
                    local, request, peer_creds, node_name=node_name,
                    dial_timeout=args.timeout, request_timeout=args.request_timeout):
                printer.write(response)
        return
    tls = tls or bool(args.tls_client_cert_file)  # a client certificate implies TLS
    channel = open_channel(target, credentials(args) if tls else None, args.tls_server_name)
    async with channel:
        await wait_ready(channel, target, args.timeout)
        try:
            async for response in observer_pb2_grpc.ObserverStub(channel).GetFlows(request):
                printer.write(response)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise MeshagentError(rpc_error_text(exc)) from None
