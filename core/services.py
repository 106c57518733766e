"""Services: the cluster's own (from ``meshagent service apply``), and global ones merged
across clusters.

A service applied to any agent is stored in the cluster's kvstore
(``meshagent/services/v1/<ns>/<name>``), so every agent of the cluster knows it; source plugins
(Kubernetes Services) feed more. A global, shared one is exported as Cilium's ClusterService under
``cilium/state/services/v1/<cluster>/<ns>/<name>``, where remote clusters' agents find it through
ClusterMesh: every agent reconciles that prefix to what it knows (the same writes from each, as
idempotent as Cilium's operator doing it once). Each agent merges the backends of its cluster's global services with those of the
same namespace/name from every remote cluster, by the annotations:

- ``service.cilium.io/global: "true"`` (old alias ``io.cilium/global-service``): merge at all;
- ``service.cilium.io/shared`` (default true): false keeps this cluster's backends to itself;
- ``service.cilium.io/affinity``: ``local`` prefers local backends while any exist, ``remote``
  prefers remote ones, ``none`` (default) uses all.
"""

import asyncio
import ipaddress
import json
import logging
from collections.abc import Iterable, Sequence

import attrs
import yaml

from meshagent import hookimpl, kvkeys
from meshagent.cluster import ClusterInfo
from meshagent.clustersync import Tables
from meshagent.controller import Controller, ControllerHandle
from meshagent.datapath import Datapath
from meshagent.errors import UsageError
from meshagent.events import ChangeKind
from meshagent.kvstore import KVStore
from meshagent.kvsync import follow_prefix
from meshagent.service import Backend, Frontend, MergedService, Service, service_to_json
from meshagent.status import Health, StatusSection

log = logging.getLogger(__name__)

PREFIX = "meshagent/services/v1/"
GLOBAL = ("service.cilium.io/global", "io.cilium/global-service")
SHARED = "service.cilium.io/shared"
AFFINITY = "service.cilium.io/affinity"
PROTOCOLS = ("TCP", "UDP", "SCTP")


class ServiceError(UsageError):
    """A service document is invalid; the message names it and the problem."""


@attrs.frozen
class ServiceUpdate:
    """What a service source yields."""

    kind: ChangeKind
    service: Service


# -- parsing Kubernetes documents ------------------------------------------------------------------


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
    an error. Only ready endpoints of IPv4 EndpointSlices are backends."""
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
                             where))
        elif kind == "EndpointSlice":
            owner = (meta.get("labels") or {}).get("kubernetes.io/service-name", name)
            if doc.get("addressType", "IPv4") != "IPv4":
                continue
            for endpoint in doc.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                for address in endpoint.get("addresses") or []:
                    for port in doc.get("ports") or []:
                        backends.setdefault((namespace, owner), []).append(
                            (address, port.get("port"), port.get("protocol", "TCP"), where))
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
    try:
        cluster_ip = ipaddress.IPv4Address(spec.get("clusterIP"))
    except (ipaddress.AddressValueError, ValueError):
        raise ServiceError(f"{where}: spec.clusterIP {spec.get('clusterIP')!r} is not an IPv4"
                           " address") from None
    frontends = []
    for j, port in enumerate(spec.get("ports") or []):
        number, protocol = port.get("port"), port.get("protocol", "TCP")
        if not isinstance(number, int) or not 0 < number < 65536:
            raise ServiceError(f"{where}: spec.ports[{j}].port must be 1..65535")
        if protocol not in PROTOCOLS:
            raise ServiceError(f"{where}: spec.ports[{j}].protocol must be one of"
                               f" {', '.join(PROTOCOLS)}")
        frontends.append(Frontend(cluster_ip, number, protocol))
    if not frontends:
        raise ServiceError(f"{where}: spec.ports needs at least one port")
    found = []
    for ip, port, protocol, source in backends.get((namespace, meta["name"]), []):
        try:
            address = ipaddress.IPv4Address(ip)
        except (ipaddress.AddressValueError, ValueError):
            raise ServiceError(f"{source}: backend address {ip!r} is not IPv4") from None
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ServiceError(f"{source}: backend port {port!r} must be 1..65535")
        found.append(Backend(address, port, cluster, protocol))
    return Service(namespace, meta["name"], cluster, tuple(frontends), tuple(sorted(
        set(found), key=lambda b: (b.ip, b.port))),
        global_=_bool_annotation(annotations, GLOBAL, False, where),
        shared=_bool_annotation(annotations, SHARED, True, where), affinity=affinity)


# -- the manager -----------------------------------------------------------------------------------


def _model_to_json(service: Service) -> bytes:
    return json.dumps({"service": json.loads(service_to_json(service)),
                       "affinity": service.affinity}).encode()


def _model_from_json(data: bytes, cluster: str) -> Service:
    from meshagent.service import service_from_json
    doc = json.loads(data)
    service = service_from_json(json.dumps(doc["service"]).encode())
    return attrs.evolve(service, affinity=doc.get("affinity", "none"), cluster=cluster)


class ServiceManager:
    def __init__(self, store: KVStore, cluster: ClusterInfo, pod_cidrs: Sequence,
                 tables: Tables, agent_ready: asyncio.Event):
        self.store = store
        self.cluster = cluster
        self.pod_cidrs = tuple(pod_cidrs)  # this node's (--pod-cidr)
        self.tables = tables
        self.agent_ready = agent_ready
        self.local: dict[tuple[str, str], Service] = {}  # stored in the cluster's kvstore
        self.sourced: dict[tuple[str, str], Service] = {}  # from source plugins
        self.merged: dict[tuple[str, str], MergedService] = {}
        self.rejected: dict[str, str] = {}
        self._changed = asyncio.Event()
        self.exports: dict[str, bytes] = {}  # ClusterService key -> value, for remote clusters
        self.backend_ips: set = set()  # every backend address a merge looks at
        self._written: dict[str, bytes] = {}  # what this agent exported
        self._swept = False
        self.sources = 0  # service source plugins feeding this agent
        self.refused_updates: dict[tuple[str, str], tuple[str, Service]] = {}
        self._export_wake = asyncio.Event()

    # -- apply / delete (API) -------------------------------------------------------------------

    def validate(self, service: Service) -> None:
        cidrs = list(self.pod_cidrs)
        cidrs += [c for node in self.tables.nodes.values()
                  if node.cluster == self.cluster.name for c in node.pod_cidrs]
        cidrs = list(dict.fromkeys(cidrs))
        for backend in service.backends:
            if not any(backend.ip in cidr for cidr in cidrs):
                raise ServiceError(
                    f"service {service.namespace}/{service.name}: backend {backend.ip} is"
                    f" outside every pod CIDR of cluster {self.cluster.name}"
                    f" ({', '.join(map(str, cidrs)) or 'none known'})")

    async def apply(self, text: str, source: str) -> list[Service]:
        services = parse_services(text, self.cluster.name, source)
        for service in services:
            self.validate(service)
        for service in services:
            await self.store.put(f"{PREFIX}{service.namespace}/{service.name}",
                                         _model_to_json(service))
        return services

    async def delete(self, namespace: str, name: str) -> bool:
        return await self.store.delete(f"{PREFIX}{namespace}/{name}")

    # -- the cluster's services, from the kvstore -----------------------------------------------

    # -- hooks (registered as plugin ``core.services``) ------------------------------------------

    @hookimpl
    def meshagent_controllers(self, agent):
        controllers = [Controller("service-sync", self.sync),
                       Controller("service-export", self.export)]
        for plugin, source in agent.hooks.service_sources(agent):
            controllers.append(Controller(
                f"service-source-{plugin}",
                lambda h, s=source, p=plugin: self.run_source(s, h, p)))
        return controllers

    @hookimpl
    def meshagent_service_changed(self, kind, service):
        self.service_changed(kind, service)

    @hookimpl
    def meshagent_ipcache_changed(self, kind, entry):
        if entry.prefix.prefixlen == 32 and entry.prefix.network_address in self.backend_ips:
            self.remerge()  # backends follow their endpoints

    @hookimpl
    def meshagent_node_changed(self, kind, node):
        if node.cluster == self.cluster.name and self.refused_updates:
            self.revalidate()  # a new pod CIDR may admit a refused service

    @hookimpl
    def meshagent_status(self):
        merged = self.merged.values()
        problems = [f"{m.service.namespace}/{m.service.name}: {c}" for m in merged
                    for c in m.conflicts]
        problems += [f"{key}: {why}" for key, why in sorted(self.rejected.items())]
        summary = (f"{len(self.merged)} services, {self.global_count()} global,"
                   f" {sum(m.remote_backends for m in merged)} remote backends")
        if problems:
            summary += f"; {len(problems)} problems"
        return StatusSection("Services", Health.WARNING if problems else Health.OK, summary,
                             details=problems)

    async def sync(self, handle: ControllerHandle) -> None:
        """Controller: the cluster's services, listed then watched in its kvstore."""
        await follow_prefix(self.store, PREFIX, self._apply_stored,
                            lambda: [f"{PREFIX}{ns}/{name}" for ns, name in self.local],
                            handle.ready)

    def _apply_stored(self, key: str, value: bytes | None) -> None:
        namespace, _, name = key[len(PREFIX):].partition("/")
        if value is None:
            self.local.pop((namespace, name), None)
        else:
            try:
                self.local[(namespace, name)] = _model_from_json(value, self.cluster.name)
                self.rejected.pop(key, None)
            except (ValueError, KeyError, TypeError) as exc:
                self.rejected[key] = f"malformed stored service: {exc}"
                log.error("refusing stored service %s: %s", key, exc)
                return
        self._services_changed()

    async def run_source(self, source, handle: ControllerHandle, plugin: str = "") -> None:
        """Controller: apply what a source plugin yields; a service that fails validation is
        refused (shown in status), its last good version stays, and it is checked again when
        the cluster's nodes (and so its pod CIDRs) change."""
        self.sources += 1
        handle.ready()
        async for update in source:
            key = (update.service.namespace, update.service.name)
            where = f"{plugin} service {key[0]}/{key[1]}"
            self.refused_updates.pop(key, None)
            if update.kind is ChangeKind.UPSERT:
                try:
                    self.validate(update.service)
                except ServiceError as exc:
                    self.rejected[where] = str(exc)
                    self.refused_updates[key] = (where, update.service)
                    log.error("refusing %s: %s (the last good version stays)", where, exc)
                    continue
                self.sourced[key] = attrs.evolve(update.service, cluster=self.cluster.name)
            else:
                self.sourced.pop(key, None)
            self.rejected.pop(where, None)
            self._services_changed()

    def revalidate(self) -> None:
        """The cluster's nodes changed: a sourced service refused for a backend outside every
        known pod CIDR may be fine now."""
        for key, (where, service) in list(self.refused_updates.items()):
            try:
                self.validate(service)
            except ServiceError as exc:
                self.rejected[where] = str(exc)
                continue
            del self.refused_updates[key]
            self.rejected.pop(where, None)
            self.sourced[key] = attrs.evolve(service, cluster=self.cluster.name)
            log.info("accepting %s now", where)
            self._services_changed()

    def _services_changed(self) -> None:
        exports = self._exports()
        if exports != self.exports:
            self.exports = exports
            self._export_wake.set()
        self.remerge()

    # -- export to remote clusters --------------------------------------------------------------

    def _exports(self) -> dict[str, bytes]:
        cluster = self.cluster
        return {kvkeys.service_key(cluster.name, s.namespace, s.name):
                service_to_json(attrs.evolve(s, cluster=cluster.name, cluster_id=cluster.id))
                for s in {**self.sourced, **self.local}.values() if s.global_ and s.shared}

    async def export(self, handle: ControllerHandle) -> None:
        """Controller: write this cluster's global, shared services as Cilium's ClusterServices
        for the other clusters, and take back those that stop being global or go away.

        It starts once the agent is synced. An agent with a service source then clears keys
        under ``cilium/state/services/v1/<cluster>/`` that nobody wants any more (a Service
        deleted while every agent was down); after that it deletes only what it wrote itself,
        so agents whose views differ for a moment never keep undoing each other, and it writes
        a wanted key again if the key disappears.
        """
        handle.ready()
        await self.agent_ready.wait()
        store = self.store
        if self.sources and not self._swept:
            prefix = kvkeys.service_key(self.cluster.name, "", "")[:-1]
            for kv in (await store.list_prefix(prefix)).items:
                if kv.key not in self.exports:
                    await store.delete(kv.key)
                    log.info("withdrew %s: no such global service any more", kv.key)
            self._swept = True
        while True:
            self._export_wake.clear()
            wanted = self.exports
            local = self.cluster.name
            present = {kvkeys.service_key(local, s.namespace, s.name)
                       for s in self.tables.services.values() if s.cluster == local}
            for key in self._written.keys() - wanted.keys():
                await store.delete(key)
                del self._written[key]
            for key, value in wanted.items():
                if self._written.get(key) != value or key not in present:
                    await store.put(key, value)
                    self._written[key] = value
            await self._export_wake.wait()

    # -- merging --------------------------------------------------------------------------------

    def service_changed(self, kind: ChangeKind, service: Service) -> None:
        """A remote (or exported) ClusterService changed: merge again; one of ours deleted
        behind our back is written again."""
        if kind is ChangeKind.DELETE and service.cluster == self.cluster.name:
            self._export_wake.set()
        self.remerge()

    def remerge(self) -> None:
        ours = {**self.sourced, **self.local}
        others = [s for s in self.tables.services.values()
                  if s.cluster != self.cluster.name]
        self.backend_ips = {b.ip for service in ours.values() for b in service.backends}
        self.backend_ips |= {b.ip for other in others if other.global_ and other.shared
                             and (other.namespace, other.name) in ours for b in other.backends}
        live = {entry.prefix.network_address for entry in self.tables.ipcache.values()
                if entry.prefix.prefixlen == 32 and entry.prefix.network_address
                in self.backend_ips}
        merged = merge_services(ours, others, live, self.cluster.name)
        if merged != self.merged:
            self.merged = merged
            self._changed.set()

    async def feed_datapath(self, handle: ControllerHandle, datapath: Datapath,
                            synced: asyncio.Event) -> None:
        """Controller: hand the merged services to the datapath whenever they change (after
        the datapath's first sync, so a restart changes nothing before then)."""
        handle.ready()
        await synced.wait()
        self._changed.set()
        while True:
            await self._changed.wait()
            self._changed.clear()
            await datapath.update_services(list(self.merged.values()))

    def global_count(self) -> int:
        return sum(1 for m in self.merged.values() if m.service.global_)


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
