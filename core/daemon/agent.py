"""The agent: one asyncio loop running the plugins' controllers behind the API socket.

Start-up: lock the state dir, register metrics, build the slot providers, open the API, start
the controllers. Shutdown (SIGTERM/SIGINT): stop the controllers (waiting up to
``--shutdown-timeout``), close the API, close providers in reverse order, unconfigure plugins.
"""

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from meshagent import __version__, hookimpl
from meshagent.clustermesh.mesh import ClusterMesh
from meshagent.clustermesh.noderoutes import NodeRoutes
from meshagent.clustermesh.ownership import AddressOwnership
from meshagent.clustermesh.sync import ClusterSync
from meshagent.daemon.api import APIState, build_app
from meshagent.runtime.apiserver import APIServer
from meshagent.runtime.collect import survivors_frozen
from meshagent.datapath import ReportsConnections
from meshagent.datapath.drops import DropFeed
from meshagent.datapath.events import FlowEvents
from meshagent.datapath.feed import DatapathFeed
from meshagent.datapath.progress import PolicyProgress
from meshagent.endpoint.manager import EndpointManager
from meshagent.fqdn.contract import ResolvesDNS
from meshagent.fqdn.manager import FQDN, FQDNOptions
from meshagent.hooks.manager import PluginManager
from meshagent.hooks.slots import (
    DATAPATH,
    IDENTITY_ALLOCATOR,
    KVSTORE,
    POLICY_RESOLVER,
    SLOTS,
    BuiltProviders,
    Provider,
    Registry,
    check_provider,
)
from meshagent.identity import CollectsGarbage
from meshagent.identity import allocator as identityalloc
from meshagent.identity.node import NodeIdentities
from meshagent.kvstore.local import LocalStore
from meshagent.kvstore.publisher import Publisher
from meshagent.model.cluster import ClusterConfig
from meshagent.model.ipcache import IPCache
from meshagent.model.node import Node
from meshagent.model.table import Table, Tables
from meshagent.observe.flows import FlowMaker
from meshagent.observe.l7 import dns_flow
from meshagent.observe.metrics import HubbleCollector
from meshagent.observe.names import Names
from meshagent.observe.observer import Observer
from meshagent.observe.peers import Peers
from meshagent.observe.server import HubbleOptions, HubbleServer
from meshagent.policy import default as policy_default
from meshagent.policy.contract import AttributesVerdicts, Verdict
from meshagent.policy.repository import LegacyResolverShim, Repository, adapt_resolver
from meshagent.runtime.config import Config
from meshagent.runtime.controller import Controller, ControllerManager
from meshagent.runtime.metrics import MetricsServer
from meshagent.runtime.statedir import StateDir
from meshagent.runtime.status import Health, StatusReport, StatusSection, sort_sections
from meshagent.service.manager import ServiceManager

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: Config, plugins: PluginManager):
        self.config = config
        self.cluster = config.cluster
        self.plugins = plugins
        self.hooks = plugins.hooks
        self.metrics = CollectorRegistry(auto_describe=True)
        self.controllers = ControllerManager()
        self.state_dir = StateDir(config.state_dir)
        self.started_at = time.time()
        self.ready = False
        self.ready_event = asyncio.Event()
        self.datapath_started = asyncio.Event()  # its maps are open: it may be called
        self.datapath_synced = asyncio.Event()  # the datapath got its first full state
        self.stopping = False
        self._stop = asyncio.Event()
        self.view = PluginView(self)  # what plugins get; never the agent itself
        plugins.register(_AgentHooks(self), name="core")
        plugins.register(identityalloc, name="core.identity")  # the default providers
        plugins.register(policy_default, name="core.policy")
        plugins.check_pending()  # a misspelled hook exits 2 here, before any side effect
        # Provider choice happens here, before any side effect, so a bad choice exits 2 cleanly.
        self.registries: dict[str, Registry] = {
            slot.name: self.hooks.register_providers(slot) for slot in SLOTS}
        self.providers: dict[str, Provider | None] = {
            slot.name: self.registries[slot.name].select(
                config.get(slot.name), lambda slot=slot: plugins.offers(slot))
            for slot in SLOTS
        }
        hooks = self.hooks
        self.tables = Tables(
            nodes=Table("node", lambda kind, v: hooks.node_changed(kind=kind, node=v)),
            identities=Table("identity",
                             lambda kind, v: hooks.identity_changed(kind=kind, identity=v)),
            ipcache=IPCache(self.cluster.name, notify_many=hooks.ipcache_changes),
            services=Table("service", lambda kind, v: hooks.service_changed(kind=kind, service=v)),
        )
        self.flow_events = FlowEvents()  # what the datapath reports; observers subscribe
        self.drops = DropFeed(self.tables.identities.get)  # meshagent monitor
        self.flow_events.subscribe(self.drops.on_event)
        # every flow event as Hubble flows (meshagent observe, the Hubble API, hubble_* metrics)
        self.flow_names = Names(self.cluster.name, self.tables.identities.get,
                                self.tables.ipcache.get)
        self.observer = Observer(
            FlowMaker(f"{self.cluster.name}/{config.node_name}", self.flow_names,
                      self._deciding_policies,
                      lambda: self.policy_resolver.revision if self.policy_resolver else 0,
                      dns_names=lambda endpoint, ip: self.fqdn.names_of(endpoint, ip)
                      if self.fqdn is not None else ()),
            config.get("hubble-event-buffer-capacity"),
            lost=lambda: self.flow_events.lost_total)
        self.flow_events.subscribe(self.observer.on_event)
        # Hubble's API (--enable-hubble=false: none); its Peer service follows the node table
        self.hubble_peers: Peers | None = None
        self.hubble: HubbleServer | None = None
        if config.get("enable-hubble"):
            options = HubbleOptions.from_config(config)
            self.hubble_peers = Peers(self.tables.nodes, tls=options.tls)
            self.hubble = HubbleServer(self.observer, self.hubble_peers, options,
                                       config.node_name, self.cluster.name, __version__,
                                       lost_events=lambda: self.flow_events.lost_total)
        self.ownership = AddressOwnership(self.cluster.name, config.get("pod-cidr"),
                                          self.kvstore_addresses)
        self.local_sync = ClusterSync(self.cluster.name, self.cluster.id, self.cluster, self.tables)
        self.publisher: Publisher | None = None  # built with the store
        self.endpoints: EndpointManager | None = None  # built with the providers
        self.datapath_feed: DatapathFeed | None = None  # the datapath's one door, likewise
        self.services: ServiceManager | None = None  # built with the store
        self.node_routes = NodeRoutes(self.ownership, config.node_name, config.get(
            "node-route-delete-grace")) if config.get("auto-direct-node-routes") else None
        self.clustermesh: ClusterMesh | None = None  # built with the store
        # every other node's address as the identity of its labels, for fromNodes/toNodes
        self.node_identities = NodeIdentities(self.tables, self.cluster.name, config.node_name) \
            if config.get("enable-node-selector-labels") else None
        # each component brings its own controllers, event handlers and status section
        for name, component in (("core.ownership", self.ownership),
                                ("core.node-routes", self.node_routes),
                                ("core.observe", self.flow_names),
                                ("core.hubble-peers", self.hubble_peers),
                                ("core.hubble", self.hubble),
                                ("core.node-identities", self.node_identities)):
            if component is not None:
                plugins.register(component, name=name)
        kvstore = self.providers[KVSTORE.name]
        self.kvstore_backends = BuiltProviders(self.registries[KVSTORE.name], kvstore.name,
                                               self.view)
        self.kvstore_backend: Any = None
        self.kvstore: Any = None
        self.identity_allocator: Any = None
        self.policy_resolver: Any = None
        self.policy_repository: Any = None  # the core's Repository, or a 0.1 resolver's shim
        self.policy_progress = PolicyProgress()  # the revision each endpoint enforces
        self.datapath: Any = None
        self.fqdn: FQDN | None = None  # the DNS proxy, with a resolver that offers DNS rules

    def stop(self) -> None:
        """Ask the agent to shut down (what SIGTERM does)."""
        self.stopping = True
        self._stop.set()

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as cleanup:
            self.state_dir.acquire()
            cleanup.callback(self.state_dir.release)
            cleanup.callback(self.hooks.unconfigure, self.config)
            self.hooks.register_metrics(self.metrics)
            await self._build_providers(cleanup)
            self.plugins.check_pending()  # again: providers and components registered objects

            state = APIState(
                is_ready=lambda: self.ready, status=self.status, plugin_infos=self.plugins.infos,
                config=self.config, tables=self.tables, services=self.services,
                endpoints=self.endpoints, clustermesh=self.clustermesh,
                resolver=self.policy_resolver, repository=self.policy_repository,
                policy_progress=self.policy_progress, drops=self.drops, fqdn=self.fqdn)
            await cleanup.enter_async_context(APIServer(
                build_app(state, self.hooks.api_routes(self.view)), self.config.socket_path))
            if addr := self.config.get("prometheus-serve-addr"):
                await cleanup.enter_async_context(MetricsServer(self.metrics, addr))
            if self.hubble is not None:
                await cleanup.enter_async_context(self.hubble)

            for plugin, controller in self.hooks.controllers(self.view):
                self.controllers.start(controller, plugin)
            frozen = cleanup.enter_context(contextlib.ExitStack())
            announce = asyncio.create_task(self._announce_ready(frozen), name="announce-ready")
            log.info("agent started: cluster %s (id %d), node %s, plugins %s",
                     self.cluster.name, self.cluster.id, self.config.node_name,
                     ",".join(self.config.plugins))
            try:
                await self._stop.wait()
                log.info("shutting down")
            finally:
                announce.cancel()
                await self.controllers.stop(self.config.get("shutdown-timeout"))
        log.info("agent stopped")

    async def _build_providers(self, cleanup: contextlib.AsyncExitStack) -> None:
        """Instantiate the chosen providers; each is closed in reverse order at exit."""
        def build(slot):
            provider = self.providers[slot.name]
            return check_provider(slot, provider, provider.factory(self.view)) if provider else None

        self.kvstore_backend = self.kvstore_backends.named(None)
        self.kvstore = self.kvstore_backend.local_client(self.config)
        cleanup.push_async_callback(self.kvstore.close)
        config = self.config
        node = Node(config.node_name, self.cluster.name, self.cluster.id, self._node_ip(4),
                    config.get("pod-cidr"), self._node_ip(6), config.get("local-node-labels"))
        self.publisher = Publisher(self.kvstore, self.cluster, node,
                                   config.get("kvstore-lease-ttl"))
        self.plugins.register(self.publisher, name="core.publisher")
        self.plugins.register(LocalStore(self.kvstore, self.controllers, self.local_sync.run,
                                         self.publisher.published), name="core.kvstore")
        self.services = ServiceManager(
            self.kvstore, self.cluster, config.get("pod-cidr"), self.tables, self.ready_event,
            merged_changed=lambda merged: self.datapath_feed.services_changed(merged),
            source_plugins=lambda: self.hooks.service_sources(self.view),
            policy_services=self._policy_services)
        self.plugins.register(self.services, name="core.services")
        cleanup.push_async_callback(self.publisher.close)  # revoke the lease before closing
        if mesh_dir := config.get("clustermesh-config"):
            self.clustermesh = ClusterMesh(
                cluster=self.cluster, follower=self._follow_remote,
                backend_named=self.kvstore_backends.named,
                directory=Path(mesh_dir), cache_ttl=config.get("clustermesh-cache-ttl"),
                ownership=self.ownership, global_services=self.services.global_count,
                node_routes=self.node_routes,
                cache_store=self.kvstore if config.get("clustermesh-read-cache") else None)
            self.plugins.register(self.clustermesh, name="core.clustermesh")
            cleanup.push_async_callback(self.clustermesh.close)
        self.identity_allocator = build(IDENTITY_ALLOCATOR)
        if self.identity_allocator is not None:
            cleanup.push_async_callback(self.identity_allocator.close)
        self.policy_resolver = self._build_policy_resolver()
        if self.policy_resolver is not None:
            cleanup.push_async_callback(self.policy_resolver.close)
            if isinstance(self.policy_resolver, LegacyResolverShim):
                self.policy_repository = self.policy_resolver  # it holds the rules itself
            else:
                self.policy_repository = Repository(
                    self.kvstore, self.policy_resolver,
                    lambda: self.hooks.policy_sources(self.view), self.tables, self.cluster.name,
                    node_selector_labels=config.get("enable-node-selector-labels"))
                self.plugins.register(self.policy_repository, name="core.policy-repository")
                cleanup.push_async_callback(self.policy_repository.close)
        self.datapath = build(DATAPATH)
        if self.datapath is not None:
            cleanup.push_async_callback(self.datapath.stop)
        else:
            self.datapath_started.set()  # nothing to wait for
        mesh = self.clustermesh
        self.datapath_feed = DatapathFeed(
            self.datapath, self.policy_resolver, self.tables.ipcache,
            agent_ready=self.ready_event,
            remotes_ready=lambda: mesh is None or all(r.ready for r in mesh.remotes.values()),
            sync_timeout=self.config.get("datapath-sync-timeout"),
            started=self.datapath_started, synced=self.datapath_synced,
            progress=self.policy_progress)
        hooks = self.hooks
        self.endpoints = EndpointManager(
            cluster_name=self.cluster.name, node_ip=node.ipv4, pod_cidrs=node.pod_cidrs,
            directory=config.state_dir / "endpoints",
            allocator=self.identity_allocator, publisher=self.publisher,
            datapath=self.datapath_feed, datapath_started=self.datapath_started,
            plugin_labels=lambda namespace, pod: hooks.endpoint_labels(
                agent=self.view, namespace=namespace, pod_name=pod),
            changed=lambda kind, endpoint: hooks.endpoint_changed(kind=kind, endpoint=endpoint),
            policy_audit_mode=config.get("policy-audit-mode"))
        self.plugins.register(self.endpoints, name="core.endpoints")
        self.plugins.register(self.datapath_feed, name="core.datapath")
        self.fqdn = self._build_fqdn()

    def _build_fqdn(self) -> FQDN | None:
        """The DNS proxy, when a datapath can send it DNS traffic and the resolver says what
        to allow (:class:`~meshagent.fqdn.contract.ResolvesDNS`); built before any
        controller runs, so the names it restores are in force before the datapath's first
        full state."""
        config = self.config
        if not (config.get("enable-dns-proxy") and self.datapath is not None
                and isinstance(self.policy_resolver, ResolvesDNS)):
            return None
        feed = self.datapath_feed
        fqdn = FQDN(self.cluster.name, self.tables, self.policy_resolver,
                    FQDNOptions.from_config(config), config.state_dir,
                    datapath_applied=feed.applied, set_proxy_port=feed.set_proxy_port,
                    publish=self._dns_record, ready=lambda: self.ready,
                    connections=self.datapath.connected_peers
                    if isinstance(self.datapath, ReportsConnections) else None,
                    endpoints_restored=self.endpoints.restored)
        self.plugins.register(fqdn, name="core.fqdn")
        return fqdn

    def _policy_services(self, services: list) -> None:
        """The cluster's services, for the toServices rules of the core's repository (a 0.1
        resolver, which holds the rules itself, has none)."""
        if isinstance(self.policy_repository, Repository):
            self.policy_repository.services_changed(services)

    def _dns_record(self, record) -> None:
        """A DNS proxy record: to meshagent monitor, and as an L7 flow to the observer."""
        self.drops.publish(record)
        self.observer.add_flow(dns_flow(record, self.observer.maker.node_name,
                                        self.flow_names))

    def _build_policy_resolver(self):
        """The slot's resolver; one written for 0.1's contract through its shim."""
        provider = self.providers[POLICY_RESOLVER.name]
        if provider is None:
            return None
        built = provider.factory(self.view)
        return adapt_resolver(built, provider.name) or check_provider(
            POLICY_RESOLVER, provider, built)

    def _deciding_policies(self, endpoint: int, direction: str, identity: int, protocol: int,
                           port: int, allowed: bool, match: int) -> tuple:
        """The policies behind a verdict, if the loaded resolver can name them
        (:class:`meshagent.policy.contract.AttributesVerdicts`); none otherwise."""
        resolver = self.policy_resolver
        if not isinstance(resolver, AttributesVerdicts):
            return ()
        return resolver.deciding_policies(endpoint, direction, identity, protocol, port,
                                          Verdict.ALLOW if allowed else Verdict.DENY, match)

    def _follow_remote(self, name: str, config: ClusterConfig) -> ClusterSync:
        """A remote cluster's entries go to the tables, admitted by pod CIDR."""
        return ClusterSync(name, config.id, self.cluster, self.tables, self.ownership,
                           cached=config.cached, canaries=config.synced_canaries)

    def _node_ip(self, version: int):
        """This node's address of that family (``--node-ip``), or None."""
        return next((a for a in self.config.get("node-ip") if a.version == version), None)

    def kvstore_addresses(self) -> list[str]:
        """The servers of the local and every remote kvstore: no pod CIDR may cover them."""
        stores = [self.kvstore] + ([r.store for r in self.clustermesh.remotes.values()]
                                   if self.clustermesh is not None else [])
        out = [a for store in stores if store is not None for a in store.status().addresses]
        if self.clustermesh is not None:
            out += [a for r in self.clustermesh.remotes.values() for a in r.known_addresses]
        return out

    async def _announce_ready(self, frozen: contextlib.ExitStack) -> None:
        await self.controllers.wait_ready()
        self.ready = True
        self.ready_event.set()
        # from here on a full collection walks only what came since the last one
        frozen.enter_context(survivors_frozen())
        log.info("agent ready (%d controllers)", len(self.controllers.states))

    def status(self, verbose: bool = False) -> StatusReport:
        sections = []
        for plugin, item in self.hooks.status(self.view, verbose):
            if isinstance(item, StatusSection):
                sections.append(attrs.evolve(item, plugin=item.plugin or plugin,
                                             details=item.details if verbose else ()))
            else:
                sections.append(StatusSection(plugin, Health.FAILURE,
                                              f"status hook failed: {item!r}", plugin=plugin))
        return StatusReport(
            version=__version__, cluster_name=self.cluster.name, cluster_id=self.cluster.id,
            node_name=self.config.node_name, uptime_seconds=time.time() - self.started_at,
            ready=self.ready, sections=tuple(sort_sections(sections)),
        )


def run_forever(agent: Agent) -> None:
    """``asyncio.run(serve(agent))``, except that leftover tasks get a bounded time to finish.

    asyncio.run waits for every cancelled task; one that swallows cancellation would keep the
    process alive after SIGTERM.
    """
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve(agent))
    finally:
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=1.0))
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


async def serve(agent: Agent) -> None:
    """Run ``agent`` until SIGTERM or SIGINT; a second SIGINT exits at once."""
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        if agent.stopping:
            log.warning("second interrupt: exiting without cleanup")
            os._exit(130)
        agent.stop()

    loop.add_signal_handler(signal.SIGTERM, agent.stop)
    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        await agent.run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)


class PluginView:
    """What plugins get of the agent (:class:`meshagent.hooks.view.AgentView`): the parts they
    may use and nothing else. Provider factories and every hook that takes ``agent`` get
    this, never the agent."""

    def __init__(self, agent: Agent):
        self._agent = agent

    config = property(lambda self: self._agent.config)
    cluster = property(lambda self: self._agent.cluster)
    plugins = property(lambda self: self._agent.plugins)
    hooks = property(lambda self: self._agent.hooks)
    metrics = property(lambda self: self._agent.metrics)
    tables = property(lambda self: self._agent.tables)
    kvstore = property(lambda self: self._agent.kvstore)
    node_keys = property(lambda self: self._agent.publisher)
    endpoints = property(lambda self: self._agent.endpoints)
    flow_events = property(lambda self: self._agent.flow_events)


class _AgentHooks:
    """Registered as plugin ``core``: what the agent reports about itself (its controllers,
    plugins and empty slots) and the slot-level wiring no single component owns."""

    def __init__(self, agent: Agent):
        self.agent = agent

    @hookimpl
    def meshagent_controllers(self):
        agent = self.agent
        if isinstance(agent.identity_allocator, CollectsGarbage):
            return [Controller("identity-gc", agent.identity_allocator.run_gc)]
        return []

    @hookimpl
    def meshagent_status(self, verbose: bool):
        agent = self.agent
        sections = []
        if agent.clustermesh is None:
            sections.append(StatusSection("ClusterMesh", Health.DISABLED,
                                          "not configured (--clustermesh-config)"))
        if agent.datapath is None:
            sections.append(StatusSection(
                "Datapath", Health.DISABLED,
                "control plane only (no datapath plugin loaded): policy is not enforced"))
        if agent.policy_resolver is None:
            sections.append(StatusSection(
                "Policy", Health.DISABLED, "no policy resolver loaded"))
        if agent.hubble is None:
            sections.append(StatusSection("Hubble", Health.DISABLED, "--enable-hubble=false"))
        if agent.fqdn is None:
            sections.append(StatusSection("DNS proxy", Health.DISABLED, _no_dns_proxy(agent)))
        sections.append(self._controllers_section(agent))
        sections.append(StatusSection(
            "Plugins", Health.OK, ", ".join(agent.config.plugins),
            details=[f"{slot}: {p.name} (plugin {p.plugin})" if p else f"{slot}: none"
                     for slot, p in agent.providers.items()]))
        return sections

    @staticmethod
    def _controllers_section(agent: Agent) -> StatusSection:
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
        registry.register(_AgentCollector(self.agent))
        registry.register(HubbleCollector(self.agent.observer.metrics,
                                          lambda: self.agent.flow_events.lost_total))


def _no_dns_proxy(agent: Agent) -> str:
    """Why the agent runs no DNS proxy (rules: dns and toFQDNs then allow nothing)."""
    if not agent.config.get("enable-dns-proxy"):
        return "--enable-dns-proxy=false"
    if agent.datapath is None:
        return "no datapath loaded"
    return "the policy resolver offers no DNS rules (ResolvesDNS)"


class _AgentCollector:
    """Metrics read from the agent's state at scrape time, so nothing has to keep them current."""

    def __init__(self, agent: Agent):
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
