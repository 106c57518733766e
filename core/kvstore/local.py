"""The local cluster's kvstore as the agent sees it: connected, answering, and read back.

Registered as plugin ``core.kvstore`` once the store is built. It connects the store, probes it
every few seconds so a hung one is reported even while nothing else asks it, wakes every
controller waiting in its backoff the moment it answers again, and lists our own cluster back
(after our own initial publish, so a ready agent lists itself).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from meshagent import hookimpl
from meshagent.kvstore import KVStore
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstore.liveness import PROBE_INTERVAL, PROBE_INTERVAL_FAILING, Liveness
from meshagent.runtime.controller import Controller, ControllerHandle, ControllerManager
from meshagent.runtime.status import Health, StatusSection

log = logging.getLogger(__name__)


class LocalStore:
    def __init__(self, store: KVStore, controllers: ControllerManager,
                 sync_local: Callable[[KVStore, Callable[[], None]], Awaitable[None]],
                 published: asyncio.Event):
        self.store = store
        self.controllers = controllers
        self.sync_local = sync_local  # follows our own cluster in the store; calls back once listed
        self.published = published  # the publisher's: our initial state is in the store
        self.liveness = Liveness(kvkeys.HEARTBEAT)

    @hookimpl
    def meshagent_controllers(self):
        return [Controller("kvstore-connect", self._connect),
                Controller("kvstore-health", self._watch),
                Controller("local-cluster-sync", self._sync_local_cluster)]

    async def _connect(self, handle: ControllerHandle) -> None:
        # Raises KVStoreUnavailable while the store is down: the controller retries with backoff.
        await self.store.connect()
        if self.liveness.failing:
            self.liveness.answered()
            self.controllers.retry_now()

    async def _watch(self, handle: ControllerHandle) -> None:
        liveness = self.liveness
        handle.ready()
        while True:
            was_failing = liveness.failing
            if await liveness.probe(self.store) and was_failing:
                log.info("the kvstore answers again: retrying what waited for it")
                self.controllers.retry_now()
            await asyncio.sleep(PROBE_INTERVAL_FAILING if liveness.failing else PROBE_INTERVAL)

    async def _sync_local_cluster(self, handle: ControllerHandle) -> None:
        """Our own cluster's nodes, identities, endpoints and services, from the local store."""
        await self.published.wait()
        await self.sync_local(self.store, handle.ready)

    @hookimpl
    def meshagent_status(self):
        status = self.store.status()
        if self.liveness.failing:
            summary = f"{self.liveness.describe()}; {status.summary}"
            return StatusSection("KVStore", Health.FAILURE, summary, details=status.details)
        health = Health.OK if status.connected else Health.FAILURE
        return StatusSection("KVStore", health, status.summary, details=status.details)
