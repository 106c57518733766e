"""The Hubble API server, driven by clients generated from Hubble's definitions
(``ObserverStub``, ``PeerStub``) over real sockets: the unix socket, and TCP with mutual TLS."""

import asyncio
import ipaddress
import json
import logging

import grpc
import pytest
import trustme
from google.protobuf.internal import encoder

from meshagent.datapath.events import DROP, DROPPED, FORWARDED, POLICY_VERDICT, FlowEvent
from meshagent.errors import MeshagentError, UsageError
from meshagent.kvstore import keys as kvkeys
from meshagent.model.node import Node, node_to_json
from meshagent.model.table import Table
from meshagent.observe import jsonformat
from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.api.observer import observer_pb2, observer_pb2_grpc
from meshagent.observe.api.peer import peer_pb2, peer_pb2_grpc
from meshagent.observe.api.relay import relay_pb2
from meshagent.observe.peers import Peers, tls_server_name
from meshagent.observe.server import HubbleOptions, HubbleServer
from meshagent.plugins.memory.store import shared_store
from meshagent.runtime.config import parse_listen_address
from meshagent.runtime.status import Health
from meshagent.testing import eventually

CALL_TIMEOUT = 5


class ListFlowSource:
    """A test double of the FlowSource contract: a list of flows, new ones added by the test.

    It understands no filter but ``verdict`` and refuses a request with any other one."""

    def __init__(self, flows=()):
        self.flows = list(flows)
        self._new: list[asyncio.Queue] = []

    def add(self, flow: flow_pb2.Flow) -> None:
        self.flows.append(flow)
        for queue in self._new:
            queue.put_nowait(flow)

    async def get_flows(self, request):
        for f in [*request.whitelist, *request.blacklist]:
            others = [d.name for d, _ in f.ListFields() if d.name != "verdict"]
            if others:
                raise ValueError(f"unsupported filter field: {others[0]}")
        queue: asyncio.Queue = asyncio.Queue()
        self._new.append(queue)
        try:
            for flow in list(self.flows):
                if self._wanted(request, flow):
                    yield self._response(flow)
            while request.follow:
                flow = await queue.get()
                if self._wanted(request, flow):
                    yield self._response(flow)
        finally:
            self._new.remove(queue)

    @staticmethod
    def _wanted(request, flow) -> bool:
        verdicts = {v for f in request.whitelist for v in f.verdict}
        return not verdicts or flow.verdict in verdicts

    @staticmethod
    def _response(flow):
        return observer_pb2.GetFlowsResponse(flow=flow, node_name=flow.node_name, time=flow.time)

    def server_status(self):
        return observer_pb2.ServerStatusResponse(num_flows=len(self.flows), max_flows=4095,
                                                 seen_flows=len(self.flows) + 7,
                                                 uptime_ns=123, version="test")


def _flow(uuid: str, verdict=flow_pb2.FORWARDED) -> flow_pb2.Flow:
    flow = flow_pb2.Flow(uuid=uuid, verdict=verdict, node_name="c1/n1")
    flow.time.FromNanoseconds(1_700_000_000_000_000_000)
    return flow


def _node(name: str, cluster: str = "c1", ip: str = "10.0.0.1") -> Node:
    return Node(name, cluster, 1, ipaddress.ip_address(ip))


class Setup:
    """A node table feeding Peers as the agent's hook does, and the server over it."""

    def __init__(self, short_tmp, max_buffer: int = 100, **options):
        self.source = ListFlowSource([_flow("a"), _flow("b", flow_pb2.DROPPED), _flow("c")])
        options = HubbleOptions(short_tmp / "h.sock", **options)
        self.nodes = Table("node", lambda kind, node: self.peers.meshagent_node_changed(
            kind=kind, node=node))
        self.peers = Peers(self.nodes, tls=options.tls, max_buffer=max_buffer)
        self.server = HubbleServer(self.source, self.peers, options, node_name="n1",
                                   cluster="c1", version="9.9")


@pytest.fixture
async def hubble(short_tmp):
    setup = Setup(short_tmp)
    setup.nodes.upsert(("c1", "n1"), _node("n1"))
    setup.nodes.upsert(("c2", "n2"), _node("n2", "c2", "fd00::2"))
    async with setup.server:
        async with grpc.aio.insecure_channel(f"unix:{short_tmp / 'h.sock'}") as channel:
            setup.observer = observer_pb2_grpc.ObserverStub(channel)
            setup.peer = peer_pb2_grpc.PeerStub(channel)
            setup.channel = channel
            yield setup
    assert not (short_tmp / "h.sock").exists()


async def test_the_socket_is_for_root_and_its_group(hubble, short_tmp):
    assert (short_tmp / "h.sock").stat().st_mode & 0o777 == 0o660


async def test_get_flows_streams_what_the_source_gives(hubble):
    call = hubble.observer.GetFlows(observer_pb2.GetFlowsRequest(), timeout=CALL_TIMEOUT)
    assert [r.flow.uuid async for r in call] == ["a", "b", "c"]
    dropped = observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(
        verdict=[flow_pb2.DROPPED])])
    responses = [r async for r in hubble.observer.GetFlows(dropped, timeout=CALL_TIMEOUT)]
    assert [r.flow.uuid for r in responses] == ["b"]
    assert responses[0].node_name == "c1/n1"
    assert responses[0].time.ToNanoseconds() == 1_700_000_000_000_000_000


async def test_get_flows_follow_brings_new_flows(hubble):
    call = hubble.observer.GetFlows(observer_pb2.GetFlowsRequest(follow=True),
                                    timeout=CALL_TIMEOUT)
    seen = [(await call.read()).flow.uuid for _ in range(3)]
    hubble.source.add(_flow("d"))
    seen.append((await call.read()).flow.uuid)
    assert seen == ["a", "b", "c", "d"]
    call.cancel()


async def test_a_request_the_source_refuses_is_invalid_argument(hubble):
    request = observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(source_fqdn=["x"])])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [r async for r in hubble.observer.GetFlows(request, timeout=CALL_TIMEOUT)]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "unsupported filter field: source_fqdn"


async def test_a_filter_field_we_do_not_know_is_invalid_argument(hubble):
    """A newer client's filter field (here 60 of FlowFilter) must not be silently ignored."""
    raw = flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED]).SerializeToString() + \
        encoder.TagBytes(60, 0) + b"\x01"
    request = observer_pb2.GetFlowsRequest(follow=True).SerializeToString() + \
        encoder.TagBytes(6, 2) + bytes([len(raw)]) + raw  # whitelist = [that filter]
    call = hubble.channel.unary_stream("/observer.Observer/GetFlows",
                                       request_serializer=lambda b: b,
                                       response_deserializer=observer_pb2.GetFlowsResponse.FromString)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [r async for r in call(request, timeout=CALL_TIMEOUT)]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "fields this server does not know: FlowFilter.60"


async def test_server_status_counts(hubble):
    status = await hubble.observer.ServerStatus(observer_pb2.ServerStatusRequest(),
                                                timeout=CALL_TIMEOUT)
    assert (status.num_flows, status.max_flows, status.seen_flows) == (3, 4095, 10)
    assert (status.uptime_ns, status.version) == (123, "test")
    assert status.HasField("num_connected_nodes") and status.num_connected_nodes.value == 1
    assert status.HasField("num_unavailable_nodes") and status.num_unavailable_nodes.value == 0
    hubble.source.add(_flow("d"))
    status = await hubble.observer.ServerStatus(observer_pb2.ServerStatusRequest(),
                                                timeout=CALL_TIMEOUT)
    assert status.num_flows == 4


async def test_methods_meshagent_does_not_serve_are_unimplemented(hubble):
    for method in ("/observer.Observer/GetAgentEvents", "/observer.Observer/GetDebugEvents"):
        call = hubble.channel.unary_stream(method, request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [r async for r in call(b"", timeout=CALL_TIMEOUT)]
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    call = hubble.channel.unary_unary("/observer.Observer/GetNamespaces",
                                      request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"", timeout=CALL_TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_get_nodes(hubble):
    response = await hubble.observer.GetNodes(observer_pb2.GetNodesRequest(),
                                              timeout=CALL_TIMEOUT)
    this, other = response.nodes
    assert (this.name, this.address, this.state) == ("c1/n1", "10.0.0.1:4244",
                                                      relay_pb2.NODE_CONNECTED)
    assert (this.version, this.num_flows, this.max_flows, this.seen_flows, this.uptime_ns) == (
        "9.9", 3, 4095, 10, 123)
    assert not this.tls.enabled and this.tls.server_name == ""
    # another node: its state is not known to this server, nor its counters
    assert (other.name, other.address, other.state) == ("c2/n2", "[fd00::2]:4244",
                                                        relay_pb2.UNKNOWN_NODE_STATE)
    assert (other.version, other.num_flows) == ("", 0)


async def test_notify_sends_known_peers_then_changes(hubble):
    call = hubble.peer.Notify(peer_pb2.NotifyRequest(), timeout=CALL_TIMEOUT)
    first = [await call.read() for _ in range(2)]
    assert [(n.name, n.address, n.type) for n in first] == [
        ("c1/n1", "10.0.0.1", peer_pb2.PEER_ADDED), ("c2/n2", "fd00::2", peer_pb2.PEER_ADDED)]
    assert not first[0].HasField("tls")  # this server speaks no TLS
    hubble.nodes.upsert(("c2", "n3"), _node("n3", "c2", "10.0.2.3"))
    added = await call.read()
    assert (added.name, added.address, added.type) == ("c2/n3", "10.0.2.3", peer_pb2.PEER_ADDED)
    # a change that keeps the address is no notification; a new address is an update
    hubble.nodes.upsert(("c2", "n3"), Node("n3", "c2", 9, ipaddress.ip_address("10.0.2.3")))
    hubble.nodes.upsert(("c2", "n3"), _node("n3", "c2", "10.0.2.4"))
    updated = await call.read()
    assert (updated.name, updated.address, updated.type) == ("c2/n3", "10.0.2.4",
                                                             peer_pb2.PEER_UPDATED)
    hubble.nodes.delete(("c2", "n3"))
    deleted = await call.read()
    assert (deleted.name, deleted.type) == ("c2/n3", peer_pb2.PEER_DELETED)
    # Cilium names a node of the cluster "default" without its cluster
    hubble.nodes.upsert(("default", "n4"), _node("n4", "default", "10.0.0.4"))
    assert (await call.read()).name == "n4"
    call.cancel()


async def test_a_notify_client_that_falls_behind_is_cut_off(short_tmp):
    setup = Setup(short_tmp, max_buffer=3)
    async with setup.server:
        async with grpc.aio.insecure_channel(f"unix:{short_tmp / 'h.sock'}") as channel:
            call = peer_pb2_grpc.PeerStub(channel).Notify(peer_pb2.NotifyRequest(),
                                                          timeout=CALL_TIMEOUT)
            async with asyncio.timeout(CALL_TIMEOUT):  # the stream is registered
                while not setup.peers.subscribers:
                    await asyncio.sleep(0.01)
            for i in range(5):
                setup.nodes.upsert(("c1", f"x{i}"), _node(f"x{i}"))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                while True:
                    await call.read()
            assert raised.value.code() == grpc.StatusCode.UNKNOWN
            assert "blocked" in raised.value.details()
    assert setup.peers.subscribers == 0


def test_tls_server_name_is_ciliums():
    assert tls_server_name("moseisley", "tatooine") == "moseisley.tatooine.hubble-grpc.cilium.io"
    assert tls_server_name("a.b", "c.d") == "a-b.c-d.hubble-grpc.cilium.io"
    assert tls_server_name("n", "") == "n.default.hubble-grpc.cilium.io"
    assert tls_server_name("", "c") == ""


def test_listen_addresses():
    assert parse_listen_address(":4244") == ("[::]", 4244)
    assert parse_listen_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen_address("[fd00::1]:4244") == ("[fd00::1]", 4244)
    for bad in ("4244", "host:4244", ":http", ":70000"):
        with pytest.raises(ValueError):
            parse_listen_address(bad)


# --- TCP and TLS -------------------------------------------------------------------------

SERVER_NAME = "n1.c1.hubble-grpc.cilium.io"


@pytest.fixture
def certs(short_tmp):
    """One Hubble CA issuing the server's and a client's certificates; another CA's client."""
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert(SERVER_NAME)
    files = {"ca": short_tmp / "ca.pem", "cert": short_tmp / "server.pem",
             "key": short_tmp / "server-key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    return {"files": files, "ca": ca, "client": ca.issue_cert("hubble-relay.example"),
            "stranger": other_ca.issue_cert("hubble-relay.example")}


def _tls_channel(port: int, ca, client=None):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem.bytes(),
        private_key=client.private_key_pem.bytes() if client else None,
        certificate_chain=client.cert_chain_pems[0].bytes() if client else None)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials,
                                   options=[("grpc.ssl_target_name_override", SERVER_NAME)])


async def _status(channel):
    return await observer_pb2_grpc.ObserverStub(channel).ServerStatus(
        observer_pb2.ServerStatusRequest(), timeout=CALL_TIMEOUT)


async def test_tcp_with_mutual_tls(short_tmp, certs):
    files = certs["files"]
    setup = Setup(short_tmp, listen_address="127.0.0.1:0", tls_cert_file=str(files["cert"]),
                  tls_key_file=str(files["key"]), tls_client_ca_files=(str(files["ca"]),))
    setup.nodes.upsert(("c1", "n1"), _node("n1"))
    async with setup.server:
        port = setup.server.tcp_port
        assert port
        async with _tls_channel(port, certs["ca"], certs["client"]) as channel:
            assert (await _status(channel)).num_flows == 3
            call = peer_pb2_grpc.PeerStub(channel).Notify(peer_pb2.NotifyRequest(),
                                                          timeout=CALL_TIMEOUT)
            assert (await call.read()).tls.server_name == SERVER_NAME
            call.cancel()
            nodes = await observer_pb2_grpc.ObserverStub(channel).GetNodes(
                observer_pb2.GetNodesRequest(), timeout=CALL_TIMEOUT)
            assert nodes.nodes[0].tls.enabled and nodes.nodes[0].address == f"10.0.0.1:{port}"
        # refused: no client certificate, a certificate of another CA, no TLS at all
        for channel in (_tls_channel(port, certs["ca"]),
                        _tls_channel(port, certs["ca"], certs["stranger"]),
                        grpc.aio.insecure_channel(f"127.0.0.1:{port}")):
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await _status(channel)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        # the unix socket stays without TLS, for local tools
        async with grpc.aio.insecure_channel(f"unix:{short_tmp / 'h.sock'}") as channel:
            assert (await _status(channel)).num_flows == 3


async def test_a_port_in_use_is_an_error_that_says_so(short_tmp):
    """gRPC would share the port (SO_REUSEPORT) and split the clients between two agents."""
    (short_tmp / "a").mkdir()
    (short_tmp / "b").mkdir()
    first = Setup(short_tmp / "a", listen_address="127.0.0.1:0", disable_tls=True)
    async with first.server:
        second = Setup(short_tmp / "b", listen_address=f"127.0.0.1:{first.server.tcp_port}",
                       disable_tls=True)
        with pytest.raises(MeshagentError, match="cannot listen on 127.0.0.1:"):
            await second.server.start()
        assert not (short_tmp / "b" / "h.sock").exists()


async def test_tcp_without_tls_warns(short_tmp, caplog):
    setup = Setup(short_tmp, listen_address="127.0.0.1:0", disable_tls=True)
    with caplog.at_level(logging.WARNING, logger="meshagent.observe.server"):
        async with setup.server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{setup.server.tcp_port}") as ch:
                assert (await _status(ch)).num_flows == 3
    assert "WITHOUT TLS" in caplog.text


# --- in the agent --------------------------------------------------------------------------

async def test_the_agent_serves_hubble_beside_its_api_socket(agent_factory, short_tmp):
    running = await agent_factory(["--plugins", "memory", "--cluster-name", "c1",
                                   "--node-name", "n1", "--node-ip", "10.9.0.1"])
    path = short_tmp / "agent0-hubble.sock"
    assert running.agent.config.get("hubble-socket-path") == path
    hubble = [s for s in running.agent.status().sections if s.name == "Hubble"]
    assert [(s.health, s.summary) for s in hubble] == [
        (Health.OK, f"Current/Max Flows: 0/4095, seen 0; serving unix:{path}")]
    running.agent.flow_events.lost(3)  # what a datapath says when its perf buffer overflowed
    hubble = [s for s in running.agent.status().sections if s.name == "Hubble"]
    assert hubble[0].summary == (f"Current/Max Flows: 0/4095, seen 0, 3 events lost by the"
                                 f" datapath; serving unix:{path}")
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        status = await _status(channel)
        assert status.num_connected_nodes.value == 1 and status.uptime_ns > 0
        call = observer_pb2_grpc.ObserverStub(channel).GetFlows(
            observer_pb2.GetFlowsRequest(), timeout=CALL_TIMEOUT)
        assert [r async for r in call] == []  # no datapath: no flow events
        nodes = await observer_pb2_grpc.ObserverStub(channel).GetNodes(
            observer_pb2.GetNodesRequest(), timeout=CALL_TIMEOUT)
        assert [(n.name, n.state) for n in nodes.nodes] == [("c1/n1", relay_pb2.NODE_CONNECTED)]
        notify = peer_pb2_grpc.PeerStub(channel).Notify(peer_pb2.NotifyRequest(),
                                                        timeout=CALL_TIMEOUT)
        first = await notify.read()  # the agent's own node, from the node table
        assert (first.name, first.address, first.type) == ("c1/n1", "10.9.0.1",
                                                           peer_pb2.PEER_ADDED)
        notify.cancel()
        # streams still open at shutdown (a follow, a Notify) do not hold the agent up
        follow = observer_pb2_grpc.ObserverStub(channel).GetFlows(
            observer_pb2.GetFlowsRequest(follow=True))
        notify = peer_pb2_grpc.PeerStub(channel).Notify(peer_pb2.NotifyRequest())
        await notify.read()
        await running.stop()
        for call in (follow, notify):
            with pytest.raises(grpc.aio.AioRpcError):
                await call.read()
    assert not path.exists()


async def test_enable_hubble_false_serves_nothing(agent_factory, short_tmp):
    running = await agent_factory(["--plugins", "memory", "--enable-hubble=false"])
    assert not (short_tmp / "agent0-hubble.sock").exists()
    hubble = [s for s in running.agent.status().sections if s.name == "Hubble"]
    assert [(s.health, s.summary) for s in hubble] == [(Health.DISABLED, "--enable-hubble=false")]


def test_tcp_needs_certificates_or_disable_tls():
    from meshagent.cli import build_agent
    with pytest.raises(UsageError, match="--hubble-tls-cert-file"):
        build_agent(["--plugins", "memory", "--hubble-listen-address", ":4244"], {})
    with pytest.raises(UsageError, match="HOST must be an IP address"):
        build_agent(["--plugins", "memory", "--hubble-listen-address", "example.com:4244",
                     "--hubble-disable-tls"], {})
    agent = build_agent(["--plugins", "memory", "--hubble-listen-address", ":4244",
                         "--hubble-disable-tls"], {})
    assert agent.hubble.options.listen_address == ":4244" and not agent.hubble.options.tls


def test_the_default_agent_uses_the_run_dirs_hubble_socket():
    from meshagent.client import DEFAULT_SOCKET
    from meshagent.runtime.config import default_hubble_socket
    assert str(default_hubble_socket(DEFAULT_SOCKET)) == "/var/run/meshagent/hubble.sock"


async def test_nodes_of_a_connected_cluster_are_peers(agent_factory, short_tmp):
    """Through the agent: the remote cluster's nodes come from the mesh into the node table,
    and from there into GetNodes and Notify."""
    store2 = f"hubble-{short_tmp.name}-2"
    mesh = short_tmp / "mesh"
    mesh.mkdir()
    (mesh / "cluster2").write_text(f"kvstore: memory\nmemory-store: {store2}\n")
    await agent_factory(["--plugins", "memory", "--memory-store", store2,
                         "--cluster-name", "cluster2", "--cluster-id", "102",
                         "--node-name", "node1", "--node-ip", "10.2.0.1"])
    a1 = await agent_factory(["--plugins", "memory", "--memory-store", f"{store2}-1",
                              "--cluster-name", "cluster1", "--cluster-id", "101",
                              "--node-name", "node1", "--node-ip", "10.1.0.1",
                              "--clustermesh-config", str(mesh)])
    remote = a1.agent.clustermesh.remotes["cluster2"]
    await eventually(lambda: remote.ready, 5, "cluster2 ready")
    async with grpc.aio.insecure_channel(f"unix:{short_tmp / 'agent1-hubble.sock'}") as channel:
        observer = observer_pb2_grpc.ObserverStub(channel)
        nodes = (await observer.GetNodes(observer_pb2.GetNodesRequest(),
                                         timeout=CALL_TIMEOUT)).nodes
        assert [(n.name, n.address, n.state) for n in nodes] == [
            ("cluster1/node1", "10.1.0.1:4244", relay_pb2.NODE_CONNECTED),
            ("cluster2/node1", "10.2.0.1:4244", relay_pb2.UNKNOWN_NODE_STATE)]
        notify = peer_pb2_grpc.PeerStub(channel).Notify(peer_pb2.NotifyRequest(),
                                                        timeout=CALL_TIMEOUT)
        assert [(await notify.read()).name for _ in range(2)] == ["cluster1/node1",
                                                                  "cluster2/node1"]
        store = shared_store(store2)
        store.write(kvkeys.node_key("cluster2", "node2"), node_to_json(
            Node("node2", "cluster2", 102, ipaddress.ip_address("10.2.0.2"))), None)
        added = await notify.read()
        assert (added.name, added.address, added.type) == ("cluster2/node2", "10.2.0.2",
                                                           peer_pb2.PEER_ADDED)
        store.remove(kvkeys.node_key("cluster2", "node2"))
        deleted = await notify.read()
        assert (deleted.name, deleted.type) == ("cluster2/node2", peer_pb2.PEER_DELETED)
        notify.cancel()


async def test_a_flow_event_reaches_a_hubble_client(agent_factory, short_tmp):
    """The whole path in one agent: datapath event -> observer -> GetFlows -> jsonpb line."""
    running = await agent_factory(["--plugins", "memory", "--cluster-name", "c1",
                                   "--node-name", "n1"])
    async with grpc.aio.insecure_channel(f"unix:{short_tmp / 'agent0-hubble.sock'}") as channel:
        follow = observer_pb2_grpc.ObserverStub(channel).GetFlows(
            observer_pb2.GetFlowsRequest(follow=True, whitelist=[flow_pb2.FlowFilter(
                verdict=[flow_pb2.DROPPED])]), timeout=CALL_TIMEOUT)
        async with asyncio.timeout(CALL_TIMEOUT):  # the follower is registered
            while not running.agent.observer.followers:
                await asyncio.sleep(0.01)
        for verdict, reason in ((FORWARDED, "forwarded"), (DROPPED, "policy_default")):
            running.agent.flow_events.publish(FlowEvent(
                1_700_000_000_123_456_789, DROP if verdict == DROPPED else POLICY_VERDICT,
                verdict, reason, 7, "ingress", "10.1.0.20", 40000, "10.1.0.9", 80, 6, 0x02,
                2, 2))
        response = await follow.read()
        follow.cancel()
    doc = json.loads(jsonformat.response_json(response))
    assert list(doc) == ["flow", "node_name", "time"]
    assert (doc["node_name"], doc["time"]) == ("c1/n1", "2023-11-14T22:13:20.123456789Z")
    flow = doc["flow"]
    assert list(flow)[:3] == ["time", "uuid", "verdict"]  # declaration order
    assert (flow["verdict"], flow["drop_reason_desc"]) == ("DROPPED", "POLICY_DENIED")
    assert flow["l4"] == {"TCP": {"source_port": 40000, "destination_port": 80,
                                  "flags": {"SYN": True}}}
