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


#: The label every endpoint carries with its cluster's name.
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"


@attrs.frozen
class Identity:
    """A numeric identity, the source-prefixed labels it stands for (``k8s:app=db``), and the
    cluster it came from."""

    id: int
    labels: frozenset[str]
    cluster: str = ""

    @property
    def reserved(self) -> bool:
        return self.id < 256


def format_labels(labels: frozenset[str]) -> str:
    """Cilium's sorted label list, the value of ``cilium/state/identities/v1/id/<id>``."""
    return "".join(f"{label};" for label in sorted(labels))


def parse_labels(text: str) -> frozenset[str]:
    """The inverse of :func:`format_labels`; ValueError names the bad label."""
    labels = frozenset(part for part in text.split(";") if part)
    if not labels:
        raise ValueError("empty label set")
    for label in labels:
        source, sep, rest = label.partition(":")
        if not sep or not source or not rest or rest.startswith("="):
            raise ValueError(f"label {label!r} is not source:key[=value]")
    return labels


def label_value(labels: frozenset[str], key: str) -> str | None:
    """The value of ``key`` whatever its source prefix, or None."""
    for label in labels:
        name, _, value = label.partition(":")[2].partition("=")
        if name == key:
            return value
    return None


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
