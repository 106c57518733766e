"""One agent's view of its Kubernetes cluster, and what it feeds the agent from it.

Seven reflectors (Namespaces, this node's Node and Pods, Services, EndpointSlices, CNPs, CCNPs)
keep local copies current. From them: this node's labels (published with the node), the
identity labels of this node's pods (asked for when an endpoint
is created, pushed again when a pod's or its namespace's labels change), policies for the
default resolver and services for the service manager. A resource that cannot be used is
refused with its name, shown in status, and its last good version stays in force.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from meshagent import hookimpl
from meshagent.plugin import (
    ChangeKind,
    Controller,
    ControllerHandle,
    Health,
    PolicyError,
    PolicyUpdate,
    ServiceError,
    ServiceUpdate,
    StatusSection,
    UsageError,
)
from meshagent.plugins.k8s import translate
from meshagent.plugins.k8s.client import (
    CCNPS,
    CNPS,
    ENDPOINT_SLICES,
    NAMESPACES,
    NODES,
    PODS,
    SERVICES,
    TRANSIENT,
    KubeAPI,
    KubeError,
    Resource,
)
from meshagent.plugins.k8s.reflector import Change, Reflector

if TYPE_CHECKING:
    from meshagent.plugin import AgentView, Config

log = logging.getLogger(__name__)


class KubernetesSource:
    """Registered per agent at configure (several agents may share a process in tests)."""

    def __init__(self, config: "Config"):
        self.kubeconfig = config.get("k8s-kubeconfig")
        self.node_name = config.get("k8s-node-name") or config.node_name
        self.watch_timeout = config.get("k8s-watch-timeout")
        self.pod_wait = config.get("k8s-pod-wait")
        self.agent: "AgentView | None" = None
        self.api: KubeAPI | None = None
        self._connected = asyncio.Event()
        self.reflectors: dict[str, Reflector] = {}
        self._consumed: set[asyncio.Queue] = set()  # the update queues the agent reads
        self.refused: dict[str, str] = {}  # "Kind ns/name" -> why it is not used
        self.label_errors: dict[str, str] = {}  # "ns/pod" -> why its labels were not applied
        self.policies: set[tuple[str, str, str]] = set()  # keys of the policies in force
        self.services: set[tuple[str, str]] = set()  # services yielded and not deleted
        self.policy_updates: asyncio.Queue[PolicyUpdate] = asyncio.Queue()
        self.service_updates: asyncio.Queue[ServiceUpdate] = asyncio.Queue()
        self._relabel: set[tuple[str, str]] = set()
        self._relabel_wake = asyncio.Event()
        self._pod_arrived: dict[tuple[str, str], asyncio.Event] = {}
        self._pod_waiters: dict[tuple[str, str], int] = {}
        self._slices: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}  # by service

    # -- connection ----------------------------------------------------------------------------

    async def _client(self, handle: ControllerHandle) -> None:
        """Controller: the API client, made once (a bad kubeconfig shows here, retried), and
        closed at shutdown."""
        self.api = await KubeAPI.connect(self.kubeconfig)
        log.info("Kubernetes API at %s (%s)", self.api.server, self.api.where)
        self._connected.set()
        handle.ready()
        try:
            await asyncio.Future()  # until the agent stops
        finally:
            await self.api.close()

    # -- controllers ---------------------------------------------------------------------------

    @hookimpl
    def meshagent_controllers(self, agent):
        self.agent = agent
        specs = [
            ("k8s-namespaces", NAMESPACES, self._namespace_changed, "", None),
            ("k8s-pods", PODS, self._pod_changed, f"spec.nodeName={self.node_name}", None),
            ("k8s-node", NODES, self._node_changed, f"metadata.name={self.node_name}", None),
            ("k8s-policies", CNPS, self._policy_changed, "", self.policy_updates),
            ("k8s-clusterwide-policies", CCNPS, self._policy_changed, "", self.policy_updates),
            ("k8s-services", SERVICES, self._service_changed, "", self.service_updates),
            ("k8s-endpointslices", ENDPOINT_SLICES, self._slice_changed, "",
             self.service_updates),
        ]
        controllers = [Controller("k8s-client", self._client)]
        for name, resource, handler, selector, queue in specs:
            reflector = Reflector(None, resource, lambda c, r=resource, h=handler: h(r, c),
                                  field_selector=selector, watch_timeout=self.watch_timeout)
            self.reflectors[resource.plural] = reflector
            controllers.append(Controller(name, self._reflect(reflector, queue)))
        controllers.append(Controller("k8s-endpoint-labels", self._apply_labels))
        return controllers

    def _reflect(self, reflector: Reflector, queue: asyncio.Queue | None):
        async def run(handle: ControllerHandle) -> None:
            await self._connected.wait()
            reflector.api = self.api

            async def listed() -> None:
                if queue in self._consumed:
                    await queue.join()  # applied by the agent before we say ready
                handle.ready()
            await reflector.run(listed)
        return run

    # -- pods, namespaces and endpoint labels ------------------------------------------------

    def _namespace_changed(self, resource: Resource, change: Change) -> None:
        if change.kind is ChangeKind.UPSERT:  # a deleted one's pods go first
            self._queue_stale(lambda endpoint: endpoint.namespace == change.key[1])

    def _node_changed(self, resource: Resource, change: Change) -> None:
        """This node's Node: its labels are the node's, published for fromNodes/toNodes
        selectors elsewhere (Cilium's node.Labels). A deleted Node leaves them as they were."""
        if change.kind is not ChangeKind.UPSERT or self.agent is None:
            return
        labels = change.obj.get("metadata", {}).get("labels") or {}
        try:
            self.agent.node_keys.set_node_labels(labels)
            self.refused.pop(f"Node {self.node_name}", None)
        except ValueError as exc:
            self.refused[f"Node {self.node_name}"] = f"labels not published: {exc}"
            log.error("Node %s: labels not published: %s", self.node_name, exc)

    def _pod_changed(self, resource: Resource, change: Change) -> None:
        arrived = self._pod_arrived.get(change.key)
        if arrived is not None:
            arrived.set()
        if change.kind is ChangeKind.UPSERT:
            self._queue_stale(lambda e: (e.namespace, e.pod_name) == change.key)

    def _cached_labels(self, namespace: str, pod_name: str) -> frozenset[str] | None:
        pod = self.reflectors["pods"].objects.get((namespace, pod_name))
        ns = self.reflectors["namespaces"].objects.get(("", namespace))
        return None if pod is None or ns is None else translate.identity_labels(pod, ns)

    def _queue_stale(self, wanted) -> None:
        """Queue a relabel for every wanted endpoint whose labels from us differ from what the
        local copies say now (a Pod's status updates change nothing)."""
        if self.agent is None:
            return
        for endpoint in list(self.agent.endpoints.endpoints.values()):
            if endpoint.pod_name and wanted(endpoint):
                labels = self._cached_labels(endpoint.namespace, endpoint.pod_name)
                if labels is not None and labels != endpoint.plugin_labels:
                    self._relabel.add((endpoint.namespace, endpoint.pod_name))
                    self._relabel_wake.set()

    @hookimpl
    def meshagent_endpoint_changed(self, kind, endpoint):
        """An endpoint created while its Pod changed may carry the labels from before the
        change (the event found no endpoint to relabel yet): catch up."""
        if kind is ChangeKind.UPSERT and endpoint.pod_name:
            self._queue_stale(lambda e: e.id == endpoint.id)

    async def _apply_labels(self, handle: ControllerHandle) -> None:
        """Controller: once pods, namespaces and restored endpoints are known, give every
        endpoint the labels of its pod now, then follow label changes."""
        agent = self.agent
        await self.reflectors["pods"].synced.wait()
        await self.reflectors["namespaces"].synced.wait()
        await agent.endpoints.restored.wait()
        self._queue_stale(lambda endpoint: True)
        first = True
        while True:
            pending, self._relabel = self._relabel, set()
            self._relabel_wake.clear()
            for namespace, pod in sorted(pending):
                try:
                    await agent.endpoints.refresh_labels(namespace, pod)
                    self.label_errors.pop(f"{namespace}/{pod}", None)
                except UsageError as exc:
                    self.label_errors[f"{namespace}/{pod}"] = str(exc)
                    log.error("pod %s/%s: labels not applied: %s", namespace, pod, exc)
            if first:
                handle.ready()
                first = False
            await self._relabel_wake.wait()

    @hookimpl
    def meshagent_endpoint_labels(self, agent, namespace, pod_name):
        return self._labels_of(namespace, pod_name)

    async def _labels_of(self, namespace: str, pod_name: str) -> frozenset[str]:
        """The pod from the local copy, waiting ``--k8s-pod-wait`` for it to arrive (the CNI
        call can beat the watch); else straight from the API server (a pod on another node)."""
        key = (namespace, pod_name)
        pods = self.reflectors.get("pods")
        pod = pods.objects.get(key) if pods else None
        if pod is None and pods is not None:
            arrived = self._pod_arrived.setdefault(key, asyncio.Event())
            self._pod_waiters[key] = self._pod_waiters.get(key, 0) + 1
            try:
                await asyncio.wait_for(arrived.wait(), self.pod_wait)
            except TimeoutError:
                pass
            finally:
                self._pod_waiters[key] -= 1
                if not self._pod_waiters[key]:
                    del self._pod_waiters[key], self._pod_arrived[key]
            pod = pods.objects.get(key)
        api = self.api
        if api is None:
            raise UsageError(f"pod {namespace}/{pod_name}: not connected to the Kubernetes API"
                             " yet")
        try:
            if pod is None:
                pod = await api.request("GET", PODS.path(namespace, pod_name))
            namespaces = self.reflectors.get("namespaces")
            ns = namespaces.objects.get(("", namespace)) if namespaces else None
            if ns is None:
                ns = await api.request("GET", NAMESPACES.path(name=namespace))
        except KubeError as exc:
            raise UsageError(f"pod {namespace}/{pod_name}: cannot read it (or its namespace)"
                             f" from the Kubernetes API at {api.server}: {exc}") from None
        except TRANSIENT as exc:
            raise UsageError(f"pod {namespace}/{pod_name}: the Kubernetes API at {api.server}"
                             f" is unreachable: {exc}") from None
        return translate.identity_labels(pod, ns)

    # -- policies -------------------------------------------------------------------------------

    def _policy_changed(self, resource: Resource, change: Change) -> None:
        name = translate.display(resource, change.obj)
        key = (resource.kind, change.key[0], change.key[1])
        if change.kind is ChangeKind.DELETE:
            self.refused.pop(name, None)
            if key in self.policies:
                self.policies.discard(key)
                self.policy_updates.put_nowait(PolicyUpdate(ChangeKind.DELETE, key=key))
            return
        try:
            policy = translate.policy_from(resource, change.obj)
        except PolicyError as exc:
            self._refuse(name, str(exc), kept=key in self.policies)
            return
        self.refused.pop(name, None)
        self.policies.add(policy.key)
        self.policy_updates.put_nowait(PolicyUpdate(ChangeKind.UPSERT, policy))

    @hookimpl
    def meshagent_policy_source(self, agent):
        self._consumed.add(self.policy_updates)
        return _drain(self.policy_updates)

    # -- services -------------------------------------------------------------------------------

    def _service_changed(self, resource: Resource, change: Change) -> None:
        self._update_service(change.key)

    def _slice_changed(self, resource: Resource, change: Change) -> None:
        before = next((owner for owner, owned in self._slices.items()
                       if owned.pop(change.key, None) is not None), None)
        owner = translate.slice_owner(change.obj)
        if owner is not None and change.kind is ChangeKind.UPSERT:
            self._slices.setdefault(owner, {})[change.key] = change.obj
        for affected in {before, owner} - {None}:
            self._update_service(affected)

    def _update_service(self, key: tuple[str, str]) -> None:
        services = self.reflectors.get("services")
        obj = services.objects.get(key) if services else None
        name = f"Service {key[0]}/{key[1]}"
        if obj is None:
            self.refused.pop(name, None)
            self._withdraw_service(key)
            return
        owned = list(self._slices.get(key, {}).values())
        try:
            service = translate.service_from(obj, owned, self.agent.cluster.name)
        except (ServiceError, TypeError, AttributeError, ValueError, KeyError) as exc:
            self._refuse(name, str(exc), kept=key in self.services)
            return
        self.refused.pop(name, None)
        if service is None:
            self._withdraw_service(key)
            return
        self.services.add(key)
        self.service_updates.put_nowait(ServiceUpdate(ChangeKind.UPSERT, service))

    def _withdraw_service(self, key: tuple[str, str]) -> None:
        from meshagent.plugin import Service
        if key in self.services:
            self.services.discard(key)
            self.service_updates.put_nowait(ServiceUpdate(ChangeKind.DELETE, Service(
                key[0], key[1], self.agent.cluster.name)))

    @hookimpl
    def meshagent_service_source(self, agent):
        self._consumed.add(self.service_updates)
        return _drain(self.service_updates)

    # -- visibility -----------------------------------------------------------------------------

    def _refuse(self, name: str, why: str, kept: bool) -> None:
        self.refused[name] = why
        log.error("refusing %s: %s%s", name, why,
                  " (its last good version stays in force)" if kept else "")

    @hookimpl
    def meshagent_status(self, verbose):
        synced = [r for r in self.reflectors.values() if r.synced.is_set()]
        failing = [r for r in self.reflectors.values() if r.last_error]
        server = self.api.server if self.api else "not connected"
        pods = self.reflectors.get("pods")
        summary = (f"{server}: {len(synced)}/{len(self.reflectors)} resources synced, "
                   f"{len(pods.objects) if pods else 0} pods on {self.node_name},"
                   f" {len(self.policies)} policies, {len(self.services)} services")
        problems = [f"refused {name}: {why}" for name, why in sorted(self.refused.items())]
        problems += [f"labels of pod {pod}: {why}" for pod, why in
                     sorted(self.label_errors.items())]
        problems += [f"{r.name}: {r.last_error} ({time.time() - r.last_error_at:.0f} s ago)"
                     for r in failing]
        problems += [f"{r.name}: {r.malformed} malformed events skipped"
                     for r in self.reflectors.values() if r.malformed]
        if problems:
            summary += f"; {len(problems)} problems"
        if len(synced) < len(self.reflectors) and failing:
            health = Health.FAILURE
        else:
            health = Health.WARNING if problems else Health.OK
        details = [f"{r.name}: resourceVersion {r.resource_version or '-'}, {len(r.objects)}"
                   f" objects, {r.lists} lists, {r.events} events"
                   for r in self.reflectors.values()] if verbose else []
        return StatusSection("Kubernetes", health, summary, details=problems + details)


async def _drain(queue: asyncio.Queue) -> AsyncIterator:
    """Yield what the reflectors queue; an item counts as done once the consumer asks for the
    next one (it has applied this one by then), which is what ``queue.join()`` waits for."""
    while True:
        item = await queue.get()
        yield item
        queue.task_done()
