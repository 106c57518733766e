"""Services from Kubernetes YAML (Service and EndpointSlice documents)."""

import ipaddress

import yaml

from meshagent.errors import UsageError
from meshagent.model.service import Backend, Frontend, Service

GLOBAL = ("service.cilium.io/global", "io.cilium/global-service")
SHARED = "service.cilium.io/shared"
AFFINITY = "service.cilium.io/affinity"
PROTOCOLS = ("TCP", "UDP", "SCTP")


class ServiceError(UsageError):
    """A service document is invalid; the message names it and the problem."""


def _bool_annotation(annotations: dict, names, default: bool, where: str) -> bool:
    for name in (names if isinstance(names, tuple) else (names,)):
        if name in annotations:
            value = str(annotations[name]).lower()
            if value not in ("true", "false"):
                raise ServiceError(f"{where}: annotation {name}={annotations[name]!r} must be"
                                   " \"true\" or \"false\"")
            return value == "true"
    return default


def parse_services(text: str, cluster: str, source: str = "input") -> list[Service]:
    """Kubernetes Services with their Endpoints or EndpointSlices, as meshagent services."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ServiceError(f"{source}: not valid YAML/JSON: {exc}") from None
    return services_from_documents(docs, cluster, [f"{source} document {i}"
                                                   for i in range(1, len(docs) + 1)])


def services_from_documents(docs: list, cluster: str, names: list[str]) -> list[Service]:
    """The parsed form of :func:`parse_services`; ``names`` says what to call each document in
    an error. Only ready endpoints of IPv4 and IPv6 EndpointSlices are backends; every port
    keeps its name (Cilium matches backends to a frontend port by it)."""
    services, backends = [], {}
    for doc, where in zip(docs, names):
        if not isinstance(doc, dict):
            raise ServiceError(f"{where}: must be a mapping")
        meta = doc.get("metadata") or {}
        name, namespace = meta.get("name"), meta.get("namespace", "default")
        if not isinstance(name, str) or not name:
            raise ServiceError(f"{where}: metadata.name is required")
        kind = doc.get("kind")
        if kind == "Service":
            services.append((doc, f"{where} (Service {namespace}/{name})"))
        elif kind == "Endpoints":
            for subset in doc.get("subsets") or []:
                ports = subset.get("ports") or []
                for address in subset.get("addresses") or []:
                    for port in ports:
                        backends.setdefault((namespace, name), []).append(
                            (address.get("ip"), port.get("port"), port.get("protocol", "TCP"),
                             port.get("name") or "", where))
        elif kind == "EndpointSlice":
            owner = (meta.get("labels") or {}).get("kubernetes.io/service-name", name)
            if doc.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
                continue
            for endpoint in doc.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                for address in endpoint.get("addresses") or []:
                    for port in doc.get("ports") or []:
                        backends.setdefault((namespace, owner), []).append(
                            (address, port.get("port"), port.get("protocol", "TCP"),
                             port.get("name") or "", where))
        else:
            raise ServiceError(f"{where}: kind {kind!r} is not Service, Endpoints or"
                               " EndpointSlice")
    return [_service(doc, where, cluster, backends) for doc, where in services]


def _service(doc: dict, where: str, cluster: str, backends: dict) -> Service:
    meta, spec = doc["metadata"], doc.get("spec") or {}
    namespace = meta.get("namespace", "default")
    annotations = meta.get("annotations") or {}
    affinity = str(annotations.get(AFFINITY, "none")).lower()
    if affinity not in ("local", "remote", "none"):
        raise ServiceError(f"{where}: annotation {AFFINITY}={affinity!r} must be local, remote"
                           " or none")
    cluster_ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    addresses = []
    for text in cluster_ips:
        try:
            addresses.append(ipaddress.ip_address(text))
        except (ValueError, TypeError):
            raise ServiceError(f"{where}: spec.clusterIP {text!r} is not an IP address") from None
    frontends = []
    for j, port in enumerate(spec.get("ports") or []):
        number, protocol = port.get("port"), port.get("protocol", "TCP")
        if not isinstance(number, int) or not 0 < number < 65536:
            raise ServiceError(f"{where}: spec.ports[{j}].port must be 1..65535")
        if protocol not in PROTOCOLS:
            raise ServiceError(f"{where}: spec.ports[{j}].protocol must be one of"
                               f" {', '.join(PROTOCOLS)}")
        name = port.get("name") or ""
        if not isinstance(name, str):
            raise ServiceError(f"{where}: spec.ports[{j}].name must be a string")
        frontends += [Frontend(address, number, protocol, name) for address in addresses]
    if not frontends:
        raise ServiceError(f"{where}: spec.ports needs at least one port")
    found = []
    for ip, port, protocol, name, source in backends.get((namespace, meta["name"]), []):
        try:
            address = ipaddress.ip_address(ip)
        except (ValueError, TypeError):
            raise ServiceError(f"{source}: backend address {ip!r} is not an IP address") from None
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ServiceError(f"{source}: backend port {port!r} must be 1..65535")
        found.append(Backend(address, port, cluster, protocol, str(name)))
    return Service(namespace, meta["name"], cluster, tuple(frontends), tuple(sorted(
        set(found), key=lambda b: (b.ip.version, b.ip, b.port, b.name))),
        global_=_bool_annotation(annotations, GLOBAL, False, where),
        shared=_bool_annotation(annotations, SHARED, True, where), affinity=affinity,
        labels=_string_map(meta.get("labels"), f"{where}: metadata.labels"),
        selector=_string_map(spec.get("selector"), f"{where}: spec.selector"))


def _string_map(value, where: str) -> tuple[tuple[str, str], ...]:
    """A Kubernetes label map as sorted pairs (toServices rules match the Service's labels
    and translate its selector)."""
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ServiceError(f"{where} must map strings to strings")
    return tuple(sorted(value.items()))
