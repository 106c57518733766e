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
from meshagent.datapath import Datapath, DatapathBatch, ReportsConnections
from meshagent.datapath.proxyroute import NoProxyRoutes, ProxyRoutes
from meshagent.datapath.drops import (
    PROTOCOL_NAMES,
    REASON_TEXT,
    flag_names,
    host_port,
    protocol_name,
    verdict_metrics,
)
from meshagent.datapath.events import (
    AUDIT,
    DROP,
    DROPPED,
    FORWARDED,
    MATCH_ALL,
    MATCH_L3_L4,
    MATCH_L3_ONLY,
    MATCH_L3_PROTO,
    MATCH_L4_ONLY,
    MATCH_NONE,
    MATCH_PROTO_ONLY,
    MATCH_TEXT,
    POLICY_VERDICT,
    REDIRECTED,
    TRACE,
    FlowEvent,
    FlowEvents,
    FlowEventSink,
    match_of,
)
from meshagent.errors import MeshagentError, PluginError, UsageError
from meshagent.events import ChangeKind, PolicyChange
from meshagent.hooks.additions import Command, Route, format_table, json_response, print_rows
from meshagent.hooks.answers import Answer
from meshagent.hooks.slots import Registry
from meshagent.hooks.view import AgentView
from meshagent.identity import CollectsGarbage, IdentityAllocator
from meshagent.kvstore import (
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
    RevisionCompacted,
    WatchEvent,
    pages_of,
)
from meshagent.kvstore.batch import check_distinct, create_each, put_each
from meshagent.kvstore.lock import kv_lock
from meshagent.fqdn.contract import DNSRule, FQDNSelector, ResolvesDNS
from meshagent.model.cluster import ClusterInfo
from meshagent.model.endpoint import Endpoint
from meshagent.model.identity import Identity, ReservedIdentity, world_identity
from meshagent.model.ipcache import IPCacheEntry
from meshagent.model.jsonfields import to_jsonable
from meshagent.model.node import Node
from meshagent.model.service import Backend, Frontend, MergedService, Service, ServiceUpdate
from meshagent.policy import (
    AttributesVerdicts,
    ChangeQueue,
    EndpointChanges,
    MapChange,
    MapKey,
    MapState,
    PolicyKey,
    PolicyRepository,
    PolicyResolver,
    PolicyUpdate,
    ReportsEnforcement,
    Verdict,
)
from meshagent.policy.api import Policy, PolicyError, parse_document
from meshagent.runtime.config import Config
from meshagent.runtime.controller import Controller, ControllerHandle
from meshagent.runtime.options import parse_bool, parse_list
from meshagent.runtime.status import Health, StatusSection
from meshagent.service.kubernetes import ServiceError, services_from_documents


def build_default_resolver(agent: AgentView) -> PolicyResolver:
    """The default policy resolver, for a resolver that composes it, as contrib's
    meshagent-guardrails does. Imported on use: it is a component."""
    from meshagent.policy.default import build_default
    return build_default(agent)


__all__ = [
    # hooks and the agent
    "PROJECT", "hookimpl", "Answer", "AgentView", "Registry", "Controller", "ControllerHandle",
    "StatusSection", "Health", "Route", "json_response", "to_jsonable", "Command",
    "format_table", "print_rows", "parse_bool", "parse_list", "ChangeKind", "PolicyChange",
    "MeshagentError", "UsageError", "PluginError", "Config",
    # slot contracts, and helpers for their providers
    "KVStore", "KVStoreBackend", "KVStoreStatus", "KVStoreError", "KVStoreUnavailable",
    "RevisionCompacted", "LeaseExpired", "EventType", "KeyValue", "Listing", "WatchEvent",
    "Lease", "kv_lock", "PAGE_SIZE", "pages_of", "check_distinct", "create_each", "put_each",
    "IdentityAllocator", "CollectsGarbage",
    "PolicyResolver", "PolicyRepository", "PolicyUpdate", "PolicyKey", "Policy", "PolicyError",
    "parse_document", "build_default_resolver", "MapKey", "MapState", "MapChange", "Verdict",
    "EndpointChanges", "ChangeQueue", "ReportsEnforcement", "AttributesVerdicts",
    "ResolvesDNS", "DNSRule", "FQDNSelector",
    "Datapath", "DatapathBatch", "ReportsConnections", "ProxyRoutes", "NoProxyRoutes", "FlowEvent", "FlowEventSink", "FlowEvents", "DROP",
    "POLICY_VERDICT", "TRACE", "FORWARDED", "DROPPED", "AUDIT", "REDIRECTED", "MATCH_NONE", "MATCH_L3_ONLY",
    "MATCH_L3_L4", "MATCH_L4_ONLY", "MATCH_ALL", "MATCH_L3_PROTO", "MATCH_PROTO_ONLY",
    "MATCH_TEXT", "match_of", "PROTOCOL_NAMES", "REASON_TEXT", "flag_names", "host_port", "protocol_name", "verdict_metrics",
    # values
    "ClusterInfo", "Node", "Identity", "ReservedIdentity", "world_identity", "Endpoint",
    "IPCacheEntry", "Service", "Frontend", "Backend", "MergedService", "ServiceUpdate",
    "ServiceError", "services_from_documents",
]
