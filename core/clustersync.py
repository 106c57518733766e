"""Keeping the agent's tables in step with one cluster's kvstore: list, then watch.

A :class:`ClusterSync` runs one :class:`PrefixSync` per kind (nodes, identities, ipcache,
services) against a cluster's store. Each entry is decoded and checked against the cluster it
comes from; an entry that does not belong (a foreign cluster name, an identity outside the
cluster's range, malformed JSON) is rejected and counted, and nothing else is lost. A dropped
connection keeps the entries; the next run resumes from the last revision, or lists again when
that history is compacted, deleting what did not come back.
"""

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs

from meshagent import kvkeys
from meshagent.cluster import ClusterInfo
from meshagent.identity import CLUSTER_LABEL, Identity, label_value, parse_labels
from meshagent.ipcache import ipcache_from_json
from meshagent.kvstore import EventType, KVStore, RevisionCompacted
from meshagent.node import node_from_json
from meshagent.service import service_from_json
from meshagent.table import Table

log = logging.getLogger(__name__)


class Rejected(ValueError):
    """An entry that does not belong to the cluster it came from."""


@attrs.define
class Tables:
    """The agent's tables, shared by the local and every remote cluster's sync."""

    nodes: Table
    identities: Table
    ipcache: Table
    services: Table


@attrs.frozen
class Kind:
    """One kind of entry: where it lives, which table it fills, how it is checked."""

    name: str  # nodes, identities, endpoints, services (the words of cilium status)
    prefix: str
    table: str
    decode: Callable[["ClusterSync", str, bytes], tuple[Any, Any]]  # -> (table key, row)


class PrefixSync:
    """One kind of one cluster: list, then watch; remembers the revision it reached."""

    def __init__(self, sync: "ClusterSync", kind: Kind):
        self.sync = sync
        self.kind = kind
        self.table: Table = getattr(sync.tables, kind.table)
        self.revision: int | None = None  # None: list before watching
        self.owned: dict[str, Any] = {}  # kvstore key -> table key of rows we put there
        self.synced = False

    async def run(self, store: KVStore, on_synced: Callable[[], None]) -> None:
        while True:
            if self.revision is None:
                await self._list(store)
            self.synced = True
            on_synced()
            try:
                async for event in store.watch(self.kind.prefix, after_revision=self.revision):
                    self._apply(event.key, event.value if event.type is EventType.PUT else None)
                    self.revision = event.revision
                    self.sync.last_event_at = time.time()
            except RevisionCompacted as exc:
                log.info("%s %s: %s; listing again", self.sync.cluster, self.kind.name, exc)
                self.revision = None

    async def _list(self, store: KVStore) -> None:
        listing = await store.list_prefix(self.kind.prefix)
        present = set()
        for item in listing.items:
            present.add(item.key)
            self._apply(item.key, item.value)
        for key in set(self.owned) - present:  # gone while we were not watching
            self._apply(key, None)
        self.revision = listing.revision
        self.sync.last_event_at = time.time()

    def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            table_key = self.owned.pop(key, None)
            if table_key is not None:
                self.table.delete(table_key, self.sync.cluster)
            return
        try:
            table_key, row = self.kind.decode(self.sync, key, value)
        except ValueError as exc:
            self.sync.reject(self.kind.name, key, str(exc))
            return
        self.owned[key] = table_key
        self.table.upsert(table_key, row)

    def withdraw(self) -> None:
        for key in list(self.owned):
            self._apply(key, None)
        self.revision = None
        self.synced = False


class ClusterSync:
    """All kinds of one cluster, checked against that cluster's name and id."""

    def __init__(self, cluster: str, cluster_id: int, local: ClusterInfo, tables: Tables):
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.local = local
        self.tables = tables
        self.rejected: Counter[str] = Counter()
        self.last_reject: dict[str, str] = {}
        self.last_event_at: float | None = None
        self.prefixes = [PrefixSync(self, kind) for kind in KINDS]

    @property
    def synced(self) -> dict[str, bool]:
        return {p.kind.name: p.synced for p in self.prefixes}

    async def run(self, store: KVStore, on_synced: Callable[[], None]) -> None:
        """Sync every kind until the store fails; ``on_synced`` once all are listed."""
        def one_synced() -> None:
            if all(p.synced for p in self.prefixes):
                on_synced()
        try:
            async with asyncio.TaskGroup() as tasks:
                for prefix in self.prefixes:
                    tasks.create_task(prefix.run(store, one_synced),
                                      name=f"sync:{self.cluster}:{prefix.kind.name}")
        except ExceptionGroup as group:  # all kinds share the store: the first error says it
            raise group.exceptions[0] from None

    def relist(self) -> None:
        """List every kind again on the next run (a new connection); rows stay until then."""
        for prefix in self.prefixes:
            prefix.revision = None
            prefix.synced = False

    def withdraw(self) -> None:
        """Remove every row this cluster contributed (its clustermesh file went away)."""
        for prefix in self.prefixes:
            prefix.withdraw()

    def reject(self, kind: str, key: str, reason: str) -> None:
        self.rejected[kind] += 1
        if kind not in self.last_reject:  # log once per kind; status shows the latest
            log.warning("cluster %s: rejected %s entry %s: %s (further %s rejections are"
                        " counted, not logged)", self.cluster, kind, key, reason, kind)
        self.last_reject[kind] = f"{key}: {reason}"

    # -- checks ---------------------------------------------------------------------------------

    def check_cluster(self, what: str, name: str) -> None:
        if name != self.cluster:
            raise Rejected(f"{what} names cluster {name!r}, not {self.cluster!r}")

    def check_identity(self, identity: int) -> None:
        if identity < 256:
            raise Rejected(f"reserved identity {identity} is not for clusters to publish")
        owner = self.local.cluster_of_identity(identity)
        if owner != self.cluster_id:
            allowed = self.local.identity_range(self.cluster_id)
            raise Rejected(f"identity {identity} is outside {self.cluster}'s range"
                           f" {allowed.start}..{allowed.stop - 1} (it belongs to cluster id"
                           f" {owner})")


def _node(sync: ClusterSync, key: str, value: bytes):
    cluster, name = kvkeys.split_key(key, kvkeys.NODES, 2)
    sync.check_cluster("node key", cluster)
    node = node_from_json(value)
    sync.check_cluster("node", node.cluster)
    if node.name != name:
        raise Rejected(f"node named {node.name!r} under key of {name!r}")
    if node.cluster_id not in (0, sync.cluster_id):
        raise Rejected(f"node has cluster id {node.cluster_id}, not {sync.cluster_id}")
    return (cluster, name), attrs.evolve(node, cluster_id=sync.cluster_id)


def _identity(sync: ClusterSync, key: str, value: bytes):
    number = _identity_key(sync, key)
    sync.check_identity(number)
    try:
        labels = parse_labels(value.decode())
    except UnicodeDecodeError:
        raise ValueError("labels are not UTF-8") from None
    cluster = label_value(labels, CLUSTER_LABEL)
    if cluster is not None:
        sync.check_cluster("identity's cluster label", cluster)
    return number, Identity(number, labels, sync.cluster)


def _identity_key(sync: ClusterSync, key: str) -> int:
    (text,) = kvkeys.split_key(key, kvkeys.IDENTITIES, 1)
    if not text.isdigit():
        raise ValueError(f"identity key {key!r} does not end in a number")
    return int(text)


def _ipcache(sync: ClusterSync, key: str, value: bytes):
    cluster, ip = _ipcache_key_parts(key)
    sync.check_cluster("ipcache key", cluster)
    entry = ipcache_from_json(value, sync.cluster)
    if entry.key_ip != ip and str(entry.prefix.network_address) != ip:
        raise Rejected(f"entry for {entry.prefix} under key of {ip}")
    sync.check_identity(entry.identity)
    return entry.prefix, entry


def _ipcache_key_parts(key: str) -> tuple[str, str]:
    rest = key[len(kvkeys.IPCACHE):]
    cluster, _, ip = rest.partition("/")
    if not key.startswith(kvkeys.IPCACHE) or not cluster or not ip:
        raise ValueError(f"key {key!r} is not {kvkeys.IPCACHE}<cluster>/<ip>")
    return cluster, ip


def _service(sync: ClusterSync, key: str, value: bytes):
    cluster, namespace, name = kvkeys.split_key(key, kvkeys.SERVICES, 3)
    sync.check_cluster("service key", cluster)
    service = service_from_json(value)
    sync.check_cluster("service", service.cluster)
    if (service.namespace, service.name) != (namespace, name):
        raise Rejected(f"service {service.namespace}/{service.name} under key of"
                       f" {namespace}/{name}")
    if service.cluster_id not in (0, sync.cluster_id):
        raise Rejected(f"service has cluster id {service.cluster_id}, not {sync.cluster_id}")
    return (cluster, namespace, name), service


KINDS = (
    Kind("nodes", kvkeys.NODES, "nodes", _node),
    Kind("identities", kvkeys.IDENTITIES, "identities", _identity),
    Kind("endpoints", kvkeys.IPCACHE, "ipcache", _ipcache),
    Kind("services", kvkeys.SERVICES, "services", _service),
)
