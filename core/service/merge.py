"""Merging global services across clusters (Cilium's global-service annotations)."""

from collections.abc import Iterable

from meshagent.model.net import Address, family_order
from meshagent.model.service import Backend, MergedService, Service


def merge_services(ours: dict[tuple[str, str], Service], others: Iterable[Service],
                   live: set[Address], local_cluster: str,
                   ) -> dict[tuple[str, str], MergedService]:
    """What the datapath balances for each of our services (Cilium's global services).

    A global service takes the backends of the same namespace/name from every other cluster
    that marks it global and shared; a frontend port is served by the backends whose port has
    its name (Cilium's rule: :meth:`Backend.serves`), so a remote cluster's frontends do not
    matter. A remote backend whose port names match none of ours, or whose address is one of
    our own backends', is reported as a conflict and not used. ``affinity`` local/remote
    prefers one side while any of it is alive. A backend whose address is not ``live`` (its
    endpoint went away) is never used.
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
            names = {f.name for f in service.frontends}
            own = {b.ip for b in service.backends}
            for other in remote.get(key, []):
                unmatched = sorted({b.name for b in other.backends} - names)
                if unmatched:
                    conflicts.append(f"{other.cluster}: backend port names"
                                     f" {', '.join(map(repr, unmatched))} match no port of this"
                                     f" service ({', '.join(map(repr, sorted(names)))})")
                clashes = sorted({b.ip for b in other.backends} & own, key=family_order)
                if clashes:
                    conflicts.append(f"{other.cluster}: backend addresses"
                                     f" {', '.join(map(str, clashes))} are this cluster's own;"
                                     " not used")
                remote_backends.extend(b for b in other.backends
                                       if b.ip in live and b.ip not in own and b.name in names)
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
