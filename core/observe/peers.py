"""The mesh's nodes as Hubble peers: Cilium's names and addresses for them, and the change
notifications of the Peer service, fed by the agent's node table.

Cilium's rules (``pkg/hubble/peer/handler.go``, ``pkg/node/types/node.go``):

* a peer's name is the node's ``Fullname()``: ``<cluster>/<node>``, or just ``<node>`` in the
  cluster named ``default``;
* its address is the node's IP without a port (IPv4 preferred, else IPv6; "" if none): Hubble
  Relay dials it on Hubble's port, 4244, unless the address carries one;
* its TLS server name is ``<node>.<cluster>.hubble-grpc.cilium.io``, dots in either name
  replaced by hyphens, and is sent only when the server speaks TLS;
* a node that changes but keeps its address is no notification (PEER_UPDATED says the address
  changed).
"""

import asyncio
import logging

from meshagent import hookimpl
from meshagent.events import ChangeKind
from meshagent.model.node import Node
from meshagent.observe.api.peer import peer_pb2

log = logging.getLogger(__name__)

DEFAULT_CLUSTER = "default"  # Cilium's defaults.ClusterName
SERVER_PORT = 4244  # Hubble's default port (Cilium's hubble defaults.ServerPort)
#: Notifications a slow Notify client may fall behind before its stream is ended (Cilium's
#: serviceoption default MaxSendBufferSize).
MAX_SEND_BUFFER = 65_536


def peer_name(node: Node) -> str:
    return node.name if node.cluster == DEFAULT_CLUSTER else f"{node.cluster}/{node.name}"


def peer_address(node: Node) -> str:
    address = node.ipv4 or node.ipv6
    return str(address) if address is not None else ""


def tls_server_name(node: str, cluster: str) -> str:
    if not node:
        return ""
    return ".".join((node.replace(".", "-"), (cluster or DEFAULT_CLUSTER).replace(".", "-"),
                     "hubble-grpc", "cilium.io"))


class SlowConsumer(Exception):
    """A Notify client fell MAX_SEND_BUFFER notifications behind."""


class Peers:
    """Follows the node table (``meshagent_node_changed``) and hands each Notify stream the
    known peers, then every change; registered as plugin ``core.hubble-peers``."""

    def __init__(self, nodes, tls: bool, max_buffer: int = MAX_SEND_BUFFER):
        self._nodes = nodes  # the agent's node table: values() lists the nodes
        self._tls = tls
        self._max_buffer = max_buffer
        self._known: dict[tuple[str, str], Node] = {}  # the table as the streams saw it
        self._streams: list[asyncio.Queue] = []

    @property
    def subscribers(self) -> int:
        """Notify streams open now."""
        return len(self._streams)

    def nodes(self) -> list[Node]:
        return sorted(self._nodes.values(), key=peer_name)

    def notification(self, node: Node, kind: int) -> peer_pb2.ChangeNotification:
        tls = peer_pb2.TLS(server_name=tls_server_name(node.name, node.cluster)) \
            if self._tls else None
        return peer_pb2.ChangeNotification(name=peer_name(node), address=peer_address(node),
                                           type=kind, tls=tls)

    async def notify(self):
        """Every known node as PEER_ADDED, then the changes, until the caller stops."""
        nodes = self.nodes()  # no await between this snapshot and subscribing
        queue: asyncio.Queue = asyncio.Queue(self._max_buffer + len(nodes))
        for node in nodes:
            queue.put_nowait(self.notification(node, peer_pb2.PEER_ADDED))
        self._streams.append(queue)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, SlowConsumer):
                    raise item
                yield item
        finally:
            self._streams.remove(queue)

    @hookimpl
    def meshagent_node_changed(self, kind, node: Node):
        key = (node.cluster, node.name)
        old = self._known.pop(key, None)
        if kind == ChangeKind.DELETE:
            self._send(self.notification(node, peer_pb2.PEER_DELETED))
            return
        self._known[key] = node
        if old is None:
            self._send(self.notification(node, peer_pb2.PEER_ADDED))
        elif peer_address(old) != peer_address(node):
            self._send(self.notification(node, peer_pb2.PEER_UPDATED))

    def _send(self, notification: peer_pb2.ChangeNotification) -> None:
        for queue in self._streams:
            if queue.full():
                continue  # already ended below
            if queue.qsize() == queue.maxsize - 1:
                log.warning("a Hubble peer client fell %d notifications behind: ending its"
                            " stream", self._max_buffer)
                queue.put_nowait(SlowConsumer("server stream send was blocked for too long"))
                continue
            queue.put_nowait(notification)
