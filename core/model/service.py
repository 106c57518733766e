"""A service: frontends balanced over backends, possibly across clusters.

Published as Cilium's ClusterService under ``cilium/state/services/v1/<cluster>/<ns>/<name>``.
"""

import json

import attrs

from meshagent.events import ChangeKind
from meshagent.model.jsonfields import GoNames, field, ip_address, load_object
from meshagent.model.net import Address


@attrs.frozen
class Frontend:
    ip: Address
    port: int
    protocol: str = "TCP"
    name: str = ""  # the Service's port name ("": an unnamed port): backends are matched by it


@attrs.frozen
class Backend:
    ip: Address
    port: int
    cluster: str
    protocol: str = "TCP"
    name: str = ""  # the port name its EndpointSlice gives it

    def serves(self, frontend: Frontend) -> bool:
        """Whether a frontend's connections may go here: the same port name (how Cilium up to
        1.17 matches a remote cluster's backends to a frontend: ``pkg/k8s/watchers/service.go``,
        ``genCartesianProduct``), protocol and address family."""
        return (self.name == frontend.name and self.protocol == frontend.protocol
                and self.ip.version == frontend.ip.version)


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
    # the Service's own labels and its pod selector (Kubernetes' spec.selector), as sorted
    # (key, value) pairs: what toServices rules match and translate (docs/policy.md)
    labels: tuple[tuple[str, str], ...] = ()
    selector: tuple[tuple[str, str], ...] = ()


def service_to_json(service: Service) -> bytes:
    """Cilium's ClusterService (``pkg/clustermesh/store/store.go``): ports keyed by their
    Service port name, frontends and backends keyed by address, both families."""
    def ports(items):
        out: dict = {}
        for item in items:
            out.setdefault(str(item.ip), {})[item.name] = {"Protocol": item.protocol,
                                                          "Port": item.port}
        return out
    doc = {"cluster": service.cluster, "namespace": service.namespace, "name": service.name,
           "frontends": ports(service.frontends), "backends": ports(service.backends),
           "hostnames": {}, "labels": dict(service.labels), "selector": dict(service.selector),
           "includeExternal": service.global_,
           "shared": service.shared, "clusterID": service.cluster_id}
    return json.dumps(doc, separators=(",", ":")).encode()


# Cilium's ClusterService and loadbalancer.L4Addr, as encoding/json reads them
SERVICE_FIELDS = GoNames("cluster", "namespace", "name", "frontends", "backends", "labels",
                         "selector", "includeExternal", "shared", "clusterID")
PORT_FIELDS = GoNames("Protocol", "Port")


def service_from_json(data: bytes) -> Service:
    """Decode a ClusterService as a Cilium agent does (absent booleans are false)."""
    doc = load_object(data, SERVICE_FIELDS)
    cluster = field(doc, "cluster", str)

    def ports(what):
        out = []
        for ip, by_name in field(doc, what, dict, required=False, default={}).items():
            address = ip_address(ip, what)
            if by_name is None:
                continue
            if not isinstance(by_name, dict):
                raise ValueError(f"field {what!r}: ports of {ip} must be an object")
            for name, port in by_name.items():
                if port is None:
                    continue
                if not isinstance(port, dict):
                    raise ValueError(f"field {what!r}: a port of {ip} must be an object")
                port = PORT_FIELDS.match(port)
                number = field(port, "Port", int)
                if not 0 < number < 65536:
                    raise ValueError(f"field {what!r}: port {number} out of range")
                out.append((address, number, field(port, "Protocol", str, required=False,
                                                   default="TCP").upper(), name))
        return sorted(out, key=lambda item: (item[0].version, item[0], *item[1:]))

    def string_map(what):
        found = field(doc, what, dict, required=False, default={})
        for key, value in found.items():
            if not isinstance(value, str):
                raise ValueError(f"field {what!r}: the value of {key!r} must be a string")
        return tuple(sorted(found.items()))

    return Service(
        namespace=field(doc, "namespace", str), name=field(doc, "name", str), cluster=cluster,
        frontends=tuple(Frontend(ip, port, proto, name)
                        for ip, port, proto, name in ports("frontends")),
        backends=tuple(Backend(ip, port, cluster, proto, name)
                       for ip, port, proto, name in ports("backends")),
        global_=field(doc, "includeExternal", bool, required=False, default=False),
        shared=field(doc, "shared", bool, required=False, default=False),
        cluster_id=field(doc, "clusterID", int, required=False, default=0),
        labels=string_map("labels"), selector=string_map("selector"),
    )


@attrs.frozen
class MergedService:
    """What the datapath balances: a local service's frontends over the chosen backends."""

    service: Service
    backends: tuple[Backend, ...]  # after merging and affinity
    remote_backends: int
    conflicts: tuple[str, ...] = ()

    def balanced(self) -> list[tuple[Frontend, list[Backend]]]:
        """Each frontend the datapaths balance (IPv4 ones: docs/dual-stack.md) with the
        backends that serve it."""
        return [(frontend, [b for b in self.backends if b.serves(frontend)])
                for frontend in self.service.frontends if frontend.ip.version == 4]


@attrs.frozen
class ServiceUpdate:
    """What a service source yields."""

    kind: ChangeKind
    service: Service
