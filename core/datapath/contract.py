"""The datapath slot's contract: what enforces policy in the kernel (or elsewhere).

The slot may stay empty: the agent then runs its control plane only and says so in status.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from meshagent.events import ChangeKind
from meshagent.model.endpoint import Endpoint
from meshagent.model.ipcache import IPCacheEntry
from meshagent.model.service import MergedService
from meshagent.policy.contract import MapChange, MapState


@runtime_checkable
class Datapath(Protocol):
    async def start(self) -> None:
        """Take over existing state (pinned maps, attached programs) without changing it."""

    async def endpoint_added(self, endpoint: Endpoint) -> None:
        """Start enforcing for a new (or restored) endpoint."""

    async def endpoint_removed(self, endpoint: Endpoint) -> None:
        """Stop enforcing for an endpoint and free what it used."""

    async def update_ipcache(self, changes: Iterable[tuple[ChangeKind, IPCacheEntry]]) -> None:
        """Apply IP to identity changes incrementally."""

    async def update_policy(self, endpoint_id: int, changes: Sequence[MapChange]) -> None:
        """Apply one endpoint's policy map changes incrementally, in order (from any
        resolver, through :meth:`meshagent.policy.PolicyResolver.changes`)."""

    async def update_services(self, services: Iterable[MergedService]) -> None:
        """Load-balance connections to each service frontend over its merged backends; the
        whole current set every time."""

    async def reconcile(self, policies: Mapping[int, MapState],
                        ipcache: Sequence[IPCacheEntry]) -> None:
        """Once the agent has synced: make the maps exactly this, dropping what is stale.

        Until then the datapath changes nothing, so a restart neither drops allowed traffic
        nor lets denied traffic pass. ``policies`` maps endpoint id to its map state
        (:meth:`meshagent.policy.PolicyResolver.snapshot`).
        """

    async def stop(self) -> None:
        """Stop; keep pinned state so a restarted agent finds it as it was."""
