"""``meshagent observe --mesh``: Hubble Relay's job, done in the CLI.

Cilium's answer to "flows of every node" is a separate process, Hubble Relay. meshagent does
the same work in the CLI instead (no extra daemon to deploy and secure; the CLI already has
the certificates an operator would give a relay), following Relay's behaviour
(cilium/cilium ``pkg/hubble/relay/observer``):

* the nodes come from the local agent's Peer service (``peer.Peer/Notify``): every node of
  this cluster and of every connected cluster, named ``cluster/node``, with its address
  (port 4244 when it names none, Hubble's port) and the TLS server name its certificate
  carries (``<node>.<cluster>.hubble-grpc.cilium.io``);
* each node's Observer is dialled over TCP, with mutual TLS when the peer says TLS; a node
  that does not answer within the dial timeout is *unavailable*;
* the stream starts with a GetFlowsResponse ``node_status`` NODE_CONNECTED naming the nodes
  it reads and one NODE_UNAVAILABLE naming those it could not reach; a node whose stream
  fails later gives NODE_ERROR with the reason (the printer shows the last two on stderr);
* every node gets the same GetFlowsRequest (so ``--last N`` is N per node, as with Relay);
  the responses are merged in time order: all of them sorted once every node has answered
  (or timed out: a node that hangs cannot hold the others back), and with ``--follow``
  through a window (when the streams pause, what is older than one second is let out; more
  than 100 waiting push the oldest out), so late flows of one node still come out in order
  with the others';
* with ``--follow``, nodes the Peer service adds later are read too; the stream ends when no
  node is being read any more (as Relay's).

Not done as Relay does: errors with the same message are not merged into one event.
"""

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator

import attrs

from meshagent.errors import MeshagentError
from meshagent.observe.api.observer import observer_pb2, observer_pb2_grpc
from meshagent.observe.api.peer import peer_pb2, peer_pb2_grpc
from meshagent.observe.api.relay import relay_pb2
from meshagent.observe.connect import open_channel, rpc_error_text

HUBBLE_PORT = 4244  # Cilium's hubble-listen-address port, the default of a peer's address
PEER_QUIET = 0.3  # the peer list is complete once Notify is silent this long
PEER_WAIT = 3.0  # ... or after this long at most
SORT_WINDOW = 1.0  # hubble-relay's sort-buffer-drain-timeout
SORT_BUFFER = 100  # hubble-relay's sort-buffer-len-max
QUIET = 0.1  # follow mode: the streams pause this long before the window drains


@attrs.frozen
class Peer:
    """A node as the Peer service names it."""

    name: str  # cluster/node
    address: str  # host:port to dial
    tls_server_name: str | None  # None: the node serves plain TCP


def peer_address(address: str) -> str:
    """``address`` with Hubble's port when it names none (IPv6 in brackets)."""
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{HUBBLE_PORT}"
    if address.count(":") == 1:
        return address
    if ":" in address:  # a bare IPv6 address
        return f"[{address}]:{HUBBLE_PORT}"
    return f"{address}:{HUBBLE_PORT}"


def peer_from(notification) -> Peer:
    tls = notification.tls.server_name if notification.HasField("tls") else None
    return Peer(notification.name, peer_address(notification.address), tls)


class PeerList:
    """The nodes the Peer service knows, kept current by reading its Notify stream in a task
    of its own (from :meth:`start` to :meth:`close`)."""

    def __init__(self, channel):
        self.peers: dict[str, Peer] = {}
        self.changed = asyncio.Event()
        self._call = peer_pb2_grpc.PeerStub(channel).Notify(peer_pb2.NotifyRequest())
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="observe peers")

    @property
    def following(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def _read(self) -> None:
        try:
            async for notification in self._call:
                kinds = peer_pb2.ChangeNotificationType
                if notification.type == kinds.Value("PEER_DELETED"):
                    self.peers.pop(notification.name, None)
                elif notification.type in (kinds.Value("PEER_ADDED"),
                                           kinds.Value("PEER_UPDATED")):
                    self.peers[notification.name] = peer_from(notification)
                self.changed.set()
        finally:
            self.changed.set()  # whoever waits for news learns the stream ended

    async def initial(self) -> dict[str, Peer]:
        """Every node the service names now: its first burst of notifications (complete once
        it pauses PEER_QUIET, or after PEER_WAIT). Raises MeshagentError when the service
        fails before naming any node."""
        deadline = time.monotonic() + PEER_WAIT
        while self.following and (left := deadline - time.monotonic()) > 0:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(),
                                       min(left, PEER_QUIET) if self.peers else left)
            except asyncio.TimeoutError:
                break
        if not self.peers and self._reader.done() and self._reader.exception() is not None:
            import grpc
            exc = self._reader.exception()
            text = rpc_error_text(exc) if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            raise MeshagentError(f"cannot list the nodes (peer.Peer/Notify): {text}")
        return dict(self.peers)

    async def close(self) -> None:
        self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


def _status(state: str, names: list[str], node_name: str, message: str = ""):
    response = observer_pb2.GetFlowsResponse(node_name=node_name)
    response.time.GetCurrentTime()
    response.node_status.state_change = relay_pb2.NodeState.Value(state)
    response.node_status.node_names.extend(names)
    if message:
        response.node_status.message = message
    return response


def _when(response) -> int:
    """The response's time in ns, the order of the merged stream."""
    ts = response.time if response.HasField("time") else response.flow.time
    return ts.seconds * 1_000_000_000 + ts.nanos


class _Merge:
    """Reads one GetFlows stream per node into one queue."""

    def __init__(self, request, creds, node_name: str, dial_timeout: float,
                 request_timeout: float):
        self.request = request
        self.creds = creds
        self.node_name = node_name
        self.dial_timeout = dial_timeout
        self.request_timeout = request_timeout
        self.queue: asyncio.Queue = asyncio.Queue()
        self.channels = []
        self.tasks: set[asyncio.Task] = set()
        self.reading: set[str] = set()

    async def dial(self, peer: Peer):
        """A ready channel to ``peer``, or None when it does not answer in time."""
        channel = open_channel(peer.address, self.creds if peer.tls_server_name is not None
                               else None, peer.tls_server_name or "")
        try:
            await asyncio.wait_for(channel.channel_ready(), self.dial_timeout)
        except asyncio.TimeoutError:
            await channel.close()
            return None
        self.channels.append(channel)
        return channel

    def read(self, peer: Peer, channel) -> None:
        self.reading.add(peer.name)
        task = asyncio.create_task(self._read(peer, channel), name=f"observe {peer.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _read(self, peer: Peer, channel) -> None:
        import grpc

        timeout = None if self.request.follow else self.request_timeout
        try:
            call = observer_pb2_grpc.ObserverStub(channel).GetFlows(self.request,
                                                                     timeout=timeout)
            async for response in call:
                await self.queue.put(response)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                await self.queue.put(_status("NODE_ERROR", [peer.name], self.node_name,
                                             rpc_error_text(exc)))
        finally:
            self.reading.discard(peer.name)
            await self.queue.put(None)  # this node is done

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()


async def observe_mesh(local_channel, request, creds, *, node_name: str, dial_timeout: float,
                       request_timeout: float) -> AsyncIterator:
    """The merged GetFlowsResponses of every node the Peer service at ``local_channel``
    names (see the module docstring)."""
    peers = PeerList(local_channel)
    merge = _Merge(request, creds, node_name, dial_timeout, request_timeout)
    watcher = None
    try:
        peers.start()
        known = await peers.initial()
        dialled = await asyncio.gather(*(merge.dial(p) for p in known.values()))
        connected = [p.name for p, ch in zip(known.values(), dialled) if ch is not None]
        unavailable = [p.name for p, ch in zip(known.values(), dialled) if ch is None]
        if connected:
            yield _status("NODE_CONNECTED", connected, node_name)
        if unavailable:
            yield _status("NODE_UNAVAILABLE", unavailable, node_name)
        for peer, channel in zip(known.values(), dialled):
            if channel is not None:
                merge.read(peer, channel)
        if not request.follow:
            async for response in _sorted_all(merge, len(connected)):
                yield response
            return
        watcher = asyncio.create_task(_join_new_peers(peers, merge, set(known)))
        async for response in _sorted_window(merge):
            yield response
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await peers.close()
        await merge.close()


async def _sorted_all(merge: _Merge, streams: int) -> AsyncIterator:
    """Everything, in time order, once every stream ended (each has a deadline)."""
    responses, done = [], 0
    while done < streams:
        item = await merge.queue.get()
        if item is None:
            done += 1
        else:
            responses.append(item)
    responses.sort(key=_when)
    for response in responses:
        yield response


async def _sorted_window(merge: _Merge) -> AsyncIterator:
    """Follow mode: once the streams pause (QUIET), let out what is SORT_WINDOW old; while
    they do not, only what more than SORT_BUFFER responses push out."""
    heap: list = []
    order = itertools.count()
    while True:
        try:
            item = await asyncio.wait_for(merge.queue.get(), QUIET)
        except asyncio.TimeoutError:
            if not merge.tasks and merge.queue.empty():  # every stream ended, as Relay's
                while heap:
                    yield heapq.heappop(heap)[2]
                return
            horizon = time.time_ns() - int(SORT_WINDOW * 1e9)
            while heap and heap[0][0] <= horizon:
                yield heapq.heappop(heap)[2]
            continue
        if item is not None:
            heapq.heappush(heap, (_when(item), next(order), item))
        while len(heap) > SORT_BUFFER:
            yield heapq.heappop(heap)[2]


async def _join_new_peers(peers: PeerList, merge: _Merge, seen: set[str]) -> None:
    """Follow mode: read the nodes the Peer service names later too."""
    while peers.following:
        peers.changed.clear()
        for name, peer in list(peers.peers.items()):
            if name in seen:
                continue
            seen.add(name)
            channel = await merge.dial(peer)
            if channel is None:
                await merge.queue.put(_status("NODE_UNAVAILABLE", [name], merge.node_name))
            else:
                merge.read(peer, channel)
        await peers.changed.wait()
