"""Hubble's flow filters: ``GetFlowsRequest.whitelist``/``blacklist`` as predicates.

As ``pkg/hubble/filters`` builds them: a flow passes if it matches any whitelist filter (or
there is none) and no blacklist filter; a ``FlowFilter`` matches if every field it sets
matches; a field matches if any of its values does. A field this module does not implement
raises ValueError naming it, rather than being ignored.
"""

import ipaddress
import re
from collections.abc import Callable, Iterable

from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.labels import parse_selector

Predicate = Callable[[flow_pb2.Flow], bool]

_L4 = ("icmp", "icmpv4", "icmpv6", "tcp", "udp", "sctp")
_L7 = ("dns", "http", "kafka")
_FLAGS = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")
_FQDN = r"(?:[-0-9_a-z]+(?:\.[-0-9_a-z]+)*)"


def flows_filter(whitelist: Iterable[flow_pb2.FlowFilter],
                 blacklist: Iterable[flow_pb2.FlowFilter]) -> Predicate:
    """The request's filters as one predicate; ValueError for one it cannot apply."""
    allow = [filter_predicate(f) for f in whitelist]
    deny = [filter_predicate(f) for f in blacklist]

    def passes(flow: flow_pb2.Flow) -> bool:
        return (not allow or any(p(flow) for p in allow)) and not any(p(flow) for p in deny)
    return passes


def filter_predicate(flow_filter: flow_pb2.FlowFilter) -> Predicate:
    checks = []
    for field, values in flow_filter.ListFields():
        build = _BUILDERS.get(field.name)
        if build is None:
            raise ValueError(f"flow filter field {field.name!r} is not supported")
        checks.append(build(list(values)))
    return lambda flow: all(check(flow) for check in checks)


def _ips(values: list[str], get: Callable[[flow_pb2.Flow], str]) -> Predicate:
    exact, networks = set(), []
    for value in values:
        try:
            if "/" in value:
                networks.append(ipaddress.ip_network(value, strict=False))
            else:
                exact.add(str(ipaddress.ip_address(value)))
        except ValueError:
            raise ValueError(f"invalid IP address or CIDR in filter: {value!r}") from None

    def check(flow: flow_pb2.Flow) -> bool:
        address = get(flow)
        if not address:
            return False
        if address in exact:
            return True
        parsed = ipaddress.ip_address(address)
        return any(parsed in network for network in networks)
    return check


def _pods(values: list[str], side: str) -> Predicate:
    """``namespace/prefix`` (Hubble's ParseNamespaceName: no slash, no namespace)."""
    wanted = []
    for value in values:
        parts = value.split("/")
        namespace, prefix = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
        if not namespace and not prefix:
            raise ValueError(f"invalid filter, must be [namespace/][<name>], got {value!r}")
        wanted.append((namespace, prefix))

    def check(flow: flow_pb2.Flow) -> bool:
        end = getattr(flow, side)
        if not end.namespace and not end.pod_name:
            return False
        return any(ns == end.namespace and end.pod_name.startswith(prefix)
                   for ns, prefix in wanted)
    return check


def _labels(values: list[str], side: str) -> Predicate:
    selectors = [parse_selector(value) for value in values]
    return lambda flow: any(s.matches(getattr(flow, side).labels) for s in selectors)


def _ports(values: list[str], side: str) -> Predicate:
    ports = set()
    for value in values:
        if not value.isdigit() or int(value) > 65535:
            raise ValueError(f"invalid port {value!r}")
        ports.add(int(value))

    def check(flow: flow_pb2.Flow) -> bool:
        which = flow.l4.WhichOneof("protocol")
        if which not in ("TCP", "UDP", "SCTP"):
            return False
        return getattr(getattr(flow.l4, which), f"{side}_port") in ports
    return check


def _protocols(values: list[str]) -> Predicate:
    wanted = set()
    for value in values:
        name = value.lower()
        if name not in _L4 + _L7:
            raise ValueError(f"unknown protocol: {value!r}")
        wanted.add(name)

    def check(flow: flow_pb2.Flow) -> bool:
        which = (flow.l4.WhichOneof("protocol") or "").lower()
        if which in wanted or (which in ("icmpv4", "icmpv6") and "icmp" in wanted):
            return True
        record = flow.l7.WhichOneof("record") if flow.HasField("l7") else None
        return record in wanted
    return check


def _event_types(values: list[flow_pb2.EventTypeFilter]) -> Predicate:
    def check(flow: flow_pb2.Flow) -> bool:
        kind = flow.event_type
        return any(v.type == kind.type and (not v.match_sub_type or v.sub_type == kind.sub_type)
                   for v in values)
    return check


def _tcp_flags(values: list[flow_pb2.TCPFlags]) -> Predicate:
    wanted = [[name for name in _FLAGS if getattr(v, name)] for v in values]

    def check(flow: flow_pb2.Flow) -> bool:
        if flow.l4.WhichOneof("protocol") != "TCP" or not flow.l4.TCP.HasField("flags"):
            return False
        flags = flow.l4.TCP.flags
        return any(all(getattr(flags, name) for name in names) for names in wanted)
    return check


def _node_names(values: list[str]) -> Predicate:
    """Hubble's node name patterns: ``cluster/node``, each part an FQDN pattern with ``*``,
    empty for any; no slash: any cluster."""
    parts = []
    for value in values:
        pieces = value.split("/")
        if not value or len(pieces) > 2:
            raise ValueError(f"invalid node name pattern {value!r}")
        cluster, node = pieces if len(pieces) == 2 else ("", pieces[0])
        parts.append(f"{_fqdn(cluster)}/{_fqdn(node)}")
    pattern = re.compile(r"\A(?:" + "|".join(parts) + r")\Z")

    def check(flow: flow_pb2.Flow) -> bool:
        name = flow.node_name
        if not name:
            return False
        return bool(pattern.match(name if "/" in name else f"default/{name}"))
    return check


def _fqdn(pattern: str) -> str:
    pattern = pattern.strip().removesuffix(".").lower()
    if not pattern:
        return _FQDN
    if pattern.endswith("."):
        raise ValueError("multiple trailing dots in pattern")
    out = []
    for char in pattern:
        if char == ".":
            out.append(r"\.")
        elif char == "*":
            out.append(r"[-.0-9a-z]*")
        elif char.isdigit() or char in "-_" or "a" <= char <= "z":
            out.append(char)
        else:
            raise ValueError(f"{char!r}: invalid rune in pattern")
    return "".join(out)


def _clusters(values: list[str], side: str) -> Predicate:
    if "" in values:
        raise ValueError("invalid filter, name must not be empty")
    return lambda flow: getattr(flow, side).cluster_name in values


def _one_of(get: Callable[[flow_pb2.Flow], object]) -> Callable[[list], Predicate]:
    return lambda values: (lambda flow: get(flow) in values)


_BUILDERS: dict[str, Callable[[list], Predicate]] = {
    "uuid": _one_of(lambda f: f.uuid),
    "source_ip": lambda v: _ips(v, lambda f: f.IP.source),
    "destination_ip": lambda v: _ips(v, lambda f: f.IP.destination),
    "source_pod": lambda v: _pods(v, "source"),
    "destination_pod": lambda v: _pods(v, "destination"),
    "source_label": lambda v: _labels(v, "source"),
    "destination_label": lambda v: _labels(v, "destination"),
    "source_identity": _one_of(lambda f: f.source.identity),
    "destination_identity": _one_of(lambda f: f.destination.identity),
    "source_cluster_name": lambda v: _clusters(v, "source"),
    "destination_cluster_name": lambda v: _clusters(v, "destination"),
    "verdict": _one_of(lambda f: f.verdict),
    "drop_reason_desc": _one_of(lambda f: f.drop_reason_desc),
    "traffic_direction": _one_of(lambda f: f.traffic_direction),
    "event_type": _event_types,
    "protocol": _protocols,
    "source_port": lambda v: _ports(v, "source"),
    "destination_port": lambda v: _ports(v, "destination"),
    "reply": _one_of(lambda f: f.reply),
    "tcp_flags": _tcp_flags,
    "node_name": _node_names,
    "ip_version": _one_of(lambda f: f.IP.ipVersion),
}
#: The FlowFilter fields applied here; any other set in a filter is refused.
SUPPORTED = frozenset(_BUILDERS)
