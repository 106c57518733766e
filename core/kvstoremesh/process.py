"""The ``meshagent kvstoremesh`` process: one cluster's replicator of every remote cluster.

It reads the same ``--clustermesh-config`` directory agents read, connects to each remote
cluster's kvstore, checks its config and entries as an agent does, and copies what it accepts
into the local kvstore's cache (:mod:`meshagent.kvstoremesh.writer`). Agents of the cluster
then read remote clusters from their own kvstore: one connection and one watch per kind per
remote cluster, instead of one per agent.

Replicas: any number may run. They elect a leader through a key on a lease in the local
kvstore (``meshagent/kvstoremesh/leader``); only the leader connects and writes, the others
wait to take over. One writer keeps the cache's history in order: two writers with different
lags would delete and re-create entries under the agents' feet, and agents would drop allowed
traffic meanwhile. A leader that cannot renew its lease stops writing; a standby takes over
within the lease's TTL, and the cache meanwhile stays as it was (agents keep enforcing it).
"""

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from meshagent import __version__
from meshagent.client import API_PREFIX
from meshagent.clustermesh.mesh import ClusterMesh
from meshagent.hooks.additions import json_response
from meshagent.kvstore import EventType, KVStore, KVStoreBackend, Lease, LeaseExpired
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstoremesh.writer import CacheWriter
from meshagent.model.cluster import ClusterConfig
from meshagent.runtime.config import Config
from meshagent.runtime.apiserver import APIServer
from meshagent.runtime.metrics import MetricsServer
from meshagent.runtime.status import Health, StatusReport, StatusSection, sort_sections
from meshagent.runtime.tasks import run_together

log = logging.getLogger(__name__)

LEADER_KEY = kvkeys.KVSTOREMESH_LEADER
LEADER_RETRY = 1.0


class KVStoreMesh:
    """The composition root of the kvstoremesh process."""

    def __init__(self, config: Config, backend_named: Callable[[str | None], KVStoreBackend],
                 socket_path: Path, leader_ttl: float):
        self.config = config
        self.cluster = config.cluster
        self.backend_named = backend_named
        self.socket_path = socket_path
        self.leader_ttl = leader_ttl
        self.identity = f"{socket.gethostname()}/{os.getpid()}"
        self.local: KVStore = backend_named(None).local_client(config)
        self.mesh = ClusterMesh(
            cluster=self.cluster, follower=self._follow, backend_named=backend_named,
            directory=Path(config.get("clustermesh-config")), cache_ttl=0.0,
            section="KVStoreMesh")
        self._writers: dict[str, CacheWriter] = {}  # the last writer made for each cluster
        self.leader = False
        self.leader_seen = ""  # who leads, as the key says
        self.started_at = time.time()
        self.last_error = ""
        self.metrics = CollectorRegistry(auto_describe=True)
        self.metrics.register(_Collector(self))
        self._stop = asyncio.Event()

    def _follow(self, name: str, config: ClusterConfig) -> CacheWriter:
        writer = CacheWriter(name, config, self.cluster, self.local, self._writers.get(name))
        self._writers[name] = writer
        return writer

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as cleanup:
            cleanup.push_async_callback(self.local.close)
            await cleanup.enter_async_context(APIServer(self._app(), self.socket_path))
            if addr := self.config.get("prometheus-serve-addr"):
                await cleanup.enter_async_context(MetricsServer(self.metrics, addr))
            work = asyncio.create_task(self._lead_when_elected(), name="kvstoremesh")
            log.info("kvstoremesh started: cluster %s (id %d), remotes from %s, as %s",
                     self.cluster.name, self.cluster.id, self.mesh.directory, self.identity)
            try:
                await self._stop.wait()
            finally:
                work.cancel()
                await asyncio.wait({work}, timeout=5)
                await self.mesh.close()
        log.info("kvstoremesh stopped")

    # -- leader election ----------------------------------------------------------------------

    async def _lead_when_elected(self) -> None:
        """Forever: connect, win the election (or wait for it), replicate while leading."""
        while True:
            lease = None
            try:
                await self.local.connect()
                lease = await self.local.grant_lease(self.leader_ttl)
                await self._elect(lease)
                self.leader, self.last_error = True, ""
                log.info("kvstoremesh: leading cluster %s's cache", self.cluster.name)
                await run_together({"kvstoremesh-lease": self._keep_lease(lease),
                                    "kvstoremesh-mesh": self.mesh.follow_directory(lambda: None)})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("kvstoremesh: %s; %s", self.last_error,
                            "stepping down" if self.leader else "retrying")
            finally:
                if self.leader:
                    self.leader = False
                    await self.mesh.close()  # stop writing; the cache stays for the agents
                if lease is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.local.revoke(lease), 2)
            await asyncio.sleep(LEADER_RETRY)

    async def _elect(self, lease: Lease) -> None:
        """Returns once this replica holds the leader key; keeps its lease alive meanwhile."""
        me = self.identity.encode()
        while True:
            if await self.local.create(LEADER_KEY, me, lease=lease):
                self.leader_seen = self.identity
                return
            listing = await self.local.list_prefix(LEADER_KEY)
            holder = next((i for i in listing.items if i.key == LEADER_KEY), None)
            if holder is None:
                continue
            self.leader_seen = holder.value.decode(errors="replace")
            watch = self.local.watch(LEADER_KEY, after_revision=listing.revision)
            deadline = time.monotonic() + self.leader_ttl / 3
            while time.monotonic() < deadline:  # wake up to renew our own lease
                try:
                    event = await asyncio.wait_for(anext(watch), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
                if event.key == LEADER_KEY and event.type is EventType.DELETE:
                    break
            await watch.aclose()
            await self.local.keepalive(lease)

    async def _keep_lease(self, lease: Lease) -> None:
        """Raises LeaseExpired (and so stops the replication) once leadership is lost."""
        while True:
            await asyncio.sleep(self.leader_ttl / 3)
            try:
                await asyncio.wait_for(self.local.keepalive(lease), self.leader_ttl / 3)
            except asyncio.TimeoutError:
                raise LeaseExpired("the local kvstore did not renew the leader lease") from None

    # -- status -------------------------------------------------------------------------------

    def status(self, verbose: bool) -> StatusReport:
        local = self.local.status()
        sections = [StatusSection("KVStore", Health.OK if local.connected else Health.FAILURE,
                                  local.summary, details=local.details if verbose else ())]
        if self.leader:
            section = self.mesh.status(verbose)
            if not verbose:
                section = StatusSection(section.name, section.health, section.summary)
            sections.append(section)
            sections.append(StatusSection("Leader", Health.OK, f"this replica ({self.identity})"))
        else:
            what = f"standby; leader: {self.leader_seen or 'none yet'}"
            if self.last_error:
                what += f"; last error: {self.last_error}"
            sections.append(StatusSection("Leader", Health.OK, what))
        return StatusReport(
            version=__version__, cluster_name=self.cluster.name, cluster_id=self.cluster.id,
            node_name=self.identity, uptime_seconds=time.time() - self.started_at,
            ready=self.leader and all(r.ready for r in self.mesh.remotes.values()),
            sections=tuple(sort_sections(sections)))

    def _app(self) -> web.Application:
        app = web.Application()

        async def status(request: web.Request) -> web.Response:
            verbose = request.query.get("verbose", "false").lower() in ("1", "true", "yes")
            return json_response(self.status(verbose))

        async def remotes(request: web.Request) -> web.Response:
            now = time.time()
            return json_response({"leader": self.leader, "remotes": [
                r.to_json(now) | {"writes": self._writers[name].writes
                                  if name in self._writers else 0}
                for name, r in sorted(self.mesh.remotes.items())]})
        app.router.add_get(API_PREFIX + "/status", status)
        app.router.add_get(API_PREFIX + "/clustermesh", remotes)
        return app


class _Collector:
    """KVStoreMesh's metrics, read at scrape time."""

    def __init__(self, mesh: KVStoreMesh):
        self.mesh = mesh

    def collect(self):
        leader = GaugeMetricFamily("meshagent_kvstoremesh_leader",
                                   "1 while this replica leads (writes the cache)")
        leader.add_metric([], 1.0 if self.mesh.leader else 0.0)
        yield leader
        ready = GaugeMetricFamily("meshagent_kvstoremesh_remote_cluster_ready",
                                  "1 while the remote cluster is connected and its cache synced",
                                  labels=["target_cluster"])
        entries = GaugeMetricFamily("meshagent_kvstoremesh_cached_entries",
                                    "entries of a remote cluster in the cache",
                                    labels=["target_cluster", "kind"])
        failures = CounterMetricFamily("meshagent_kvstoremesh_remote_cluster_failures",
                                       "connections to the remote cluster that failed",
                                       labels=["target_cluster"])
        rejected = CounterMetricFamily("meshagent_kvstoremesh_rejected_entries",
                                       "remote entries refused (not copied)",
                                       labels=["target_cluster", "kind"])
        for name, remote in sorted(self.mesh.mesh.remotes.items()):
            ready.add_metric([name], 1.0 if remote.ready else 0.0)
            failures.add_metric([name], remote.failures)
            for kind, count in remote.counts().items():
                entries.add_metric([name, kind], count)
            if remote.sync is not None:
                for kind, count in remote.sync.checks.rejected.items():
                    rejected.add_metric([name, kind], count)
        yield from (ready, entries, failures, rejected)

    def describe(self):
        return []


async def serve(mesh: KVStoreMesh) -> None:
    """Run until SIGTERM or SIGINT."""
    import signal
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, mesh.stop)
    await mesh.run()
