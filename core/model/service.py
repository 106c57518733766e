"""A service: frontends balanced over backends, possibly across clusters.

Published as Cilium's ClusterService under ``cilium/state/services/v1/<cluster>/<ns>/<name>``.
"""

import ipaddress
import json

import attrs

from meshagent.events import ChangeKind
from meshagent.model.jsonfields import field, ipv4, load_object


@attrs.frozen
class Frontend:
    ip: ipaddress.IPv4Address
    port: int
    protocol: str = "TCP"


@attrs.frozen
class Backend:
    ip: ipaddress.IPv4Address
    port: int
    cluster: str
    protocol: str = "TCP"


@attrs.frozen
class Service:
    namespace: str
    name: str
    cluster: str
    frontends: tuple[Frontend, ...] = ()
    backends: tuple[Backend, ...] = ()
    global_: bool = False
    shared: bool = True
    affinity: str = "none"
    cluster_id: int = 0


def service_to_json(service: Service) -> bytes:
    def ports(items):
        out: dict = {}
        for item in items:
            out.setdefault(str(item.ip), {})[f"{item.protocol.lower()}-{item.port}"] = {
                "Protocol": item.protocol, "Port": item.port}
        return out
    doc = {"cluster": service.cluster, "namespace": service.namespace, "name": service.name,
           "frontends": ports(service.frontends), "backends": ports(service.backends),
           "labels": {}, "selector": {}, "includeExternal": service.global_,
           "shared": service.shared, "clusterID": service.cluster_id}
    return json.dumps(doc, separators=(",", ":")).encode()


def service_from_json(data: bytes) -> Service:
    doc = load_object(data)
    cluster = field(doc, "cluster", str)

    def ports(name):
        out = []
        for ip, by_name in field(doc, name, dict, required=False, default={}).items():
            address = ipv4(ip, name)
            if not isinstance(by_name, dict):
                raise ValueError(f"field {name!r}: ports of {ip} must be an object")
            for port in by_name.values():
                if not isinstance(port, dict):
                    raise ValueError(f"field {name!r}: a port of {ip} must be an object")
                number = field(port, "Port", int)
                if not 0 < number < 65536:
                    raise ValueError(f"field {name!r}: port {number} out of range")
                out.append((address, number, field(port, "Protocol", str, required=False,
                                                   default="TCP").upper()))
        return sorted(out)

    return Service(
        namespace=field(doc, "namespace", str), name=field(doc, "name", str), cluster=cluster,
        frontends=tuple(Frontend(ip, port, proto) for ip, port, proto in ports("frontends")),
        backends=tuple(Backend(ip, port, cluster, proto) for ip, port, proto in ports("backends")),
        global_=field(doc, "includeExternal", bool, required=False, default=False),
        shared=field(doc, "shared", bool, required=False, default=True),
        cluster_id=field(doc, "clusterID", int, required=False, default=0),
    )


@attrs.frozen
class MergedService:
    """What the datapath balances: a local service's frontends over the chosen backends."""

    service: Service
    backends: tuple[Backend, ...]  # after merging and affinity
    remote_backends: int
    conflicts: tuple[str, ...] = ()


@attrs.frozen
class ServiceUpdate:
    """What a service source yields."""

    kind: ChangeKind
    service: Service
