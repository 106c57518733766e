"""Hubble's gRPC API, served on the agent's loop as a Cilium agent serves it: the Observer
service (GetFlows, GetNodes, ServerStatus) and the Peer service (Notify), on a unix socket and,
with ``--hubble-listen-address``, on TCP with TLS (mutual when client CAs are given).

Methods of Cilium's Observer service that meshagent does not define (GetAgentEvents,
GetDebugEvents, GetNamespaces) answer UNIMPLEMENTED, as gRPC answers any unknown method.
"""

import logging
import os
from collections.abc import Callable
from pathlib import Path

import attrs
import grpc
from google.protobuf import unknown_fields
from google.protobuf.message import Message

from meshagent import hookimpl
from meshagent.errors import MeshagentError
from meshagent.model.node import Node
from meshagent.observe.api.observer import observer_pb2, observer_pb2_grpc
from meshagent.observe.api.peer import peer_pb2_grpc
from meshagent.observe.api.relay import relay_pb2
from meshagent.observe.contract import FlowSource
from meshagent.observe.peers import (
    SERVER_PORT,
    Peers,
    SlowConsumer,
    peer_address,
    peer_name,
    tls_server_name,
)
from meshagent.runtime.apiserver import SOCKET_MODE, remove_stale_socket
from meshagent.runtime.config import parse_listen_address
from meshagent.runtime.status import Health, StatusSection

log = logging.getLogger(__name__)

STOP_GRACE = 1.0  # seconds open streams (a follow, a Notify) get to end at shutdown


@attrs.frozen
class HubbleOptions:
    """Where and how to serve; the ``--hubble-*`` options."""

    socket_path: Path
    listen_address: str = ""  # "[host]:port" as Cilium takes it (":4244"); "": no TCP
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_files: tuple[str, ...] = ()  # given: clients must show a certificate they sign
    disable_tls: bool = False

    @property
    def tls(self) -> bool:
        return bool(self.listen_address) and not self.disable_tls

    @classmethod
    def from_config(cls, config) -> "HubbleOptions":
        return cls(socket_path=Path(config.get("hubble-socket-path")),
                   listen_address=config.get("hubble-listen-address"),
                   tls_cert_file=config.get("hubble-tls-cert-file"),
                   tls_key_file=config.get("hubble-tls-key-file"),
                   tls_client_ca_files=tuple(config.get("hubble-tls-client-ca-files")),
                   disable_tls=config.get("hubble-disable-tls"))


class HubbleServer:
    """The gRPC server; an async context: entering serves, leaving stops and removes the
    socket. Registered as plugin ``core.hubble`` for its ``meshagent status`` line."""

    def __init__(self, source: FlowSource, peers: Peers, options: HubbleOptions,
                 node_name: str, cluster: str, version: str,
                 lost_events: Callable[[], int] = lambda: 0):
        self.options = options
        self._lost_events = lost_events  # events the datapath could not hand over, so far
        self.tcp_port: int | None = None  # the bound port (``:0`` picks one)
        self._source = source
        self._peers = peers
        self._self = (cluster, node_name)
        self._version = version
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        # no SO_REUSEPORT (gRPC's default): a second agent must not share this node's port
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        try:
            await self._start(server)
        except BaseException:
            await server.stop(None)
            raise
        self._server = server
        os.chmod(self.options.socket_path, SOCKET_MODE)

    async def _start(self, server: grpc.aio.Server) -> None:
        options = self.options
        observer_pb2_grpc.add_ObserverServicer_to_server(_Observer(self._source, self.nodes),
                                                         server)
        peer_pb2_grpc.add_PeerServicer_to_server(_Peer(self._peers), server)
        await remove_stale_socket(options.socket_path)
        options.socket_path.parent.mkdir(parents=True, exist_ok=True)
        server.add_insecure_port(f"unix:{options.socket_path}")  # binds: the file exists now
        try:
            if options.listen_address:
                self.tcp_port = self._add_tcp_port(server)
            await server.start()
        except BaseException:
            options.socket_path.unlink(missing_ok=True)
            raise
        log.info("Hubble API on %s%s", options.socket_path,
                 f" and {options.listen_address} ({self._tls_kind()})"
                 if options.listen_address else "")

    def _add_tcp_port(self, server: grpc.aio.Server) -> int:
        options = self.options
        host, port = parse_listen_address(options.listen_address)
        try:
            if options.tls:
                return server.add_secure_port(f"{host}:{port}", self._credentials())
            log.warning("Hubble API on %s WITHOUT TLS (--hubble-disable-tls): anyone who"
                        " reaches it reads every flow", options.listen_address)
            return server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            raise MeshagentError(f"Hubble API: cannot listen on {options.listen_address}:"
                                 f" {exc}") from None

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(STOP_GRACE)
            self._server = None
        self.options.socket_path.unlink(missing_ok=True)

    async def __aenter__(self) -> "HubbleServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    @hookimpl
    def meshagent_status(self, verbose: bool):
        if self._server is None:
            return StatusSection("Hubble", Health.WARNING, "not serving (yet)")
        status = self._source.server_status()
        where = f"unix:{self.options.socket_path}"
        if self.options.listen_address:
            where += f", {self.options.listen_address} ({self._tls_kind()})"
        lost = self._lost_events()
        return StatusSection("Hubble", Health.OK,
                             f"Current/Max Flows: {status.num_flows}/{status.max_flows},"
                             f" seen {status.seen_flows}"
                             + (f", {lost} events lost by the datapath" if lost else "")
                             + f"; serving {where}")

    def _credentials(self) -> grpc.ServerCredentials:
        options = self.options
        try:
            key = Path(options.tls_key_file).read_bytes()
            cert = Path(options.tls_cert_file).read_bytes()
            cas = b"".join(Path(f).read_bytes() for f in options.tls_client_ca_files)
        except OSError as exc:
            raise MeshagentError(f"Hubble TLS: {exc}") from None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=cas or None,
                                           require_client_auth=bool(cas))

    def _tls_kind(self) -> str:
        if not self.options.tls:
            return "no TLS"
        return "mutual TLS" if self.options.tls_client_ca_files else "TLS"

    def nodes(self) -> list[observer_pb2.Node]:
        """GetNodes: this node (connected: it is what answers) and every other node of the
        table, whose state this server cannot know (it does not connect to them)."""
        port = self.tcp_port or SERVER_PORT
        nodes = self._peers.nodes()
        if not any((n.cluster, n.name) == self._self for n in nodes):
            nodes.insert(0, Node(self._self[1], self._self[0], 0))  # not published yet
        out = []
        for node in nodes:
            address = peer_address(node)
            entry = observer_pb2.Node(
                name=peer_name(node),
                address=f"[{address}]:{port}" if ":" in address else
                (f"{address}:{port}" if address else ""),
                state=relay_pb2.UNKNOWN_NODE_STATE,
                tls=observer_pb2.TLS(enabled=self.options.tls, server_name=tls_server_name(
                    node.name, node.cluster) if self.options.tls else ""))
            if (node.cluster, node.name) == self._self:
                status = self._source.server_status()
                entry.state = relay_pb2.NODE_CONNECTED
                entry.version = self._version
                entry.uptime_ns = status.uptime_ns
                entry.num_flows = status.num_flows
                entry.max_flows = status.max_flows
                entry.seen_flows = status.seen_flows
            out.append(entry)
        return out


class _Observer(observer_pb2_grpc.ObserverServicer):
    def __init__(self, source: FlowSource, nodes):
        self._source = source
        self._nodes = nodes

    async def GetFlows(self, request, context):
        if unknown := _unknown_fields(request):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"fields this server does not know: {', '.join(unknown)}")
        try:
            async for response in self._source.get_flows(request):
                yield response
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def ServerStatus(self, request, context):
        response = observer_pb2.ServerStatusResponse()
        response.CopyFrom(self._source.server_status())
        response.num_connected_nodes.value = 1  # this server's flows are this node's
        response.num_unavailable_nodes.value = 0
        return response

    async def GetNodes(self, request, context):
        return observer_pb2.GetNodesResponse(nodes=self._nodes())


def _unknown_fields(message: Message) -> list[str]:
    """Fields a newer client set that our definitions lack ("FlowFilter.39"): a filter we
    cannot read must not be ignored, or the answer would hold flows it excludes."""
    found = [f"{message.DESCRIPTOR.name}.{field.field_number}"
             for field in unknown_fields.UnknownFieldSet(message)]
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        for sub in (value if field.is_repeated else [value]):
            found += _unknown_fields(sub)
    return found


class _Peer(peer_pb2_grpc.PeerServicer):
    def __init__(self, peers: Peers):
        self._peers = peers

    async def Notify(self, request, context):
        try:
            async for notification in self._peers.notify():
                yield notification
        except SlowConsumer as exc:
            await context.abort(grpc.StatusCode.UNKNOWN, str(exc))
