"""A datapath's flow event as the ``flow.Flow`` Hubble makes of the same packet.

Field by field as Cilium's ``pkg/hubble/parser/threefour/parser.go`` fills them for the three
monitor messages our events stand for:

========================  =========================  ========================  ==================
field                     drop (type 1)              policy verdict (type 5)   trace (type 4)
========================  =========================  ========================  ==================
verdict                   DROPPED                    FORWARDED, AUDIT, DROPPED FORWARDED
drop_reason(_desc)        the reason                 the reason, if dropped    —
event_type.sub_type       the reason's number        0                         observation point
is_reply                  unset (unknown)            false; unset if dropped   the datapath's
traffic_direction         the hook's direction       the hook's direction      the connection's
policy_match_type         —                          the entry's level         —
trace_observation_point   —                          —                         TO/FROM_ENDPOINT
========================  =========================  ========================  ==================

A drop by policy is reported twice by Cilium, a policy verdict and then a drop notification
(``hubble observe`` shows "policy-verdict:none INGRESS DENIED" above "Policy denied DROPPED"),
so one such event makes two flows here too. Policies are named (``*_allowed_by``,
``*_denied_by``) on policy verdicts only, as Cilium's ``pkg/policy/correlation`` does: for
FORWARDED, and for DROPPED by a deny rule (POLICY_DENY); never for AUDIT or a default deny.
"""

import functools
import uuid
from collections.abc import Callable, Sequence

import attrs

from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import BoolValue

from meshagent.datapath import events as ev
from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.names import NamedEnd, Names

#: Our drop reasons as Cilium's (api/v1/flow/flow.proto DropReason, bpf/lib/common.h DROP_*).
DROP_REASONS = {
    "policy_default": flow_pb2.POLICY_DENIED,  # 133: no rule allows it
    "policy_deny": flow_pb2.POLICY_DENY,  # 181: a deny rule
    "spoofed": flow_pb2.INVALID_SOURCE_IP,  # 132: a pod's packet without its own address
    "malformed": flow_pb2.INVALID_PACKET_DROPPED,  # 134
    # a first fragment too short for the transport header: Cilium cannot read the ports of
    # it either and drops it as a truncated header
    "frag_tiny": flow_pb2.CT_TRUNCATED_OR_INVALID_HEADER,  # 135
    "frag_unknown": flow_pb2.FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND,  # 175
    "unsupported_l3": flow_pb2.UNSUPPORTED_L3_PROTOCOL,  # 139
    # a packet for the DNS proxy that could not be handed to it (bpf/lib/common.h
    # DROP_PROXY_LOOKUP_FAILED, DROP_PROXY_SET_FAILED, DROP_PROXY_UNKNOWN_PROTO)
    "proxy_lookup": flow_pb2.SOCKET_LOOKUP_FAILED,  # 178
    "proxy_assign": flow_pb2.SOCKET_ASSIGN_FAILED,  # 179
    "proxy_unsupported": flow_pb2.PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL,  # 180
}
POLICY_DROPS = ("policy_default", "policy_deny")
#: FlowEvent.verdict as Hubble's Verdict (any other: FORWARDED)
VERDICTS = {ev.DROPPED: flow_pb2.DROPPED, ev.AUDIT: flow_pb2.AUDIT,
            ev.REDIRECTED: flow_pb2.REDIRECTED}  # to the DNS proxy: Hubble's policy verdict
# with a proxy port (pkg/hubble/parser/threefour: a verdict > 0 is REDIRECTED)
#: Cilium's monitor message types (pkg/monitor/api/types.go)
MESSAGE_DROP, MESSAGE_TRACE, MESSAGE_POLICY_VERDICT = 1, 4, 5
#: Cilium's trace observation points as monitor sub-types (TraceToLxc, TraceFromLxc)
TRACE_TO_ENDPOINT, TRACE_FROM_ENDPOINT = 0, 5
TCP, UDP, ICMP, ICMPV6, SCTP = 6, 17, 1, 58, 132
_FLAGS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10),
          ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80))
_SUMMARY_FLAGS = ("SYN", "ACK", "RST", "FIN", "PSH", "URG", "ECE", "CWR")  # getTCPFlags order
#: gopacket's names (its ICMPv4TypeCode/ICMPv6TypeCode String()) of the ICMP types a pod
#: commonly sees: type -> (name, code names or None when the type has no codes)
_UNREACHABLE4 = ("Net", "Host", "Protocol", "Port", "FragmentationNeeded",
                 "SourceRoutingFailed", "NetUnknown", "HostUnknown", "SourceIsolated",
                 "NetAdminProhibited", "HostAdminProhibited", "NetTOS", "HostTOS",
                 "CommAdminProhibited", "HostPrecedence", "PrecedenceCutoff")
_ICMP4 = {0: ("EchoReply", None), 3: ("DestinationUnreachable", _UNREACHABLE4),
          8: ("EchoRequest", None),
          11: ("TimeExceeded", ("TTLExceeded", "FragmentReassemblyTimeExceeded"))}
_ICMP6 = {1: ("DestinationUnreachable", ("NoRouteToDst", "AdminProhibited",
                                          "BeyondScopeOfSrc", "AddressUnreachable",
                                          "PortUnreachable", "SrcAddressFailedPolicy",
                                          "RejectRouteToDst")),
          2: ("PacketTooBig", None),
          3: ("TimeExceeded", ("HopLimitExceeded", "FragmentReassemblyTimeExceeded")),
          128: ("EchoRequest", None), 129: ("EchoReply", None),
          133: ("RouterSolicitation", None), 134: ("RouterAdvertisement", None),
          135: ("NeighborSolicitation", None), 136: ("NeighborAdvertisement", None)}

#: (local endpoint, direction, peer identity, protocol, port, allow?, match) -> policy keys
Attribution = Callable[[int, str, int, int, int, bool, int], tuple[tuple[str, str, str], ...]]
POLICY_LABEL = "k8s:io.cilium.k8s.policy"


@attrs.define(slots=True, eq=False)
class FlowRecord:
    """A flow as the observer keeps it: the event, and what naming it takes from the moment it
    happened (the ends as the tables named them then, the policies that decided), so that
    :meth:`FlowMaker.build` makes the same Hubble flow whenever it is read. A record is a
    fraction of a built flow's size and cost."""

    event: ev.FlowEvent
    kind: int  # Cilium's monitor message: MESSAGE_DROP, MESSAGE_TRACE or MESSAGE_POLICY_VERDICT
    number: int  # the maker's count of the flows it recorded: the flow's uuid derives from it
    source: NamedEnd
    destination: NamedEnd
    policies: Sequence[flow_pb2.Policy] = ()  # the deciding ones (a policy verdict's): shared
    names: tuple[str, ...] = ()  # the DNS names the local endpoint got the remote address for


class FlowMaker:
    """Turns events into flows for node ``node_name`` (``<cluster>/<node>``); ``attribute``
    names the deciding policies (None: the resolver cannot tell, the fields stay empty) and
    ``revision`` is the policy revision it answers for.

    :meth:`records` is what happens for each event; :meth:`build` for each flow read. A
    flow's uuid is random for this maker and the flow's number (Hubble's is random per flow):
    the same record builds with the same uuid every time."""

    def __init__(self, node_name: str, names: Names, attribute: Attribution | None = None,
                 revision: Callable[[], int] = lambda: 0,
                 dns_names: Callable[[int, str], tuple[str, ...]] | None = None):
        self.node_name = node_name
        self.names = names
        self.attribute = attribute
        self.revision = revision
        # (local endpoint, remote address) -> the names it looked up for it (the DNS proxy's)
        self.dns_names = dns_names
        self._cache: dict[tuple, list[flow_pb2.Policy]] = {}
        self._recorded = 0
        # a version 4 uuid: a record's number (< 2**62) changes only its random bits
        self._uuid_base = uuid.uuid4().int

    def flows(self, event: ev.FlowEvent) -> list[flow_pb2.Flow]:
        """The flows Cilium would report for ``event``: two for a drop by policy."""
        return [self.build(record) for record in self.records(event)]

    def records(self, event: ev.FlowEvent) -> list[FlowRecord]:
        """The records of the flows Cilium would report for ``event``: two for a drop by
        policy (its policy verdict, then the drop)."""
        names = self.names
        source = names.end(event.source_ip, event.source_identity)
        destination = names.end(event.destination_ip, event.destination_identity)
        dns = ()
        if self.dns_names is not None and event.endpoint and event.source_ip:
            remote = event.destination_ip if event.direction == "egress" else event.source_ip
            dns = self.dns_names(event.endpoint, remote)
        number = self._recorded
        if event.kind == ev.TRACE:
            self._recorded = number + 1
            return [FlowRecord(event, MESSAGE_TRACE, number, source, destination, (), dns)]
        if event.kind != ev.DROP:
            self._recorded = number + 1
            return [FlowRecord(event, MESSAGE_POLICY_VERDICT, number, source, destination,
                               self._policies(event), dns)]
        if event.reason not in POLICY_DROPS:
            self._recorded = number + 1
            return [FlowRecord(event, MESSAGE_DROP, number, source, destination, (), dns)]
        self._recorded = number + 2
        return [FlowRecord(event, MESSAGE_POLICY_VERDICT, number, source, destination,
                           self._policies(event), dns),
                FlowRecord(event, MESSAGE_DROP, number + 1, source, destination, (), dns)]

    def build(self, record: FlowRecord, into: flow_pb2.Flow | None = None) -> flow_pb2.Flow:
        """The Hubble flow of ``record``, the same fields each time; made in ``into`` (an
        empty message, e.g. a response's ``flow``: no copy) or a new message."""
        event, kind = record.event, record.kind
        flow = flow_pb2.Flow() if into is None else into
        digits = f"{self._uuid_base ^ record.number:032x}"  # as str(uuid.UUID) spells it
        flow.uuid = (f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-"
                     f"{digits[20:]}")
        flow.Type = flow_pb2.L3_L4
        flow.node_name = self.node_name
        flow.time.seconds, flow.time.nanos = divmod(event.time_ns, 1_000_000_000)
        dropped = event.verdict == ev.DROPPED
        flow.verdict = VERDICTS.get(event.verdict, flow_pb2.FORWARDED)
        code = DROP_REASONS.get(event.reason, 0) if dropped else 0
        flow.drop_reason = flow.drop_reason_desc = code
        if event.source_ip:
            flow.IP.source, flow.IP.destination = event.source_ip, event.destination_ip
            flow.IP.ipVersion = flow_pb2.IPv6 if event.ipv6 else flow_pb2.IPv4
        _layer4(flow, event)
        record.source.fill(flow.source)
        record.destination.fill(flow.destination)
        if record.names:  # Hubble: the names the local endpoint resolved the remote end from
            (flow.destination_names if event.direction == "egress"
             else flow.source_names).extend(record.names)
        ingress = event.direction == "ingress"
        if kind == MESSAGE_TRACE:
            point = TRACE_TO_ENDPOINT if ingress else TRACE_FROM_ENDPOINT
            flow.event_type.type, flow.event_type.sub_type = kind, point
            flow.trace_observation_point = (flow_pb2.TO_ENDPOINT if ingress
                                            else flow_pb2.FROM_ENDPOINT)
            flow.trace_reason = flow_pb2.REPLY if event.is_reply else flow_pb2.ESTABLISHED
            flow.is_reply.CopyFrom(BoolValue(value=event.is_reply))
            flow.reply = event.is_reply
            ingress = ingress != event.is_reply  # the connection's direction
        elif kind == MESSAGE_DROP:
            flow.event_type.type, flow.event_type.sub_type = kind, code
        else:
            flow.event_type.type = kind
            flow.policy_match_type = event.match
            if not dropped:
                flow.is_reply.CopyFrom(BoolValue(value=False))
        flow.traffic_direction = flow_pb2.INGRESS if ingress else flow_pb2.EGRESS
        flow.Summary = _summary(flow, event)
        if record.policies:
            allowed = flow.verdict == flow_pb2.FORWARDED
            target = (flow.ingress_allowed_by if allowed else flow.ingress_denied_by) \
                if ingress else (flow.egress_allowed_by if allowed else flow.egress_denied_by)
            target.extend(record.policies)
        return flow

    def _policies(self, event: ev.FlowEvent) -> Sequence[flow_pb2.Policy]:
        """The policies a policy verdict names: for FORWARDED, and for DROPPED by a deny
        rule; asked at the event, as the policy revision then answers."""
        if self.attribute is None or not event.protocol:
            return ()
        allowed = event.verdict not in VERDICTS  # FORWARDED
        if not (allowed or (event.verdict == ev.DROPPED and event.reason == "policy_deny")):
            return ()
        ingress = event.direction == "ingress"
        peer = event.source_identity if ingress else event.destination_identity
        revision = self.revision()
        port = event.destination_port
        if event.protocol in (ICMP, ICMPV6):  # its type, which an icmps rule names as a port
            port = event.source_port >> 8
        key = (event.endpoint, event.direction, peer, event.protocol, port, allowed,
               event.match, revision)
        policies = self._cache.get(key)
        if policies is None:
            if len(self._cache) > 4096:  # a new revision, or many peers: start over
                self._cache.clear()
            named = self.attribute(event.endpoint, event.direction, peer, event.protocol,
                                   port, allowed, event.match)
            policies = self._cache[key] = [policy_message(k, revision) for k in named]
        return policies


def policy_message(key: tuple[str, str, str], revision: int) -> flow_pb2.Policy:
    """A policy as Hubble names it: the labels Cilium derives from it
    (``k8s:io.cilium.k8s.policy.derived-from=<kind>``, ``...name=``, ``...namespace=``; not
    ``...uid=``, which meshagent policies do not have)."""
    kind, namespace, name = key
    labels = [f"{POLICY_LABEL}.derived-from={kind}", f"{POLICY_LABEL}.name={name}"]
    if namespace:
        labels.append(f"{POLICY_LABEL}.namespace={namespace}")
    return flow_pb2.Policy(name=name, namespace=namespace, kind=kind, labels=labels,
                           revision=revision)


def timestamp(time_ns: int) -> Timestamp:
    return Timestamp(seconds=time_ns // 1_000_000_000, nanos=time_ns % 1_000_000_000)


def _layer4(flow: flow_pb2.Flow, event: ev.FlowEvent) -> None:
    if event.protocol == TCP:
        tcp = flow.l4.TCP
        tcp.source_port, tcp.destination_port = event.source_port, event.destination_port
        if event.tcp_flags & 0xFF:
            tcp.flags.CopyFrom(_tcp_flags(event.tcp_flags & 0xFF))
        if not event.tcp_flags:
            tcp.SetInParent()
    elif event.protocol == UDP:
        flow.l4.UDP.source_port = event.source_port
        flow.l4.UDP.destination_port = event.destination_port
        flow.l4.UDP.SetInParent()
    elif event.protocol == SCTP:
        flow.l4.SCTP.source_port = event.source_port
        flow.l4.SCTP.destination_port = event.destination_port
        flow.l4.SCTP.SetInParent()
    elif event.protocol in (ICMP, ICMPV6):
        # FlowEvent has no ICMP fields: type and code are read from source_port as the ICMP
        # header's first two bytes (type << 8 | code); a datapath that leaves it 0 shows type 0
        icmp = flow.l4.ICMPv4 if event.protocol == ICMP else flow.l4.ICMPv6
        icmp.type, icmp.code = event.source_port >> 8, event.source_port & 0xFF
        icmp.SetInParent()


@functools.cache
def _tcp_flags(bits: int) -> flow_pb2.TCPFlags:
    """The flags set in ``bits`` (shared: copy it)."""
    return flow_pb2.TCPFlags(**{name: True for name, bit in _FLAGS if bits & bit})


@functools.cache
def _tcp_summary(bits: int) -> str:
    names = dict(_FLAGS)
    return "TCP Flags: " + ", ".join(n for n in _SUMMARY_FLAGS if bits & names[n])


def _summary(flow: flow_pb2.Flow, event: ev.FlowEvent) -> str:
    """Cilium's Summary: the last decoded layer's name, with TCP's flags and ICMP's type."""
    which = flow.l4.WhichOneof("protocol")
    if which == "TCP":
        return _tcp_summary(event.tcp_flags & 0xFF)
    if which in ("ICMPv4", "ICMPv6"):
        icmp = getattr(flow.l4, which)
        known = (_ICMP4 if which == "ICMPv4" else _ICMP6).get(icmp.type)
        if known is None:
            return f"{which} {icmp.type}({icmp.code})"
        name, codes = known
        if codes is None and not icmp.code:
            return f"{which} {name}"
        if codes is None or icmp.code >= len(codes):
            return f"{which} {name}(Code: {icmp.code})"
        return f"{which} {name}({codes[icmp.code]})"
    if which is not None:
        return which
    if event.source_ip:
        return "IPv6" if event.ipv6 else "IPv4"
    return "Ethernet"
