"""Merging global services across clusters (Cilium's global-service annotations)."""

import ipaddress
from collections.abc import Iterable

from meshagent.model.service import Backend, MergedService, Service


def merge_services(ours: dict[tuple[str, str], Service], others: Iterable[Service],
                   live: set[ipaddress.IPv4Address], local_cluster: str,
                   ) -> dict[tuple[str, str], MergedService]:
    """What the datapath balances for each of our services (Cilium's global services).

    A global service takes the backends of the same namespace/name from every other cluster
    that marks it global and shared, unless that cluster's ports differ (reported as a
    conflict); ``affinity`` local/remote prefers one side while any of it is alive. A backend
    whose address is not ``live`` (its endpoint went away) is never used.
    """
    remote: dict[tuple[str, str], list[Service]] = {}
    for service in others:
        if service.cluster != local_cluster and service.global_ and service.shared:
            remote.setdefault((service.namespace, service.name), []).append(service)
    merged = {}
    for key, service in ours.items():
        local_backends = [b for b in service.backends if b.ip in live]
        remote_backends, conflicts = [], []
        if service.global_:
            ports = {(f.port, f.protocol) for f in service.frontends}
            for other in remote.get(key, []):
                if {(f.port, f.protocol) for f in other.frontends} != ports:
                    conflicts.append(f"{other.cluster}: ports differ"
                                     f" ({_ports(other)} vs {_ports(service)}); its backends"
                                     " are not used")
                    continue
                remote_backends.extend(b for b in other.backends if b.ip in live)
        chosen = _by_affinity(service.affinity, local_backends, remote_backends)
        merged[key] = MergedService(service, tuple(chosen), len(remote_backends),
                                    tuple(conflicts))
    return merged


def _by_affinity(affinity: str, local: list[Backend], remote: list[Backend]) -> list[Backend]:
    if affinity == "local" and local:
        return local
    if affinity == "remote" and remote:
        return remote
    return local + remote


def _ports(service: Service) -> str:
    return ",".join(f"{f.port}/{f.protocol}" for f in sorted(
        service.frontends, key=lambda f: (f.port, f.protocol)))
