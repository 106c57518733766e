"""The agent's observer: every flow event as Hubble flows, the recent ones in a ring buffer,
and the ``GetFlows``/``ServerStatus`` answers of Hubble's Observer service.

A flow is kept as its :class:`~meshagent.observe.flows.FlowRecord` (the event and the names
it had then) and built into a Hubble flow only when a reader asks for it: each event costs a
record and a count in the metrics. A reader's filters are applied to built flows; a request
with none builds only the flows it sends. Every read builds anew (nothing built is kept), the
same fields and uuid each time.

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
from meshagent.observe.flows import FlowMaker, FlowRecord, timestamp
from meshagent.observe.metrics import FlowMetrics
from meshagent.runtime.config import parse_event_buffer_capacity

DEFAULT_CAPACITY = 4095  # Cilium's hubble-event-buffer-capacity
FOLLOW_QUEUE = 4096  # flows a follower may be behind before it loses some
#: what GetFlows reads: a flow recorded, the same built (it had to be, for the filters), or a
#: notice of lost events
_Item = FlowRecord | flow_pb2.Flow | observer_pb2.GetFlowsResponse


class _Follower:
    """A GetFlows stream with follow: the flows it has yet to send, at most
    :data:`FOLLOW_QUEUE`; a count in their midst marks where it lost that many."""

    def __init__(self, passes: Predicate | None):
        self.passes = passes  # None: every flow
        self.items: collections.deque[_Item | int] = collections.deque()
        self.queued = 0  # flows in items
        self.missed = 0  # lost since the last flow queued
        self._ready = asyncio.Event()

    def offer(self, flow: _Item) -> None:
        """A flow that passed the filters (built, or a record to build when sent), or a
        notice of lost events."""
        if self.queued >= FOLLOW_QUEUE:
            self.missed += 1
            return
        if self.missed:
            self.items.append(self.missed)
            self.missed = 0
        self.items.append(flow)
        self.queued += 1
        self._ready.set()

    async def next(self) -> _Item | int:
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
    """Subscribe :meth:`on_event` to the agent's flow events; ``maker`` records each as flows,
    which are kept (the last ``capacity``), counted (``metrics``) and streamed."""

    def __init__(self, maker: FlowMaker, capacity: int = DEFAULT_CAPACITY,
                 clock: Callable[[], float] = time.time, lost: Callable[[], int] = lambda: 0):
        self.maker = maker
        self.capacity = parse_event_buffer_capacity(capacity)
        # flows, and notices of events the datapath lost (GetFlowsResponse)
        self.ring: collections.deque[FlowRecord | flow_pb2.Flow
                                     | observer_pb2.GetFlowsResponse] = \
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
        for record in self.maker.records(event):
            self.add(record)

    def add(self, record: FlowRecord) -> None:
        self.ring.append(record)
        self.seen_flows += 1
        self.metrics.count(record)
        if not self.followers:
            return
        built = None  # once for all the followers that filter
        for follower in self.followers:
            if follower.passes is None:
                follower.offer(record)
                continue
            if built is None:
                built = self.maker.build(record)
            if follower.passes(built):
                follower.offer(built)

    def add_flow(self, flow: flow_pb2.Flow) -> None:
        """A flow made elsewhere (the DNS proxy's L7 flows): kept and streamed as the
        datapath's are; not counted in the hubble_* metrics."""
        self.ring.append(flow)
        self.seen_flows += 1
        for follower in self.followers:
            if follower.passes is None or follower.passes(flow):
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
            num_flows=sum(1 for f in self.ring
                          if isinstance(f, FlowRecord | flow_pb2.Flow)),
            max_flows=self.capacity, seen_flows=self.seen_flows,
            uptime_ns=int((now - self.started) * 1e9), version=__version__,
            flows_rate=self._rate(now))

    def _rate(self, now: float) -> float:
        """Flows per second over the last minute (over what the ring holds, if less)."""
        since = now - 60.0
        count = 0
        oldest = None
        for record in reversed(self.ring):
            if isinstance(record, observer_pb2.GetFlowsResponse):
                continue
            stamp = _when(record) / 1e9
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
        passes = None
        if request.whitelist or request.blacklist:
            passes = flows_filter(request.whitelist, request.blacklist)
        follower = None
        if request.follow:  # before reading the ring: nothing falls between the two
            follower = _Follower(passes)
            self.followers.add(follower)
        try:
            stored = self._stored(request, passes, since)
            sent = 0
            for item in stored:
                if not request.follow and request.number and sent >= request.number:
                    return
                if isinstance(item, observer_pb2.GetFlowsResponse):
                    yield item  # a notice of lost events
                    continue
                stamp = _when(item)
                if until is not None and stamp > until:
                    return
                if since is not None and stamp < since:
                    continue
                sent += 1
                yield self._response(item)
            if follower is None:
                return
            while True:
                item = await follower.next()
                if isinstance(item, int):
                    self.follow_lost += item
                    yield self._notice(flow_pb2.HUBBLE_RING_BUFFER, item)
                    continue
                if isinstance(item, observer_pb2.GetFlowsResponse):
                    yield item
                    continue
                if until is not None and _when(item) > until:
                    return
                if since is not None and _when(item) < since:
                    continue
                yield self._response(item)
        finally:
            if follower is not None:
                self.followers.discard(follower)

    def _stored(self, request: observer_pb2.GetFlowsRequest, passes: Predicate | None,
                since: int | None) -> list[_Item]:
        """The stored flows to read forward from, as Hubble's newRingReader picks its start;
        the ones that fail the filters already left out (those that passed them built)."""
        items = list(self.ring)
        if request.first and since is None:
            return [item for item in map(self._filtered(passes), items) if item is not None]
        if request.follow and not request.number and since is None:
            return []
        filtered = self._filtered(passes)
        picked = []
        count = 0
        for item in reversed(items):
            if isinstance(item, observer_pb2.GetFlowsResponse):
                picked.append(item)  # a notice: not a flow, never counted
                continue
            item = filtered(item)
            if item is None:
                continue
            if since is not None and _when(item) < since:
                break
            picked.append(item)
            count += 1
            if since is None and request.number and count == request.number:
                break
        picked.reverse()
        return picked

    def _filtered(self, passes: Predicate | None) -> Callable[[_Item], _Item | None]:
        """What of a stored item is read with ``passes``: the item itself (no filters; a
        notice), its flow (built to be filtered), or None (filtered out)."""
        if passes is None:
            return lambda item: item

        def filtered(item: _Item) -> _Item | None:
            if isinstance(item, observer_pb2.GetFlowsResponse):
                return item
            flow = self.maker.build(item) if isinstance(item, FlowRecord) else item
            return flow if passes(flow) else None
        return filtered

    def _response(self, item: FlowRecord | flow_pb2.Flow) -> observer_pb2.GetFlowsResponse:
        if isinstance(item, flow_pb2.Flow):
            return response(item)
        answer = observer_pb2.GetFlowsResponse()
        flow = self.maker.build(item, answer.flow)
        answer.node_name = flow.node_name
        answer.time.CopyFrom(flow.time)
        return answer

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


def _when(item: FlowRecord | flow_pb2.Flow) -> int:
    """A flow's time in nanoseconds, built or not."""
    return item.event.time_ns if isinstance(item, FlowRecord) else _ns(item.time)


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
