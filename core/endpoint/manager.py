"""Creating, restoring and deleting local endpoints: address, interface, identity, publish.

Creation is a sequence of steps, each with its undo; if a step fails the done ones are undone in
reverse, so a failed create leaves no half-made endpoint, leaked address or stray veth. Each
endpoint is saved in the state dir; after a restart it is restored without re-addressing.
"""

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import attrs

from meshagent import hookimpl
from meshagent.endpoint import podnet
from meshagent.endpoint.ipam import HostScopeIPAM
from meshagent.endpoint.options import POLICY_AUDIT_MODE, format_setting, parse_options
from meshagent.errors import MeshagentError, UsageError
from meshagent.events import ChangeKind
from meshagent.identity import IdentityAllocator
from meshagent.kvstore.publisher import Publisher
from meshagent.model.endpoint import (
    Endpoint,
    endpoint_from_json,
    endpoint_labels,
    endpoint_to_json,
)
from meshagent.model.identity import Identity
from meshagent.model.ipcache import IPCacheEntry
from meshagent.runtime.controller import Controller, ControllerHandle
from meshagent.runtime.status import Health, StatusSection

log = logging.getLogger(__name__)


class EndpointNotFound(MeshagentError):
    http_status = 404


@attrs.frozen
class EndpointRequest:
    netns: str
    namespace: str
    labels: str | list[str] = ""
    pod_ifname: str = "eth0"
    container_id: str = ""
    pod_name: str = ""


LabelSource = Callable[[str, str], Awaitable[frozenset[str]]]
"""(namespace, pod name) -> the labels plugins give that pod (the endpoint_labels hook)."""
EndpointListener = Callable[[ChangeKind, Endpoint], None]


class DatapathDoor(Protocol):
    """How endpoints reach the datapath: through its feed (:mod:`meshagent.datapath.feed`),
    its only caller. Each returns an awaitable done once the datapath applied the change (at
    once when no datapath is loaded), failing with what the datapath raised."""

    def endpoint_added(self, endpoint: Endpoint) -> Awaitable[None]: ...

    def endpoint_removed(self, endpoint: Endpoint) -> Awaitable[None]: ...


def host_interface_name(request: EndpointRequest) -> str:
    """The node-side veth of a pod: ``lxc`` and a hash of its container (or netns and
    interface), so that a retried CNI ADD finds the same name."""
    seed = request.container_id or f"{request.netns}/{request.pod_ifname}"
    return "lxc" + hashlib.sha1(seed.encode()).hexdigest()[:12]


class EndpointManager:
    """The endpoints of this node, saved under ``directory`` and handed to the datapath
    (through its feed: ``datapath``). ``policy_audit_mode`` is --policy-audit-mode: the audit
    mode of every endpoint that has no setting of its own."""

    def __init__(self, *, cluster_name: str, node_ip: ipaddress.IPv4Address | None,
                 pod_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
                 directory: Path, allocator: IdentityAllocator, publisher: Publisher,
                 datapath: DatapathDoor, datapath_started: asyncio.Event,
                 plugin_labels: LabelSource, changed: EndpointListener,
                 policy_audit_mode: bool = False):
        self.cluster_name = cluster_name
        self.policy_audit_mode = policy_audit_mode
        self.node_ip = node_ip
        self.ipam = HostScopeIPAM(tuple(pod_cidrs))
        self.allocator = allocator
        self.publisher = publisher
        self.datapath = datapath
        self.datapath_started = datapath_started
        self._labels_of = plugin_labels
        self._changed = changed
        self.endpoints: dict[int, Endpoint] = {}
        self.directory = directory
        self._lock = asyncio.Lock()
        self.restored = asyncio.Event()
        self._node_prepared = False

    async def _prepare_node(self) -> None:
        """Node-wide settings (gateway on lo, forwarding), made when the first pod needs them."""
        if not self._node_prepared:
            await asyncio.to_thread(podnet.prepare_node)
            self._node_prepared = True

    # -- create ---------------------------------------------------------------------------------

    async def create(self, request: EndpointRequest) -> Endpoint:
        labels = endpoint_labels(request.labels, request.namespace, self.cluster_name)
        if not 0 < len(request.pod_ifname) <= 15:
            raise UsageError(f"invalid interface name {request.pod_ifname!r}")
        podnet.netns_path(request.netns)  # a clear error before anything is made
        plugin_labels = await self._plugin_labels(request.namespace, request.pod_name)
        await self.restored.wait()
        async with self._lock:
            if request.container_id and self.by_container(request.container_id):
                raise UsageError(f"container {request.container_id} already has an endpoint")
            undo: list[Callable[[], Awaitable[None]]] = []
            async with _undone_on_failure(undo, "endpoint create"):
                return await self._create(request, labels | plugin_labels, plugin_labels, undo)

    async def _create(self, request: EndpointRequest, labels: frozenset[str],
                      plugin_labels: frozenset[str], undo) -> Endpoint:
        await self._prepare_node()
        endpoint_id = max(self.endpoints, default=0) + 1
        host_ifname = host_interface_name(request)
        address = self.ipam.allocate(f"endpoint {endpoint_id}")
        undo.append(lambda: _sync(self.ipam.release, address))
        address6 = None
        if self.ipam.has_family(6):  # dual stack: an address of each family
            address6 = self.ipam.allocate(f"endpoint {endpoint_id}", version=6)
            undo.append(lambda: _sync(self.ipam.release, address6))
        wired = await asyncio.to_thread(podnet.create_pod_interface, request.netns,
                                        request.pod_ifname, host_ifname, address, address6)
        undo.append(lambda: asyncio.to_thread(podnet.remove_pod_interface, host_ifname))
        identity = await self.allocator.allocate(labels)
        undo.append(lambda: self.allocator.release(identity))
        endpoint = Endpoint(
            id=endpoint_id, namespace=request.namespace, labels=labels, ipv4=address, ipv6=address6,
            identity=identity.id, ifname=host_ifname, ifindex=wired["host_ifindex"],
            netns=request.netns, pod_ifname=request.pod_ifname,
            container_id=request.container_id, pod_name=request.pod_name,
            host_mac=wired["host_mac"], pod_mac=wired["pod_mac"], plugin_labels=plugin_labels,
            policy_audit=self.policy_audit_mode)
        await self._activate(endpoint, undo)
        self._save(endpoint)
        log.info("endpoint %d created: %s in %s, identity %d", endpoint.id, address,
                 request.netns, identity.id)
        return endpoint

    async def _activate(self, endpoint: Endpoint, undo: list) -> None:
        """Publish, hand to the datapath and wait until it enforces for the endpoint (the
        CNI ADD is answered after that), announce: shared by create and restore."""
        self.endpoints[endpoint.id] = endpoint
        undo.append(lambda: _sync(self.endpoints.pop, endpoint.id, None))
        for entry in self._ipcache_entries(endpoint):
            self.publisher.upsert_ipcache(entry)
            undo.append(lambda entry=entry: _sync(self.publisher.delete_ipcache, entry))
        try:
            await self.datapath.endpoint_added(endpoint)
        finally:  # a refused endpoint may be half there: its removal undoes that part too
            undo.append(lambda: self.datapath.endpoint_removed(endpoint))
        self._changed(ChangeKind.UPSERT, endpoint)

    async def _plugin_labels(self, namespace: str, pod_name: str) -> frozenset[str]:
        if not pod_name:
            return frozenset()
        return await self._labels_of(namespace, pod_name)

    # -- labels changed elsewhere ---------------------------------------------------------------

    async def refresh_labels(self, namespace: str, pod_name: str) -> list[Endpoint]:
        """Ask the plugins again for a pod's labels; an endpoint whose labels changed gets the
        identity of its new labels (allocated before the old one is released, so the pod is
        never without one) and the datapath and the rest of the agent hear of it.

        The labels are fetched outside the endpoint lock (creates and deletes do not wait on
        the network). Returns the endpoints that changed. Raises what the label hook raises, or
        what applying the change raised after undoing it; either way nothing changed.
        """
        plugin_labels = await self._plugin_labels(namespace, pod_name)
        changed = []
        async with self._lock:
            for endpoint in [e for e in self.endpoints.values()
                             if e.pod_name == pod_name and e.namespace == namespace]:
                labels = (endpoint.labels - endpoint.plugin_labels) | plugin_labels
                if labels != endpoint.labels:
                    changed.append(await self._relabel(endpoint, labels, plugin_labels))
        return changed

    async def _relabel(self, endpoint: Endpoint, labels: frozenset[str],
                       plugin_labels: frozenset[str]) -> Endpoint:
        cluster = self.cluster_name
        identity = await self.allocator.allocate(labels)
        updated = attrs.evolve(endpoint, labels=labels, plugin_labels=plugin_labels,
                               identity=identity.id)
        try:
            await self._activate(updated, [])
        except BaseException:
            await self._activate(endpoint, [])  # back to what it was
            await self.allocator.release(identity)
            raise
        self._save(updated)
        await self.allocator.release(Identity(endpoint.identity, endpoint.labels,
                                                             cluster))
        log.info("endpoint %d (%s/%s) relabelled: identity %d -> %d", endpoint.id,
                 endpoint.namespace, endpoint.pod_name, endpoint.identity, identity.id)
        return updated

    # -- options (meshagent endpoint config) ----------------------------------------------------

    def options(self, endpoint_id: int) -> dict:
        """The endpoint's options as ``meshagent endpoint config`` shows them: ``options``,
        what is in force; ``overrides``, what the endpoint sets itself (the rest follows the
        agent's options)."""
        endpoint = self.get(endpoint_id)
        own = endpoint.policy_audit_mode
        return {"id": endpoint.id,
                "options": {POLICY_AUDIT_MODE: format_setting(endpoint.policy_audit)},
                "overrides": {} if own is None else {POLICY_AUDIT_MODE: format_setting(own)}}

    async def configure(self, endpoint_id: int, options: dict[str, str]) -> Endpoint:
        """Set endpoint options (:mod:`meshagent.endpoint.options`; ``Default`` clears one).

        Every option is checked first: UsageError naming an unknown name or value, and
        nothing changed. A changed endpoint is handed to the datapath again through its feed
        (as a relabel is), so the datapath enforces its new audit mode, then saved; if the
        datapath refuses, the endpoint is handed back as it was and the error raised.
        """
        settings = parse_options(options)
        await self.restored.wait()
        async with self._lock:
            endpoint = self.get(endpoint_id)
            updated = endpoint
            if POLICY_AUDIT_MODE in settings:
                updated = self._audit_mode(attrs.evolve(
                    endpoint, policy_audit_mode=settings[POLICY_AUDIT_MODE]))
            if updated == endpoint:
                return endpoint
            try:
                await self._activate(updated, [])
            except BaseException:
                await self._activate(endpoint, [])  # back to what it was
                raise
            self._save(updated)
            log.info("endpoint %d (%s/%s): policy audit mode %s (%s)", endpoint.id,
                     endpoint.namespace, endpoint.pod_name,
                     format_setting(updated.policy_audit).lower(), _audit_source(updated))
            return updated

    def _audit_mode(self, endpoint: Endpoint) -> Endpoint:
        """The endpoint with its effective audit mode: its own setting, else the agent's."""
        own = endpoint.policy_audit_mode
        return attrs.evolve(endpoint, policy_audit=self.policy_audit_mode if own is None
                            else own)

    @hookimpl
    def meshagent_status(self, verbose):
        """Section Endpoints: how many, and which are in policy audit mode (a warning: the
        policy is not enforced for them)."""
        audited = [e for _, e in sorted(self.endpoints.items()) if e.policy_audit]
        summary = f"{len(self.endpoints)} endpoints"
        if self.policy_audit_mode:
            summary += f", policy audit mode on (--policy-audit-mode): {len(audited)} in it"
        elif audited:
            summary += f", {len(audited)} in policy audit mode"
        details = [f"endpoint {e.id} ({e.namespace}/{e.pod_name or e.ipv4}): policy audit mode"
                   f" ({_audit_source(e)})" for e in audited]
        warn = audited or self.policy_audit_mode
        return StatusSection("Endpoints", Health.WARNING if warn else Health.OK, summary,
                             details=details)

    def _ipcache_entries(self, endpoint: Endpoint) -> list[IPCacheEntry]:
        """One per address of the endpoint (a /32, and a /128 in dual stack)."""
        return [IPCacheEntry(ipaddress.ip_network(address), endpoint.identity,
                             self.cluster_name, self.node_ip, endpoint.namespace,
                             endpoint.pod_name) for address in endpoint.addresses]

    # -- delete ---------------------------------------------------------------------------------

    async def delete(self, endpoint_id: int) -> Endpoint:
        async with self._lock:
            endpoint = self.endpoints.get(endpoint_id)
            if endpoint is None:
                raise EndpointNotFound(f"no endpoint {endpoint_id}")
            # the veth (and the programs on it) go first: until then the datapath keeps
            # enforcing for the pod, never lets its traffic pass unjudged
            await asyncio.to_thread(podnet.remove_pod_interface, endpoint.ifname)
            await self.datapath.endpoint_removed(endpoint)
            for entry in self._ipcache_entries(endpoint):
                self.publisher.delete_ipcache(entry)
            for address in endpoint.addresses:
                self.ipam.release(address)
            del self.endpoints[endpoint_id]
            (self.directory / f"{endpoint_id}.json").unlink(missing_ok=True)
            try:  # once, whatever happens: the endpoint is gone and so is its reference
                await self.allocator.release(
                    Identity(endpoint.identity, endpoint.labels, self.cluster_name))
            except Exception:
                log.exception("endpoint %d: releasing identity %d failed", endpoint_id,
                              endpoint.identity)
            self._changed(ChangeKind.DELETE, endpoint)
            log.info("endpoint %d deleted (%s)", endpoint_id, endpoint.ipv4)
            return endpoint

    # -- lookups --------------------------------------------------------------------------------

    def get(self, endpoint_id: int) -> Endpoint:
        if endpoint_id not in self.endpoints:
            raise EndpointNotFound(f"no endpoint {endpoint_id}")
        return self.endpoints[endpoint_id]

    def by_container(self, container_id: str) -> Endpoint | None:
        return next((e for e in self.endpoints.values() if e.container_id == container_id), None)

    # -- persistence and restore ----------------------------------------------------------------

    def _save(self, endpoint: Endpoint) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{endpoint.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(endpoint_to_json(endpoint))
        os.replace(tmp, path)

    @hookimpl
    def meshagent_controllers(self):
        return [Controller("endpoint-restore", self.restore)]

    async def restore(self, handle: ControllerHandle) -> None:
        """Controller: bring back the endpoints saved before a restart, as they were (once
        the datapath is started: restoring hands each endpoint to it)."""
        await self.datapath_started.wait()
        async with self._lock:
            for path in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
                await self._prepare_node()
                try:
                    saved = endpoint_from_json(path.read_text())
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("ignoring unreadable endpoint state %s: %s", path, exc)
                    continue
                if saved.id not in self.endpoints:  # not restored by an earlier, failed run
                    await self._restore_one(saved, path)
        self.restored.set()
        self.publisher.endpoints_restored()
        handle.ready()

    async def _restore_one(self, saved: Endpoint, path) -> None:
        ifindex = await asyncio.to_thread(podnet.host_interface, saved.ifname)
        if ifindex is None or not await asyncio.to_thread(
                podnet.pod_interface_present, saved.netns, saved.pod_ifname):
            log.warning("endpoint %d (%s) is gone (pod network removed while the agent was"
                        " down): cleaning up", saved.id, saved.ipv4)
            await asyncio.to_thread(podnet.remove_pod_interface, saved.ifname)
            path.unlink(missing_ok=True)
            return
        undo: list[Callable[[], Awaitable[None]]] = []
        async with _undone_on_failure(undo, f"restore of endpoint {saved.id}"):
            for address in saved.addresses:
                self.ipam.claim(address, f"endpoint {saved.id}")
                undo.append(lambda address=address: _sync(self.ipam.release, address))
            identity = await self.allocator.allocate(saved.labels)
            undo.append(lambda: self.allocator.release(identity))
            # its own audit setting was saved with it; the agent's may have changed meanwhile
            endpoint = self._audit_mode(attrs.evolve(saved, identity=identity.id,
                                                     ifindex=ifindex))
            await self._activate(endpoint, undo)
        if endpoint != saved:
            self._save(endpoint)
        log.info("endpoint %d restored: %s, identity %d", endpoint.id, endpoint.ipv4,
                 endpoint.identity)


def _audit_source(endpoint: Endpoint) -> str:
    return "--policy-audit-mode" if endpoint.policy_audit_mode is None else "set on the endpoint"


async def _sync(func, *args) -> None:
    func(*args)


@contextlib.asynccontextmanager
async def _undone_on_failure(undo: list[Callable[[], Awaitable[None]]], what: str):
    """Run the undo steps, newest first, if the block fails: a failed create or restore
    leaves no address, interface, identity reference or published entry behind."""
    try:
        yield
    except BaseException:
        for step in reversed(undo):
            try:
                await step()
            except Exception:
                log.exception("undoing a failed %s", what)
        raise
