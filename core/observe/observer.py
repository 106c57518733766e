"""The agent's observer: every flow event as Hubble flows, the recent ones in a ring buffer,
and the ``GetFlows``/``ServerStatus`` answers of Hubble's Observer service.

``GetFlows`` reads as Hubble's ``pkg/hubble/observer/local_observer.go`` does: with ``first``,
from the oldest flow; with ``follow`` and neither ``number`` nor ``since``, only new flows;
otherwise back from the newest until ``number`` flows match (or, with ``since``, to the first
flow before it), then forward: at most ``number`` flows unless following, skipping flows
before ``since``, ending at the first after ``until``. Each follower has a queue of
:data:`FOLLOW_QUEUE` flows; what it misses while its queue is full is counted and told to it
as a ``LostEvent`` (source ``HUBBLE_RING_BUFFER``) where they were lost, as Hubble tells a
reader that fell behind its ring.

Events the datapath could not hand over (its buffer was full) are kept in the ring too, as a
``LostEvent`` of source ``PERF_EVENT_RING_BUFFER`` before the next flow (``hubble observe``
prints them as "EVENTS LOST"): like Hubble, GetFlows sends them whatever the filters and times,
and never counts them as flows.
"""

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable

from google.protobuf.timestamp_pb2 import Timestamp

from meshagent import __version__
from meshagent.datapath.events import FlowEvent
from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.api.observer import observer_pb2
from meshagent.observe.filters import Predicate, flows_filter
from meshagent.observe.flows import FlowMaker, timestamp
from meshagent.observe.metrics import FlowMetrics
from meshagent.runtime.config import parse_event_buffer_capacity

DEFAULT_CAPACITY = 4095  # Cilium's hubble-event-buffer-capacity
FOLLOW_QUEUE = 4096  # flows a follower may be behind before it loses some


class _Follower:
    """A GetFlows stream with follow: the flows it has yet to send, at most
    :data:`FOLLOW_QUEUE`; a count in their midst marks where it lost that many."""

    def __init__(self, passes: Predicate):
        self.passes = passes
        self.items: collections.deque[flow_pb2.Flow | int] = collections.deque()
        self.queued = 0  # flows in items
        self.missed = 0  # lost since the last flow queued
        self._ready = asyncio.Event()

    def offer(self, flow: flow_pb2.Flow | observer_pb2.GetFlowsResponse) -> None:
        """A flow (sent if it passes the filters), or a notice of lost events (always)."""
        if isinstance(flow, flow_pb2.Flow) and not self.passes(flow):
            return
        if self.queued >= FOLLOW_QUEUE:
            self.missed += 1
            return
        if self.missed:
            self.items.append(self.missed)
            self.missed = 0
        self.items.append(flow)
        self.queued += 1
        self._ready.set()

    async def next(self) -> flow_pb2.Flow | observer_pb2.GetFlowsResponse | int:
        """The next flow or notice, or how many this follower lost at this point."""
        while not self.items:
            if self.missed:
                missed, self.missed = self.missed, 0
                return missed
            self._ready.clear()
            await self._ready.wait()
        item = self.items.popleft()
        if not isinstance(item, int):
            self.queued -= 1
        return item


class Observer:
    """Subscribe :meth:`on_event` to the agent's flow events; ``maker`` turns each into
    flows, which are kept (the last ``capacity``), counted (``metrics``) and streamed."""

    def __init__(self, maker: FlowMaker, capacity: int = DEFAULT_CAPACITY,
                 clock: Callable[[], float] = time.time, lost: Callable[[], int] = lambda: 0):
        self.maker = maker
        self.capacity = parse_event_buffer_capacity(capacity)
        # flows, and notices of events the datapath lost (GetFlowsResponse)
        self.ring: collections.deque[flow_pb2.Flow | observer_pb2.GetFlowsResponse] = \
            collections.deque(maxlen=self.capacity)
        self.seen_flows = 0
        self._lost_total = lost  # how many events the datapath lost so far
        self._lost_seen = lost()
        self.metrics = FlowMetrics()
        self.followers: set[_Follower] = set()
        self.follow_lost = 0  # flows followers missed, all of them together
        self._clock = clock
        self.started = clock()

    def on_event(self, event: FlowEvent) -> None:
        lost = self._lost_total()
        if lost > self._lost_seen:
            self._add_lost(lost - self._lost_seen)
            self._lost_seen = lost
        for flow in self.maker.flows(event):
            self.add(flow)

    def add(self, flow: flow_pb2.Flow) -> None:
        self.ring.append(flow)
        self.seen_flows += 1
        self.metrics.count(flow)
        for follower in self.followers:
            follower.offer(flow)

    def _add_lost(self, count: int) -> None:
        notice = self._notice(flow_pb2.PERF_EVENT_RING_BUFFER, count)
        self.ring.append(notice)
        for follower in self.followers:
            follower.offer(notice)

    # -- the Observer service -----------------------------------------------------------------

    def server_status(self) -> observer_pb2.ServerStatusResponse:
        now = self._clock()
        return observer_pb2.ServerStatusResponse(
            num_flows=sum(1 for f in self.ring if isinstance(f, flow_pb2.Flow)), max_flows=self.capacity, seen_flows=self.seen_flows,
            uptime_ns=int((now - self.started) * 1e9), version=__version__,
            flows_rate=self._rate(now))

    def _rate(self, now: float) -> float:
        """Flows per second over the last minute (over what the ring holds, if less)."""
        since = now - 60.0
        count = 0
        oldest = None
        for flow in reversed(self.ring):
            if not isinstance(flow, flow_pb2.Flow):
                continue
            stamp = flow.time.seconds + flow.time.nanos / 1e9
            if stamp < since:
                oldest = None
                break
            count += 1
            oldest = stamp
        if count and oldest is not None and len(self.ring) == self.capacity:
            since = oldest  # the ring does not reach back a minute
        return count / (now - since) if now > since else 0.0

    async def get_flows(self, request: observer_pb2.GetFlowsRequest
                        ) -> AsyncIterator[observer_pb2.GetFlowsResponse]:
        """The flows the request asks for, oldest first; with follow, then each new one as
        it comes. Raises ValueError for a request it cannot serve (an unsupported filter
        field, bad times): the server answers INVALID_ARGUMENT with that text."""
        if request.first and request.follow:
            raise ValueError("first cannot be specified with follow")
        if request.HasField("field_mask") and request.field_mask.paths:
            raise ValueError("field_mask is not supported")
        since = _time_ns(request, "since")
        until = _time_ns(request, "until")
        passes = flows_filter(request.whitelist, request.blacklist)
        follower = None
        if request.follow:  # before reading the ring: nothing falls between the two
            follower = _Follower(passes)
            self.followers.add(follower)
        try:
            stored = self._stored(request, passes, since)
            sent = 0
            for flow in stored:
                if not request.follow and request.number and sent >= request.number:
                    return
                if not isinstance(flow, flow_pb2.Flow):
                    yield flow  # a notice of lost events
                    continue
                stamp = _ns(flow.time)
                if until is not None and stamp > until:
                    return
                if since is not None and stamp < since:
                    continue
                sent += 1
                yield response(flow)
            if follower is None:
                return
            while True:
                flow = await follower.next()
                if isinstance(flow, int):
                    self.follow_lost += flow
                    yield self._notice(flow_pb2.HUBBLE_RING_BUFFER, flow)
                    continue
                if not isinstance(flow, flow_pb2.Flow):
                    yield flow
                    continue
                if until is not None and _ns(flow.time) > until:
                    return
                if since is not None and _ns(flow.time) < since:
                    continue
                yield response(flow)
        finally:
            if follower is not None:
                self.followers.discard(follower)

    def _stored(self, request: observer_pb2.GetFlowsRequest, passes: Predicate,
                since: int | None) -> list[flow_pb2.Flow]:
        """The stored flows to read forward from, as Hubble's newRingReader picks its start;
        the ones that fail the filters already left out."""
        items = list(self.ring)
        if request.first and since is None:
            return [f for f in items if not isinstance(f, flow_pb2.Flow) or passes(f)]
        if request.follow and not request.number and since is None:
            return []
        picked = []
        count = 0
        for item in reversed(items):
            if not isinstance(item, flow_pb2.Flow):
                picked.append(item)  # a notice: not a flow, never counted
                continue
            if not passes(item):
                continue
            if since is not None and _ns(item.time) < since:
                break
            picked.append(item)
            count += 1
            if since is None and request.number and count == request.number:
                break
        picked.reverse()
        return picked

    def _notice(self, source: int, count: int) -> observer_pb2.GetFlowsResponse:
        """``count`` events lost at ``source``, now."""
        return observer_pb2.GetFlowsResponse(
            lost_events=flow_pb2.LostEvent(source=source, num_events_lost=count),
            node_name=self.maker.node_name, time=timestamp(int(self._clock() * 1e9)))


def response(flow: flow_pb2.Flow) -> observer_pb2.GetFlowsResponse:
    """The GetFlowsResponse envelope of a flow: the flow, its node and its time."""
    return observer_pb2.GetFlowsResponse(flow=flow, node_name=flow.node_name, time=flow.time)


def _ns(stamp: Timestamp) -> int:
    return stamp.seconds * 1_000_000_000 + stamp.nanos


def _time_ns(request: observer_pb2.GetFlowsRequest, name: str) -> int | None:
    """The request's ``since``/``until`` in nanoseconds, checked as Go's CheckValid does."""
    if not request.HasField(name):
        return None
    stamp = getattr(request, name)
    if not 0 <= stamp.nanos < 1_000_000_000:
        raise ValueError(f"{name}: nanos {stamp.nanos} out of range")
    if not -62135596800 <= stamp.seconds <= 253402300799:  # years 1 to 9999
        raise ValueError(f"{name}: seconds {stamp.seconds} out of range")
    return _ns(stamp)
