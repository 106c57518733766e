"""The datapath slot's contract: what enforces policy in the kernel (or elsewhere).

The slot may stay empty: the agent then runs its control plane only and says so in status.

**One door.** The core's datapath feed (:mod:`meshagent.datapath.feed`) is a datapath's only
caller, and it makes one call at a time. Endpoints (from the endpoint manager), IP→identity
changes (the agent's ipcache), policy map changes (any resolver's ``changes()``) and merged
services all reach the datapath as :class:`DatapathBatch`es, folded by the feed into net
changes: a datapath never sees two changes of one key in a batch, and never has to reason
about several callers' orderings.
"""

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs

from meshagent.model.endpoint import Endpoint
from meshagent.model.ipcache import IPCacheEntry
from meshagent.model.service import MergedService
from meshagent.policy.contract import MapChange, MapState


@attrs.frozen
class DatapathBatch:
    """Net changes for the datapath to apply together; each key appears at most once.

    The keys: an endpoint id (in ``added`` or ``removed``, never both), an ipcache prefix (in
    ``ipcache_upserts`` or ``ipcache_deletes``, once), an (endpoint id, map key) pair in
    ``policy``. A datapath applies a batch in the order of the fields:

    1. ``added`` — endpoints new to the datapath, restored after a restart, or changed (the
       same endpoint with, say, a new identity after a relabel: its policy entries stay). An
       endpoint is added before any policy entry of its is written, in this batch or later.
    2. ``policy`` and the ipcache (``ipcache_upserts``, then ``ipcache_deletes``), such that no
       packet passes that the state before the batch and the state after it both deny: the
       policy entries of the touched (endpoint, direction, identity) groups are first
       tightened to what both states allow, then the ipcache changes, then the policy is the
       new one. (Loosening first, or the ipcache before any policy change, would let a packet
       from an address that moves to another identity meet the other state's verdict for its
       old one.) Upserts before deletes: as each prefix is in the batch once, every address
       resolves to its old or its new identity on the way, never to a shorter prefix's. A
       datapath that applies all of it in one atomic step meets this as it is (nftables).
    3. ``services`` — the whole current set of merged services, when it changed (None:
       unchanged); the first batch after a :meth:`Datapath.reconcile` always has it.
    4. ``proxy_port`` — the port the agent's DNS proxy listens on (TCP and UDP, both
       families), when it changed (None: unchanged; 0: no proxy); the first batch after a
       :meth:`Datapath.reconcile` always has it. A packet whose policy entry is
       :attr:`~meshagent.policy.contract.Verdict.REDIRECT` goes to that port on this node,
       its original destination kept (transparent proxying).
    5. ``removed`` — endpoints gone, with every policy entry of theirs; last, so nothing is
       written for an endpoint after it went.

    ``policy`` holds entries only of endpoints the datapath holds once ``added`` is applied
    and that are not in ``removed``. A delete names a key the datapath held before the
    batch, except an ipcache delete: a prefix upserted and deleted within one raw stream is
    deleted (it may have been there before the stream), and deleting a prefix the datapath
    does not hold changes nothing. Before the first :meth:`Datapath.reconcile` a batch holds
    endpoints only.
    """

    added: tuple[Endpoint, ...] = ()
    policy: Mapping[int, tuple[MapChange, ...]] = attrs.field(factory=dict)
    ipcache_upserts: tuple[IPCacheEntry, ...] = ()
    ipcache_deletes: tuple[IPCacheEntry, ...] = ()
    services: tuple[MergedService, ...] | None = None
    proxy_port: int | None = None
    removed: tuple[Endpoint, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.policy or self.ipcache_upserts or self.ipcache_deletes
                    or self.services is not None or self.proxy_port is not None
                    or self.removed)


@runtime_checkable
class Datapath(Protocol):
    async def start(self) -> None:
        """Take over existing state (pinned maps, attached programs) without changing it."""

    async def apply(self, batch: DatapathBatch) -> None:
        """Apply one batch of net changes, in the order :class:`DatapathBatch` states.

        Raises when the datapath could not apply it: the feed then fails the endpoint
        additions and removals of the batch (their callers undo or report) and starts again
        from a fresh :meth:`reconcile`."""

    async def reconcile(self, policies: Mapping[int, MapState],
                        ipcache: Sequence[IPCacheEntry]) -> None:
        """Once the agent has synced: make the maps exactly this, dropping what is stale.

        Until then the datapath changes nothing but its endpoints, so a restart neither drops
        allowed traffic nor lets denied traffic pass. ``policies`` maps endpoint id to its map
        state (:meth:`meshagent.policy.PolicyResolver.snapshot`), for endpoints the datapath
        holds. The services follow in the next batch.
        """

    async def stop(self) -> None:
        """Stop; keep pinned state so a restarted agent finds it as it was."""


@runtime_checkable
class ReportsConnections(Protocol):
    """An optional capability of a datapath: the live connections of its endpoints, what the
    DNS proxy asks before it lets an expired name's address go (Cilium keeps an address alive
    while a connection uses it: its DNS zombies, marked alive by the conntrack GC)."""

    async def connected_peers(self) -> Mapping[int, frozenset[ipaddress.IPv4Address
                                                              | ipaddress.IPv6Address]]:
        """Per local endpoint id, the remote addresses it has opened connections to that are
        still tracked (not expired), by the address the connection really goes to (a
        service's backend, not its frontend). Endpoints without one are left out."""
