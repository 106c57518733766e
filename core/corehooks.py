"""The core's own hook implementations: what the agent reports about itself and its slots."""

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from meshagent import hookimpl, kvkeys
from meshagent.controller import Controller, ControllerHandle
from meshagent.identity import CollectsGarbage
from meshagent.liveness import PROBE_INTERVAL, PROBE_INTERVAL_FAILING, Liveness
from meshagent.status import Health, StatusSection

if TYPE_CHECKING:
    from meshagent.agent import Agent

log = logging.getLogger(__name__)


class CoreHooks:
    """Registered as plugin ``core`` in every agent."""

    def __init__(self, agent: "Agent"):
        self.agent = agent
        self.kvstore_liveness = Liveness(kvkeys.HEARTBEAT)

    @hookimpl
    def meshagent_register_identity_allocator(self, registry):
        from meshagent.identityalloc import KVStoreIdentityAllocator
        registry.register("kvstore", KVStoreIdentityAllocator)

    @hookimpl
    def meshagent_register_policy_resolver(self, registry):
        from meshagent.policy.service import PolicyService
        registry.register("default", PolicyService)

    @hookimpl
    def meshagent_controllers(self, agent: "Agent"):
        controllers = [
            Controller("kvstore-connect", self._connect_kvstore),
            Controller("kvstore-health", self._watch_kvstore),
            Controller("kvstore-publish", agent.publisher.run),
            Controller("local-cluster-sync", self._sync_local_cluster),
            Controller("endpoint-restore", agent.endpoints.restore),
            Controller("service-sync", agent.services.sync),
            Controller("service-export", agent.services.export),
        ]
        for plugin, source in agent.hooks.service_sources(agent):
            controllers.append(Controller(
                f"service-source-{plugin}",
                lambda h, s=source, p=plugin: agent.services.run_source(s, h, p)))
        if agent.clustermesh is not None:
            controllers.append(Controller("clustermesh-config", agent.clustermesh.run))
        if agent.node_routes is not None:
            controllers.append(Controller("node-routes", agent.node_routes.run))
        if isinstance(agent.identity_allocator, CollectsGarbage):
            controllers.append(Controller("identity-gc", agent.identity_allocator.run_gc))
        return controllers

    @hookimpl
    def meshagent_service_changed(self, kind, service):
        self.agent.services.service_changed(kind, service)

    @hookimpl
    def meshagent_ipcache_changed(self, kind, entry):
        if entry.prefix.prefixlen == 32 and \
                entry.prefix.network_address in self.agent.services.backend_ips:
            self.agent.services.remerge()  # backends follow their endpoints

    async def _sync_local_cluster(self, handle: ControllerHandle) -> None:
        """Our own cluster's nodes, identities, endpoints and services, from the local store.

        Listed after our own initial publish, so a ready agent lists itself.
        """
        await self.agent.publisher.published.wait()
        await self.agent.local_sync.run(self.agent.kvstore, handle.ready)

    @hookimpl
    def meshagent_node_changed(self, kind, node):
        self.agent.ownership.node_changed(kind, node)
        if node.cluster == self.agent.cluster.name and self.agent.services.refused_updates:
            self.agent.services.revalidate()

    async def _connect_kvstore(self, handle: ControllerHandle) -> None:
        # Raises KVStoreUnavailable while the store is down: the controller retries with backoff.
        await self.agent.kvstore.connect()
        if self.kvstore_liveness.failing:
            self.kvstore_liveness.answered()
            self.agent.controllers.retry_now()

    async def _watch_kvstore(self, handle: ControllerHandle) -> None:
        """Probe the local kvstore every few seconds, so that a hung one is reported even
        while nothing else asks it, and, the moment it answers again, wake every controller
        waiting in its backoff: recovery within a second of its return, not at the next tick."""
        liveness = self.kvstore_liveness
        handle.ready()
        while True:
            was_failing = liveness.failing
            if await liveness.probe(self.agent.kvstore) and was_failing:
                log.info("the kvstore answers again: retrying what waited for it")
                self.agent.controllers.retry_now()
            await asyncio.sleep(PROBE_INTERVAL_FAILING if liveness.failing else PROBE_INTERVAL)

    @hookimpl
    def meshagent_status(self, agent: "Agent", verbose: bool):
        sections = [self._kvstore_section(agent)]
        if agent.clustermesh is not None:
            sections.append(agent.clustermesh.status(verbose))
        else:
            sections.append(StatusSection("ClusterMesh", Health.DISABLED,
                                          "not configured (--clustermesh-config)"))
        if agent.datapath is None:
            sections.append(StatusSection(
                "Datapath", Health.DISABLED,
                "control plane only (no datapath plugin loaded): policy is not enforced"))
        if agent.policy_resolver is None:
            sections.append(StatusSection(
                "Policy", Health.DISABLED, "no policy resolver loaded"))
        sections.append(self._services_section(agent))
        sections.append(self._controllers_section(agent, verbose))
        sections.append(StatusSection(
            "Plugins", Health.OK, ", ".join(agent.config.plugins),
            details=[f"{slot}: {p.name} (plugin {p.plugin})" if p else f"{slot}: none"
                     for slot, p in agent.providers.items()]))
        return sections

    def _kvstore_section(self, agent: "Agent") -> StatusSection:
        status = agent.kvstore.status()
        liveness = self.kvstore_liveness
        if liveness.failing:
            summary = f"{liveness.describe()}; {status.summary}"
            return StatusSection("KVStore", Health.FAILURE, summary, details=status.details)
        health = Health.OK if status.connected else Health.FAILURE
        return StatusSection("KVStore", health, status.summary, details=status.details)

    @staticmethod
    def _services_section(agent: "Agent") -> StatusSection:
        services = agent.services
        merged = services.merged.values()
        problems = [f"{m.service.namespace}/{m.service.name}: {c}" for m in merged
                    for c in m.conflicts]
        problems += [f"{key}: {why}" for key, why in sorted(services.rejected.items())]
        summary = (f"{len(services.merged)} services, {services.global_count()} global,"
                   f" {sum(m.remote_backends for m in merged)} remote backends")
        if problems:
            summary += f"; {len(problems)} problems"
        return StatusSection("Services", Health.WARNING if problems else Health.OK, summary,
                             details=problems)

    @staticmethod
    def _controllers_section(agent: "Agent", verbose: bool) -> StatusSection:
        states = list(agent.controllers.states.values())
        failing = [s for s in states if not s.healthy]
        waiting = [s for s in states if not s.ready]
        summary = f"{len(states) - len(failing)}/{len(states)} healthy"
        if waiting:
            summary += f", {len(waiting)} not ready ({', '.join(s.name for s in waiting)})"
        if failing:
            summary += f"; failing: {', '.join(f'{s.name}: {s.last_error}' for s in failing)}"
        details = []
        now = time.time()
        for s in sorted(states, key=lambda s: s.name):
            last = f"{now - s.last_error_at:.0f}s ago: {s.last_error}" if s.last_error_at else "never"
            state = "done" if s.done else ("ready" if s.ready else "starting")
            details.append(f"{s.name} [{s.plugin}]: {state}, {s.failures} failures (last: {last})")
        return StatusSection("Controllers", Health.WARNING if failing else Health.OK, summary,
                             details=details)

    @hookimpl
    def meshagent_register_metrics(self, registry):
        registry.register(_CoreCollector(self.agent))


class _CoreCollector:
    """Metrics read from the agent's state at scrape time, so nothing has to keep them current."""

    def __init__(self, agent: "Agent"):
        self.agent = agent

    def collect(self):
        ready = GaugeMetricFamily("meshagent_agent_ready", "1 once every controller is ready")
        ready.add_metric([], 1.0 if self.agent.ready else 0.0)
        yield ready
        failures = CounterMetricFamily("meshagent_controller_failures",
                                       "times a controller raised", labels=["controller"])
        healthy = GaugeMetricFamily("meshagent_controller_healthy",
                                    "1 when the controller's last run did not fail",
                                    labels=["controller"])
        for state in self.agent.controllers.states.values():
            failures.add_metric([state.name], state.failures)
            healthy.add_metric([state.name], 1.0 if state.healthy else 0.0)
        yield failures
        yield healthy
        errors = CounterMetricFamily("meshagent_hook_errors", "exceptions raised by event hooks")
        errors.add_metric([], self.agent.hooks.errors)
        yield errors

    def describe(self):
        return []
