"""Feeding the datapath slot: its start, its first full state, then every change.

Everything reaches the datapath through contracts: map state from any policy resolver
(``snapshot`` then ``changes``), IP→identity entries from the agent's tables, merged services
from the services component. Nothing is changed before the agent has synced, so a restart
neither drops allowed traffic nor lets denied traffic pass.
"""

import asyncio
import logging
import time
from collections.abc import Callable

from meshagent import hookimpl
from meshagent.datapath import Datapath
from meshagent.datapath.progress import PolicyProgress
from meshagent.events import ChangeKind
from meshagent.model.ipcache import IPCache, IPCacheEntry
from meshagent.policy import PolicyResolver
from meshagent.runtime.controller import Controller, ControllerHandle

log = logging.getLogger(__name__)


class DatapathFeed:
    """Registered as plugin ``core.datapath`` once the providers are built."""

    def __init__(self, datapath: Datapath | None, resolver: PolicyResolver | None,
                 ipcache: IPCache,
                 feed_services: Callable[[ControllerHandle, Datapath, asyncio.Event], object], *,
                 agent_ready: asyncio.Event, remotes_ready: Callable[[], bool],
                 sync_timeout: float, started: asyncio.Event, synced: asyncio.Event,
                 progress: PolicyProgress):
        self.datapath = datapath
        self.resolver = resolver
        self.ipcache = ipcache
        self.feed_services = feed_services  # the services component's, given datapath and synced
        self.agent_ready = agent_ready
        self.remotes_ready = remotes_ready
        self.sync_timeout = sync_timeout
        self.started = started  # set here: the datapath may be called
        self.synced = synced  # set here: it got its first full state
        self._ipcache_changes: list[tuple[ChangeKind, IPCacheEntry]] = []
        self._ipcache_taken = False  # the first full state is taken: keep the changes after it
        self._ipcache_wake = asyncio.Event()
        self._gone: set[int] = set()  # endpoints deleted since the policy batch was taken
        self._endpoints: set[int] = set()  # local endpoints announced so far
        self.progress = progress  # the policy revision each endpoint's state reflects

    @hookimpl
    def meshagent_controllers(self):
        datapath, resolver = self.datapath, self.resolver
        if datapath is None:
            if resolver is None:
                return []
            # nobody enforces: take the resolver's changes so they do not pile up
            return [Controller("policy-changes", lambda h: self._discard_changes(resolver, h))]
        return [Controller("datapath-start", lambda h: self._start(datapath, h)),
                Controller("datapath-sync", lambda h: self._sync(datapath, resolver, h)),
                Controller("datapath-services",
                           lambda handle: self.feed_services(handle, datapath, self.synced))]

    @hookimpl
    def meshagent_ipcache_changed(self, kind, entry):
        if self.datapath is not None and self._ipcache_taken:  # before: in the full state
            self._ipcache_changes.append((kind, entry))
            self._ipcache_wake.set()

    @hookimpl
    def meshagent_endpoint_changed(self, kind, endpoint):
        if kind is ChangeKind.DELETE:
            self._gone.add(endpoint.id)
            self._endpoints.discard(endpoint.id)
            self.progress.forget(endpoint.id)
        else:
            self._endpoints.add(endpoint.id)
            self.progress.announced(endpoint.id)

    async def _start(self, datapath: Datapath, handle: ControllerHandle) -> None:
        await datapath.start()
        self.started.set()

    async def _sync(self, datapath: Datapath, resolver: PolicyResolver | None,
                    handle: ControllerHandle) -> None:
        """Hold every change until the agent is synced, reconcile, then stream.

        Synced: every controller ready (policies listed, endpoints restored, local cluster
        listed) and every remote cluster ready, or ``--datapath-sync-timeout`` passed. A
        failure restarts this from a fresh reconcile, so no change is lost.
        """
        handle.ready()
        await self.agent_ready.wait()
        deadline = time.monotonic() + self.sync_timeout
        while time.monotonic() < deadline and not self.remotes_ready():
            await asyncio.sleep(0.1)
        policies = resolver.snapshot() if resolver is not None else {}
        revision = resolver.revision if resolver is not None else 0
        self._ipcache_changes.clear()
        self._ipcache_taken = True
        await datapath.reconcile(policies, list(self.ipcache.values()))
        self.progress.realized(policies, revision)
        self.synced.set()
        async with asyncio.TaskGroup() as streams:
            streams.create_task(self._stream_ipcache(datapath))
            if resolver is not None:
                streams.create_task(self._stream_policy(datapath, resolver))

    async def _stream_ipcache(self, datapath: Datapath) -> None:
        while True:
            await self._ipcache_wake.wait()
            self._ipcache_wake.clear()
            batch, self._ipcache_changes = self._ipcache_changes, []
            if batch:
                await datapath.update_ipcache(batch)

    async def _stream_policy(self, datapath: Datapath, resolver: PolicyResolver) -> None:
        while True:
            batch = await resolver.changes()
            # every change of this revision is in the batch (the resolver's contract), and
            # every endpoint announced so far is known to the resolver
            revision, endpoints = resolver.revision, set(self._endpoints)
            self._gone.clear()
            for endpoint_id, changes in batch.items():
                # an endpoint deleted meanwhile must not get entries back (nor its successor
                # under the same id the old one's)
                if endpoint_id not in self._gone:
                    await datapath.update_policy(endpoint_id, changes)
            self.progress.realized(endpoints - self._gone, revision)

    async def _discard_changes(self, resolver: PolicyResolver, handle: ControllerHandle) -> None:
        """Nobody enforces: take the resolver's changes; the revisions count as reached."""
        handle.ready()
        while True:
            await resolver.changes()
            self.progress.realized(set(self._endpoints), resolver.revision)
