"""The policy contracts: the repository of rules, the resolver slot, and what they hand on.

Two parts, as in Cilium (``pkg/policy/repository.go`` keeps the rules and their revisions;
the distillery computes per-endpoint state):

- the **repository** (:class:`PolicyRepository`; the core's is
  :class:`meshagent.policy.repository.Repository`) holds the cluster's rules from every source
  — the API, the cluster's kvstore, source plugins such as Kubernetes — and numbers every
  change with a revision;
- the **resolver** (:class:`PolicyResolver`, slot ``policy-resolver``) is handed each change
  of the rules in order (:meth:`PolicyResolver.apply`), learns identities and endpoints from
  the agent's events, and turns it all into per-endpoint map state: ``{MapKey: Verdict}`` for
  each local endpoint. The core feeds any resolver's output to the datapath slot through
  :meth:`PolicyResolver.snapshot` (the whole state, for a reconcile) and
  :meth:`PolicyResolver.changes` (what changed since).

So a third-party resolver receives every rule of every source, whether or not it wraps the
default one, and drives the datapath exactly as the default one does.
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
    #: allowed, and delivered to the agent's DNS proxy instead of its destination: the entry
    #: of a port rule with ``rules: dns`` (Cilium's policy entry with a proxy port)
    REDIRECT = "redirect"


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


PolicyKey = tuple[str, str, str]  # kind, namespace ("" for a clusterwide one), name


@attrs.frozen
class PolicyUpdate:
    """One change of the rules: an imported policy (``UPSERT``), or the key of a deleted one
    (``DELETE``). What a policy source yields, and what the repository hands a resolver."""

    kind: ChangeKind
    policy: Policy | None = None
    key: PolicyKey | None = None

    @property
    def policy_key(self) -> PolicyKey:
        return self.policy.key if self.policy is not None else self.key


class ChangeQueue:
    """Map changes waiting to be taken, per endpoint and in order: what a resolver needs to
    serve :meth:`PolicyResolver.changes` (and to drop on :meth:`PolicyResolver.snapshot`)."""

    def __init__(self) -> None:
        self._pending: EndpointChanges = {}
        self._wake = asyncio.Event()
        self._touched = False

    def touch(self) -> None:
        """Wake a taker with nothing pending: the revision grew without changing map state."""
        self._touched = True
        self._wake.set()

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
        """Wait until something is pending (or :meth:`touch`), then hand all of it over."""
        while not self._pending and not self._touched:
            self._wake.clear()
            await self._wake.wait()
        taken, self._pending, self._touched = self._pending, {}, False
        return taken


@runtime_checkable
class PolicyRepository(Protocol):
    """The cluster's policies from every source, numbered by revision (what the ``policy``
    commands and routes use). The core has one: plugins feed it through
    ``meshagent_policy_source``; it hands every change to the loaded resolver."""

    async def import_policies(self, text: str, source: str) -> list[Policy]:
        """Validate YAML/JSON documents into policies; raises
        :class:`meshagent.policy.api.PolicyError` naming document, field path and problem, or
        the input limit it exceeds (docs/policy.md)."""

    async def store(self, policies: list[Policy]) -> int:
        """Make the policies the cluster's (every agent of it enforces them); returns once
        this node's repository applied them, with its revision then."""

    async def delete(self, kind: str, namespace: str | None, name: str) -> int | None:
        """Remove one policy from the cluster; returns once this node's repository applied
        it, with its revision then; None if there was no such policy."""

    def policies(self) -> list[Policy]:
        """The policies in force (served by ``meshagent policy get``)."""

    @property
    def revision(self) -> int:
        """Grows by one with every change of the policies in force."""


@runtime_checkable
class PolicyResolver(Protocol):
    """Rules and identities in, per-endpoint map state out (slot ``policy-resolver``).

    It is handed every change of the rules by the repository (:meth:`apply`) and learns
    identities and endpoints from the agent's events (``meshagent_identity_changed``,
    ``meshagent_endpoint_changed``).
    """

    async def apply(self, update: PolicyUpdate, revision: int) -> None:
        """Take one change of the rules, in the repository's order; ``revision`` is the
        repository's revision with it. When this returns, every map change it causes is
        queued for :meth:`changes` and :attr:`revision` is ``revision``. Called for one
        change at a time: a call never overlaps another."""

    @property
    def revision(self) -> int:
        """The repository revision whose map changes are all queued (0: none yet)."""

    def enforcing(self) -> tuple[int, int]:
        """(local endpoints with policy enforced in some direction, local endpoints)."""

    def trace(self, dst_endpoint: int, port: int, protocol: str = "TCP", **source) -> dict:
        """Explain the verdict for a source (``src_identity``, ``src_labels`` or ``src_ip``)
        reaching a local endpoint: ``source``, ``destination``, ``port``, ``protocol``,
        ``verdict`` ("allow"/"deny"), ``reason`` and what matched (``meshagent policy trace``
        prints it)."""

    def snapshot(self) -> dict[int, MapState]:
        """Every local endpoint's map state now. :meth:`changes` continues from here: what
        changed before this call is in it, what changes after is not."""

    async def changes(self) -> EndpointChanges:
        """Wait until map state changed since the last call (or :meth:`snapshot`), or
        :attr:`revision` grew, or an endpoint was added (its state may be empty), then hand
        those changes over (possibly none), in order per endpoint. Taken changes are not
        handed again. When it returns, every endpoint announced before holds the state of
        :attr:`revision` once the changes are applied (what ``policy wait`` relies on)."""

    async def close(self) -> None:
        """Stop what it runs besides the agent."""


@runtime_checkable
class AttributesVerdicts(Protocol):
    """An optional capability of a resolver: naming the policies behind a verdict, what flows
    carry as Hubble's ``ingress_allowed_by``/``egress_denied_by`` and the like. The observer
    leaves those fields empty with a resolver that lacks it."""

    def deciding_policies(self, endpoint_id: int, direction: str, identity: int,
                          protocol: int, port: int, verdict: Verdict, match: int
                          ) -> tuple[PolicyKey, ...]:
        """The policies whose rules give ``verdict`` to a packet of ``protocol``/``port``
        between local endpoint ``endpoint_id`` and peer ``identity`` in ``direction``, at the
        entry level ``match`` names (Cilium's PolicyMatchType: 1 L3-only, 2 L3-L4, 3 L4-only,
        4 all, 5 L3-Proto, 6 Proto-Only), sorted; empty when no policy did (an implied allowance, an unknown endpoint).
        Reads the state as of :attr:`PolicyResolver.revision`."""


@runtime_checkable
class ReportsEnforcement(Protocol):
    """Optional for a resolver: the directions its policy is enforced in for an endpoint
    (the POLICY ENFORCEMENT columns of ``meshagent endpoint list``, which say ``Unknown``
    for a resolver without it)."""

    def enforced(self, endpoint_id: int) -> tuple[bool, bool] | None:
        """(ingress enforced, egress enforced) for a local endpoint; None for one it does not
        know (yet)."""


@runtime_checkable
class LegacyPolicyResolver(Protocol):
    """A resolver written for meshagent 0.1's slot, which held the rules itself: still loaded
    for one release, through :class:`meshagent.policy.repository.LegacyResolverShim`, with a
    deprecation warning. Removed in 0.3."""

    async def import_policies(self, text: str, source: str) -> list[Policy]: ...

    async def store(self, policies: list[Policy]) -> None: ...

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool: ...

    def policies(self) -> list[Policy]: ...

    @property
    def revision(self) -> int: ...

    def trace(self, dst_endpoint: int, port: int, protocol: str = "TCP", **source) -> dict: ...

    def snapshot(self) -> dict[int, MapState]: ...

    async def changes(self) -> EndpointChanges: ...

    async def close(self) -> None: ...
