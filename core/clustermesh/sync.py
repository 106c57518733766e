"""Keeping the agent's tables in step with one cluster's kvstore: list, then watch.

A :class:`ClusterSync` runs one :class:`PrefixSync` per kind (nodes, identities, ipcache,
services) against a cluster's store: its ``cilium/state/`` prefixes, or the KVStoreMesh cache
of it (``cilium/cache/``, see :mod:`meshagent.clustermesh.cache`) when its cluster config says
``cached``. Each entry is decoded and checked against the cluster it comes from
(:class:`EntryChecks`, which KVStoreMesh uses too); an entry that does not belong (a foreign
cluster name, an identity outside the cluster's range, malformed JSON) is rejected and counted,
and nothing else is lost. A dropped
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

from meshagent.clustermesh.cache import CacheLayout
from meshagent.clustermesh.legacy import LegacyIPCache
from meshagent.clustermesh.ownership import AddressOwnership
from meshagent.kvstore import KVStore
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstore.follow import Position, follow_prefix
from meshagent.model.cluster import ClusterInfo
from meshagent.model.identity import Identity, check_endpoint_labels, parse_labels
from meshagent.model.ipcache import ipcache_from_json
from meshagent.model.node import node_from_json
from meshagent.model.service import service_from_json
from meshagent.model.table import Table, Tables
from meshagent.runtime.tasks import run_together

log = logging.getLogger(__name__)


class Rejected(ValueError):
    """An entry that does not belong to the cluster it came from."""


MAX_KEY_BYTES = 1024


@attrs.frozen
class Kind:
    """One kind of entry: where it lives, which table it fills, how it is checked."""

    name: str  # nodes, identities, endpoints, services (the words of cilium status)
    prefix: str
    table: str
    decode: Callable[["EntryChecks", str, bytes], tuple[Any, Any]]  # -> (table key, row)
    key_of: Callable[[Any], Any]  # a row's table key (as decode gave it)
    max_value: int  # bytes: a larger value is rejected before it is decoded
    # a remote's row that decodes fine may still wait for the right to it: why, or ""
    admit: Callable[["ClusterSync", Any], str] | None = None

    @property
    def canary(self) -> str:
        """Where its store's sync canary sits, relative to the cluster's
        (``cilium/state/identities/v1``: the store, not the watched ``…/id/``)."""
        return "/".join(self.prefix.split("/")[:4])

    @property
    def is_identities(self) -> bool:
        return self.prefix == kvkeys.IDENTITIES


def printable(key: str, limit: int = 160) -> str:
    """A key as it can be logged and shown, whatever bytes it holds."""
    text = key.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return text if len(text) <= limit else text[:limit] + "…"


class PrefixSync:
    """One kind of one cluster: list, then watch; remembers the revision it reached. A cluster
    that writes sync canaries is listed only once the kind's canary exists (as Cilium's
    watchers wait): a partial listing is never applied as complete, nor used to delete."""

    def __init__(self, sync: "ClusterSync", kind: Kind):
        self.sync = sync
        self.kind = kind
        self.table: Table = getattr(sync.tables, kind.table)
        self.position = Position()  # the revision reached; None: list before watching
        # kvstore key -> the row we put there (its table key: kind.key_of): one dict slot
        # per row, as a remote cluster may publish a million
        self.owned: dict[str, Any] = {}
        self.held: dict[str, tuple[Any, Any, str]] = {}  # kvstore key -> (table key, row, why)
        self.synced = False
        self.cache = CacheLayout(kind.prefix, sync.cluster)
        self.legacy = (LegacyIPCache(sync.cluster, self._apply, self._holds)
                       if kind.prefix == kvkeys.IPCACHE else None)

    @property
    def prefix(self) -> str:
        return self.cache.prefix if self.sync.cached else self.kind.prefix

    @property
    def canary(self) -> str:
        """The key whose existence says the cluster's copy of this kind is complete."""
        if self.sync.cached:
            return self.cache.canary
        return kvkeys.synced_key(self.sync.cluster, self.kind.canary)

    def _holds(self, key: str) -> bool:
        return key in self.owned or key in self.held

    async def run(self, store: KVStore, on_synced: Callable[[], None]) -> None:
        def listed() -> None:
            self.synced = True
            on_synced()
        if self.position.revision is None:
            await self.sync.canary_seen(self.canary)
        legacy = None if self.sync.cached else self.legacy
        await follow_prefix(store, self.prefix, legacy.apply if legacy else self._apply,
                            lambda: [*self.owned, *self.held, *(legacy.keys() if legacy else ())],
                            listed, self.position, self._heard, self.sync.tables.held)

    def rekey(self, cached: bool) -> None:
        """The cluster is read from the other place now (direct <-> cache): the keys of what
        it holds are renamed, so that the next listing keeps every row it lists again."""
        rename = self.cache.to_cache if cached else self.cache.to_state
        if self.legacy is not None:
            self.legacy.clear()
        self.owned = {rename(key): value for key, value in self.owned.items()}
        self.held = {rename(key): value for key, value in self.held.items()}
        self.relist()

    def _heard(self) -> None:
        self.sync.last_event_at = time.time()

    def _apply(self, key: str, value: bytes | None) -> None:
        """One key's new value (None: deleted). Whatever the value holds, this returns: a
        value that does not decode or does not belong is rejected and counted, and the row
        the key had stays; the caller moves on to the next revision, never replaying it."""
        if value is None:
            self.held.pop(key, None)
            row = self.owned.pop(key, None)
            if row is not None:
                self.table.delete(self.kind.key_of(row), self.sync.cluster)
            return
        state_key = key
        if self.sync.cached:
            try:
                state_key = self.cache.to_state(key)
            except ValueError as exc:
                self.sync.checks.reject(self.kind.name, key, str(exc))
                return
        decoded = self.sync.checks.decode(self.kind, state_key, value)
        if decoded is not None:
            self._admit(key, *decoded)

    def _admit(self, key: str, table_key: Any, row: Any) -> None:
        """Put the row in the table, or hold it while the cluster has no right to it."""
        why = self.sync.admission(self.kind, row)
        if why:
            self.held[key] = (table_key, row, why)
            old = self.owned.pop(key, None)
            if old is not None:
                self.table.delete(self.kind.key_of(old), self.sync.cluster)
            return
        self.held.pop(key, None)
        old = self.owned.get(key)
        if old is not None and (old_key := self.kind.key_of(old)) != table_key:
            self.table.delete(old_key, self.sync.cluster)
        self.owned[key] = row  # also what is checked again when rights change
        self.table.upsert(table_key, row)

    def readmit(self) -> None:
        """Rights changed: check every row again, held and admitted."""
        if self.kind.admit is None:
            return
        for key, (table_key, row, _) in list(self.held.items()):
            self._admit(key, table_key, row)
        if self.sync.ownership is not None:  # only a remote's rows are checked
            for key, row in list(self.owned.items()):
                self._admit(key, self.kind.key_of(row), row)

    def relist(self) -> None:
        """List again on the next run; the rows stay until then."""
        self.position.revision = None
        self.synced = False

    def withdraw(self) -> None:
        if self.legacy is not None:
            self.legacy.clear()
        for key in list(self.owned) + list(self.held):
            self._apply(key, None)
        self.relist()


class EntryChecks:
    """Whether an entry belongs to the cluster it comes from; counts and names what does not.

    The one judge of remote entries: agents apply what it accepts, KVStoreMesh copies only
    that into the cache (and the agents reading the cache judge it again)."""

    def __init__(self, cluster: str, cluster_id: int, local: ClusterInfo, remote: bool):
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.local = local
        self.remote = remote  # False: our own cluster, trusted with ranges of addresses
        self.rejected: Counter[str] = Counter()
        self.last_reject: dict[str, str] = {}
        self.identities = local.identity_range(cluster_id)  # its range (ClusterInfo is frozen)

    def decode(self, kind: Kind, key: str, value: bytes) -> tuple[Any, Any] | None:
        """(table key, row) of a state key and its value, or None once it is rejected.
        Whatever the value holds, this returns."""
        try:
            return kind.decode(self, check_key(key), check_size(value, kind.max_value))
        except ValueError as exc:
            self.reject(kind.name, key, str(exc))
        except RecursionError:
            self.reject(kind.name, key, "nested too deeply")
        except Exception as exc:  # a decoder bug must not stop the sync either
            self.reject(kind.name, key, f"{type(exc).__name__}: {exc}")
        return None

    def reject(self, kind: str, key: str, reason: str) -> None:
        self.rejected[kind] += 1
        shown = f"{printable(key)}: {printable(reason, 300)}"
        if kind not in self.last_reject:  # log once per kind; status shows the latest
            log.warning("cluster %s: rejected %s entry %s (further %s rejections are counted,"
                        " not logged)", self.cluster, kind, shown, kind)
        self.last_reject[kind] = shown

    def check_cluster(self, what: str, name: str) -> None:
        if name != self.cluster:
            raise Rejected(f"{what} names cluster {name!r}, not {self.cluster!r}")

    def check_identity(self, identity: int) -> None:
        """``identity`` is one this cluster may allocate: in its range exactly as Cilium
        computes it (id << 16 | 256 .. id << 16 | 0xFFFF), never a reserved one."""
        if identity < 256:
            raise Rejected(f"reserved identity {identity} is not for clusters to publish")
        allowed = self.identities
        if identity not in allowed:
            raise Rejected(f"identity {identity} is outside {self.cluster}'s range"
                           f" {allowed.start}..{allowed.stop - 1}")


class SyncCanaries:
    """The sync canaries of one cluster seen on the current connection (Cilium's
    ``pkg/kvstore/store/watchstoremgr.go``: a kind's watcher starts once its canary
    ``cilium/synced/<cluster>/<store>`` is there; its value does not matter, its deletion is
    ignored)."""

    def __init__(self, cluster: str):
        self.prefix = kvkeys.synced_key(cluster, "")  # cilium/synced/<cluster>/
        self.keys: set[str] = set()
        self._added = asyncio.Condition()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def clear(self) -> None:
        self.keys.clear()

    async def seen(self, key: str) -> None:
        """Returns once ``key`` was seen."""
        async with self._added:
            await self._added.wait_for(lambda: key in self.keys)

    async def follow(self, store: KVStore, canaries: dict[Kind, str], older: bool) -> None:
        """Until the canary of every kind (``canaries``) was seen (then no watch is kept open
        for them).

        meshagent before 0.2 wrote no identities canary, and its canaries hold seconds since
        the epoch where Cilium (and 0.2) write RFC 3339: with ``older`` (a cluster's own
        state, not a cache), where such a canary is seen the identities canary counts as seen
        too (to be removed in 0.3)."""
        wanted = set(canaries.values())
        identities = next((key for kind, key in canaries.items() if kind.is_identities), None) \
            if older else None

        async def add(key: str, value: bytes) -> bool:
            found = {key} & wanted
            if identities is not None and value.isdigit():
                found.add(identities)
            if not found <= self.keys:
                async with self._added:
                    self.keys |= found
                    self._added.notify_all()
            return wanted <= self.keys

        if wanted <= self.keys:
            return
        listing = await store.list_prefix(self.prefix)
        for item in listing.items:
            if await add(item.key, item.value):
                return
        async for event in store.watch(self.prefix, after_revision=listing.revision):
            if event.value is not None and await add(event.key, event.value):
                return


class ClusterSync:
    """All kinds of one cluster, checked against that cluster's name and id. ``canaries``:
    the cluster writes sync canaries (its config says ``syncedCanaries``; a cache always
    does), and each kind is listed only once its canary exists."""

    def __init__(self, cluster: str, cluster_id: int, local: ClusterInfo, tables: Tables,
                 ownership: AddressOwnership | None = None, cached: bool = False,
                 canaries: bool = False):
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.local = local
        self.tables = tables
        self.ownership = ownership  # None: this cluster's own sync, trusted with addresses
        self.cached = cached  # read from the local kvstore's KVStoreMesh cache of it
        self.checks = EntryChecks(cluster, cluster_id, local, remote=ownership is not None)
        self.uses_canaries = canaries
        self.canaries = SyncCanaries(cluster)  # seen on this connection
        self.last_event_at: float | None = None
        self.prefixes = [PrefixSync(self, kind) for kind in KINDS]

    @property
    def canaries_required(self) -> bool:
        return self.uses_canaries or self.cached

    @property
    def synced(self) -> dict[str, bool]:
        """Per kind: listed, after its sync canary where the cluster writes them."""
        return {p.kind.name: p.synced and (not self.canaries_required
                                           or p.canary in self.canaries)
                for p in self.prefixes}

    async def run(self, store: KVStore, on_synced: Callable[[], None]) -> None:
        """Sync every kind until the store fails; ``on_synced`` once all are listed (after
        their canaries, where the cluster writes them: an agent must not act on half a
        cluster)."""
        def one_synced() -> None:
            if all(self.synced.values()):
                on_synced()
        work = {f"sync:{self.cluster}:{p.kind.name}": p.run(store, one_synced)
                for p in self.prefixes}
        if self.canaries_required:
            work[f"sync:{self.cluster}:canaries"] = self.canaries.follow(
                store, {p.kind: p.canary for p in self.prefixes}, older=not self.cached)
        await run_together(work)

    async def canary_seen(self, key: str) -> None:
        """Returns once ``key`` (a kind's canary) was seen, at once where none is needed."""
        if self.canaries_required:
            await self.canaries.seen(key)

    def switch_source(self, cached: bool) -> None:
        """Read the cluster from the cache (or directly) from the next run on, keeping its
        rows until the new place has listed them."""
        if cached != self.cached:
            for prefix in self.prefixes:
                prefix.rekey(cached)
            self.cached = cached

    def admission(self, kind: Kind, row: Any) -> str:
        """Why a remote's row must wait ("" to admit it): only remote rows are checked."""
        if kind.admit is None or self.ownership is None:
            return ""
        return kind.admit(self, row)

    def readmit(self) -> None:
        for prefix in self.prefixes:
            prefix.readmit()

    def counts(self) -> dict[str, int]:
        """Per kind: the cluster's rows in the agent's tables."""
        return {p.kind.name: p.table.count(self.cluster) for p in self.prefixes}

    @property
    def held(self) -> dict[str, int]:
        return {p.kind.name: len(p.held) for p in self.prefixes if p.held}

    def relist(self) -> None:
        """List every kind again on the next run (a new connection), once its canary is
        there again (a restarted writer's partial copy is not complete); rows stay until
        then."""
        self.canaries.clear()
        for prefix in self.prefixes:
            prefix.relist()

    def withdraw(self) -> None:
        """Remove every row this cluster contributed (its clustermesh file went away)."""
        for prefix in self.prefixes:
            prefix.withdraw()


def _node(checks: EntryChecks, key: str, value: bytes):
    cluster, name = kvkeys.split_key(key, kvkeys.NODES, 2)
    checks.check_cluster("node key", cluster)
    node = node_from_json(value)
    checks.check_cluster("node", node.cluster)
    if node.name != name:
        raise Rejected(f"node named {node.name!r} under key of {name!r}")
    if node.cluster_id not in (0, checks.cluster_id):
        raise Rejected(f"node has cluster id {node.cluster_id}, not {checks.cluster_id}")
    return (cluster, name), attrs.evolve(node, cluster_id=checks.cluster_id)


def _identity(checks: EntryChecks, key: str, value: bytes):
    number = _identity_key(checks, key)
    checks.check_identity(number)
    try:
        labels = parse_labels(value.decode())
    except UnicodeDecodeError:
        raise ValueError("labels are not UTF-8") from None
    check_endpoint_labels(labels, checks.cluster)
    return number, Identity(number, labels, checks.cluster)


def _identity_key(checks: EntryChecks, key: str) -> int:
    """The number a key ends in, written the one way Cilium writes it (no sign, no leading
    zero, ASCII digits)."""
    (text,) = kvkeys.split_key(key, kvkeys.IDENTITIES, 1)
    if not (text.isascii() and text.isdigit()) or str(int(text)) != text:
        raise ValueError("identity key does not end in a number written canonically")
    return int(text)


def _ipcache(checks: EntryChecks, key: str, value: bytes):
    cluster, ip = _ipcache_key_parts(key)
    if cluster != kvkeys.IPCACHE_ADDRESS_SPACE:  # a Cilium cluster's own spelling
        checks.check_cluster("ipcache key", cluster)
    entry = ipcache_from_json(value, checks.cluster)
    if entry.key_ip != ip and str(entry.address) != ip:
        raise Rejected(f"entry for {entry.prefix} under key of {ip}")
    if checks.remote and not entry.is_host:
        raise Rejected(f"{entry.prefix} is not a single address: a remote cluster publishes its"
                       " endpoints, never ranges")
    checks.check_identity(entry.identity)
    return entry.key, entry  # packed: the table key is kept per kvstore key


def _ipcache_admission(sync: ClusterSync, entry) -> str:
    """A remote's endpoint must be inside a pod CIDR granted to that cluster (or, where its
    clustermesh file trusts it, in none granted to anyone else)."""
    owner = sync.ownership.owner(entry.packed)
    if owner == sync.cluster:
        return ""
    address = entry.address
    if owner is None:
        if sync.cluster in sync.ownership.trusted:
            return ""
        return f"{address} is in no pod CIDR granted to {sync.cluster}"
    whose = "this cluster" if owner == sync.local.name else f"cluster {owner}"
    return f"{address} belongs to {whose}'s pod CIDRs"


def _ipcache_key_parts(key: str) -> tuple[str, str]:
    rest = key[len(kvkeys.IPCACHE):]
    cluster, _, ip = rest.partition("/")
    if not key.startswith(kvkeys.IPCACHE) or not cluster or not ip:
        raise ValueError(f"key {key!r} is not {kvkeys.IPCACHE}<cluster>/<ip>")
    return cluster, ip


def _service(checks: EntryChecks, key: str, value: bytes):
    cluster, namespace, name = kvkeys.split_key(key, kvkeys.SERVICES, 3)
    checks.check_cluster("service key", cluster)
    service = service_from_json(value)
    checks.check_cluster("service", service.cluster)
    if (service.namespace, service.name) != (namespace, name):
        raise Rejected(f"service {service.namespace}/{service.name} under key of"
                       f" {namespace}/{name}")
    if service.cluster_id not in (0, checks.cluster_id):
        raise Rejected(f"service has cluster id {service.cluster_id}, not {checks.cluster_id}")
    return (cluster, namespace, name), service


def check_key(key: str) -> str:
    if len(key) <= MAX_KEY_BYTES and key.isascii():  # a byte a character
        return key
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("key is not UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise ValueError(f"key of {size} bytes is longer than the limit, {MAX_KEY_BYTES}")
    return key


def check_size(value: bytes, limit: int) -> bytes:
    if len(value) > limit:
        raise ValueError(f"value of {len(value)} bytes is larger than the limit for its kind,"
                         f" {limit}")
    return value


#: Value size limits (bytes): far above what an agent writes (a node ~300, an identity ~200,
#: an ipcache entry ~150), low enough that a hostile cluster cannot make us hold much.
KINDS = (
    Kind("nodes", kvkeys.NODES, "nodes", _node, lambda node: (node.cluster, node.name),
         64 * 1024),
    Kind("identities", kvkeys.IDENTITIES, "identities", _identity,
         lambda identity: identity.id, 16 * 1024),
    Kind("endpoints", kvkeys.IPCACHE, "ipcache", _ipcache, lambda entry: entry.key, 4 * 1024,
         _ipcache_admission),
    Kind("services", kvkeys.SERVICES, "services", _service,
         lambda service: (service.cluster, service.namespace, service.name), 1024 * 1024),
)
