"""Everything a plugin author uses, in one module: ``from meshagent.plugin import ...``.

A plugin is a module (or object) with ``@hookimpl`` functions named after the hook
specifications in :mod:`meshagent.hooks.specs`, published under the entry-point group
``meshagent.plugins``. It fills a slot by registering a factory that takes the
:class:`AgentView` and returns an object meeting the slot's contract; the agent checks it
against that contract when building it. The conformance suites are in
:mod:`meshagent.testing` (kvstore, identity allocator, policy resolver, datapath).
docs/writing-plugins.md walks through a plugin end to end.
"""

from meshagent import PROJECT, hookimpl
from meshagent.datapath import Datapath, DatapathBatch
from meshagent.datapath.drops import DropFeed, DropNotice, DropPeer
from meshagent.errors import MeshagentError, PluginError, UsageError
from meshagent.events import ChangeKind, PolicyChange
from meshagent.hooks.additions import Command, Route, format_table, json_response
from meshagent.hooks.slots import Registry
from meshagent.hooks.view import AgentView
from meshagent.identity import CollectsGarbage, IdentityAllocator
from meshagent.kvstore import (
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
    RevisionCompacted,
    WatchEvent,
)
from meshagent.kvstore.lock import kv_lock
from meshagent.model.cluster import ClusterInfo
from meshagent.model.endpoint import Endpoint
from meshagent.model.identity import Identity, ReservedIdentity
from meshagent.model.ipcache import IPCacheEntry
from meshagent.model.jsonfields import to_jsonable
from meshagent.model.node import Node
from meshagent.model.service import Backend, Frontend, MergedService, Service, ServiceUpdate
from meshagent.policy import (
    ChangeQueue,
    EndpointChanges,
    MapChange,
    MapKey,
    MapState,
    PolicyResolver,
    Verdict,
)
from meshagent.runtime.controller import Controller, ControllerHandle
from meshagent.runtime.options import parse_bool, parse_list
from meshagent.runtime.status import Health, StatusSection


def build_default_resolver(agent: AgentView) -> PolicyResolver:
    """The default policy resolver (policies in the cluster's kvstore), for a resolver that
    composes it, as contrib's meshagent-guardrails does. Imported on use: it is a component."""
    from meshagent.policy.service import build_default
    return build_default(agent)


__all__ = [
    # hooks and the agent
    "PROJECT", "hookimpl", "AgentView", "Registry", "Controller", "ControllerHandle",
    "StatusSection", "Health", "Route", "json_response", "to_jsonable", "Command",
    "format_table", "parse_bool", "parse_list", "ChangeKind", "PolicyChange",
    "MeshagentError", "UsageError", "PluginError",
    # slot contracts
    "KVStore", "KVStoreBackend", "KVStoreStatus", "KVStoreError", "KVStoreUnavailable",
    "RevisionCompacted", "LeaseExpired", "EventType", "KeyValue", "Listing", "WatchEvent",
    "Lease", "kv_lock", "IdentityAllocator", "CollectsGarbage", "PolicyResolver", "build_default_resolver", "MapKey",
    "MapState", "MapChange", "Verdict", "EndpointChanges", "ChangeQueue", "Datapath",
    "DatapathBatch",
    "DropFeed", "DropNotice", "DropPeer",
    # values
    "ClusterInfo", "Node", "Identity", "ReservedIdentity", "Endpoint", "IPCacheEntry",
    "Service", "Frontend", "Backend", "MergedService", "ServiceUpdate",
]
