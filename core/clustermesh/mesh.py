"""ClusterMesh: connect to every cluster in ``--clustermesh-config``, sync it, show it.

The directory holds one file per remote cluster, named after it (the seed's layout; the
certificates beside it are ignored because a cluster name has no dot). The directory is
watched with inotify: a new file connects, a changed one (or a changed CA, certificate or key
it names) reconnects, a removed one disconnects and withdraws every entry of that cluster. Written against the kvstore slot only: a file may
say ``kvstore: <backend>`` and defaults to the local cluster's backend.
"""

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import yaml

from meshagent import hookimpl
from meshagent.clustermesh.noderoutes import NodeRoutes
from meshagent.clustermesh.ownership import AddressOwnership
from meshagent.clustermesh.sync import ClusterSync
from meshagent.errors import MeshagentError
from meshagent.kvstore import KVStore, KVStoreBackend, KVStoreUnavailable
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstore.liveness import KVStoreSilent, Liveness
from meshagent.model.cluster import CLUSTER_NAME_PATTERN, ClusterInfo
from meshagent.model.jsonfields import field, load_object
from meshagent.model.net import family_order
from meshagent.model.table import Tables
from meshagent.runtime.controller import Controller, ControllerHandle
from meshagent.runtime.status import Health, StatusSection

log = logging.getLogger(__name__)

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
        self.sync: ClusterSync | None = None
        self.remote_id: int | None = None  # what its cluster config says
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
        backend = self.mesh.backend_for(self.file.path)
        self.store = backend.client_from_file(self.file.path)
        self.known_addresses = self.store.status().addresses
        self.mesh.ownership.schedule()  # no pod CIDR may cover these servers
        await self.store.connect()
        self.liveness.answered()
        cluster_id = await self._read_cluster_config(self.store)
        if self.sync is None or self.sync.cluster_id != cluster_id:
            if self.sync is not None:
                self.sync.withdraw()
            self.sync = ClusterSync(self.name, cluster_id, self.mesh.cluster, self.mesh.tables,
                                    self.mesh.ownership)
        # A hung or partitioned server keeps the watches open and silent: the probe notices
        # and its raise ends the sync, so the connection is made again.
        async with asyncio.TaskGroup() as group:
            group.create_task(self.liveness.watch(self.store), name=f"liveness:{self.name}")
            await self.sync.run(self.store, self._synced)

    async def _read_cluster_config(self, store: KVStore) -> int:
        entry = await store.get(kvkeys.cluster_config_key(self.name))
        if entry is None:
            self.config_retrieved = False
            raise ClusterConfigMissing(
                f"waiting for its cluster config at {kvkeys.cluster_config_key(self.name)}"
                " (is an agent of that cluster running?)")
        try:
            cluster_id = field(load_object(entry.value), "id", int)
        except ValueError as exc:
            raise ClusterConfigError(f"malformed cluster config: {exc}") from None
        self.config_retrieved = True
        self.remote_id = cluster_id
        problem = self._id_problem(cluster_id)
        if problem:
            self.accepted_id = None
            raise ClusterConfigError(problem)
        self.accepted_id = cluster_id
        return cluster_id

    def _id_problem(self, cluster_id: int) -> str:
        local = self.mesh.cluster
        if not 1 <= cluster_id <= local.max_connected_clusters:
            return f"cluster id {cluster_id} is out of range 1..{local.max_connected_clusters}"
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
        if store is not None:
            await store.close()

    # -- status ---------------------------------------------------------------------------------

    def problem(self) -> str:
        """Why it is not ready, naming its kvstore and how long it has been silent."""
        if self.liveness.failing:
            where = ", ".join(self.known_addresses) or f"of {self.file.path}"
            return f"kvstore {where}: {self.liveness.describe()}"
        return self.last_error or "connecting"

    def status_lines(self, now: float) -> list[str]:
        tables = self.mesh.tables
        last = "never" if self.last_failure_at is None else f"{now - self.last_failure_at:.0f}s ago"
        head = (f"{self.name}: {'ready' if self.ready else 'not ready'},"
                f" {tables.nodes.count(self.name)} nodes,"
                f" {tables.ipcache.count(self.name)} endpoints,"
                f" {tables.identities.count(self.name)} identities,"
                f" {tables.services.count(self.name)} services,"
                f" {self.failures} failures (last: {last})")
        lines = [head]
        store_status = self.store.status().summary if self.store else (
            f"not connected: {self.last_error}" if self.last_error else "not connected")
        lines.append(f"└  {store_status}")
        cid = self.remote_id if self.remote_id is not None else "unknown"
        lines.append(f"└  remote configuration: expected=true,"
                     f" retrieved={str(self.config_retrieved).lower()}, cluster-id={cid}")
        synced = self.sync.synced if self.sync else {}
        flags = ", ".join(f"{k}={str(synced.get(k, False)).lower()}"
                          for k in ("nodes", "endpoints", "identities", "services"))
        lines.append(f"└  synchronization status: {flags}")
        if self.sync and self.sync.last_event_at:
            lines.append(f"└  sync lag: {now - self.sync.last_event_at:.1f}s (age of the last"
                         " applied change)")
        if self.sync and self.sync.held:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(self.sync.held.items()))
            lines.append(f"└  held (outside the pod CIDRs granted to {self.name}): {counts}")
        refused = [f"{node}: {cidr}: {why}" for (cluster, node, cidr), why
                   in sorted(self.mesh.ownership.refused.items(), key=lambda item: (
                       item[0][1], family_order(item[0][2]))) if cluster == self.name]
        if refused:
            lines.append(f"└  pod CIDRs refused: {len(refused)}")
            lines += [f"   {line}" for line in refused[:10]]
        if self.sync and self.sync.rejected:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(self.sync.rejected.items()))
            lines.append(f"└  rejected: {counts}")
            for kind, reason in sorted(self.sync.last_reject.items()):
                lines.append(f"   last rejected {kind}: {reason}")
        if not self.ready:
            lines.append(f"└  error: {self.problem()}")
        elif self.liveness.failing:
            lines.append(f"└  warning: {self.problem()}")
        return lines

    def to_json(self, now: float) -> dict[str, Any]:
        tables = self.mesh.tables
        return {
            "name": self.name, "ready": self.ready, "cluster_id": self.remote_id,
            "config_retrieved": self.config_retrieved, "config_file": str(self.file.path),
            "nodes": tables.nodes.count(self.name),
            "endpoints": tables.ipcache.count(self.name),
            "identities": tables.identities.count(self.name),
            "services": tables.services.count(self.name),
            "failures": self.failures, "last_failure_at": self.last_failure_at,
            "last_error": self.last_error,
            "no_answer_seconds": round(self.liveness.silence(), 1),
            "kvstore": self.store.status().summary if self.store else None,
            "synced": self.sync.synced if self.sync else {},
            "sync_lag_seconds": (now - self.sync.last_event_at)
            if self.sync and self.sync.last_event_at else None,
            "rejected": dict(self.sync.rejected) if self.sync else {},
            "last_rejected": dict(self.sync.last_reject) if self.sync else {},
            "held": self.sync.held if self.sync else {},
            "refused_pod_cidrs": {f"{node}/{cidr}": why for (cluster, node, cidr), why
                                  in self.mesh.ownership.refused.items()
                                  if cluster == self.name},
        }


class ClusterMesh:
    """Every remote cluster of ``--clustermesh-config``, kept in step with the directory."""

    def __init__(self, *, cluster: ClusterInfo, tables: Tables, ownership: AddressOwnership,
                 backend_named: Callable[[str | None], KVStoreBackend],
                 global_services: Callable[[], int], node_routes: NodeRoutes | None,
                 directory: Path, cache_ttl: float):
        self.cluster = cluster
        self.tables = tables
        self.ownership = ownership
        self._backend_named = backend_named
        self._global_services = global_services
        self.node_routes = node_routes
        self.directory = directory
        self.cache_ttl = cache_ttl
        self.remotes: dict[str, RemoteCluster] = {}
        ownership.listeners.append(self._rights_changed)

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
        from asyncinotify import Inotify, Mask

        mask = (Mask.CREATE | Mask.DELETE | Mask.MODIFY | Mask.CLOSE_WRITE | Mask.MOVED_TO
                | Mask.MOVED_FROM | Mask.ATTRIB)
        with Inotify() as inotify:
            inotify.add_watch(self.directory, mask)
            watched = {self.directory.resolve()}
            await self.reconcile()
            handle.ready()
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
        """Agent shutdown: disconnect, withdraw nothing (as Cilium does)."""
        for remote in list(self.remotes.values()):
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
        services = self._global_services()
        summary = f"{ready}/{len(remotes)} remote clusters ready, {services} global-services"
        not_ready = [r for r in remotes if not r.ready]
        if not_ready:
            summary += "; not ready: " + ", ".join(f"{r.name} ({r.problem()})"
                                                   for r in not_ready)
        # Still synced, but its last probes went unanswered: say so before it is given up.
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
        return StatusSection("ClusterMesh", health, summary,
                             details=details)
