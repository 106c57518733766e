"""ClusterMesh: connect to every cluster in ``--clustermesh-config``, sync it, show it.

The directory holds one file per remote cluster, named after it (the seed's layout; the
certificates beside it are ignored because a cluster name has no dot). The directory is
watched with inotify: a new file connects, a changed one (or a changed CA, certificate or key
it names) reconnects, a removed one disconnects and withdraws every entry of that cluster.
Written against the kvstore slot only: a file may say ``kvstore: <backend>`` and defaults to the
local cluster's backend.

What is done with a connected cluster is a :class:`Follower`'s job: the agent's fills its tables
(:class:`~meshagent.clustermesh.sync.ClusterSync`), KVStoreMesh's copies the cluster into the
local kvstore's cache. A cluster whose config says ``cached`` is read from that cache.
"""

import asyncio
import hashlib
import ipaddress
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import yaml

from meshagent import hookimpl
from meshagent.clustermesh.cache import CacheReader
from meshagent.clustermesh.noderoutes import NodeRoutes
from meshagent.clustermesh.ownership import AddressOwnership
from meshagent.clustermesh.sync import EntryChecks
from meshagent.errors import MeshagentError
from meshagent.kvstore import KVStore, KVStoreBackend, KVStoreUnavailable
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstore.liveness import KVStoreSilent, Liveness
from meshagent.model.cluster import (
    CLUSTER_NAME_PATTERN,
    ClusterConfig,
    ClusterInfo,
    cluster_config_from_json,
)
from meshagent.model.net import Network, family_order
from meshagent.runtime.controller import Controller, ControllerHandle
from meshagent.runtime.status import Health, StatusSection

log = logging.getLogger(__name__)

KIND_WORDS = ("nodes", "endpoints", "identities", "services")  # as cilium status says them

BACKOFF_START = 0.5
# Short, so that a remote is back within seconds of its return however long it was away: one
# connection attempt every ~2 s per remote is cheap (KVStoreMesh is the answer at scale).
BACKOFF_MAX = 2.0
DEBOUNCE = 0.1
RESCAN_INTERVAL = 10.0
STOP_RECANCEL = 1.0  # seconds between cancellations of a remote's task that will not stop


class ClusterConfigError(MeshagentError):
    """A remote's cluster config is malformed or conflicts: retried, and shown in status."""


class ClusterConfigMissing(ClusterConfigError):
    """No cluster config yet: its agents have not started. Waited for, not a failure."""


class Follower(Protocol):
    """What is done with one connected remote cluster, for as long as it stays connected."""

    cluster_id: int
    cached: bool  # reads the KVStoreMesh cache of the cluster, not its own state
    last_event_at: float | None  # when the last change was applied
    checks: EntryChecks  # what it refused, per kind, and why
    held: dict[str, int]  # per kind: entries waiting for the right to be applied

    @property
    def synced(self) -> dict[str, bool]:
        """Per kind (nodes, endpoints, identities, services): caught up with the cluster."""

    def counts(self) -> dict[str, int]:
        """Per kind: entries of the cluster held."""

    async def run(self, store: KVStore, on_synced: Callable[[], None]) -> None:
        """Follow the cluster until the store fails; ``on_synced`` once caught up."""

    def switch_source(self, cached: bool) -> None:
        """Follow the cluster's cache (or its own state) from the next run on."""

    def relist(self) -> None:
        """List everything again on the next run, keeping what is held until then."""

    def withdraw(self) -> None:
        """Remove everything of the cluster (it left the mesh)."""

    def readmit(self) -> None:
        """Granted pod CIDRs changed: check held entries again."""


#: Makes the follower of a remote cluster: (name, its config) -> follower, or raises
#: ClusterConfigError if that config cannot be followed.
FollowerFactory = Callable[[str, ClusterConfig], Follower]


#: Keys of a clustermesh file for a cluster whose nodes announce no pod CIDR (Cilium with ENI,
#: Azure or multi-pool IPAM): the CIDRs its endpoints live in, or trust with any address
#: that is not this cluster's or granted to another
POD_CIDRS = "pod-cidrs"
TRUST_ENDPOINTS = "trust-endpoints"


def read_address_options(path: Path) -> tuple[tuple[Network, ...], bool]:
    """A clustermesh file's ``pod-cidrs`` and ``trust-endpoints``; ClusterConfigError names
    what is wrong (the cluster is not connected until it is mended)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return (), False  # the backend's own parser says what is wrong
    if not isinstance(data, dict):
        return (), False
    texts = data.get(POD_CIDRS) or []
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise ClusterConfigError(f"{path}: '{POD_CIDRS}' must be a list of CIDRs")
    cidrs = []
    for text in texts:
        try:
            cidrs.append(ipaddress.ip_network(str(text)))
        except ValueError as exc:
            raise ClusterConfigError(f"{path}: '{POD_CIDRS}': {exc}") from None
    trusted = data.get(TRUST_ENDPOINTS, False)
    if not isinstance(trusted, bool):
        raise ClusterConfigError(f"{path}: '{TRUST_ENDPOINTS}' must be true or false")
    return tuple(sorted(cidrs, key=family_order)), trusted


@attrs.frozen
class RemoteFile:
    name: str
    path: Path
    digest: str
    named_files: tuple[Path, ...] = ()


def scan_config_dir(directory: Path, local_name: str,
                    files_of: Callable[[Path], tuple[Path, ...]]) -> dict[str, RemoteFile]:
    """The remote cluster files in ``directory``, by cluster name, with a hash of their
    content and of the files they name (``files_of``: CA, certificate, key)."""
    found = {}
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if name == local_name or not CLUSTER_NAME_PATTERN.match(name) or not entry.is_file():
            continue
        digest = hashlib.sha256()
        try:
            digest.update(entry.read_bytes())
        except OSError as exc:
            log.warning("clustermesh: cannot read %s: %s", entry, exc)
            continue
        named_files = files_of(entry)
        for named in named_files:
            digest.update(b"\0" + str(named).encode() + b"\0")
            try:
                digest.update(hashlib.sha256(named.read_bytes()).digest())
            except OSError:
                digest.update(b"unreadable")  # the connection attempt will say why
        found[name] = RemoteFile(name, entry, digest.hexdigest(), named_files)
    return found


class RemoteCluster:
    """One remote cluster: its connection, its sync, and what status says about it."""

    def __init__(self, mesh: "ClusterMesh", remote: RemoteFile):
        self.mesh = mesh
        self.name = remote.name
        self.file = remote
        self.store: KVStore | None = None
        self.sync: Follower | None = None
        self.remote_config: ClusterConfig | None = None  # what its cluster config says
        self.accepted_id: int | None = None  # set once that id passed the conflict checks
        self.config_retrieved = False
        self.ready = False
        self.failures = 0
        self.last_failure_at: float | None = None
        self.last_error = ""
        self.disconnected_at: float | None = None
        self.known_addresses: tuple[str, ...] = ()  # its kvstore servers, once known
        self.liveness = Liveness(kvkeys.cluster_config_key(self.name))
        self._expiry: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"clustermesh:{self.name}")

    async def stop(self, withdraw: bool) -> None:
        while self.task is not None and not self.task.done():
            # cancelled again each second: a client library may swallow one cancellation
            # (Python 3.11's asyncio.wait_for can), and shutdown must not wait on it forever.
            # (asyncio.timeout is no cure on 3.11: after a TaskGroup child fails, the task's
            # cancel count stays raised and a later timeout turns into a cancellation.)
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=STOP_RECANCEL)
        if self._expiry is not None:
            self._expiry.cancel()
        self.accepted_id = None
        if withdraw and self.mesh.ownership is not None:
            self.mesh.ownership.configure(self.name, (), False)
        if withdraw and self.sync is not None:
            self.sync.withdraw()
            log.info("clustermesh: withdrew every entry of cluster %s", self.name)

    async def _run(self) -> None:
        backoff = BACKOFF_START
        while True:
            was_ready = False
            try:
                await self._connect_and_sync()
            except asyncio.CancelledError:
                await self._close_store()
                raise
            except ClusterConfigMissing as exc:
                self.last_error = str(exc)
            except Exception as exc:
                was_ready = self.ready
                self._failed(exc)
            self.ready = False
            await self._close_store()
            if was_ready:
                backoff = BACKOFF_START  # a new outage, however long the last one was
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _connect_and_sync(self) -> None:
        if self.mesh.ownership is not None:
            cidrs, trusted = read_address_options(self.file.path)
            self.mesh.ownership.configure(self.name, cidrs, trusted)
        self.store = self.mesh.open_store(self.file)
        self.known_addresses = self.store.status().addresses
        if self.mesh.ownership is not None:
            self.mesh.ownership.schedule()  # no pod CIDR may cover these servers
        await self.store.connect()
        self.liveness.answered()
        config = await self._read_cluster_config(self.store)
        if self.mesh.cache_store is not None and not config.cached:
            raise ClusterConfigError(
                f"the local kvstore's {kvkeys.cluster_config_key(self.name)} is not a"
                " KVStoreMesh cache (no 'cached' capability): is meshagent kvstoremesh running?")
        if self.sync is not None and self.sync.cluster_id == config.id:
            self.sync.switch_source(config.cached)
        else:
            follower = self.mesh.follower(self.name, config)
            if self.sync is not None:
                self.sync.withdraw()
            self.sync = follower
        # A hung or partitioned server keeps the watches open and silent: the probe notices
        # and its raise ends the sync, so the connection is made again.
        async with asyncio.TaskGroup() as group:
            group.create_task(self.liveness.watch(self.store), name=f"liveness:{self.name}")
            await self.sync.run(self.store, self._synced)

    async def _read_cluster_config(self, store: KVStore) -> ClusterConfig:
        entry = await store.get(kvkeys.cluster_config_key(self.name))
        if entry is None:
            self.config_retrieved = False
            raise ClusterConfigMissing(
                f"waiting for its cluster config at {kvkeys.cluster_config_key(self.name)}"
                f" ({self.mesh.config_missing_hint()})")
        try:
            config = cluster_config_from_json(entry.value)
        except ValueError as exc:
            raise ClusterConfigError(f"malformed cluster config: {exc}") from None
        self.config_retrieved = True
        self.remote_config = config
        problem = self._id_problem(config)
        if problem:
            self.accepted_id = None
            raise ClusterConfigError(problem)
        self.accepted_id = config.id
        return config

    def _id_problem(self, config: ClusterConfig) -> str:
        local, cluster_id = self.mesh.cluster, config.id
        if not 1 <= cluster_id <= local.max_connected_clusters:
            return f"cluster id {cluster_id} is out of range 1..{local.max_connected_clusters}"
        if local.max_connected_clusters == 511 and config.max_connected_clusters != 511:
            # Cilium checks it only where the mesh is extended (ValidateRemoteConfig)
            return (f"mismatched maxConnectedClusters: local={local.max_connected_clusters},"
                    f" remote={config.max_connected_clusters}")
        if cluster_id == local.id:
            return (f"cluster id {cluster_id} conflicts with the local cluster {local.name!r}:"
                    " refusing to connect")
        for other in self.mesh.remotes.values():
            if other is not self and other.accepted_id == cluster_id:
                return (f"cluster id {cluster_id} conflicts with remote cluster {other.name!r}:"
                        " refusing to connect")
        return ""

    def _synced(self) -> None:
        if not self.ready:
            self.ready = True
            self.last_error = ""
            self.disconnected_at = None
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
            log.info("clustermesh: cluster %s (id %d) is ready", self.name, self.remote_id)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, ExceptionGroup):
            exc = exc.exceptions[0]
        self.failures += 1
        self.last_failure_at = time.time()
        self.last_error = (str(exc) if isinstance(exc, MeshagentError)
                           else f"{type(exc).__name__}: {exc}")
        if isinstance(exc, KVStoreUnavailable) and not isinstance(exc, KVStoreSilent):
            self.liveness.no_answer(self.last_error)  # the silence goes on while reconnecting
        self.ready = False
        log.warning("clustermesh: cluster %s: %s (failure %d; entries kept)", self.name,
                    self.last_error, self.failures)
        if self.disconnected_at is None:
            self.disconnected_at = time.time()
            ttl = self.mesh.cache_ttl
            if ttl > 0 and self.sync is not None:
                self._expiry = asyncio.get_running_loop().call_later(ttl, self._expire)

    def _expire(self) -> None:
        log.warning("clustermesh: cluster %s unreachable for over %.0fs: dropping its entries",
                    self.name, self.mesh.cache_ttl)
        if self.sync is not None:
            self.sync.withdraw()

    async def _close_store(self) -> None:
        store, self.store = self.store, None
        if store is not None and self.mesh.cache_store is None:  # never the shared one
            await store.close()

    # -- status ---------------------------------------------------------------------------------

    def problem(self) -> str:
        """Why it is not ready, naming its kvstore and how long it has been silent."""
        if self.liveness.failing:
            where = ", ".join(self.known_addresses) or f"of {self.file.path}"
            return f"kvstore {where}: {self.liveness.describe()}"
        return self.last_error or "connecting"

    @property
    def remote_id(self) -> int | None:
        return self.remote_config.id if self.remote_config is not None else None

    def counts(self) -> dict[str, int]:
        return self.sync.counts() if self.sync else dict.fromkeys(KIND_WORDS, 0)

    @property
    def source(self) -> str:
        """Where the cluster is read from: ``cache`` (KVStoreMesh's copy) or ``direct``."""
        return "cache" if self.sync is not None and self.sync.cached else "direct"

    def status_lines(self, now: float) -> list[str]:
        last = "never" if self.last_failure_at is None else f"{now - self.last_failure_at:.0f}s ago"
        counts = self.counts()
        head = (f"{self.name}: {'ready' if self.ready else 'not ready'}, "
                + ", ".join(f"{counts[k]} {k}" for k in KIND_WORDS)
                + f", {self.failures} failures (last: {last})")
        lines = [head]
        store_status = self.store.status().summary if self.store else (
            f"not connected: {self.last_error}" if self.last_error else "not connected")
        lines.append(f"└  {store_status}")
        if self.source == "cache":
            lines.append("└  source: the KVStoreMesh cache (cilium/cache/) in that kvstore")
        cid = self.remote_id if self.remote_id is not None else "unknown"
        config = self.remote_config
        lines.append(
            f"└  remote configuration: expected=true,"
            f" retrieved={str(self.config_retrieved).lower()}, cluster-id={cid},"
            f" kvstoremesh={str(bool(config and config.cached)).lower()},"
            f" sync-canaries={str(bool(config and config.synced_canaries)).lower()}")
        synced = self.sync.synced if self.sync else {}
        flags = ", ".join(f"{k}={str(synced.get(k, False)).lower()}"
                          for k in KIND_WORDS)
        lines.append(f"└  synchronization status: {flags}")
        if self.sync and self.sync.last_event_at:
            lines.append(f"└  sync lag: {now - self.sync.last_event_at:.1f}s (age of the last"
                         " applied change)")
        if self.sync and self.sync.held:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(self.sync.held.items()))
            lines.append(f"└  held (outside the pod CIDRs granted to {self.name}): {counts}")
        if self.lacks_pod_cidrs():
            lines.append(f"└  held: its nodes announce no pod CIDR (ENI, Azure or multi-pool"
                         f" IPAM?): give them as '{POD_CIDRS}:' in {self.file.path}, or set"
                         f" '{TRUST_ENDPOINTS}: true' there")
        refused = [f"{node}: {cidr}: {why}" for (cluster, node, cidr), why
                   in sorted(self._refused().items(), key=lambda item: (
                       item[0][1], family_order(item[0][2]))) if cluster == self.name]
        if refused:
            lines.append(f"└  pod CIDRs refused: {len(refused)}")
            lines += [f"   {line}" for line in refused[:10]]
        if self.sync and self.sync.checks.rejected:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(self.sync.checks.rejected.items()))
            lines.append(f"└  rejected: {counts}")
            for kind, reason in sorted(self.sync.checks.last_reject.items()):
                lines.append(f"   last rejected {kind}: {reason}")
        if not self.ready:
            lines.append(f"└  error: {self.problem()}")
        elif self.liveness.failing:
            lines.append(f"└  warning: {self.problem()}")
        return lines

    def lacks_pod_cidrs(self) -> bool:
        """Its endpoints are held because its nodes announce no pod CIDR and its file gives
        none: what status says of a Cilium cluster with ENI, Azure or multi-pool IPAM."""
        ownership = self.mesh.ownership
        return (ownership is not None and self.sync is not None and bool(self.sync.held)
                and ownership.announces_pod_cidrs(self.name) is False
                and self.name not in ownership.configured and self.name not in ownership.trusted)

    def _refused(self) -> dict:
        ownership = self.mesh.ownership
        return ownership.refused if ownership is not None else {}

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name, "ready": self.ready, "cluster_id": self.remote_id,
            "config_retrieved": self.config_retrieved, "config_file": str(self.file.path),
            "source": self.source,
            "kvstoremesh": bool(self.remote_config and self.remote_config.cached),
            **self.counts(),
            "failures": self.failures, "last_failure_at": self.last_failure_at,
            "last_error": self.last_error,
            "no_answer_seconds": round(self.liveness.silence(), 1),
            "kvstore": self.store.status().summary if self.store else None,
            "synced": self.sync.synced if self.sync else {},
            "sync_lag_seconds": (now - self.sync.last_event_at)
            if self.sync and self.sync.last_event_at else None,
            "rejected": dict(self.sync.checks.rejected) if self.sync else {},
            "last_rejected": dict(self.sync.checks.last_reject) if self.sync else {},
            "held": self.sync.held if self.sync else {},
            "held_for_lack_of_pod_cidrs": self.lacks_pod_cidrs(),
            "refused_pod_cidrs": {f"{node}/{cidr}": why for (cluster, node, cidr), why
                                  in self._refused().items() if cluster == self.name},
        }


class ClusterMesh:
    """Every remote cluster of ``--clustermesh-config``, kept in step with the directory."""

    def __init__(self, *, cluster: ClusterInfo, follower: FollowerFactory,
                 backend_named: Callable[[str | None], KVStoreBackend], directory: Path,
                 cache_ttl: float, ownership: AddressOwnership | None = None,
                 global_services: Callable[[], int] | None = None,
                 node_routes: NodeRoutes | None = None,
                 cache_store: KVStore | None = None,
                 section: str = "ClusterMesh"):
        self.cluster = cluster
        self.follower = follower
        self.ownership = ownership  # None: nothing is admitted by pod CIDR (KVStoreMesh)
        self._backend_named = backend_named
        self._global_services = global_services
        self.node_routes = node_routes
        self.directory = directory
        self.cache_ttl = cache_ttl
        # set: every remote is read from the local kvstore's KVStoreMesh cache, through this
        # client (the agent's own: no connection beyond the one every agent holds, and never
        # closed here); the files only name the clusters
        self.cache_store = cache_store
        # ... and watched through one watch per kind for all of them
        self.cache_reader = CacheReader(cache_store) if cache_store is not None else None
        self.section = section
        self.remotes: dict[str, RemoteCluster] = {}
        if ownership is not None:
            ownership.listeners.append(self._rights_changed)

    def config_missing_hint(self) -> str:
        """Who should have written a remote's cluster config where it is read."""
        if self.cache_store is not None:
            return "is meshagent kvstoremesh running?"
        return "is an agent of that cluster running?"

    def open_store(self, remote: RemoteFile) -> KVStore:
        """A new client for a remote: the one its file describes, or the local cache's."""
        if self.cache_reader is not None:
            return self.cache_reader
        return self.backend_for(remote.path).client_from_file(remote.path)

    def _rights_changed(self) -> None:
        """Granted pod CIDRs changed: every remote's endpoints are checked against them again."""
        for remote in self.remotes.values():
            if remote.sync is not None:
                remote.sync.readmit()

    def backend_for(self, path: Path):
        """The kvstore backend a clustermesh file asks for (default: the local one)."""
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            data = None  # the backend's own parser reports what is wrong
        name = data.get("kvstore") if isinstance(data, dict) else None
        return self._backend_named(name)

    def _files_of(self, path: Path) -> tuple[Path, ...]:
        try:
            return self.backend_for(path).files_of(path)
        except MeshagentError:
            return ()  # an unknown backend: connecting will say so

    async def run(self, handle: ControllerHandle) -> None:
        """Controller: connect to what is there, then follow the directory's changes."""
        await self.follow_directory(handle.ready)

    async def follow_directory(self, on_started: Callable[[], None]) -> None:
        """Connect to the clusters the directory names (then ``on_started``), and keep in
        step with its changes, forever."""
        from asyncinotify import Inotify, Mask

        mask = (Mask.CREATE | Mask.DELETE | Mask.MODIFY | Mask.CLOSE_WRITE | Mask.MOVED_TO
                | Mask.MOVED_FROM | Mask.ATTRIB)
        with Inotify() as inotify:
            inotify.add_watch(self.directory, mask)
            watched = {self.directory.resolve()}
            await self.reconcile()
            on_started()
            events = aiter(inotify)
            while True:
                # certificates may live in other directories: watch those too
                for folder in {f.parent.resolve() for r in self.remotes.values()
                               for f in r.file.named_files} - watched:
                    try:
                        inotify.add_watch(folder, mask)
                        watched.add(folder)
                    except OSError as exc:
                        log.warning("clustermesh: cannot watch %s: %s", folder, exc)
                try:  # and look again now and then, in case an event was missed
                    await asyncio.wait_for(anext(events), RESCAN_INTERVAL)
                except asyncio.TimeoutError:
                    pass
                await asyncio.sleep(DEBOUNCE)  # a writer's burst of events is one change
                await self.reconcile()

    async def reconcile(self) -> None:
        wanted = scan_config_dir(self.directory, self.cluster.name, self._files_of)
        for name in sorted(set(self.remotes) - set(wanted)):
            log.info("clustermesh: %s removed from %s: disconnecting", name, self.directory)
            await self.remotes[name].stop(withdraw=True)
            del self.remotes[name]
        for name, remote in sorted(wanted.items()):
            current = self.remotes.get(name)
            if current is not None and current.file.digest == remote.digest:
                continue
            if current is not None:
                log.info("clustermesh: %s changed: reconnecting", name)
                await current.stop(withdraw=False)
            else:
                log.info("clustermesh: connecting to cluster %s (%s)", name, remote.path)
            cluster = RemoteCluster(self, remote)
            if current is not None and current.sync is not None:
                # keep its entries until the new connection has listed them again
                cluster.sync = current.sync
                cluster.sync.relist()
            self.remotes[name] = cluster
            cluster.start()

    async def close(self) -> None:
        """Agent shutdown: disconnect and forget every remote, withdraw nothing (as Cilium
        does). Following the directory again connects afresh."""
        remotes, self.remotes = list(self.remotes.values()), {}
        for remote in remotes:
            await remote.stop(withdraw=False)

    @hookimpl
    def meshagent_controllers(self):
        return [Controller("clustermesh-config", self.run)]

    @hookimpl
    def meshagent_status(self, verbose):
        return self.status(verbose)

    def status(self, verbose: bool) -> StatusSection:
        now = time.time()
        remotes = sorted(self.remotes.values(), key=lambda r: r.name)
        ready = sum(1 for r in remotes if r.ready)
        summary = f"{ready}/{len(remotes)} remote clusters ready"
        if self._global_services is not None:
            summary += f", {self._global_services()} global-services"
        cached = sum(1 for r in remotes if r.source == "cache")
        if cached:
            summary += f", {cached} through the KVStoreMesh cache"
        not_ready = [r for r in remotes if not r.ready]
        if not_ready:
            summary += "; not ready: " + ", ".join(f"{r.name} ({r.problem()})"
                                                   for r in not_ready)
        # Still synced, but its last probes went unanswered: say so before it is given up.
        lacking = [r.name for r in remotes if r.lacks_pod_cidrs()]
        if lacking:
            summary += ("; endpoints held, no pod CIDRs announced or configured: "
                        + ", ".join(lacking))
        silent = [r for r in remotes if r.ready and r.liveness.failing]
        if silent:
            summary += "; not answering: " + ", ".join(f"{r.name} ({r.problem()})"
                                                       for r in silent)
        details = [line for r in remotes for line in r.status_lines(now)]
        routes = self.node_routes
        if routes is not None:
            details.append(f"node routes: {len(routes.routes)} installed,"
                           f" {len(routes.refused)} refused")
            details += [f"   not routed {cidr}: {why}" for cidr, why in sorted(
                routes.refused.items(), key=lambda item: family_order(item[0]))]
        health = Health.WARNING if not_ready or silent else Health.OK
        return StatusSection(self.section, health, summary,
                             details=details)
