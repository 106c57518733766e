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

from meshagent.observe.api.flow import flow_pb2

_TYPES = {1: "Drop", 3: "Capture", 4: "Trace", 5: "PolicyVerdict"}
#: Cilium's TraceObservationPoints (pkg/monitor/api/types.go), by monitor sub-type
_TRACE_POINTS = {0: "to-endpoint", 1: "to-proxy", 2: "to-host", 3: "to-stack",
                 4: "to-overlay", 5: "from-endpoint", 6: "from-proxy", 7: "from-host",
                 8: "from-stack", 9: "from-overlay", 10: "from-network", 11: "to-network"}
#: Cilium's PolicyMatchType strings, lower-cased as the policy handler labels them
_MATCHES = {0: "none", 1: "l3-only", 2: "l3-l4", 3: "l4-only", 4: "all", 5: "l3-proto",
            6: "proto-only"}
_HOST = 1  # reserved:host: the policy handler skips its verdicts


def flow_protocol(flow: flow_pb2.Flow) -> str:
    which = flow.l4.WhichOneof("protocol")
    return which if which else "Unknown L4"


class FlowMetrics:
    """Counts flows by the label values above; a Prometheus collector reads them."""

    def __init__(self):
        self.flows: collections.Counter = collections.Counter()
        self.drops: collections.Counter = collections.Counter()
        self.verdicts: collections.Counter = collections.Counter()

    def count(self, flow: flow_pb2.Flow) -> None:
        kind = flow.event_type.type
        protocol = flow_protocol(flow)
        if kind in _TYPES:
            name = _TYPES[kind]
            subtype = _TRACE_POINTS.get(flow.event_type.sub_type, "") if kind == 4 else ""
        else:
            name, subtype = "Unknown", str(kind)
        verdict = flow_pb2.Verdict.Name(flow.verdict)
        self.flows[protocol, name, subtype, verdict] += 1
        if flow.verdict == flow_pb2.DROPPED:
            self.drops[flow_pb2.DropReason.Name(flow.drop_reason_desc), protocol] += 1
        if kind == 5 and flow.source.identity != _HOST:
            direction = flow_pb2.TrafficDirection.Name(flow.traffic_direction).lower()
            self.verdicts[direction, _MATCHES.get(flow.policy_match_type, "unknown"),
                          verdict.lower()] += 1


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
