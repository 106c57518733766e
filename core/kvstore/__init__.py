"""The kvstore slot: its contract (re-exported here), every key prefix, and what the agent
builds on any store: a lock, list-then-watch, liveness, the publisher of this node's state."""

from meshagent.kvstore.contract import (
    PAGE_SIZE,
    EventType,
    KeyValue,
    KVStore,
    KVStoreBackend,
    KVStoreError,
    KVStoreStatus,
    KVStoreUnavailable,
    Lease,
    LeaseExpired,
    Listing,
    NodeKeys,
    RevisionCompacted,
    WatchEvent,
    pages_of,
)

__all__ = ["PAGE_SIZE", "EventType", "KeyValue", "KVStore", "KVStoreBackend", "KVStoreError",
           "KVStoreStatus", "KVStoreUnavailable", "Lease", "LeaseExpired", "Listing", "NodeKeys",
           "RevisionCompacted", "WatchEvent", "pages_of"]
