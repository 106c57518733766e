"""``hubble observe``'s filter flags turned into FlowFilters, exactly as Hubble's CLI does.

Follows cilium/cilium ``hubble/cmd/observe/flows_filter.go`` (its ``flows_filter_test.go``
cases are replayed in tests/test_observe_cli.py):

* Flags build a *whitelist*; ``--not`` sends the next flag to the *blacklist* instead.
* ``--from-X`` fills a source field, ``--to-X`` a destination field, both on each of the two
  filters Hubble keeps (left and right); a bare ``--X`` fills the source field of the left
  filter and the destination field of the right one, so the flow matches either way (the
  server ORs a list's filters). When left and right end up equal, one filter is sent.
* Repeating a flag adds a value to the same field (the server ORs a field's values);
  different flags are ANDed within a filter.
* ``--namespace``/``--from-namespace``/``--to-namespace`` (and ``--all-namespaces``) are not
  fields: when the filters are built they turn pod (or service) names into ``ns/name``,
  or into ``ns/`` (every pod of the namespace) when no pod was given.
* ``--from-cluster``/``--to-cluster``/``--cluster`` are the FlowFilter fields
  ``source_cluster_name``/``destination_cluster_name`` (not node-name prefixes).
* Some flags cannot be combined (``--ip`` with ``--from-ip``, ``--pod`` with
  ``--namespace``…): the same groups and message as Hubble.
"""

import json

from google.protobuf import json_format

from meshagent.errors import UsageError
from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.printer import MESSAGE_TYPE_NAMES, RESERVED_IDENTITIES, TRACE_POINTS

#: flag -> (source field, destination field): --from-X, --to-X and --X
DIRECTED = {
    "ip": ("source_ip", "destination_ip"),
    "pod": ("source_pod", "destination_pod"),
    "fqdn": ("source_fqdn", "destination_fqdn"),
    "label": ("source_label", "destination_label"),
    "service": ("source_service", "destination_service"),
    "port": ("source_port", "destination_port"),
    "identity": ("source_identity", "destination_identity"),
    "cluster": ("source_cluster_name", "destination_cluster_name"),
}
#: flag -> the one field it fills on both filters (values taken as given)
PLAIN = {"uuid": "uuid", "node-name": "node_name", "node-label": "node_labels",
         "protocol": "protocol", "snat-ip": "source_ip_xlated", "http-status":
         "http_status_code", "http-method": "http_method", "http-path": "http_path",
         "http-url": "http_url", "trace-id": "trace_id"}
#: flags that take no value (Hubble's NoOptDefVal), and the value they stand for
NO_VALUE = {"ipv4": "v4", "ipv6": "v6", "all-namespaces": "true",
            "from-all-namespaces": "true", "to-all-namespaces": "true"}
#: flags_filter.go newFlowFilter(): groups of flags of which only one may be used
CONFLICTS = (
    ("from-fqdn", "from-ip", "ip", "fqdn", "from-namespace", "namespace",
     "from-all-namespaces", "all-namespaces"),
    ("from-fqdn", "from-ip", "ip", "fqdn", "from-pod", "pod"),
    ("to-fqdn", "to-ip", "ip", "fqdn", "to-namespace", "namespace", "to-all-namespaces",
     "all-namespaces"),
    ("to-fqdn", "to-ip", "ip", "fqdn", "to-pod", "pod"),
    ("to-pod", "namespace", "all-namespaces"),
    ("from-pod", "namespace", "all-namespaces"),
    ("to-service", "namespace", "all-namespaces"),
    ("from-service", "namespace", "all-namespaces"),
    ("snat-ip",), ("label", "from-label"), ("label", "to-label"), ("service", "from-service"),
    ("service", "to-service"), ("verdict",), ("drop-reason-desc",), ("type",),
    ("http-status",), ("http-method",), ("http-path",), ("http-url",), ("protocol",),
    ("port", "to-port"), ("port", "from-port"), ("identity", "to-identity"),
    ("identity", "from-identity"), ("node-label",), ("tcp-flags",), ("uuid",),
    ("traffic-direction",),
)
#: hubble/cmd/observe/flows_filter.go agentEventSubtypes
AGENT_SUBTYPES = {"unspecified": 0, "message": 1, "agent-started": 2, "policy-updated": 5,
                  "policy-deleted": 6, "endpoint-regenerate-success": 3,
                  "endpoint-regenerate-failure": 4, "endpoint-created": 7,
                  "endpoint-deleted": 8, "ipcache-upserted": 9, "ipcache-deleted": 10}
#: pkg/identity: the reserved identities a flag may name (every one but "unknown")
IDENTITY_NAMES = {name: number for number, name in RESERVED_IDENTITIES.items() if number}
TCP_FLAGS = ("SYN", "FIN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")


def _field_exists(name: str) -> bool:
    return name in flow_pb2.FlowFilter.DESCRIPTOR.fields_by_name


def filter_flags() -> list[str]:
    """Every filter flag name this build of the FlowFilter message can carry."""
    names = []
    for flag, (src, dst) in DIRECTED.items():
        if _field_exists(src) and _field_exists(dst):
            names += [f"from-{flag}", flag, f"to-{flag}"]
    names += [flag for flag, field in PLAIN.items() if _field_exists(field)]
    names += ["namespace", "from-namespace", "to-namespace", "all-namespaces",
              "from-all-namespaces", "to-all-namespaces", "verdict", "drop-reason-desc",
              "type", "tcp-flags", "traffic-direction", "ipv4", "ipv6", "ip-version"]
    return names


def _parse_uint(text: str, bits: int) -> int:
    """Go's ``strconv.ParseUint(text, 10, bits)``, with its error text."""
    if not text.isascii() or not text.isdigit():
        raise UsageError(f'strconv.ParseUint: parsing "{text}": invalid syntax')
    value = int(text)
    if value >= 1 << bits:
        raise UsageError(f'strconv.ParseUint: parsing "{text}": value out of range')
    return value


def parse_identity(text: str) -> int:
    if text in IDENTITY_NAMES:
        return IDENTITY_NAMES[text]
    try:
        return _parse_uint(text, 32)
    except UsageError:
        raise UsageError("invalid security identity, expected one of"
                         f" [{' '.join(IDENTITY_NAMES)}] or a numeric value") from None


def parse_tcp_flags(text: str) -> flow_pb2.TCPFlags:
    flags = flow_pb2.TCPFlags()
    for flag in text.split(","):
        if flag.upper() not in TCP_FLAGS:
            raise UsageError(f"unknown tcp flag: {flag}")
        setattr(flags, flag.upper(), True)
    return flags


def parse_type(text: str) -> flow_pb2.EventTypeFilter:
    """``--type TYPE[:SUBTYPE]``: names of Cilium's monitor or numbers."""
    event = flow_pb2.EventTypeFilter()
    name, _, sub = text.partition(":")
    if name in MESSAGE_TYPE_NAMES:
        event.type = MESSAGE_TYPE_NAMES[name]
    else:
        try:
            event.type = _parse_uint(name, 32)
        except UsageError as exc:
            raise UsageError(f"unable to parse type '{name}', not a known type name and unable"
                             f" to parse as numeric value: {exc}") from None
    if ":" in text:
        if event.type == MESSAGE_TYPE_NAMES["trace"]:
            for number, point in TRACE_POINTS.items():
                if sub == point:
                    event.match_sub_type, event.sub_type = True, number
        elif event.type == MESSAGE_TYPE_NAMES["agent"] and sub in AGENT_SUBTYPES:
            event.match_sub_type, event.sub_type = True, AGENT_SUBTYPES[sub]
        if not event.match_sub_type:
            try:
                event.sub_type = _parse_uint(sub, 32)
            except UsageError as exc:
                raise UsageError(f"unable to parse event sub-type '{sub}', not a known sub-type"
                                 f" name and unable to parse as numeric value: {exc}") from None
            event.match_sub_type = True
    return event


def ip_version(text: str) -> int:
    lowered = text.lower()
    if lowered in ("4", "v4", "ipv4", "ip4"):
        return flow_pb2.IPVersion.Value("IPv4")
    if lowered in ("6", "v6", "ipv6", "ip6"):
        return flow_pb2.IPVersion.Value("IPv6")
    return flow_pb2.IPVersion.Value("IP_NOT_USED")


def _namespace_of(name: str) -> str:
    parts = name.split("/")
    return parts[0] if len(parts) > 1 else ""


def _with_namespaces(names: list[str], namespaces: list[str]) -> list[str]:
    if not namespaces or not names:
        return names
    out = []
    for name in names:
        if "/" in name:
            out.append(name)
        else:
            out += [f"{ns}/{name}" for ns in namespaces]
    return out


def _replace(field, values: list) -> None:
    del field[:]
    field.extend(values)


class _Tracker:
    """One list (whitelist or blacklist) being built: ``left OR right``."""

    def __init__(self):
        self.left: flow_pb2.FlowFilter | None = None
        self.right: flow_pb2.FlowFilter | None = None
        self.ns: list[str] = []
        self.src_ns: list[str] = []
        self.dst_ns: list[str] = []
        self.changed: list[str] = []

    def apply(self, update, left: bool = True, right: bool = True) -> None:
        if left:
            self.left = self.left or flow_pb2.FlowFilter()
            update(self.left)
        if right:
            self.right = self.right or flow_pb2.FlowFilter()
            update(self.right)

    @staticmethod
    def _apply_src(namespaces, ff) -> None:
        if not ff.source_pod and not ff.source_service:
            ff.source_pod.append("")
        _replace(ff.source_pod, _with_namespaces(list(ff.source_pod), namespaces))
        _replace(ff.source_service, _with_namespaces(list(ff.source_service), namespaces))

    @staticmethod
    def _apply_dst(namespaces, ff) -> None:
        if not ff.destination_pod and not ff.destination_service:
            ff.destination_pod.append("")
        _replace(ff.destination_pod, _with_namespaces(list(ff.destination_pod), namespaces))
        _replace(ff.destination_service,
                 _with_namespaces(list(ff.destination_service), namespaces))

    def filters(self) -> list[flow_pb2.FlowFilter]:
        if self.left is None and self.right is None and not (self.ns or self.src_ns
                                                             or self.dst_ns):
            return []
        left = flow_pb2.FlowFilter()
        right = flow_pb2.FlowFilter()
        left.CopyFrom(self.left or flow_pb2.FlowFilter())
        right.CopyFrom(self.right or flow_pb2.FlowFilter())
        if self.dst_ns:
            self._apply_dst(self.dst_ns, left)
            self._apply_dst(self.dst_ns, right)
        if self.src_ns:
            self._apply_src(self.src_ns, left)
            self._apply_src(self.src_ns, right)
        if self.ns:
            self._apply_src(self.ns, left)
            self._apply_dst(self.ns, right)
        return [left] if left == right else [left, right]

    def check_namespaces(self, ff: flow_pb2.FlowFilter | None) -> None:
        if ff is None:
            return
        for namespaces, names in ((self.ns, ff.source_pod), (self.ns, ff.source_service),
                                  (self.ns, ff.destination_pod),
                                  (self.ns, ff.destination_service),
                                  (self.src_ns, ff.source_pod), (self.src_ns, ff.source_service),
                                  (self.dst_ns, ff.destination_pod),
                                  (self.dst_ns, ff.destination_service)):
            for ns in namespaces:
                for name in names:
                    found = _namespace_of(name)
                    if found and found != ns:
                        raise UsageError(f"namespace conflict: {json.dumps(ns)} does not"
                                         f" contain {json.dumps(name)}")
        for pods, services in ((ff.source_pod, ff.source_service),
                               (ff.destination_pod, ff.destination_service)):
            for pod in pods:
                pod_ns = _namespace_of(pod)
                if not pod_ns:
                    continue
                for svc in services:
                    if _namespace_of(svc) != pod_ns:
                        raise UsageError(f"namespace of service {json.dumps(svc)} conflict with"
                                         f" pod {json.dumps(pod_ns)}")


class FlowFilterFlags:
    """The filter flags of one command line, in their order (``--not`` applies to the next)."""

    def __init__(self):
        self.whitelist: _Tracker | None = None
        self.blacklist: _Tracker | None = None
        self.blacklisting = False

    def set(self, name: str, value: str) -> None:
        if name == "not":
            if self.blacklisting:
                raise UsageError("consecutive --not statements")
            self.blacklisting = True
            return
        if self.blacklisting:
            self.blacklisting = False
            self.blacklist = self.blacklist or _Tracker()
            tracker = self.blacklist
        else:
            self.whitelist = self.whitelist or _Tracker()
            tracker = self.whitelist
        if name not in tracker.changed:
            tracker.changed.append(name)
        self._check_conflicts(tracker)
        self._set(tracker, name, value)
        tracker.check_namespaces(tracker.left)
        tracker.check_namespaces(tracker.right)

    @staticmethod
    def _check_conflicts(tracker: _Tracker) -> None:
        for group in CONFLICTS:
            for flag in group:
                if flag not in tracker.changed:
                    continue
                for other in group:
                    if other != flag and other in tracker.changed:
                        raise UsageError(f"filters --{flag} and --{other} cannot be combined")

    @staticmethod
    def _set(t: _Tracker, name: str, value: str) -> None:
        def add(field: str, item):
            return lambda ff: getattr(ff, field).append(item)

        def add_message(field: str, item):
            return lambda ff: getattr(ff, field).add().CopyFrom(item)

        base = name.removeprefix("from-").removeprefix("to-")
        if base in DIRECTED and name not in NO_VALUE:
            src, dst = DIRECTED[base]
            item = parse_identity(value) if base == "identity" else value
            if name.startswith("from-"):
                t.apply(add(src, item))
            elif name.startswith("to-"):
                t.apply(add(dst, item))
            else:
                t.apply(add(src, item), right=False)
                t.apply(add(dst, item), left=False)
        elif name in PLAIN:
            t.apply(add(PLAIN[name], value))
        elif name == "namespace":
            t.ns.append(value)
        elif name == "from-namespace":
            t.src_ns.append(value)
        elif name == "to-namespace":
            t.dst_ns.append(value)
        elif name == "all-namespaces":
            t.ns.append("")
        elif name == "from-all-namespaces":
            t.src_ns.append("")
        elif name == "to-all-namespaces":
            t.dst_ns.append("")
        elif name in ("ipv4", "ipv6", "ip-version"):
            version = {"ipv4": flow_pb2.IPVersion.Value("IPv4"),
                       "ipv6": flow_pb2.IPVersion.Value("IPv6")}.get(name) or ip_version(value)
            t.apply(add("ip_version", version))
        elif name == "verdict":
            if value not in flow_pb2.Verdict.keys():
                raise UsageError(f"invalid --verdict value: {value}")
            t.apply(add("verdict", flow_pb2.Verdict.Value(value)))
        elif name == "drop-reason-desc":
            if value == "":
                raise UsageError("empty --drop-reason-desc value")
            if value not in flow_pb2.DropReason.keys():
                raise UsageError(f"invalid --drop-reason-desc value: {value}")
            t.apply(add("drop_reason_desc", flow_pb2.DropReason.Value(value)))
        elif name == "type":
            t.apply(add_message("event_type", parse_type(value)))
        elif name == "tcp-flags":
            t.apply(add_message("tcp_flags", parse_tcp_flags(value)))
        elif name == "traffic-direction":
            direction = value.lower()
            if direction not in ("ingress", "egress"):
                raise UsageError(f"{direction}: invalid traffic direction, expected ingress or"
                                 " egress")
            t.apply(add("traffic_direction",
                        flow_pb2.TrafficDirection.Value(direction.upper())))
        else:
            raise UsageError(f"unknown filter flag --{name}")

    def check_done(self) -> None:
        if self.blacklisting:
            raise UsageError("trailing --not found in the arguments")

    def whitelist_filters(self) -> list[flow_pb2.FlowFilter]:
        return self.whitelist.filters() if self.whitelist else []

    def blacklist_filters(self) -> list[flow_pb2.FlowFilter]:
        return self.blacklist.filters() if self.blacklist else []


# -- raw filters (--allowlist/--denylist, --print-raw-filters) ------------------------------


def parse_raw_filters(texts: list[str], flag: str) -> list[flow_pb2.FlowFilter]:
    """JSON-encoded FlowFilters, one or more per value (as Go's json.Decoder reads them)."""
    out = []
    decoder = json.JSONDecoder()
    for text in texts:
        rest = text.strip()
        while rest:
            try:
                value, end = decoder.raw_decode(rest)
                ff = flow_pb2.FlowFilter()
                json_format.ParseDict(value, ff)
            except (ValueError, json_format.ParseError) as exc:
                raise UsageError(f"invalid --{flag} flag: failed to decode '{text}': {exc}") \
                    from None
            out.append(ff)
            rest = rest[end:].strip()
    return out


def filter_json(ff: flow_pb2.FlowFilter) -> str:
    """A FlowFilter as Go's ``json.Marshal`` writes it (protojson, proto names, declaration
    order, compact, HTML-escaped)."""
    from meshagent.observe.jsonformat import _go_json
    return _go_json(ff)


def _yaml_quote(text: str) -> str:
    """A JSON text as gopkg.in/yaml.v3 writes it in a list (single-quoted: it starts with
    ``{``)."""
    return "'" + text.replace("'", "''") + "'"


def filters_yaml(whitelist: list, blacklist: list) -> str:
    """``--print-raw-filters``: the lists as Hubble prints them (``getFlowFiltersYAML``)."""
    out = ""
    for key, filters in (("allowlist", whitelist), ("denylist", blacklist)):
        if filters:
            out += f"{key}:\n" + "".join(f"    - {_yaml_quote(filter_json(f))}\n"
                                         for f in filters)
    return out or "{}\n"
