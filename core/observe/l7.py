"""The DNS proxy's records as Hubble L7 flows (``Type: L7``, monitor message 129, a
``Layer7.dns`` record), as Hubble's ``pkg/hubble/parser/seven`` makes them of Cilium's access
log: the request from the endpoint to the server, the response back; a question refused by
the rules is a DROPPED request."""

import uuid

from google.protobuf.wrappers_pb2 import BoolValue

from meshagent.fqdn.record import MESSAGE_ACCESS_LOG, DNSRecord
from meshagent.observe.api.flow import flow_pb2
from meshagent.observe.names import Names

#: Cilium's access-log verdicts as Hubble's (decodeVerdict)
VERDICTS = {"Forwarded": flow_pb2.FORWARDED, "Denied": flow_pb2.DROPPED,
            "Error": flow_pb2.ERROR}


def dns_flow(record: DNSRecord, node_name: str, names: Names) -> flow_pb2.Flow:
    flow = flow_pb2.Flow()
    flow.uuid = str(uuid.uuid4())
    flow.Type = flow_pb2.L7
    flow.node_name = node_name
    flow.time.seconds, flow.time.nanos = divmod(int(record.time * 1e9), 1_000_000_000)
    flow.verdict = VERDICTS.get(record.verdict, flow_pb2.VERDICT_UNKNOWN)
    flow.event_type.type = MESSAGE_ACCESS_LOG
    request = record.type == "Request"
    ends = [(record.endpoint_ip, record.endpoint_port, record.endpoint_identity),
            (record.server_ip, record.server_port, record.server_identity)]
    if not request:
        ends.reverse()
    (src_ip, src_port, src_id), (dst_ip, dst_port, dst_id) = ends
    flow.IP.source, flow.IP.destination = src_ip, dst_ip
    flow.IP.ipVersion = flow_pb2.IPv6 if ":" in src_ip else flow_pb2.IPv4
    layer4 = flow.l4.TCP if record.protocol == "TCP" else flow.l4.UDP
    layer4.source_port, layer4.destination_port = src_port, dst_port
    names.end(src_ip, src_id).fill(flow.source)
    names.end(dst_ip, dst_id).fill(flow.destination)
    flow.traffic_direction = flow_pb2.EGRESS
    flow.is_reply.CopyFrom(BoolValue(value=not request))
    flow.reply = not request
    flow.l7.type = flow_pb2.REQUEST if request else flow_pb2.RESPONSE
    dns = flow.l7.dns
    dns.query = record.query
    dns.ips.extend(record.ips)
    dns.ttl = record.ttl
    dns.cnames.extend(record.cnames)
    dns.observation_source = "proxy"
    dns.rcode = int(record.rcode)
    dns.qtypes.extend(record.qtypes)
    dns.rrtypes.extend(record.rrtypes)
    qtypes = ",".join(record.qtypes)
    if request:
        flow.Summary = f"DNS Query {record.query} {qtypes}"
    elif record.rcode:
        flow.Summary = (f"DNS Answer RCode: {record.rcode} TTL: {record.ttl}"
                        f" (Proxy {record.query} {qtypes})")
    else:
        flow.Summary = (f"DNS Answer \"{','.join(record.ips)}\" TTL: {record.ttl}"
                        f" (Proxy {record.query} {qtypes})")
    return flow
