"""Hubble's protobuf definitions and JSON output: generated code in step with its .proto,
Cilium's numbering, and a real ``hubble observe -o jsonpb`` line read and printed back."""

import importlib.util
import json
import pathlib

import pytest
from google.protobuf import json_format
from google.protobuf.internal import encoder

from meshagent.observe import jsonformat
from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.api.observer import observer_pb2
from meshagent.observe.api.peer import peer_pb2
from meshagent.observe.api.relay import relay_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "hubble"


def _genproto():
    spec = importlib.util.spec_from_file_location("genproto", ROOT / "scripts" / "genproto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_code_is_what_make_proto_generates(tmp_path):
    """Nobody edits a .proto without regenerating, nor a generated file by hand."""
    genproto = _genproto()
    written = genproto.generate(tmp_path)
    assert len(written) == 10
    for path in written:
        committed = genproto.API / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), f"{committed}: run make proto"
    generated = {p.relative_to(genproto.API) for p in genproto.API.rglob("*_pb2*")}
    assert generated == {p.relative_to(tmp_path) for p in written}


def test_package_and_service_names_give_hubbles_method_paths():
    observer = observer_pb2.DESCRIPTOR.services_by_name["Observer"]
    assert observer.full_name == "observer.Observer"
    assert sorted(m.name for m in observer.methods) == ["GetFlows", "GetNodes", "ServerStatus"]
    assert peer_pb2.DESCRIPTOR.services_by_name["Peer"].full_name == "peer.Peer"
    assert flow_pb2.Flow.DESCRIPTOR.full_name == "flow.Flow"
    assert relay_pb2.NodeStatusEvent.DESCRIPTOR.full_name == "relay.NodeStatusEvent"


# (message, field, number) from cilium/cilium api/v1/flow/flow.proto and observer.proto
CILIUM_NUMBERS = [
    (flow_pb2.Flow, "time", 1), (flow_pb2.Flow, "verdict", 2), (flow_pb2.Flow, "IP", 5),
    (flow_pb2.Flow, "l4", 6), (flow_pb2.Flow, "source", 8), (flow_pb2.Flow, "destination", 9),
    (flow_pb2.Flow, "Type", 10), (flow_pb2.Flow, "node_name", 11),
    (flow_pb2.Flow, "event_type", 19), (flow_pb2.Flow, "traffic_direction", 22),
    (flow_pb2.Flow, "policy_match_type", 23), (flow_pb2.Flow, "drop_reason_desc", 25),
    (flow_pb2.Flow, "is_reply", 26), (flow_pb2.Flow, "uuid", 34),
    (flow_pb2.Flow, "egress_allowed_by", 21001), (flow_pb2.Flow, "ingress_allowed_by", 21002),
    (flow_pb2.Flow, "egress_denied_by", 21004), (flow_pb2.Flow, "ingress_denied_by", 21005),
    (flow_pb2.Endpoint, "cluster_name", 7), (flow_pb2.Endpoint, "pod_name", 5),
    (flow_pb2.FlowFilter, "source_pod", 2), (flow_pb2.FlowFilter, "verdict", 5),
    (flow_pb2.FlowFilter, "source_cluster_name", 37),
    (flow_pb2.FlowFilter, "destination_cluster_name", 38),
    (observer_pb2.GetFlowsRequest, "follow", 3), (observer_pb2.GetFlowsRequest, "whitelist", 6),
    (observer_pb2.GetFlowsRequest, "since", 7), (observer_pb2.GetFlowsResponse, "node_name", 1000),
    (observer_pb2.GetFlowsResponse, "time", 1001), (peer_pb2.ChangeNotification, "tls", 4),
]


@pytest.mark.parametrize("message,field,number", CILIUM_NUMBERS,
                         ids=[f"{m.DESCRIPTOR.name}.{f}" for m, f, _ in CILIUM_NUMBERS])
def test_field_numbers_are_ciliums(message, field, number):
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def test_enum_numbers_are_ciliums():
    assert flow_pb2.DropReason.Value("POLICY_DENIED") == 133
    assert flow_pb2.DropReason.Value("POLICY_DENY") == 181
    assert flow_pb2.DropReason.Value("DROP_PUNT_PROXY") == 205
    assert flow_pb2.Verdict.Value("AUDIT") == 4
    assert flow_pb2.TraceObservationPoint.Value("TO_ENDPOINT") == 101
    assert relay_pb2.NodeState.Value("NODE_CONNECTED") == 1
    assert peer_pb2.ChangeNotificationType.Value("PEER_UPDATED") == 3


def _fixture_line() -> str:
    text = (FIXTURES / "observe-jsonpb.jsonl").read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    return text.removesuffix("\n")


def test_a_real_jsonpb_line_parses_with_no_unknown_field():
    response = json_format.Parse(_fixture_line(), observer_pb2.GetFlowsResponse(),
                                 ignore_unknown_fields=False)
    flow = response.flow
    assert flow.verdict == flow_pb2.DROPPED
    assert flow.drop_reason_desc == flow_pb2.POLICY_DENIED
    assert flow.IP.ipVersion == flow_pb2.IPv4
    assert (flow.l4.TCP.source_port, flow.l4.TCP.destination_port) == (44916, 80)
    assert flow.l4.TCP.flags.SYN and not flow.l4.TCP.flags.ACK
    assert flow.destination.pod_name == "deathstar-7848d6c4d5-th9v2"
    assert flow.time.nanos == 510175415
    assert response.node_name == "kind-kind/kind-worker"


def test_a_real_jsonpb_line_prints_back_byte_for_byte():
    line = _fixture_line()
    response = json_format.Parse(line, observer_pb2.GetFlowsResponse())
    assert jsonformat.response_json(response) == line
    # -o json prints the flow alone, the same way
    assert jsonformat.flow_json(response.flow) == json.dumps(
        json.loads(line)["flow"], separators=(",", ":"))


def test_keys_follow_declaration_order_not_field_numbers():
    """protojson's order: cluster_name (7) is declared after identity (2)."""
    flow = flow_pb2.Flow(source=flow_pb2.Endpoint(ID=3, identity=5, cluster_name="c1",
                                                  namespace="ns", pod_name="p"))
    assert jsonformat.flow_json(flow) == (
        '{"source":{"ID":3,"identity":5,"cluster_name":"c1","namespace":"ns","pod_name":"p"}}')
    # python's own printer would put cluster_name last: the reordering is what makes it right
    assert list(json_format.MessageToDict(flow, preserving_proto_field_name=True)["source"])[-1] \
        == "cluster_name"


def test_go_encoder_details():
    flow = flow_pb2.Flow(socket_cookie=5, source=flow_pb2.Endpoint(labels=["k8s:a=<b>&c",
                                                                          "é\u2028"]),
                         auth_type=flow_pb2.SPIRE, is_reply={"value": False})
    # auth_type (35) is declared before ethernet (4); 64-bit as a string; a set BoolValue
    # false is printed; HTML characters escaped as Go does, non-ASCII left as is.
    assert jsonformat.flow_json(flow) == (
        '{"auth_type":"SPIRE","source":{"labels":["k8s:a=\\u003cb\\u003e\\u0026c","é\\u2028"]},'
        '"is_reply":false,"socket_cookie":"5"}')


def test_fields_a_newer_hubble_adds_survive_a_round_trip():
    """A real Hubble may send fields we left out: protobuf keeps them as unknown fields."""
    flow = flow_pb2.Flow(verdict=flow_pb2.FORWARDED)
    # field 39 (Flow.encap in the newest Cilium), length-delimited, 2 bytes of content
    extra = encoder.TagBytes(39, 2) + bytes([2, 8, 1])
    data = flow.SerializeToString() + extra
    parsed = flow_pb2.Flow.FromString(data)
    assert parsed.verdict == flow_pb2.FORWARDED
    assert parsed.SerializeToString() == data
