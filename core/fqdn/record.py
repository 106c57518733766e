"""What the DNS proxy reports of each request and response: Cilium's L7 access-log record
(``pkg/proxy/accesslog/record.go``, monitor message type 129 "l7") as ``meshagent monitor``
streams and prints it. Light on purpose: the CLI imports :func:`format_l7`."""

import time

import attrs

#: Cilium's monitor message type of proxy records (MessageTypeAccessLog).
MESSAGE_ACCESS_LOG = 129


@attrs.frozen
class DNSRecord:
    """One request (``type`` "Request") or response ("Response") the proxy handled, with
    Cilium's verdict (Forwarded, Denied, Error) and the LogRecordDNS fields."""

    type: str
    verdict: str
    info: str
    protocol: str  # "UDP" or "TCP"
    endpoint: int  # 0: no local endpoint has the source address
    endpoint_identity: int
    endpoint_labels: tuple[str, ...]
    endpoint_ip: str
    endpoint_port: int
    server_identity: int
    server_ip: str
    server_port: int
    query: str
    qtypes: tuple[str, ...]
    rcode: int = 0
    ips: tuple[str, ...] = ()
    ttl: int = 0
    cnames: tuple[str, ...] = ()
    rrtypes: tuple[str, ...] = ()
    time: float = attrs.field(factory=time.time)

    def to_json(self) -> dict:
        doc = attrs.asdict(self, value_serializer=lambda _i, _f, v:
                           list(v) if isinstance(v, tuple) else v)
        return {"type": "l7", "record": "dns", **{f"dns_{k}" if k == "type" else k: v
                                                   for k, v in doc.items()}}


def format_l7(event: dict) -> str:
    """One line of ``meshagent monitor`` for a DNS record as streamed (Cilium's text form:
    ``<- Request dns from 3459 ([...]) to 0 ([...]), identity 323->15194, verdict Forwarded
    DNS Query: cilium.io. A``)."""
    labels = f"[{' '.join(event['endpoint_labels'])}]"
    server = "[reserved:world]" if event["server_identity"] in (2, 9, 10) else "[]"
    query = f"DNS Query: {event['query']} {','.join(event['qtypes'])}"
    if event["dns_type"] == "Request":
        head = (f"<- Request dns from {event['endpoint']} ({labels}) to 0 ({server})")
    else:
        head = (f"-> Response dns to {event['endpoint']} ({labels}) from 0 ({server})")
        query += f" TTL: {event['ttl']} Answer: '{','.join(event['ips'])}'"
        if event["cnames"]:
            query += f" CNAMEs: {','.join(event['cnames'])}"
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    return (f"{stamp} {head}, identity {event['endpoint_identity']}->"
            f"{event['server_identity']}, verdict {event['verdict']} {query}")
