"""Hubble's flow metrics, named and labelled as Cilium's handlers make them.

* ``hubble_flows_processed_total{protocol, type, subtype, verdict}``
  (``pkg/hubble/metrics/flow``): type ``Drop``/``Trace``/``PolicyVerdict``, subtype the
  trace's observation point (``to-endpoint``), else empty;
* ``hubble_drop_total{reason, protocol}`` (``metrics/drop``): reason as DropReason's name;
* ``hubble_policy_verdicts_total{direction, match, action}`` (``metrics/policy``): policy
  verdicts not from the host, all three lower case (``ingress``, ``l3-l4``, ``forwarded``);
* ``hubble_lost_events_total{source}`` (``pkg/hubble/metrics``): events the datapath could not
  hand over (``perf_event_ring_buffer``).

Protocol is Hubble's FlowProtocol (``TCP``, ``UDP``, ``ICMPv4``, ``ICMPv6``, ``SCTP``,
``Unknown L4``). Every label takes a handful of values: no pod or address is a label.
"""

import collections
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily

from meshagent.datapath import events as ev
from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.flows import (
    DROP_REASONS,
    ICMP,
    ICMPV6,
    MESSAGE_DROP,
    MESSAGE_POLICY_VERDICT,
    MESSAGE_TRACE,
    SCTP,
    TCP,
    UDP,
    VERDICTS,
    FlowRecord,
)

_TYPES = {MESSAGE_DROP: "Drop", MESSAGE_TRACE: "Trace", MESSAGE_POLICY_VERDICT: "PolicyVerdict"}
#: Hubble's FlowProtocol of the layer 4 a flow carries (FlowMaker fills these)
_PROTOCOLS = {TCP: "TCP", UDP: "UDP", SCTP: "SCTP", ICMP: "ICMPv4", ICMPV6: "ICMPv6"}
#: Cilium's PolicyMatchType strings, lower-cased as the policy handler labels them
_MATCHES = {0: "none", 1: "l3-only", 2: "l3-l4", 3: "l4-only", 4: "all", 5: "l3-proto",
            6: "proto-only"}
_HOST = 1  # reserved:host: the policy handler skips its verdicts


def _protocol(number: int) -> str:
    return _PROTOCOLS.get(number, "Unknown L4")


def _verdict(verdict: str) -> str:
    return flow_pb2.Verdict.Name(VERDICTS.get(verdict, flow_pb2.FORWARDED))


def _direction(direction: str) -> str:
    return "ingress" if direction == "ingress" else "egress"


class FlowMetrics:
    """Counts flows as they are recorded, by the event's fields the labels derive from (a
    counter per tuple of them: no flow is built for it); the label values are made from them
    when Prometheus scrapes (:attr:`flows`, :attr:`drops`, :attr:`verdicts`)."""

    def __init__(self):
        # (protocol number, message type, hook direction, verdict)
        self._flows: collections.Counter = collections.Counter()
        self._drops: collections.Counter = collections.Counter()  # (reason, protocol number)
        self._verdicts: collections.Counter = collections.Counter()  # (direction, match, verdict)

    def count(self, record: FlowRecord) -> None:
        event = record.event
        self._flows[event.protocol, record.kind, event.direction, event.verdict] += 1
        if event.verdict == ev.DROPPED:
            self._drops[event.reason, event.protocol] += 1
        if record.kind == MESSAGE_POLICY_VERDICT and record.source.identity != _HOST:
            self._verdicts[event.direction, event.match, event.verdict] += 1

    @property
    def flows(self) -> dict[tuple[str, str, str, str], int]:
        """(protocol, type, subtype, verdict) -> flows: a trace's subtype is its observation
        point (ingress: to-endpoint), the others have none."""
        out: collections.Counter = collections.Counter()
        for (protocol, kind, direction, verdict), count in self._flows.items():
            subtype = ""
            if kind == MESSAGE_TRACE:
                subtype = "to-endpoint" if direction == "ingress" else "from-endpoint"
            out[_protocol(protocol), _TYPES[kind], subtype,
                _verdict(verdict)] += count
        return dict(out)

    @property
    def drops(self) -> dict[tuple[str, str], int]:
        """(reason as DropReason's name, protocol) -> dropped flows."""
        out: collections.Counter = collections.Counter()
        for (reason, protocol), count in self._drops.items():
            out[flow_pb2.DropReason.Name(DROP_REASONS.get(reason, 0)), _protocol(protocol)] += \
                count
        return dict(out)

    @property
    def verdicts(self) -> dict[tuple[str, str, str], int]:
        """(direction, match, action) -> policy verdicts, not counting the host's."""
        out: collections.Counter = collections.Counter()
        for (direction, match, verdict), count in self._verdicts.items():
            out[_direction(direction), _MATCHES.get(match, "unknown"),
                _verdict(verdict).lower()] += count
        return dict(out)


class HubbleCollector:
    """The Hubble families at scrape time; ``lost`` is how many events the datapath lost."""

    def __init__(self, metrics: FlowMetrics, lost: Callable[[], int]):
        self.metrics = metrics
        self.lost = lost

    def collect(self):
        flows = CounterMetricFamily("hubble_flows_processed", "Total number of flows processed",
                                    labels=["protocol", "type", "subtype", "verdict"])
        for labels, count in sorted(self.metrics.flows.items()):
            flows.add_metric(list(labels), count)
        drops = CounterMetricFamily("hubble_drop", "Number of drops",
                                    labels=["reason", "protocol"])
        for labels, count in sorted(self.metrics.drops.items()):
            drops.add_metric(list(labels), count)
        verdicts = CounterMetricFamily("hubble_policy_verdicts",
                                       "Total number of Cilium network policy verdicts",
                                       labels=["direction", "match", "action"])
        for labels, count in sorted(self.metrics.verdicts.items()):
            verdicts.add_metric(list(labels), count)
        lost = CounterMetricFamily("hubble_lost_events", "Number of lost events",
                                   labels=["source"])
        lost.add_metric(["perf_event_ring_buffer"], self.lost())
        return [flows, drops, verdicts, lost]

    def describe(self):
        return []
