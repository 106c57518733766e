"""What a datapath must do with each packet, written as plainly as possible: the reference every
datapath is tested against (docs/datapath.md, "What every datapath enforces").

It is the resolver's decision plus the packet-level rules around it, in this order: ARP
passes, any other frame that is neither IPv4 nor IPv6 is dropped; a malformed IP packet is
dropped; the link's own ICMPv6 control messages (neighbour discovery, MLD) pass as ARP does; a
packet leaving a pod with a source that is not the pod's (of its family) is dropped; ICMPv4
fragmentation-needed passes; fragments follow RFC 1858 and take their first fragment's ports;
a reply of an allowed connection passes; every other packet gets the resolver's verdict for
(endpoint, direction, peer identity, protocol, destination port — for ICMP and ICMPv6 the
type, :func:`~meshagent.testing.packets.icmp_ports`; 0 when the packet does not show it),
the peer identity being the longest ipcache
prefix of the peer's family holding the peer's address (world of that family if none: 2 for
IPv4, 10 for IPv6).
An allowed packet makes its reverse a reply. As in Cilium, connection state only ever lets
replies through: a packet of a known connection in its own direction is judged by policy as it
is now. A packet leaving a pod for another pod of the node that takes local delivery is judged
by that pod's ingress too, and delivered into it directly (:meth:`DatapathModel.delivery`;
IPv4 only: IPv6 goes through the node's stack).

The model also predicts the flow events a datapath reports for each packet
(:meth:`DatapathModel.predict`), by the rules of :mod:`meshagent.datapath.events`: a drop
(with the deciding entry's match type when a deny rule dropped it); a policy verdict for a
packet judged by policy that passes (``audit`` when the endpoint is in audit mode and the
policy would have dropped it: it then passes and is tracked as if allowed); a trace for the
first packet of a reply direction and for a TCP packet whose SYN, FIN or RST is new for its
connection and direction; nothing else. A connection last judged in an earlier phase may or
may not be judged again (a datapath judges again only when the endpoint's policy or the
ipcache changed): either is accepted.
"""

import ipaddress
from collections.abc import Callable

import itertools

import attrs

from meshagent.datapath.events import (
    AUDIT,
    DROP,
    DROPPED,
    MATCH_NONE,
    POLICY_VERDICT,
    TRACE,
    FlowEvent,
    match_of,
)
from meshagent.datapath.events import FORWARDED as EVENT_FORWARDED
from meshagent.datapath.events import REDIRECTED as EVENT_REDIRECTED
from meshagent.model.identity import world_identity
from meshagent.policy.contract import MapKey
from meshagent.policy.resolver import (
    ALLOWED,
    DENIED_BY_DEFAULT,
    DENIED_BY_RULE,
    REDIRECTED as REDIRECTED_BY_RULE,
    Verdict,
    key_matches,
)
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
#: delivered to the DNS proxy's socket on this node, its destination kept (a REDIRECT entry)
REDIRECTED = "redirected"
#: a REDIRECT entry for a packet the proxy cannot take: entering the pod, or neither TCP nor
#: UDP (Cilium's DROP_PROXY_UNKNOWN_PROTO)
PROXY_UNSUPPORTED = "proxy-unsupported"
#: the transport protocols a packet may be redirected to the proxy with
PROXIED_PROTOCOLS = (6, 17)

_REASONS = {ALLOWED: FORWARDED, DENIED_BY_RULE: POLICY_DENY, DENIED_BY_DEFAULT: POLICY_DEFAULT,
            REDIRECTED_BY_RULE: FORWARDED}


@attrs.frozen
class ModelEndpoint:
    id: int
    ip: str
    local_delivery: bool = True  # other local pods' packets are delivered into it directly
    ipv6: str | None = None  # dual stack
    policy_audit: bool = False  # what policy would drop passes, reported as an audit

    def owns(self, address: str) -> bool:
        """Whether ``address`` is one of the pod's own (what it may send from)."""
        mine = self.ipv6 if ":" in address else self.ip
        return mine is not None and ipaddress.ip_address(mine) == ipaddress.ip_address(address)


#: decision(endpoint id, direction, identity, protocol, port) -> (Verdict, reason, match)
Decision = Callable[[int, str, int, int, int], tuple[Verdict, str, int]]

#: The TCP flags whose first appearance in a direction of a connection is reported.
TRACED_FLAGS = 0x07  # FIN, SYN, RST
SEEN = 0x100  # (in the model's seen flags) a packet of this direction went by


def key_prefix(key: MapKey, port: int) -> int:
    """The length of the policy-map prefix over (protocol 8 bits, port 16 bits) that holds
    ``port`` for this key, as Cilium's LPM policy map stores it: 0 any protocol and port, 8 a
    protocol and any port, 24 one port; a range is cut into aligned power-of-two blocks, and
    the packet meets the largest one holding its port."""
    if key.port == 0:
        return 0 if key.protocol == 0 else 8
    for bits in range(17):  # the largest aligned block first
        first = port >> (16 - bits) << (16 - bits)
        if key.port <= first and first + (1 << (16 - bits)) - 1 <= key.end_port:
            return 8 + bits
    raise ValueError(f"port {port} is outside {key}")


def match_type(verdicts: dict[MapKey, Verdict], direction: str, identity: int, protocol: int,
               port: int) -> int:
    """Which entry decides this packet, numbered as Cilium's PolicyMatchType, by the rule of
    Cilium 1.17+ (bpf/lib/policy.h, "policy map precedence by LPM prefix length").

    Two lookups, the peer's identity and any identity, each finding the longest prefix of its
    group (an allow never stands under a deny or a redirect of its group, nor a redirect under
    a deny: a group's entry covering the packet has the strongest verdict of its keys that
    cover it, deny > redirect > allow, and the longest prefix among those keys). A deny of
    the peer's lookup decides, then one of the any lookup's, then a redirect of the peer's,
    then one of any's; between two allows the any-identity entry decides only when its
    prefix is longer (a tie goes to the peer's). The deciding entry names the match type
    (:func:`~meshagent.datapath.events.match_of`); MATCH_NONE when nothing matched (a
    default drop)."""
    rank = {Verdict.ALLOW: 0, Verdict.REDIRECT: 1, Verdict.DENY: 2}

    def found(peer: int) -> tuple[Verdict, int] | None:
        keys = [k for k in verdicts if k.identity == peer
                and key_matches(k, direction, identity, protocol, port)]
        if not keys:
            return None
        verdict = max((verdicts[k] for k in keys), key=rank.__getitem__)
        return verdict, max(key_prefix(k, port) for k in keys if verdicts[k] is verdict)

    mine = found(identity) if identity else None
    anyone = found(0)
    for verdict in (Verdict.DENY, Verdict.REDIRECT):
        if mine and mine[0] is verdict:
            return match_of(True, mine[1])
        if anyone and anyone[0] is verdict:
            return match_of(False, anyone[1])
    if mine and (not anyone or anyone[1] <= mine[1]):
        return match_of(True, mine[1])
    if anyone:
        return match_of(False, anyone[1])
    return MATCH_NONE


@attrs.frozen
class ExpectedEvent:
    """The part of a flow event the model predicts and the contract compares (a datapath's
    own tests check addresses, ports and identities)."""

    kind: str
    verdict: str
    reason: str  # a key of meshagent.datapath.drops.REASON_TEXT
    endpoint: int
    direction: str
    is_reply: bool = False
    match: int = MATCH_NONE

    @classmethod
    def of(cls, event: FlowEvent) -> "ExpectedEvent":
        return cls(event.kind, event.verdict, event.reason, event.endpoint, event.direction,
                   event.is_reply, event.match)

    def __str__(self) -> str:
        reply = " reply" if self.is_reply else ""
        return (f"{self.kind}/{self.verdict}/{self.reason} ep{self.endpoint} {self.direction}"
                f"{reply} match={self.match}")


Events = tuple[ExpectedEvent, ...]


@attrs.frozen
class Prediction:
    """One packet at one hook: the outcome, whether it goes straight into a local pod, and
    the event lists a datapath may report for it (any one of them)."""

    outcome: str
    delivered: bool
    events: tuple[Events, ...]


def event_reason(outcome: str) -> str:
    """A model outcome as flow events name it (``policy-deny`` -> ``policy_deny``)."""
    return outcome.replace("-", "_")


class DatapathModel:
    """Expected outcomes and events for a sequence of packets; keeps connections (the
    phase each was last judged in), replies, the flags seen per direction, and fragment
    ports."""

    def __init__(self, decision: Decision, walk: str = CILIUM_WALK):
        self.decision = decision
        self.walk = walk  # how the datapath under test walks IPv6 extension headers
        self.endpoints: dict[int, ModelEndpoint] = {}
        self.ipcache: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int] = {}
        self.replies: set[tuple] = set()
        self.connections: dict[tuple, int] = {}  # flow -> phase judged in (-1: judge again)
        self.seen: dict[tuple, int] = {}  # flow (either direction) -> SEEN | TCP flags seen
        self.fragments: dict[tuple, tuple[int, int]] = {}
        self.phase = 0

    def next_phase(self) -> None:
        """Policy or the ipcache may have changed: a known connection may be judged again."""
        self.phase += 1

    def forget_endpoint(self, endpoint_id: int) -> None:
        """A new pod under this id: none of the connections of the old one are its own."""
        self.replies = {r for r in self.replies if r[0] != endpoint_id}
        self.connections = {c: n for c, n in self.connections.items() if c[0] != endpoint_id}
        self.seen = {c: n for c, n in self.seen.items() if c[0] != endpoint_id}

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
        prediction = self.predict(endpoint_id, direction, frame)
        return prediction.outcome, prediction.delivered

    def predict(self, endpoint_id: int, direction: str, frame: bytes,
                local_delivery: bool = True) -> Prediction:
        """:meth:`delivery` with the events (``local_delivery`` False: the datapath never
        delivers into a pod itself, so only this hook judges)."""
        outcome, events = self._judge(endpoint_id, direction, frame)
        p = parse(frame, self.walk)
        if not local_delivery or direction != EGRESS or outcome != FORWARDED or \
                p.outcome != PARSED or p.family != 4 or p.frag_needed:
            return Prediction(outcome, False, events)
        target = next((e for e in self.endpoints.values() if e.ip == p.dst), None)
        if target is None or not target.local_delivery:
            return Prediction(outcome, False, events)
        outcome, more = self._judge(target.id, INGRESS, frame)
        both = tuple(a + b for a, b in itertools.product(events, more))
        return Prediction(outcome, outcome == FORWARDED, both)

    def outcome(self, endpoint_id: int, direction: str, frame: bytes) -> str:
        return self._judge(endpoint_id, direction, frame)[0]

    def _judge(self, endpoint_id: int, direction: str,
               frame: bytes) -> tuple[str, tuple[Events, ...]]:
        """The outcome at one hook and the event lists it may report."""
        endpoint = self.endpoints[endpoint_id]
        p = parse(frame, self.walk)

        def dropped(outcome: str, match: int = MATCH_NONE) -> tuple[str, tuple[Events, ...]]:
            return outcome, ((ExpectedEvent(DROP, DROPPED, event_reason(outcome), endpoint_id,
                                            direction, False, match),),)
        if p.outcome == ARP:
            return FORWARDED, ((),)
        if p.outcome == NOT_IP:
            return dropped(UNSUPPORTED_L3)
        if p.outcome == MALFORMED:
            return dropped(MALFORMED_PACKET)
        if p.link_control(leaving=direction == EGRESS):
            return FORWARDED, ((),)
        if direction == EGRESS and not endpoint.owns(p.src):
            return dropped(SPOOFED)
        if p.frag_needed:  # path MTU discovery always works (untracked, unreported)
            return FORWARDED, ((),)
        sport, dport = p.sport, p.dport
        need = TRANSPORT_HEADER.get(p.protocol, 0)
        if p.fragment != FRAG_NONE and need:
            key = (p.src, p.dst, p.ip_id, p.protocol)
            if p.fragment == FRAG_FIRST:
                if p.transport_short:
                    return dropped(FRAG_TINY)
                self.fragments[key] = (sport, dport)
            elif p.fragment == FRAG_LATER:
                if p.frag_offset < need:
                    return dropped(FRAG_TINY)
                if key not in self.fragments:
                    return dropped(FRAG_UNKNOWN)
                sport, dport = self.fragments[key]
        flow = (endpoint_id, direction, p.src, p.dst, sport, dport, p.protocol)
        flags = SEEN | (p.tcp_flags & TRACED_FLAGS)
        if flow in self.replies:
            return FORWARDED, (self._trace(flow, flags, True),)
        peer = self.identity_of(p.src if direction == INGRESS else p.dst)
        verdict, why, match = self.decision(endpoint_id, direction, peer, p.protocol, dport)
        judged_in = self.connections.get(flow)
        if verdict is Verdict.DENY and not endpoint.policy_audit:
            if judged_in is not None:
                self.connections[flow] = -1  # its entry stays, behind the endpoint: judged again
            return dropped(_REASONS[why], match)
        if verdict is Verdict.REDIRECT and (direction == INGRESS
                                            or p.protocol not in PROXIED_PROTOCOLS):
            if judged_in is not None:
                self.connections[flow] = -1
            return dropped(PROXY_UNSUPPORTED)
        # a redirected connection goes to the proxy with every packet of its direction; its
        # verdict changes only with a change that has it judged again
        outcome = REDIRECTED if verdict is Verdict.REDIRECT else FORWARDED
        judged = ExpectedEvent(POLICY_VERDICT, {Verdict.ALLOW: EVENT_FORWARDED,
                                                Verdict.REDIRECT: EVENT_REDIRECTED}.get(
                                                    verdict, AUDIT),
                               event_reason(_REASONS[why]), endpoint_id, direction,
                               False, match)
        if judged_in == self.phase:  # known, and nothing changed since it was judged
            return outcome, (self._trace(flow, flags, False),)
        if judged_in is not None and judged_in >= 0:  # judged again, or not: either is right
            alternatives = (self._trace(flow, flags, False, record=False), (judged,))
        else:
            alternatives = ((judged,),)
        self.connections[flow] = self.phase
        if judged_in is None:  # a new connection: tracked both ways
            back = EGRESS if direction == INGRESS else INGRESS
            reverse = (endpoint_id, back, p.dst, p.src, dport, sport, p.protocol)
            self.replies.add(reverse)
            self.seen[reverse] = 0
            self.seen[flow] = flags
        else:  # its entry was there: judged again
            self.seen[flow] = self.seen.get(flow, 0) | flags
        return outcome, alternatives

    def _trace(self, flow: tuple, flags: int, is_reply: bool, record: bool = True) -> Events:
        """A trace if this packet is the first of its direction or brings a SYN, FIN or RST
        new for it (recorded unless ``record`` is false)."""
        seen = self.seen.get(flow, 0)
        if seen & flags == flags:
            return ()
        if record:
            self.seen[flow] = seen | flags
        endpoint_id, direction = flow[0], flow[1]
        return (ExpectedEvent(TRACE, EVENT_FORWARDED, "forwarded", endpoint_id, direction,
                              is_reply),)
