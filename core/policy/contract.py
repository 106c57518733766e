"""The policy-resolver slot's contract, and what it hands the datapath.

A resolver holds the cluster's policies and turns them into per-endpoint map state:
``{MapKey: Verdict}`` for each local endpoint. The core feeds any resolver's output to the
datapath slot through :meth:`PolicyResolver.snapshot` (the whole state, for a reconcile) and
:meth:`PolicyResolver.changes` (what changed since), so a third-party resolver drives the
eBPF datapath exactly as the default one does.
"""

import asyncio
import enum
from typing import Protocol, runtime_checkable

import attrs

from meshagent.events import ChangeKind
from meshagent.policy.api import Policy


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@attrs.frozen(order=True)
class MapKey:
    """What the datapath looks up: direction, peer identity (0: any), protocol (0: any) and a
    port range (port 0: any)."""

    direction: str  # "ingress" or "egress"
    identity: int
    protocol: int
    port: int
    end_port: int


@attrs.frozen
class MapChange:
    kind: ChangeKind
    key: MapKey
    verdict: Verdict | None  # None for DELETE


MapState = dict[MapKey, Verdict]  # one endpoint's
EndpointChanges = dict[int, list[MapChange]]  # endpoint id -> its changes, in order


class ChangeQueue:
    """Map changes waiting to be taken, per endpoint and in order: what a resolver needs to
    serve :meth:`PolicyResolver.changes` (and to drop on :meth:`PolicyResolver.snapshot`)."""

    def __init__(self) -> None:
        self._pending: EndpointChanges = {}
        self._wake = asyncio.Event()

    def add(self, endpoint_id: int, changes: list[MapChange]) -> None:
        if changes:
            self._pending.setdefault(endpoint_id, []).extend(changes)
            self._wake.set()

    def drop(self, endpoint_id: int) -> None:
        """The endpoint is gone: its untaken changes must not reach the datapath."""
        self._pending.pop(endpoint_id, None)

    def clear(self) -> None:
        self._pending = {}

    async def take(self) -> EndpointChanges:
        """Wait until something is pending, then hand all of it over."""
        while not self._pending:
            self._wake.clear()
            await self._wake.wait()
        taken, self._pending = self._pending, {}
        return taken


@runtime_checkable
class PolicyResolver(Protocol):
    """Holds the cluster's policies and resolves them per endpoint (slot ``policy-resolver``).

    It learns identities and endpoints from the agent's events (``meshagent_identity_changed``,
    ``meshagent_endpoint_changed``).
    """

    async def import_policies(self, text: str, source: str) -> list[Policy]:
        """Validate YAML/JSON documents into policies; raises
        :class:`meshagent.policy.api.PolicyError` naming document, field path and problem, or
        the input limit it exceeds (docs/policy.md)."""

    async def store(self, policies: list[Policy]) -> None:
        """Make the policies the cluster's (every agent of it enforces them)."""

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """Remove one policy from the cluster; False if there was none."""

    def policies(self) -> list[Policy]:
        """The policies in force (served by ``meshagent policy get``)."""

    @property
    def revision(self) -> int:
        """Grows with every change of the policies in force."""

    def trace(self, dst_endpoint: int, port: int, protocol: str = "TCP", **source) -> dict:
        """Explain the verdict for a source (``src_identity``, ``src_labels`` or ``src_ip``)
        reaching a local endpoint: ``source``, ``destination``, ``port``, ``protocol``,
        ``verdict`` ("allow"/"deny"), ``reason`` and what matched (``meshagent policy trace``
        prints it). The core's ``/v1/policy`` routes call the slot's resolver through these
        methods only, so the ``policy`` commands work with any resolver."""

    def snapshot(self) -> dict[int, MapState]:
        """Every local endpoint's map state now. :meth:`changes` continues from here: what
        changed before this call is in it, what changes after is not."""

    async def changes(self) -> EndpointChanges:
        """Wait until map state changed since the last call (or :meth:`snapshot`), then hand
        those changes over, in order per endpoint. Taken changes are not handed again."""

    async def close(self) -> None:
        """Stop what it runs besides the agent (its parser process)."""
