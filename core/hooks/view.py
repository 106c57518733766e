"""What a plugin sees of the agent: the object handed to provider factories and to hooks
that take ``agent``. Plugins depend on this protocol, never on the agent's class, so the
agent may change how it is built without breaking them."""

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from meshagent.endpoint.manager import EndpointManager
    from meshagent.hooks.manager import Hooks, PluginManager
    from meshagent.kvstore import KVStore
    from meshagent.model.cluster import ClusterInfo
    from meshagent.model.table import Tables
    from meshagent.runtime.config import Config


@runtime_checkable
class AgentView(Protocol):
    """The running agent, as plugins may use it.

    ``kvstore`` is set before any slot provider other than the kvstore backend is built;
    ``endpoints`` once every provider is built (before any controller starts).
    """

    config: "Config"
    cluster: "ClusterInfo"
    plugins: "PluginManager"  # to register a plugin object holding per-agent state
    hooks: "Hooks"  # to announce events (e.g. ``hooks.policy_changed``)
    metrics: "CollectorRegistry"
    tables: "Tables"  # nodes, identities, ipcache and services of every cluster
    kvstore: "KVStore"  # the local cluster's store
    endpoints: "EndpointManager | None"
