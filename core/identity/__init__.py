"""The identity allocator slot: its contract (re-exported here) and the default allocator,
which keeps identities in the kvstore as Cilium does. The identity value is in
:mod:`meshagent.model.identity`."""

from meshagent.identity.contract import CollectsGarbage, IdentityAllocator

__all__ = ["CollectsGarbage", "IdentityAllocator"]
