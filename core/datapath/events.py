"""Flow events: what a datapath reports about the traffic it judged.

A datapath reports, through the :class:`FlowEventSink` it is built with:

* every **drop** (kind ``drop``, verdict ``dropped``), with its reason;
* every packet **judged by policy** that passed (kind ``policy-verdict``, verdict
  ``forwarded``, ``redirected`` when it goes to the agent's DNS proxy, or ``audit`` when the endpoint is in policy audit mode and the policy would
  have dropped it: ``reason`` then says why it would have), i.e. the first packet of a
  connection in the direction that opens it, and a packet of a known connection judged again
  after its policy, the ipcache or the endpoint's audit mode changed;
* **traces** of known connections (kind ``trace``, verdict ``forwarded``): the first packet of
  the reply direction (``is_reply``), and a TCP packet whose SYN, FIN or RST flag is new for
  its connection and direction. Nothing else of an established connection is reported
  (Cilium's monitor aggregation, "medium").

Events are facts of the datapath only (numbers and addresses); the agent's observer names the
identities, pods and policies (``meshagent.observe``). A datapath never blocks on its sink:
what it could not hand over it counts with :meth:`FlowEventSink.lost`.
"""

import collections
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import attrs

#: ``FlowEvent.kind``
DROP = "drop"
POLICY_VERDICT = "policy-verdict"
TRACE = "trace"
#: ``FlowEvent.verdict``
FORWARDED = "forwarded"
DROPPED = "dropped"
AUDIT = "audit"
#: a policy verdict that sends the packet to the agent's DNS proxy (Hubble's REDIRECTED)
REDIRECTED = "redirected"
#: ``FlowEvent.match``: which kind of policy entry decided, numbered as Cilium's
#: ``monitor/api`` PolicyMatchType and Hubble's ``policy_match_type``.
MATCH_NONE = 0  # no entry (a default drop, or not judged by policy)
MATCH_L3_ONLY = 1  # the peer's identity, any protocol and port
MATCH_L3_L4 = 2  # the peer's identity, a protocol and port (or port range)
MATCH_L4_ONLY = 3  # any peer, a protocol and port (or port range)
MATCH_ALL = 4  # any peer, any protocol and port
MATCH_L3_PROTO = 5  # the peer's identity, a protocol, any port
MATCH_PROTO_ONLY = 6  # any peer, a protocol, any port
MATCHES = (MATCH_NONE, MATCH_L3_ONLY, MATCH_L3_L4, MATCH_L4_ONLY, MATCH_ALL, MATCH_L3_PROTO,
           MATCH_PROTO_ONLY)
#: Cilium's PolicyMatchType.String() (pkg/monitor/api/types.go), as Hubble prints it
MATCH_TEXT = {MATCH_NONE: "none", MATCH_L3_ONLY: "L3-Only", MATCH_L3_L4: "L3-L4",
              MATCH_L4_ONLY: "L4-Only", MATCH_ALL: "all", MATCH_L3_PROTO: "L3-Proto",
              MATCH_PROTO_ONLY: "Proto-Only"}


def match_of(peer: bool, prefix: int) -> int:
    """The match type a policy entry reports: one of the peer's identity (``peer``) or of
    any identity, whose prefix over (protocol 8 bits, port 16 bits) is ``prefix`` bits long
    (0 any protocol, 8 a protocol and any port, 9-24 a port block), as Cilium 1.17+'s
    bpf/lib/policy.h names it."""
    if peer:
        return MATCH_L3_L4 if prefix > 8 else MATCH_L3_PROTO if prefix else MATCH_L3_ONLY
    return MATCH_ALL if prefix == 0 else MATCH_PROTO_ONLY if prefix <= 8 else MATCH_L4_ONLY


@attrs.define(slots=True, unsafe_hash=True)
class FlowEvent:
    """One reported packet, as the datapath saw it at one endpoint's hook.

    Never changed once published, but not ``frozen``: attrs sets a frozen class's fields
    through ``object.__setattr__``, which made building one cost some 0.85 µs instead of 0.2,
    for every event (plugins/ebpf/events.py builds one per kernel record)."""

    time_ns: int  # wall clock, nanoseconds since the epoch
    kind: str  # DROP, POLICY_VERDICT or TRACE
    verdict: str  # FORWARDED, DROPPED, AUDIT or REDIRECTED
    reason: str  # a key of ``meshagent.datapath.drops.REASON_TEXT``: "forwarded", "policy_deny", ...
    endpoint: int  # the endpoint whose hook judged it
    direction: str  # "ingress": entering the endpoint; "egress": leaving it
    source_ip: str  # "" when the packet could not be parsed that far
    source_port: int  # ICMP and ICMPv6: type << 8 | code (destination_port 0)
    destination_ip: str
    destination_port: int
    protocol: int  # IP protocol number (0: not parsed)
    tcp_flags: int  # the TCP header's flag bits (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10)
    source_identity: int
    destination_identity: int
    is_reply: bool = False  # the reply direction of a tracked connection
    match: int = MATCH_NONE  # for policy verdicts and audits: which entry decided

    @property
    def ipv6(self) -> bool:
        return ":" in self.source_ip or ":" in self.destination_ip


@runtime_checkable
class FlowEventSink(Protocol):
    """Where a datapath reports events; called in the agent's loop, never blocks."""

    def publish(self, event: FlowEvent) -> None: ...

    def lost(self, count: int) -> None:
        """``count`` events were lost before they reached the agent (a full perf buffer)."""


class FlowEvents:
    """The agent's sink: hands every event to each subscriber, counts the lost ones.

    Subscribers are called synchronously, in the order they subscribed; one that raises is
    logged by the loop and the others still get the event."""

    def __init__(self):
        self.subscribers: list[Callable[[FlowEvent], None]] = []
        self.lost_total = 0
        self.published_total = 0
        self.recent: collections.deque[FlowEvent] = collections.deque(maxlen=64)

    def subscribe(self, subscriber: Callable[[FlowEvent], None]) -> Callable[[], None]:
        """Call ``subscriber`` with every event from now on; returns how to stop."""
        self.subscribers.append(subscriber)
        return lambda: self.subscribers.remove(subscriber)

    def publish(self, event: FlowEvent) -> None:
        self.published_total += 1
        self.recent.append(event)
        for subscriber in list(self.subscribers):
            try:
                subscriber(event)
            except Exception:  # one broken listener must not starve the others
                import logging
                logging.getLogger(__name__).exception("flow event subscriber failed")

    def lost(self, count: int) -> None:
        self.lost_total += count
