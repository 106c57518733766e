"""What ``hubble observe`` prints for each GetFlowsResponse: compact, dict, table and JSON.

The text follows Hubble's printer (cilium/cilium ``hubble/pkg/printer/printer.go`` and its
``printer_test.go``, which tests/test_observe_cli.py replays byte for byte): the timestamp
in UTC as Go's ``time.StampMilli`` (``Jan  2 15:04:05.000``), ``pod:port`` or
``ip:port`` (``[ip]:port`` for IPv6), ``(ID:1234)`` or a reserved identity's name
(``(world)``), ``->`` (``<-`` with both ends swapped for a reply, ``<>`` when the flow does
not say), the type (``to-endpoint``, ``Policy denied``, ``policy-verdict:L3-L4 INGRESS``),
the verdict (``ALLOWED``/``DENIED``/``AUDITED`` for policy verdicts) and the summary in
parentheses. Node status events of a relay go to stderr, and only the errors and unavailable
nodes unless asked; JSON is :mod:`meshagent.observe.jsonformat`. No colours: Hubble's own
output without a terminal (``--color never``).
"""

import datetime
import json
import posixpath
from typing import TextIO

from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.api.observer import observer_pb2
from meshagent.observe.api.relay import relay_pb2

# -- Cilium's names for numbers (pkg/monitor/api, pkg/identity) -----------------------------

#: pkg/monitor/api/types.go: monitor message types
MESSAGE_TYPE_DROP = 1
MESSAGE_TYPE_CAPTURE = 3
MESSAGE_TYPE_TRACE = 4
MESSAGE_TYPE_POLICY_VERDICT = 5
MESSAGE_TYPE_TRACE_SOCK = 7
MESSAGE_TYPE_NAMES = {"drop": 1, "debug": 2, "capture": 3, "trace": 4, "policy-verdict": 5,
                      "recorder": 6, "trace-sock": 7, "l7": 129, "agent": 130}
#: pkg/monitor/api/types.go TraceObservationPoints (bpf/lib/trace.h numbering)
TRACE_POINTS = {0: "to-endpoint", 1: "to-proxy", 2: "to-host", 3: "to-stack",
                4: "to-overlay", 5: "from-endpoint", 6: "from-proxy", 7: "from-host",
                8: "from-stack", 9: "from-overlay", 10: "from-network", 11: "to-network",
                12: "from-crypto", 13: "to-crypto"}
#: pkg/monitor/api/types.go PolicyMatchType.String()
POLICY_MATCH = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all", 5: "L3-Proto",
                6: "Proto-Only"}
#: pkg/identity/numericidentity.go reservedIdentityNames
RESERVED_IDENTITIES = {0: "unknown", 1: "host", 2: "world", 3: "unmanaged", 4: "health",
                       5: "init", 6: "remote-node", 7: "kube-apiserver", 8: "ingress",
                       9: "world-ipv4", 10: "world-ipv6"}
#: pkg/monitor/api/drop.go: the text of each drop reason
DROP_REASONS = {
    0: "Success", 2: "Invalid packet", 3: "Interface", 4: "Interface Decrypted",
    5: "LB, sock cgroup: No backend slot entry found",
    6: "LB, sock cgroup: No backend entry found",
    7: "LB, sock cgroup: Reverse entry update failed",
    8: "LB, sock cgroup: Reverse entry stale", 9: "Fragmented packet",
    10: "Fragmented packet entry update failed", 11: "Missed tail call to custom program",
    12: "Interface Decrypting", 13: "Interface Encrypting",
    14: "LB: sock cgroup: Reverse entry delete succeeded", 15: "MTU error message",
    130: "Invalid source mac", 131: "Invalid destination mac", 132: "Invalid source ip",
    133: "Policy denied", 134: "Invalid packet", 135: "CT: Truncated or invalid header",
    136: "Fragmentation needed", 137: "CT: Unknown L4 protocol",
    138: "CT: Can't create entry from packet", 139: "Unsupported L3 protocol",
    140: "Missed tail call", 141: "Error writing to packet", 142: "Unknown L4 protocol",
    143: "Unknown ICMPv4 code", 144: "Unknown ICMPv4 type", 145: "Unknown ICMPv6 code",
    146: "Unknown ICMPv6 type", 147: "Error retrieving tunnel key",
    148: "Error retrieving tunnel options", 149: "Invalid Geneve option",
    150: "Unknown L3 target address", 151: "Stale or unroutable IP",
    152: "No matching local container found", 153: "Error while correcting L3 checksum",
    154: "Error while correcting L4 checksum", 155: "CT: Map insertion failed",
    156: "Invalid IPv6 extension header", 157: "IP fragmentation not supported",
    158: "Service backend not found",
    160: "No tunnel/encapsulation endpoint (datapath BUG!)", 161: "NAT 46/64 not enabled",
    162: "Reached EDT rate-limiting drop horizon", 163: "Unknown connection tracking state",
    164: "Local host is unreachable",
    165: "No configuration available to perform policy decision",
    166: "Unsupported L2 protocol", 167: "No mapping for NAT masquerade",
    168: "Unsupported protocol for NAT masquerade", 169: "FIB lookup failed",
    170: "Encapsulation traffic is prohibited", 171: "Invalid identity", 172: "Unknown sender",
    173: "NAT not needed", 174: "Is a ClusterIP",
    175: "First logical datagram fragment not found", 176: "Forbidden ICMPv6 message",
    177: "Denied by LB src range check", 178: "Socket lookup failed",
    179: "Socket assign failed", 180: "Proxy redirection not supported for protocol",
    181: "Policy denied by denylist", 182: "VLAN traffic disallowed by VLAN filter",
    183: "Incorrect VNI from VTEP", 184: "Failed to update or lookup TC buffer",
    185: "No SID was found for the IP address", 186: "SRv6 state was removed during tail call",
    187: "L3 translation from IPv4 to IPv6 failed (NAT46)",
    188: "L3 translation from IPv6 to IPv4 failed (NAT64)", 190: "No conntrack map found",
    191: "No nat map found", 192: "Invalid ClusterID",
    193: "Unsupported packet protocol for DSR encapsulation", 194: "No egress gateway found",
    195: "Traffic is unencrypted", 196: "TTL exceeded", 197: "No node ID found",
    198: "Rate limited", 199: "IGMP handled", 200: "IGMP subscribed",
    201: "Multicast handled", 202: "Host datapath not ready",
    203: "Endpoint policy program not available", 204: "No Egress IP configured",
    205: "Punt to proxy", 206: "No device",
    207: "First logical datagram fragment not found from world",
}

# -- time formats (hubble/pkg/time: the --time-format names and Go layouts) -----------------

TIME_FORMATS = ("StampMilli", "YearMonthDay", "YearMonthDayHour", "YearMonthDayHourMinute",
                "RFC3339", "RFC3339Milli", "RFC3339Micro", "RFC3339Nano", "RFC1123Z")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MAX_SECONDS = 253402300799  # protobuf Timestamp's range: up to 9999-12-31T23:59:59Z
_MIN_SECONDS = -62135596800  # from 0001-01-01T00:00:00Z


def _fraction(nanos: int, digits: int) -> str:
    """Go's ``.999…``: at most ``digits`` digits, truncated, trailing zeros dropped."""
    text = f"{nanos:09d}"[:digits].rstrip("0")
    return f".{text}" if text else ""


def format_time(ts, layout: str = "StampMilli") -> str:
    """A Timestamp as Hubble prints it (UTC, as ``AsTime``); ``N/A`` when unset or invalid."""
    if ts is None or not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS) \
            or not 0 <= ts.nanos < 1_000_000_000:
        return "N/A"
    t = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=ts.seconds)
    date = f"{t.year:04d}-{t.month:02d}-{t.day:02d}"
    clock = f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    name = layout.lower()
    if name == "yearmonthday":
        return date
    if name == "yearmonthdayhour":
        return f"{date}T{t.hour:02d}Z"
    if name == "yearmonthdayhourminute":
        return f"{date}T{t.hour:02d}:{t.minute:02d}Z"
    if name == "rfc3339":
        return f"{date}T{clock}Z"
    if name in ("rfc3339milli", "rfc3339micro", "rfc3339nano"):
        digits = {"rfc3339milli": 3, "rfc3339micro": 6, "rfc3339nano": 9}[name]
        return f"{date}T{clock}{_fraction(ts.nanos, digits)}Z"
    if name == "rfc1123z":
        return f"{_DAYS[t.weekday()]}, {t.day:02d} {_MONTHS[t.month - 1]} {t.year:04d}" \
               f" {clock} +0000"
    # StampMilli, also for a name Hubble does not know (FormatNameToLayout's default)
    return f"{_MONTHS[t.month - 1]} {t.day:2d} {clock}.{ts.nanos // 1_000_000:03d}"


# -- pieces of a flow line -------------------------------------------------------------------


def _has(message, field: str) -> bool:
    """Whether ``message`` has the sub-message ``field`` set (False when the schema lacks it)."""
    return field in message.DESCRIPTOR.fields_by_name and message.HasField(field)


def _join_host_port(host: str, port: str) -> str:
    """Go's ``net.JoinHostPort``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _path_join(*parts: str) -> str:
    """Go's ``path.Join``: the non-empty parts joined by ``/``, cleaned."""
    kept = [p for p in parts if p]
    return posixpath.normpath("/".join(kept)) if kept else ""


def ports(flow) -> tuple[str, str]:
    l4 = flow.l4
    which = l4.WhichOneof("protocol") if _has(flow, "l4") else None
    if which in ("TCP", "UDP", "SCTP"):
        proto = getattr(l4, which)
        return str(proto.source_port), str(proto.destination_port)
    return "", ""


def fmt_identity(identity: int) -> str:
    name = RESERVED_IDENTITIES.get(identity)
    return f"({name})" if name is not None else f"(ID:{identity})"


def flow_type(flow) -> str:
    """``GetFlowType``: what kind of event this flow is, as the TYPE column shows it."""
    if _has(flow, "l7"):
        l7 = flow.l7
        kind = flow_pb2.L7FlowType.Name(l7.type).lower()
        record = l7.WhichOneof("record")
        proto = {"http": "http", "dns": "dns", "kafka": "kafka"}.get(record or "", "l7")
        if record == "dns":
            kind += " " + l7.dns.observation_source
        return f"{proto}-{kind}"
    etype, subtype = flow.event_type.type, flow.event_type.sub_type
    if etype == MESSAGE_TYPE_TRACE:
        return TRACE_POINTS.get(subtype & 0xFF, str(subtype & 0xFF))
    if etype == MESSAGE_TYPE_DROP:
        reason = subtype & 0xFF
        return DROP_REASONS.get(reason, f"{reason}, 0")
    if etype == MESSAGE_TYPE_POLICY_VERDICT:
        match = POLICY_MATCH.get(flow.policy_match_type, "unknown")
        direction = flow_pb2.TrafficDirection.Name(flow.traffic_direction)
        return f"policy-verdict:{match} {direction}"
    if etype == MESSAGE_TYPE_CAPTURE:
        return flow_pb2.DebugCapturePoint.Name(flow.debug_capture_point)
    if etype == MESSAGE_TYPE_TRACE_SOCK:  # the translation point is the event's subtype
        point = flow_pb2.SocketTranslationPoint.Name(subtype) \
            if subtype in flow_pb2.SocketTranslationPoint.values() else str(subtype)
        return {"SOCK_XLATE_POINT_POST_DIRECTION_FWD": "post-xlate-fwd",
                "SOCK_XLATE_POINT_POST_DIRECTION_REV": "post-xlate-rev",
                "SOCK_XLATE_POINT_PRE_DIRECTION_FWD": "pre-xlate-fwd",
                "SOCK_XLATE_POINT_PRE_DIRECTION_REV": "pre-xlate-rev"}.get(point, point)
    return "UNKNOWN"


def format_policy_names(policies) -> str:
    """``formatPolicyNames``: `` BY name (Kind), …`` of the policies that have both."""
    named = [f"{p.name} ({p.kind})" for p in policies if p.name and p.kind]
    return f" BY {', '.join(named)}" if named else ""


def _join_with_cutoff(names, sep: str, target: int) -> str:
    """``joinWithCutOff``: join, leaving out what goes past ``target`` characters."""
    length, end = 0, len(names)
    for i, name in enumerate(names):
        length += len(name) + len(sep)
        if length > target and i > 0:
            end = i
            break
    joined = sep.join(names[:end])
    return joined if end == len(names) else f"{joined} (and {len(names) - end} more)"


def _escape(text: str) -> str:
    """Hubble's terminal escaper: no escape sequence or carriage return reaches the terminal."""
    return text.replace("\x1b", "^[").replace("\r", "\\r")


def _go_quote(text: str) -> str:
    """Go's ``strconv.Quote`` for the text a node status carries (close enough: JSON's)."""
    return json.dumps(text, ensure_ascii=False)


def tabwriter(rows: list[list[str]], minwidth: int = 2, padding: int = 3) -> str:
    """Go's ``text/tabwriter`` as Hubble configures it (minwidth 2, padding 3, spaces): every
    cell but a line's last is padded to its column's widest cell plus the padding."""
    columns = max((len(r) - 1 for r in rows), default=0)
    widths = []
    for c in range(columns):
        cells = [len(r[c]) for r in rows if len(r) - 1 > c]
        widths.append(max([minwidth] + [w + padding for w in cells]))
    return "".join("".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:-1])) + r[-1]
                   + "\n" for r in rows)


# -- the printer ------------------------------------------------------------------------------

OUTPUTS = ("compact", "dict", "json", "jsonpb", "table", "tab")
DICT_SEPARATOR = "------------"
NODE_NAMES_CUTOFF = 50


class Printer:
    """Writes GetFlowsResponses as one of Hubble's outputs; :meth:`close` flushes a table."""

    def __init__(self, output: str = "compact", *, out: TextIO, err: TextIO,
                 time_format: str = "StampMilli", node_name: bool = False,
                 policy_names: bool = False, ip_translation: bool = True,
                 debug: bool = False):
        self.output = "table" if output == "tab" else "jsonpb" if output == "json" else output
        self.out, self.err = out, err
        self.time_format = time_format
        self.node_name = node_name
        self.policy_names = policy_names
        self.ip_translation = ip_translation
        self.debug = debug
        self.line = 0
        self.rows: list[list[str]] = []

    def close(self) -> None:
        if self.rows:
            self.out.write(_escape(tabwriter(self.rows)))
            self.rows = []
        self.out.flush()

    def write(self, response: observer_pb2.GetFlowsResponse) -> None:
        """``WriteGetFlowsResponse``."""
        kind = response.WhichOneof("response_types")
        if kind == "flow":
            self._flow(response)
        elif kind == "node_status":
            self._node_status(response)
        elif kind == "lost_events":
            self._lost_events(response)
        elif kind is not None and self.debug:
            self.err.write(_escape(f"unknown response type: {kind}\n"))

    # -- flows --

    def host_names(self, flow) -> tuple[str, str]:
        if not _has(flow, "IP"):
            if _has(flow, "ethernet"):
                return flow.ethernet.source, flow.ethernet.destination
            return "", ""
        src_ns, src_pod = flow.source.namespace, flow.source.pod_name
        dst_ns, dst_pod = flow.destination.namespace, flow.destination.pod_name
        src_svc = dst_svc = ""
        if _has(flow, "source_service"):
            src_ns, src_svc = flow.source_service.namespace, flow.source_service.name
        if _has(flow, "destination_service"):
            dst_ns, dst_svc = flow.destination_service.namespace, flow.destination_service.name
        sport, dport = ports(flow)
        return (self.hostname(flow.IP.source, sport, src_ns, src_pod, src_svc,
                              list(flow.source_names)),
                self.hostname(flow.IP.destination, dport, dst_ns, dst_pod, dst_svc,
                              list(flow.destination_names)))

    def hostname(self, ip: str, port: str, ns: str, pod: str, svc: str,
                 names: list[str]) -> str:
        host = ip
        if self.ip_translation:
            if pod:
                host = _path_join(ns, pod)
            elif svc:
                host = _path_join(ns, svc)
            elif names:
                host = ",".join(names)
        return _join_host_port(host, port) if port not in ("", "0") else host

    def verdict(self, flow) -> str:
        name = flow_pb2.Verdict.Name(flow.verdict) if flow.verdict in \
            flow_pb2.Verdict.values() else str(flow.verdict)
        policy = flow.event_type.type == MESSAGE_TYPE_POLICY_VERDICT
        if name in ("FORWARDED", "REDIRECTED") and policy:
            name = "ALLOWED"
        elif name in ("DROPPED", "ERROR") and policy:
            name = "DENIED"
        elif name == "AUDIT" and policy:
            name = "AUDITED"
        if self.policy_names and policy:
            name += format_policy_names(self._deciding_policies(flow))
        return name

    @staticmethod
    def _deciding_policies(flow):
        ingress = flow.traffic_direction == flow_pb2.TrafficDirection.Value("INGRESS")
        egress = flow.traffic_direction == flow_pb2.TrafficDirection.Value("EGRESS")
        allowed = flow.verdict in (flow_pb2.Verdict.Value("FORWARDED"),
                                   flow_pb2.Verdict.Value("REDIRECTED"))
        if ingress:
            return flow.ingress_allowed_by if allowed else flow.ingress_denied_by
        if egress:
            return flow.egress_allowed_by if allowed else flow.egress_denied_by
        return []

    def summary(self, flow) -> str:
        text = ""
        if _has(flow, "ip_trace_id") and flow.ip_trace_id.trace_id > 0:
            text = f"IP Trace ID: {flow.ip_trace_id.trace_id}; "
        text += flow.Summary
        if "auth_type" in flow.DESCRIPTOR.fields_by_name and flow.auth_type:
            text += "; " + flow_pb2.AuthType.Name(flow.auth_type)
        return text

    def _flow(self, response) -> None:
        f = response.flow
        when = format_time(f.time if f.HasField("time") else None, self.time_format)
        if self.output == "jsonpb":
            from meshagent.observe.jsonformat import response_json
            self.out.write(response_json(response) + "\n")
            self.out.flush()
            return
        src, dst = self.host_names(f)
        if self.output == "table":
            if self.line == 0:
                self.rows.append(["TIMESTAMP", *(["NODE"] if self.node_name else []), "SOURCE",
                                  "DESTINATION", "TYPE", "VERDICT", "SUMMARY"])
            self.rows.append([when, *([f.node_name] if self.node_name else []), src, dst,
                              flow_type(f), self.verdict(f), self.summary(f)])
        elif self.output == "dict":
            lines = [DICT_SEPARATOR] if self.line else []
            lines.append(f"  TIMESTAMP: {when}")
            if self.node_name:
                lines.append(f"       NODE: {f.node_name}")
            lines += [f"     SOURCE: {src}", f"DESTINATION: {dst}",
                      f"       TYPE: {flow_type(f)}", f"    VERDICT: {self.verdict(f)}",
                      f"    SUMMARY: {self.summary(f)}"]
            self.out.write(_escape("\n".join(lines) + "\n"))
        else:
            src_id, dst_id = fmt_identity(f.source.identity), fmt_identity(f.destination.identity)
            node = f" [{f.node_name}]" if self.node_name else ""
            arrow = "->"
            if not f.HasField("is_reply"):
                arrow = "<>"  # the direction is unknown
            elif f.is_reply.value:
                src, dst, src_id, dst_id, arrow = dst, src, dst_id, src_id, "<-"
            self.out.write(_escape(f"{when}{node}: {src} {src_id} {arrow} {dst} {dst_id}"
                                   f" {flow_type(f)} {self.verdict(f)} ({self.summary(f)})\n"))
        self.out.flush()
        self.line += 1

    # -- lost events --

    def _lost_events(self, response) -> None:
        lost = response.lost_events
        if self.output == "jsonpb":
            from meshagent.observe.jsonformat import response_json
            self.out.write(response_json(response) + "\n")
            self.out.flush()
            return
        when = format_time(response.time if response.HasField("time") else None,
                           self.time_format)
        source = flow_pb2.LostEventSource.Name(lost.source)
        cpu = lost.cpu.value if lost.HasField("cpu") else 0
        span = ""
        if _has(lost, "first") or _has(lost, "last"):  # newer Cilium: when they were lost
            first = format_time(lost.first if _has(lost, "first") else None, self.time_format)
            last = format_time(lost.last if _has(lost, "last") else None, self.time_format)
            span = f" (first: {first}, last: {last})"
        if self.output == "table":
            if self.line == 0:
                self.rows.append(["TIMESTAMP", *(["NODE"] if self.node_name else []), "SOURCE",
                                  "DESTINATION", "TYPE", "VERDICT", "SUMMARY"])
            self.rows.append([when, *([response.node_name] if self.node_name else []), source,
                              "-", "EVENTS LOST", "-",
                              f"CPU({cpu}) - {lost.num_events_lost}{span}"])
        elif self.output == "dict":
            lines = [DICT_SEPARATOR] if self.line else []
            lines.append(f"  TIMESTAMP: {when}")
            if self.node_name:
                lines.append(f"       NODE: {response.node_name}")
            lines += [f"     SOURCE: {source}", "       TYPE: EVENTS LOST", "    VERDICT: -",
                      f"    SUMMARY: CPU({cpu}) - {lost.num_events_lost}{span}"]
            self.out.write(_escape("\n".join(lines) + "\n"))
        else:
            self.out.write(_escape(f"{when} EVENTS LOST: {source} CPU({cpu})"
                                   f" {lost.num_events_lost}{span}\n"))
        self.out.flush()
        self.line += 1

    # -- node status (from a relay) --

    def _node_status(self, response) -> None:
        status = response.node_status
        state = status.state_change
        if not self.debug and state not in (relay_pb2.NodeState.Value("NODE_ERROR"),
                                            relay_pb2.NodeState.Value("NODE_UNAVAILABLE")):
            return  # informational only
        if self.output == "jsonpb":
            from meshagent.observe.jsonformat import response_json
            self.err.write(response_json(response) + "\n")
            self.err.flush()
            return
        when = format_time(response.time if response.HasField("time") else None,
                           self.time_format)
        names = list(status.node_names)
        joined = _join_with_cutoff(names, ", ", NODE_NAMES_CUTOFF)
        if self.output == "dict":
            text = f"{DICT_SEPARATOR}\n" if self.line else ""
            if not self.line:
                self.line += 1
            message = _go_quote(status.message) if status.message else "N/A"
            text += (f"  TIMESTAMP: {when}\n      STATE: {relay_pb2.NodeState.Name(state)}\n"
                     f"      NODES: {joined}\n    MESSAGE: {message}\n")
        else:
            prefix = f"{when} [{response.node_name}]"
            text = {
                relay_pb2.NodeState.Value("NODE_CONNECTED"):
                    f"{prefix}: Receiving flows from {len(names)} nodes: {joined}",
                relay_pb2.NodeState.Value("NODE_UNAVAILABLE"):
                    f"{prefix}: {len(names)} nodes are unavailable: {joined}",
                relay_pb2.NodeState.Value("NODE_GONE"):
                    f"{prefix}: {len(names)} nodes removed from cluster: {joined}",
                relay_pb2.NodeState.Value("NODE_ERROR"):
                    f"{prefix}: Error {_go_quote(status.message)} on {len(names)} nodes:"
                    f" {joined}",
            }.get(state, f"{prefix}: unknown node status event: {status}") + "\n"
        self.err.write(_escape(text))
        self.err.flush()
