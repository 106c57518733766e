"""Numeric security identities and the allocator slot's contract.

An identity stands for a label set; policy is written against labels and enforced against
identities. Reserved identities (below 256) need no allocation.
"""

import enum
from typing import Protocol, runtime_checkable

import attrs


class ReservedIdentity(enum.IntEnum):
    """Cilium's reserved identities, the same number in every cluster."""

    HOST = 1
    WORLD = 2
    UNMANAGED = 3
    HEALTH = 4
    INIT = 5
    REMOTE_NODE = 6
    KUBE_APISERVER = 7


@attrs.frozen
class Identity:
    """A numeric identity and the source-prefixed labels it stands for (``k8s:app=db``)."""

    id: int
    labels: frozenset[str]

    @property
    def reserved(self) -> bool:
        return self.id < 256


@runtime_checkable
class IdentityAllocator(Protocol):
    """Gives label sets cluster-wide numeric identities (slot ``identity-allocator``)."""

    async def allocate(self, labels: frozenset[str]) -> Identity:
        """The identity for ``labels``, allocating one if no agent of the cluster has yet.

        Agents allocating the same labels concurrently get the same id. Each call takes a
        reference that :meth:`release` gives back.
        """

    async def release(self, identity: Identity) -> bool:
        """Drop one local reference; True when it was the last one on this node."""

    def lookup(self, identity_id: int) -> Identity | None:
        """A known identity (local, remote or reserved) by number, without I/O."""

    async def close(self) -> None:
        """Stop watching and give up this node's claims."""
