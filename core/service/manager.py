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
import json
import logging
from collections.abc import Callable, Sequence

import attrs

from meshagent import hookimpl
from meshagent.events import ChangeKind
from meshagent.kvstore import KVStore
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstore.follow import follow_prefix
from meshagent.model.cluster import ClusterInfo
from meshagent.model.ipcache import host_key
from meshagent.model.service import MergedService, Service, service_from_json, service_to_json
from meshagent.model.table import Tables
from meshagent.runtime.controller import Controller, ControllerHandle
from meshagent.runtime.status import Health, StatusSection
from meshagent.service.kubernetes import ServiceError, parse_services
from meshagent.service.merge import merge_services

log = logging.getLogger(__name__)



def _model_to_json(service: Service) -> bytes:
    return json.dumps({"service": json.loads(service_to_json(service)),
                       "affinity": service.affinity}).encode()


def _model_from_json(data: bytes, cluster: str) -> Service:
    doc = json.loads(data)
    service = service_from_json(json.dumps(doc["service"]).encode())
    return attrs.evolve(service, affinity=doc.get("affinity", "none"), cluster=cluster)


class ServiceManager:
    def __init__(self, store: KVStore, cluster: ClusterInfo, pod_cidrs: Sequence,
                 tables: Tables, agent_ready: asyncio.Event,
                 merged_changed: Callable[[list[MergedService]], None],
                 source_plugins: Callable[[], list[tuple[str, object]]] = list,
                 policy_services: Callable[[list[Service]], None] = lambda services: None):
        self.store = store
        self.cluster = cluster
        self.pod_cidrs = tuple(pod_cidrs)  # this node's (--pod-cidr)
        self.tables = tables
        self.agent_ready = agent_ready
        # (plugin, async iterable of ServiceUpdate) of the service source plugins
        self.source_plugins = source_plugins
        self.local: dict[tuple[str, str], Service] = {}  # stored in the cluster's kvstore
        self.sourced: dict[tuple[str, str], Service] = {}  # from source plugins
        self.merged: dict[tuple[str, str], MergedService] = {}
        self.rejected: dict[str, str] = {}
        self._merged_changed = merged_changed  # the whole merged set, to the datapath feed
        # this cluster's services, to the policy repository (toServices rules)
        self._policy_services = policy_services
        self._told_policy: tuple[Service, ...] | None = None
        self._merge_soon: asyncio.Handle | None = None
        self.exports: dict[str, bytes] = {}  # ClusterService key -> value, for remote clusters
        # the ipcache keys of every backend address a merge looks at: an ipcache change is
        # matched by its key, with no address object made for each of a million entries
        self.backend_keys: set[bytes] = set()
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
            await self.store.put(kvkeys.local_service_key(service.namespace, service.name),
                                         _model_to_json(service))
        return services

    async def delete(self, namespace: str, name: str) -> bool:
        return await self.store.delete(kvkeys.local_service_key(namespace, name))

    # -- hooks (registered as plugin ``core.services``) ------------------------------------------

    @hookimpl
    def meshagent_controllers(self):
        controllers = [Controller("service-sync", self.sync),
                       Controller("service-export", self.export)]
        for plugin, source in self.source_plugins():
            controllers.append(Controller(
                f"service-source-{plugin}",
                lambda h, s=source, p=plugin: self.run_source(s, h, p)))
        return controllers

    @hookimpl
    def meshagent_service_changed(self, kind, service):
        self.service_changed(kind, service)

    @hookimpl
    def meshagent_ipcache_changes(self, changes):
        keys = self.backend_keys
        if keys and any(entry.key in keys for _, entry in changes):
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
        await follow_prefix(self.store, kvkeys.LOCAL_SERVICES, self._apply_stored,
                            lambda: [kvkeys.local_service_key(ns, name) for ns, name in self.local],
                            handle.ready)

    def _apply_stored(self, key: str, value: bytes | None) -> None:
        namespace, _, name = key[len(kvkeys.LOCAL_SERVICES):].partition("/")
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
        self.remerge()  # which exports them again too

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
        """Merge again, once at the end of this loop turn however many changes it brings: a
        remote cluster's listing of 10,000 services is one merge, not 10,000 (each of them
        over every service)."""
        if self._merge_soon is not None:
            return
        try:
            self._merge_soon = asyncio.get_running_loop().call_soon(self._merge)
        except RuntimeError:  # no loop (a synchronous caller): merge now
            self._merge()

    def _merge(self) -> None:
        self._merge_soon = None
        exports = self._exports()
        if exports != self.exports:
            self.exports = exports
            self._export_wake.set()
        ours = {**self.sourced, **self.local}
        cluster_services = tuple(ours[key] for key in sorted(ours))
        if cluster_services != self._told_policy:
            self._told_policy = cluster_services
            self._policy_services(list(cluster_services))
        others = [s for s in self.tables.services.values()
                  if s.cluster != self.cluster.name]
        backend_ips = {b.ip for service in ours.values() for b in service.backends}
        backend_ips |= {b.ip for other in others if other.global_ and other.shared
                        and (other.namespace, other.name) in ours for b in other.backends}
        self.backend_keys = {host_key(ip) for ip in backend_ips}
        # looked up per backend, not by walking the ipcache (100,000s of remote entries)
        live = {ip for ip in backend_ips
                if ip.version == 4 and self.tables.ipcache.get(host_key(ip)) is not None}
        merged = merge_services(ours, others, live, self.cluster.name)
        if merged != self.merged:
            self.merged = merged
            self._merged_changed(list(merged.values()))

    def global_count(self) -> int:
        return sum(1 for m in self.merged.values() if m.service.global_)


