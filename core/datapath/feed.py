"""Feeding the datapath slot: the one door.

The feed is the datapath's only caller. Endpoints (from the endpoint manager), IP→identity
changes (the agent's ipcache), map changes (any policy resolver's ``snapshot`` then
``changes``) and merged services (the services component) reach it as raw streams; it folds
them, here and nowhere else, into :class:`~meshagent.datapath.DatapathBatch`es — each key once,
its net change — and hands the datapath one batch at a time. Nothing but endpoints is handed
over before the agent has synced, so a restart neither drops allowed traffic nor lets denied
traffic pass; then the datapath gets its first full state (``reconcile``), then batches.
"""

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence

import attrs

from meshagent import hookimpl
from meshagent.datapath.contract import Datapath, DatapathBatch
from meshagent.datapath.progress import PolicyProgress
from meshagent.events import ChangeKind
from meshagent.model.endpoint import Endpoint
from meshagent.model.ipcache import IPCache, IPCacheEntry
from meshagent.model.service import MergedService
from meshagent.policy import EndpointChanges, MapChange, MapKey, MapState, PolicyResolver
from meshagent.runtime.controller import Controller, ControllerHandle

log = logging.getLogger(__name__)

#: Turns of the loop :meth:`DatapathFeed.applied` gives the policy stream to take the map
#: changes a resolver queued (the default resolver's reach the feed in one).
_TURNS = 4


@attrs.define
class _Pending:
    """One batch in the making: the last raw change of each key, and who waits for it."""

    endpoints: dict[int, tuple[bool, Endpoint]] = attrs.Factory(dict)  # id -> (added?, it)
    policy: dict[int, dict[MapKey, MapChange]] = attrs.Factory(dict)
    ipcache: dict[bytes, tuple[ChangeKind, IPCacheEntry]] = attrs.Factory(dict)
    services: tuple[MergedService, ...] | None = None
    proxy_port: int | None = None
    waiters: list[asyncio.Future] = attrs.Factory(list)
    revision: int | None = None  # the policy revision whose changes are all in (or before) it


class BatchFeed:
    """Folds raw change streams into batches for one datapath and hands them over.

    The rule per key (the last raw change wins, judged against what the datapath holds when
    the batch is taken):

    - an endpoint (its id): added is sent as added; removed is sent only if the datapath
      holds the id, so an endpoint added and removed before it reached the datapath is
      nothing. Removing an endpoint drops its pending policy changes. An endpoint added under
      an id whose removal is pending (a new pod reusing the id) goes into the next batch: the
      old one leaves, with all its entries, first.
    - an ipcache prefix: deleted then upserted (an address reused) is an upsert of the new
      entry; an upsert replacing another entry of the prefix (an ownership hand-over) is an
      upsert of the last; upserted then deleted is a delete, since the datapath may hold the
      prefix from before.
    - a policy key of an endpoint: the last change; a delete is sent only if the datapath
      holds the key. Changes of an endpoint the datapath does not hold and is not about to be
      given (never added here, or removed) are dropped, and so are those pending when it is
      removed.
    - services: the latest whole set.
    - the DNS proxy's port: the latest; the first batch after a :meth:`reconcile` always
      carries it (0 until the proxy said where it listens).

    The datapath is called by :meth:`flush` and :meth:`reconcile` only, one call at a time.
    """

    def __init__(self, datapath: Datapath, progress: PolicyProgress | None = None):
        self.datapath = datapath
        self.progress = progress or PolicyProgress()
        self.endpoints: dict[int, Endpoint] = {}  # what the datapath holds
        self.policy_keys: dict[int, set[MapKey]] = {}  # the policy keys it holds, per endpoint
        self.proxy_port = 0  # the DNS proxy's, as last told
        self.reconciled = False  # whether the datapath got its first full state
        self.wake = asyncio.Event()  # set when something is pending
        self._applying: set[int] = set()  # the endpoints added by the batch being applied
        self._queue: list[_Pending] = [_Pending()]

    # -- raw changes in ---------------------------------------------------------------------------

    def endpoint_added(self, endpoint: Endpoint) -> asyncio.Future:
        """Queue an endpoint (new, restored or changed); the future is done once the
        datapath applied the batch holding it (or fails with what the datapath raised)."""
        pending = self._queue[-1]
        earlier = pending.endpoints.get(endpoint.id)
        if earlier is not None and not earlier[0]:  # its id's removal goes first
            pending = _Pending()
            self._queue.append(pending)
        pending.endpoints[endpoint.id] = (True, endpoint)
        return self._waiter(pending)

    def endpoint_removed(self, endpoint: Endpoint) -> asyncio.Future:
        """Queue an endpoint's removal; the future as for :meth:`endpoint_added`."""
        pending = self._queue[-1]
        pending.endpoints[endpoint.id] = (False, endpoint)
        pending.policy.pop(endpoint.id, None)
        return self._waiter(pending)

    def ipcache_changed(self, kind: ChangeKind, entry: IPCacheEntry) -> None:
        self._queue[-1].ipcache[entry.key] = (kind, entry)
        self.wake.set()

    def policy_changed(self, changes: EndpointChanges, revision: int | None = None) -> None:
        """Map changes as a resolver hands them over: per endpoint, in order, with its
        revision then (every change of it is in them or before). Those of an endpoint the
        datapath neither holds nor is about to be given are stale (it was removed): dropped
        as they come."""
        pending = self._queue[-1]
        if revision is not None:
            pending.revision = revision
        for endpoint_id, endpoint_changes in changes.items():
            coming = pending.endpoints.get(endpoint_id, (False, None))[0]
            if not (coming or endpoint_id in self.endpoints or endpoint_id in self._applying):
                continue
            keys = pending.policy.setdefault(endpoint_id, {})
            for change in endpoint_changes:
                keys[change.key] = change
        self.wake.set()

    def services_changed(self, services: Iterable[MergedService]) -> None:
        self._queue[-1].services = tuple(services)
        self.wake.set()

    def barrier(self) -> asyncio.Future:
        """A future done once every change queued so far is applied (or failed)."""
        return self._waiter(self._queue[-1])

    def proxy_port_changed(self, port: int) -> None:
        """The DNS proxy listens on ``port`` now (0: no proxy). Before the first
        :meth:`reconcile` it is only kept: that reconcile's next batch carries it."""
        self.proxy_port = port
        if self.reconciled:
            self._queue[-1].proxy_port = port
            self.wake.set()

    def _waiter(self, pending: _Pending) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        pending.waiters.append(future)
        self.wake.set()
        return future

    # -- batches out ------------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return any(p.endpoints or p.policy or p.ipcache or p.waiters or p.services is not None
                   or p.proxy_port is not None or p.revision is not None for p in self._queue)

    def take(self) -> tuple[DatapathBatch, list[asyncio.Future], int | None]:
        """The next batch (the oldest pending one, folded), its waiters and the policy
        revision it brings (None: none)."""
        pending = self._queue.pop(0)
        if not self._queue:
            self._queue.append(_Pending())
        held = self.endpoints
        added, removed = [], []
        for endpoint_id, (adds, endpoint) in sorted(pending.endpoints.items()):
            if adds:
                added.append(endpoint)
            elif endpoint_id in held:
                removed.append(held[endpoint_id])
        gone = {e.id for e in removed}
        coming = {e.id for e in added}
        policy = {}
        for endpoint_id, changes in sorted(pending.policy.items()):
            # held or coming, and not leaving (no set of every endpoint held, batch by batch)
            if (endpoint_id in held or endpoint_id in coming) and endpoint_id not in gone:
                had = self.policy_keys.get(endpoint_id, set())
                net = tuple(c for c in changes.values()
                            if c.kind is ChangeKind.UPSERT or c.key in had)
                if net:
                    policy[endpoint_id] = net
        upserts, deletes = [], []
        for kind, entry in pending.ipcache.values():
            (upserts if kind is ChangeKind.UPSERT else deletes).append(entry)
        batch = DatapathBatch(
            added=tuple(added), policy=policy, ipcache_upserts=tuple(upserts),
            ipcache_deletes=tuple(deletes), services=pending.services,
            proxy_port=pending.proxy_port, removed=tuple(removed))
        return batch, pending.waiters, pending.revision

    async def flush(self) -> None:
        """Hand every pending batch to the datapath, oldest first.

        A batch the datapath refuses fails its waiters with the error, which is raised: its
        endpoints count as held (the datapath may hold part of them, so their removal is
        sent), and what else it held is lost until the next :meth:`reconcile`."""
        self.wake.clear()
        while self.pending:
            batch, waiters, revision = self.take()
            self._applying = {endpoint.id for endpoint in batch.added}
            try:
                if not batch.empty:
                    await self.datapath.apply(batch)
            except BaseException as exc:
                for endpoint in batch.added:
                    self.endpoints[endpoint.id] = endpoint
                for waiter in waiters:
                    if waiter.done():
                        continue
                    if isinstance(exc, Exception):
                        waiter.set_exception(exc)
                    else:  # cancelled
                        waiter.cancel()
                raise
            finally:
                self._applying = set()
            self._applied(batch)
            if revision is not None:  # every endpoint held has that revision's state now
                self.progress.realized(self.endpoints, revision)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _applied(self, batch: DatapathBatch) -> None:
        for endpoint in batch.added:
            self.endpoints[endpoint.id] = endpoint
        for endpoint_id, changes in batch.policy.items():
            keys = self.policy_keys.setdefault(endpoint_id, set())
            for change in changes:
                if change.kind is ChangeKind.UPSERT:
                    keys.add(change.key)
                else:
                    keys.discard(change.key)
        for endpoint in batch.removed:
            del self.endpoints[endpoint.id]
            self.policy_keys.pop(endpoint.id, None)

    async def reconcile(self, policies: Mapping[int, MapState], ipcache: Sequence[IPCacheEntry],
                        services: Iterable[MergedService], revision: int = 0) -> None:
        """The datapath's full state (the first, or a fresh one after a failure): it replaces
        every pending policy and ipcache change. Endpoints still on their way get their map
        state after them; endpoints nobody added are left out. The services and the DNS
        proxy's port follow in the next batch."""
        for pending in self._queue:
            pending.policy.clear()
            pending.ipcache.clear()
        held = {ep: state for ep, state in policies.items() if ep in self.endpoints}
        for endpoint_id, state in policies.items():
            last = next((p for p in reversed(self._queue) if endpoint_id in p.endpoints), None)
            if last is not None and last.endpoints[endpoint_id][0]:  # to be added
                last.policy[endpoint_id] = {
                    key: MapChange(ChangeKind.UPSERT, key, verdict)
                    for key, verdict in state.items()}
        self._queue[0].services = tuple(services)
        self._queue[0].proxy_port = self.proxy_port
        self.reconciled = True
        self.wake.set()
        await self.datapath.reconcile(held, ipcache)
        self.policy_keys = {ep: set(state) for ep, state in held.items()}
        self.progress.realized(held, revision)


class DatapathFeed:
    """The datapath's one door, registered as plugin ``core.datapath``: endpoints from the
    endpoint manager, services from the services component, the ipcache's changes (by hook)
    and the resolver's map changes go in; batches go out."""

    def __init__(self, datapath: Datapath | None, resolver: PolicyResolver | None,
                 ipcache: IPCache, *, agent_ready: asyncio.Event,
                 remotes_ready, sync_timeout: float, started: asyncio.Event,
                 synced: asyncio.Event, progress: PolicyProgress):
        self.datapath = datapath
        self.progress = progress  # the policy revision each endpoint's datapath state reflects
        self.batches = BatchFeed(datapath, progress) if datapath is not None else None
        self.resolver = resolver
        self.ipcache = ipcache
        self.agent_ready = agent_ready
        self.remotes_ready = remotes_ready
        self.sync_timeout = sync_timeout
        self.started = started  # set here: the datapath may be called
        self.synced = synced  # set here: it got its first full state
        self.services: tuple[MergedService, ...] = ()  # the latest merged set
        self.proxy_port = 0  # where the DNS proxy listens, as last told (0: no proxy)
        self._taken = False  # the first full state is taken: pass the changes after it on

    # -- the door's inputs ------------------------------------------------------------------------

    def endpoint_added(self, endpoint: Endpoint) -> asyncio.Future:
        """Hand an endpoint to the datapath; done once the datapath enforces for it."""
        self.progress.announced(endpoint.id)
        if self.batches is None:
            return _done()
        return self.batches.endpoint_added(endpoint)

    def endpoint_removed(self, endpoint: Endpoint) -> asyncio.Future:
        """Take an endpoint from the datapath; done once it is gone."""
        self.progress.forget(endpoint.id)
        if self.batches is None:
            return _done()
        return self.batches.endpoint_removed(endpoint)

    def services_changed(self, services: Sequence[MergedService]) -> None:
        """The merged services now (the whole set); handed over once the datapath synced."""
        self.services = tuple(services)
        if self.batches is not None and self._taken:
            self.batches.services_changed(self.services)

    def set_proxy_port(self, port: int) -> None:
        """The agent's DNS proxy listens on ``port`` (TCP and UDP, both families; 0: it
        stopped): the datapath gets it in its next batch, and again after each reconcile.
        Called once the proxy's sockets are bound."""
        if not 0 <= port <= 65535:
            raise ValueError(f"proxy port {port} is not a port number")
        self.proxy_port = port
        if self.batches is not None:
            self.batches.proxy_port_changed(port)

    async def applied(self) -> None:
        """Return once the datapath applied every change handed to the feed so far: the
        ipcache's, and the resolver's map changes they caused (a resolver queues those as it
        hears of an identity; the feed takes them within a few turns of the loop). What the
        DNS proxy waits for before a pod gets an answer."""
        if self.batches is None:
            return
        for _ in range(_TURNS):
            await asyncio.sleep(0)
        await self.batches.barrier()

    @hookimpl
    def meshagent_ipcache_changes(self, changes):
        if self.batches is not None and self._taken:  # before: in the full state
            record = self.batches.ipcache_changed
            for kind, entry in changes:
                record(kind, entry)

    # -- controllers ------------------------------------------------------------------------------

    @hookimpl
    def meshagent_controllers(self):
        datapath, resolver = self.datapath, self.resolver
        if datapath is None:
            if resolver is None:
                return []
            # nobody enforces: take the resolver's changes so they do not pile up
            return [Controller("policy-changes", lambda h: self._discard_changes(resolver, h))]
        return [Controller("datapath-start", lambda h: self._start(datapath, h)),
                Controller("datapath-sync", lambda h: self._sync(resolver, h))]

    async def _start(self, datapath: Datapath, handle: ControllerHandle) -> None:
        await datapath.start()
        self.started.set()

    async def _sync(self, resolver: PolicyResolver | None, handle: ControllerHandle) -> None:
        """Hand over endpoints only until the agent is synced, reconcile, then every change.

        Synced: every controller ready (policies listed, endpoints restored, local cluster
        listed) and every remote cluster ready, or ``--datapath-sync-timeout`` passed. A
        failure restarts this from a fresh reconcile, so no change is lost.
        """
        batches = self.batches
        handle.ready()
        await self.started.wait()
        if not self._taken:  # the first sync: endpoints (restored, created) meanwhile
            due = asyncio.create_task(self._sync_due(), name="datapath-sync-due")
            try:
                while not due.done():
                    await batches.flush()
                    wake = asyncio.create_task(batches.wake.wait())
                    try:
                        await asyncio.wait((due, wake), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        wake.cancel()
            finally:
                due.cancel()
            await batches.flush()
        policies = resolver.snapshot() if resolver is not None else {}
        revision = resolver.revision if resolver is not None else 0
        self._taken = True
        await batches.reconcile(policies, list(self.ipcache.values()), self.services, revision)
        self.synced.set()
        async with asyncio.TaskGroup() as streams:
            streams.create_task(self._flush(batches))
            if resolver is not None:
                streams.create_task(self._take_policy(resolver, batches))

    async def _sync_due(self) -> None:
        await self.agent_ready.wait()
        deadline = time.monotonic() + self.sync_timeout
        while time.monotonic() < deadline and not self.remotes_ready():
            await asyncio.sleep(0.1)

    @staticmethod
    async def _flush(batches: BatchFeed) -> None:
        while True:
            await batches.flush()
            await batches.wake.wait()

    @staticmethod
    async def _take_policy(resolver: PolicyResolver, batches: BatchFeed) -> None:
        while True:
            changes = await resolver.changes()
            # every change of this revision is in them, or taken before (the contract)
            batches.policy_changed(changes, resolver.revision)

    async def _discard_changes(self, resolver: PolicyResolver, handle: ControllerHandle) -> None:
        """Nobody enforces: take the resolver's changes; its revisions count as reached."""
        handle.ready()
        while True:
            await resolver.changes()
            self.progress.realized(list(self.progress.revisions), resolver.revision)


def _done() -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future
