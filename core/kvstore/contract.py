"""The kvstore slot's contract: what the agent and ClusterMesh need from a key-value store.

etcd, consul and the in-memory store implement it; ClusterMesh is written against it alone, so a
remote cluster on any backend behaves the same. ``meshagent.testing.kvstore_contract`` is the
conformance suite every backend runs.

Revisions: every write gets a revision that only grows. ``list_prefix`` returns the revision
the listing reflects, and ``watch(prefix, after_revision=that)`` yields every change after it,
which is how a reader lists then watches without a gap.
"""

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from meshagent.errors import MeshagentError

if TYPE_CHECKING:
    from meshagent.runtime.config import Config


class KVStoreError(MeshagentError):
    """A kvstore operation failed."""


class KVStoreUnavailable(KVStoreError):
    """No connection to the store (not yet connected, lost, or closed); retry later."""


class RevisionCompacted(KVStoreError):
    """A watch asked for history the store no longer keeps: list again, then watch."""

    def __init__(self, requested: int, compacted: int):
        super().__init__(f"revision {requested} is compacted (oldest kept: {compacted})")
        self.requested = requested
        self.compacted = compacted


class LeaseExpired(KVStoreError):
    """The lease is gone (expired or revoked); its keys were deleted."""


@attrs.frozen
class KeyValue:
    key: str
    value: bytes
    mod_revision: int  # pass to update_if / delete_if for compare-and-swap
    create_revision: int
    lease: int | None = None


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@attrs.frozen
class WatchEvent:
    type: EventType
    key: str
    value: bytes | None  # None for DELETE
    revision: int


@attrs.frozen
class Listing:
    items: list[KeyValue]
    revision: int  # watch(prefix, after_revision=revision) continues from here


#: Keys per page of :meth:`KVStore.list_pages`: few round trips, a few MiB at a time. A store
#: may default to another size where its server favours it (the etcd plugin's pages are larger).
PAGE_SIZE = 10_000


async def pages_of(listing: Listing, page_size: int) -> AsyncIterator[Listing]:
    """A whole listing as :meth:`KVStore.list_pages` gives it, for stores that read a prefix
    in one answer anyway."""
    for start in range(0, max(len(listing.items), 1), page_size):
        yield Listing(listing.items[start:start + page_size], listing.revision)


@attrs.frozen
class Lease:
    id: int
    ttl: float


@attrs.frozen
class KVStoreStatus:
    """What ``meshagent status`` shows for a store (the local one, or a remote cluster's)."""

    connected: bool
    summary: str  # e.g. "etcd: 1/1 connected, has-quorum=true: https://10.2.2.2:2379 - 3.4.23"
    details: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()  # the servers' hosts (no remote pod CIDR may cover them)


@runtime_checkable
class KVStore(Protocol):
    """One client of one store."""

    async def connect(self) -> None:
        """Reach the store; raises :class:`KVStoreUnavailable` with the reason if it cannot."""

    async def get(self, key: str) -> KeyValue | None: ...

    async def list_prefix(self, prefix: str) -> Listing: ...

    def list_pages(self, prefix: str, page_size: int = PAGE_SIZE) -> AsyncIterator[Listing]:
        """The listing of ``prefix`` in pages of at most ``page_size`` keys, in key order,
        every page at the first one's revision (at least one page, if empty): a large prefix
        (a remote cluster's 100,000s of entries) is never held whole. Raises
        :class:`RevisionCompacted` if that revision goes before the last page is read."""

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        """Write unconditionally; returns the write's revision."""

    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> bool:
        """Write only if the key does not exist; False if it does."""

    async def update_if(
        self, key: str, value: bytes, *, mod_revision: int, lease: Lease | None = None
    ) -> bool:
        """Compare-and-swap: write only if the key's mod_revision is still ``mod_revision``."""

    async def delete(self, key: str) -> bool:
        """True if the key existed."""

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        """Delete only if the key's mod_revision is still ``mod_revision``."""

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many."""

    async def create_many(
        self, items: Sequence[tuple[str, bytes]], *, lease: Lease | None = None
    ) -> list[KeyValue | None]:
        """:meth:`create` for each ``(key, value)``, each key on its own, in as few round trips
        as the store allows (etcd: one transaction per chunk its ``--max-txn-ops`` admits).
        Per item, in order: None if this call created the key, else the key as it was instead
        (so a loser needs no :meth:`get` to learn the winner's value). The keys must be distinct (ValueError).
        Each create is atomic; the batch is not promised to be (another client may see some of
        its keys before the others)."""

    async def put_many(
        self, items: Sequence[tuple[str, bytes]], *, lease: Lease | None = None
    ) -> int:
        """:meth:`put` of every ``(key, value)``, in as few round trips as the store allows;
        returns the highest revision written (0 for no items). Keys must be distinct
        (ValueError). Not promised to be atomic as a whole."""

    def watch(self, prefix: str, *, after_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change under ``prefix`` with a revision above ``after_revision``, in order.

        Raises :class:`RevisionCompacted` if that history is gone and
        :class:`KVStoreUnavailable` if the connection drops; resume from the last revision seen.
        """

    async def grant_lease(self, ttl: float) -> Lease:
        """A lease whose keys are deleted ``ttl`` seconds after its last keepalive."""

    async def keepalive(self, lease: Lease) -> None:
        """Restart the lease's TTL; raises :class:`LeaseExpired` if it is gone."""

    async def revoke(self, lease: Lease) -> None:
        """End the lease now, deleting its keys."""

    def lock(self, name: str) -> AbstractAsyncContextManager[None]:
        """A mutex held across every client of the store until the context exits."""

    def status(self) -> KVStoreStatus: ...

    async def close(self) -> None:
        """Disconnect; leases are left to expire (revoke them first for a clean exit)."""


@runtime_checkable
class KVStoreBackend(Protocol):
    """A kind of store (etcd, consul, memory): makes clients for the local and remote clusters."""

    name: str

    def local_client(self, config: "Config") -> KVStore:
        """The local cluster's store, configured by the agent's (and plugin's) options."""

    def client_from_file(self, path: Path) -> KVStore:
        """A store described by a clustermesh-style YAML file (a remote cluster's)."""

    def files_of(self, path: Path) -> tuple[Path, ...]:
        """The other files such a YAML file names (CA, certificate, key): a change to any of
        them reconnects that remote, as a change to the file itself does. Empty if the file
        cannot be read; :meth:`client_from_file` reports why."""


@runtime_checkable
class NodeKeys(Protocol):
    """The keys this node keeps on its lease in the local store (the agent's publisher): what
    an identity allocator puts its per-node references on, so they vanish with the node."""

    @property
    def lease(self) -> Lease | None:
        """The node's lease (None until :attr:`published`)."""

    async def wait_published(self) -> None:
        """Returns once the node's initial state, and its lease, are in the store."""

    def adopt(self, key: str, value: bytes) -> None:
        """A key its owner just put on the node's lease: kept there from now on."""

    def unwant(self, key: str) -> None:
        """Delete ``key``: now if the store answers, else as soon as it does again."""

    def set_node_labels(self, labels: Mapping[str, str]) -> None:
        """This node's labels as a source knows them (the Kubernetes Node's), published with
        the node in place of ``--local-node-labels``; ValueError if one is not a Kubernetes
        label."""
