"""The identity allocator slot's contract."""

from typing import Protocol, runtime_checkable

from meshagent.model.identity import Identity
from meshagent.runtime.controller import ControllerHandle


@runtime_checkable
class IdentityAllocator(Protocol):
    """Gives label sets cluster-wide numeric identities (slot ``identity-allocator``)."""

    async def allocate(self, labels: frozenset[str]) -> Identity:
        """The identity for ``labels``, allocating one if no agent of the cluster has yet.

        Agents allocating the same labels concurrently get the same id. Each call takes a
        reference that :meth:`release` gives back.
        """

    async def release(self, identity: Identity) -> bool:
        """Drop one local reference; True when it was the last one on this node.

        Called exactly once per :meth:`allocate`. It should not fail because the store is
        unreachable: the reference is gone either way, so its removal from the store must land
        when the store answers again.
        """

    def lookup(self, identity_id: int) -> Identity | None:
        """A known identity (local, remote or reserved) by number, without I/O."""

    async def close(self) -> None:
        """Stop watching and give up this node's claims."""


@runtime_checkable
class CollectsGarbage(Protocol):
    """An identity allocator that also frees identities no node uses any more: the agent runs
    ``run_gc`` as controller ``identity-gc``."""

    async def run_gc(self, handle: ControllerHandle) -> None:
        """Collect unused identities now and then, for the agent's lifetime."""
