"""Drop notices: what ``meshagent monitor`` shows of a packet a datapath dropped.

Every datapath reports its drops as flow events (:mod:`meshagent.datapath.events`); the
agent's :class:`DropFeed` turns those into :class:`DropNotice`s and streams them at ``GET
/monitor`` as JSON lines, so ``meshagent monitor`` reads the same events whichever datapath
runs (Cilium's ``cilium monitor --type drop``). Light on purpose: the CLI imports
:func:`format_drop`.
"""

import asyncio
import collections
import json
import time

import attrs

RECENT = 256  # kept for status and tests
#: What every datapath calls each verdict reason (docs/datapath.md): in drop notices, status,
#: metrics and the inspection commands.
REASON_TEXT = {
    "forwarded": "forwarded",
    "policy_deny": "policy denied (deny rule)",
    "policy_default": "policy denied (by default)",
    "spoofed": "spoofed source address",
    "frag_tiny": "tiny fragment (splits the transport header)",
    "frag_unknown": "fragment without its first fragment",
    "malformed": "malformed packet",
    "unsupported_l3": "unsupported L3 protocol (neither IPv4, IPv6 nor ARP)",
    # a REDIRECT entry's packet: delivered to the DNS proxy (not a drop), or why it could not be
    "redirected": "redirected to the DNS proxy",
    "proxy_lookup": "socket lookup failed (the DNS proxy is not listening)",
    "proxy_assign": "socket assign failed",
    "proxy_unsupported": "proxy redirection not supported for protocol",
}
#: Protocol numbers as notices and inspection commands name them (others: the number).
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
TCP_FLAGS = ((0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"))
QUEUE_LIMIT = 10_000  # a listener this far behind loses notices rather than grow the agent


@attrs.frozen
class DropPeer:
    ip: str
    port: int
    identity: int
    cluster: str  # the identity's cluster, "reserved" for reserved identities, "?" unknown

    @classmethod
    def named(cls, ip: str, port: int, identity: int, identities) -> "DropPeer":
        """One end, its cluster named from ``identities`` (number -> Identity or None)."""
        known = identities(identity)
        cluster = known.cluster if known else ("reserved" if identity < 256 else "?")
        return cls(ip, port, identity, cluster)


@attrs.frozen
class DropNotice:
    """A dropped packet; ``protocol``/``tcp_flags`` as :func:`protocol_name`/:func:`flag_names`
    give them."""

    reason: str
    endpoint: int
    direction: str  # "ingress": entering the pod; "egress": leaving it
    source: DropPeer
    destination: DropPeer
    protocol: str  # "tcp", "udp", ... or the number
    tcp_flags: tuple[str, ...] = ()
    time: float = attrs.field(factory=time.time)

    def to_json(self) -> dict:
        return {"type": "drop", **attrs.asdict(self, value_serializer=_listed)}


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))


def flag_names(protocol: int, bits: int) -> tuple[str, ...]:
    """The TCP flags set in ``bits`` (none for another protocol)."""
    return tuple(name for bit, name in TCP_FLAGS if bits & bit) if protocol == 6 else ()


def _listed(_instance, _field, value):
    return list(value) if isinstance(value, tuple) else value


class DropFeed:
    """The drops among the datapath's flow events, to every ``meshagent monitor`` listening;
    ``identities`` (number -> Identity or None) names the peers' clusters."""

    def __init__(self, identities=lambda _: None):
        self.identities = identities
        self.recent: collections.deque[DropNotice] = collections.deque(maxlen=RECENT)
        self.listeners: set[asyncio.Queue] = set()

    def on_event(self, event) -> None:
        """A flow event (:class:`meshagent.datapath.events.FlowEvent`): published if a drop."""
        if event.verdict != "dropped":
            return
        named = self.identities
        self.publish(DropNotice(
            REASON_TEXT.get(event.reason, event.reason), event.endpoint, event.direction,
            DropPeer.named(event.source_ip, event.source_port, event.source_identity, named),
            DropPeer.named(event.destination_ip, event.destination_port,
                           event.destination_identity, named),
            protocol_name(event.protocol) if event.protocol or event.source_ip else "?",
            flag_names(event.protocol, event.tcp_flags), event.time_ns / 1e9))

    def publish(self, notice: DropNotice) -> None:
        self.recent.append(notice)
        for queue in list(self.listeners):
            if queue.qsize() < QUEUE_LIMIT:
                queue.put_nowait(notice)

    async def stream(self, request):
        """``GET /monitor``: notices as JSON lines until the client goes away."""
        from aiohttp import web
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        self.listeners.add(queue)
        try:
            while True:
                notice = await queue.get()
                await response.write((json.dumps(notice.to_json()) + "\n").encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.listeners.discard(queue)
        return response


def host_port(ip: str, port: int) -> str:
    """``10.0.0.1:80``, ``[fd00::1]:80``."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def format_drop(event: dict) -> str:
    """One line of ``meshagent monitor`` for a notice as streamed (JSON)."""
    src, dst = event["source"], event["destination"]
    flags = f" {','.join(event['tcp_flags'])}" if event["tcp_flags"] else ""
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    return (f"{stamp} drop ({event['reason']}) endpoint {event['endpoint']}"
            f" {event['direction']}: {host_port(src['ip'], src['port'])} ->"
            f" {host_port(dst['ip'], dst['port'])}"
            f" {event['protocol']}{flags}, identity {src['identity']} ({src['cluster']}) ->"
            f" {dst['identity']} ({dst['cluster']})")


def verdict_metrics(rows) -> list:
    """Prometheus families from ``(reason text, packets, bytes or None)`` rows: Cilium's
    ``drop_count_total``/``forward_count_total`` under meshagent's prefix (bytes when the
    datapath counts them)."""
    from prometheus_client.core import CounterMetricFamily
    rows = list(rows)
    drops = CounterMetricFamily("meshagent_drop_count", "packets dropped, by reason",
                                labels=["reason"])
    drop_bytes = CounterMetricFamily("meshagent_drop_bytes", "bytes dropped, by reason",
                                     labels=["reason"])
    forwarded = CounterMetricFamily("meshagent_forward_count", "packets forwarded")
    forwarded_bytes = CounterMetricFamily("meshagent_forward_bytes", "bytes forwarded")
    passed = (REASON_TEXT["forwarded"], REASON_TEXT["redirected"])  # to the proxy: not dropped
    passed_rows = [(packets, size) for reason, packets, size in rows if reason in passed]
    if passed_rows:
        forwarded.add_metric([], sum(packets for packets, _ in passed_rows))
        if any(size is not None for _, size in passed_rows):
            forwarded_bytes.add_metric([], sum(size or 0 for _, size in passed_rows))
    for reason, packets, size in rows:
        if reason in passed:
            continue
        else:
            drops.add_metric([reason], packets)
            if size is not None:
                drop_bytes.add_metric([reason], size)
    with_bytes = any(size is not None for _, _, size in rows)
    return [drops, forwarded] + ([drop_bytes, forwarded_bytes] if with_bytes else [])
