"""What a datapath must do with each packet, written as plainly as possible: the reference every
datapath is tested against (docs/datapath.md, "What every datapath enforces").

It is the resolver's decision plus the packet-level rules around it, in this order: ARP
passes, any other frame that is neither IPv4 nor IPv6 is dropped; a malformed IP packet is
dropped; the link's own ICMPv6 control messages (neighbour discovery, MLD) pass as ARP does; a
packet leaving a pod with a source that is not the pod's (of its family) is dropped;
fragments follow RFC 1858 and take their first fragment's ports; a reply of an allowed
connection passes; every other packet gets the resolver's verdict for (endpoint, direction,
peer identity, protocol, destination port), the peer identity being the longest ipcache
prefix of the peer's family holding the peer's address (world of that family if none: 2 for
IPv4, 10 for IPv6).
An allowed packet makes its reverse a reply. As in Cilium, connection state only ever lets
replies through: a packet of a known connection in its own direction is judged by policy as it
is now. A packet leaving a pod for another pod of the node that takes local delivery is judged
by that pod's ingress too, and delivered into it directly (:meth:`DatapathModel.delivery`;
IPv4 only: IPv6 goes through the node's stack).
"""

import ipaddress
from collections.abc import Callable

import attrs

from meshagent.model.identity import world_identity
from meshagent.policy.resolver import ALLOWED, DENIED_BY_DEFAULT, DENIED_BY_RULE, Verdict
from meshagent.testing.packets import (
    ARP,
    CILIUM_WALK,
    FRAG_FIRST,
    FRAG_LATER,
    FRAG_NONE,
    MALFORMED,
    NOT_IP,
    PARSED,
    TRANSPORT_HEADER,
    parse,
)

INGRESS, EGRESS = "ingress", "egress"

#: Why a packet passed or was dropped: the names every datapath maps its own codes to.
FORWARDED = "forwarded"
POLICY_DENY = "policy-deny"
POLICY_DEFAULT = "policy-default"
SPOOFED = "spoofed"
FRAG_TINY = "frag-tiny"
FRAG_UNKNOWN = "frag-unknown"
MALFORMED_PACKET = "malformed"
UNSUPPORTED_L3 = "unsupported-l3"  # neither IPv4, IPv6 nor ARP: never passes unjudged

_REASONS = {ALLOWED: FORWARDED, DENIED_BY_RULE: POLICY_DENY, DENIED_BY_DEFAULT: POLICY_DEFAULT}


@attrs.frozen
class ModelEndpoint:
    id: int
    ip: str
    local_delivery: bool = True  # other local pods' packets are delivered into it directly
    ipv6: str | None = None  # dual stack

    def owns(self, address: str) -> bool:
        """Whether ``address`` is one of the pod's own (what it may send from)."""
        mine = self.ipv6 if ":" in address else self.ip
        return mine is not None and ipaddress.ip_address(mine) == ipaddress.ip_address(address)


#: decision(endpoint id, direction, identity, protocol, port) -> (Verdict, reason)
Decision = Callable[[int, str, int, int, int], tuple[Verdict, str]]


class DatapathModel:
    """Expected outcomes for a sequence of packets; keeps replies and fragment ports."""

    def __init__(self, decision: Decision, walk: str = CILIUM_WALK):
        self.decision = decision
        self.walk = walk  # how the datapath under test walks IPv6 extension headers
        self.endpoints: dict[int, ModelEndpoint] = {}
        self.ipcache: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int] = {}
        self.replies: set[tuple] = set()
        self.fragments: dict[tuple, tuple[int, int]] = {}

    def identity_of(self, address: str) -> int:
        ip = ipaddress.ip_address(address)
        best = None
        for prefix in self.ipcache:
            if prefix.version == ip.version and ip in prefix and \
                    (best is None or prefix.prefixlen > best.prefixlen):
                best = prefix
        return self.ipcache[best] if best is not None else int(world_identity(ip.version))

    def delivery(self, endpoint_id: int, direction: str, frame: bytes) -> tuple[str, bool]:
        """The outcome at this hook, and whether the packet goes straight into a local pod
        (judged by that pod's ingress policy on the way)."""
        outcome = self.outcome(endpoint_id, direction, frame)
        p = parse(frame, self.walk)
        if direction != EGRESS or outcome != FORWARDED or p.outcome != PARSED or p.family != 4:
            return outcome, False
        target = next((e for e in self.endpoints.values() if e.ip == p.dst), None)
        if target is None or not target.local_delivery:
            return outcome, False
        outcome = self.outcome(target.id, INGRESS, frame)
        return outcome, outcome == FORWARDED

    def outcome(self, endpoint_id: int, direction: str, frame: bytes) -> str:
        endpoint = self.endpoints[endpoint_id]
        p = parse(frame, self.walk)
        if p.outcome == ARP:
            return FORWARDED
        if p.outcome == NOT_IP:
            return UNSUPPORTED_L3
        if p.outcome == MALFORMED:
            return MALFORMED_PACKET
        if p.link_control(leaving=direction == EGRESS):
            return FORWARDED
        if direction == EGRESS and not endpoint.owns(p.src):
            return SPOOFED
        sport, dport = p.sport, p.dport
        need = TRANSPORT_HEADER.get(p.protocol, 0)
        if p.fragment != FRAG_NONE and need:
            key = (p.src, p.dst, p.ip_id, p.protocol)
            if p.fragment == FRAG_FIRST:
                if p.transport_short:
                    return FRAG_TINY
                self.fragments[key] = (sport, dport)
            elif p.fragment == FRAG_LATER:
                if p.frag_offset < need:
                    return FRAG_TINY
                if key not in self.fragments:
                    return FRAG_UNKNOWN
                sport, dport = self.fragments[key]
        flow = (endpoint_id, direction, p.src, p.dst, sport, dport, p.protocol)
        if flow in self.replies:
            return FORWARDED
        peer = self.identity_of(p.src if direction == INGRESS else p.dst)
        verdict, why = self.decision(endpoint_id, direction, peer, p.protocol, dport)
        if verdict is Verdict.ALLOW:
            back = EGRESS if direction == INGRESS else INGRESS
            self.replies.add((endpoint_id, back, p.dst, p.src, dport, sport, p.protocol))
        return _REASONS[why]
