"""What a plugin sees of the agent: the object handed to provider factories and to hooks
that take ``agent``. Plugins depend on these protocols, never on the agent's class (the agent
hands out a view of itself, not itself), so the agent may change how it is built without
breaking them."""

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from meshagent.datapath.events import FlowEventSink
    from meshagent.kvstore import KVStore, NodeKeys
    from meshagent.model.cluster import ClusterInfo
    from meshagent.model.endpoint import Endpoint
    from meshagent.model.table import Tables
    from meshagent.runtime.config import Config


@runtime_checkable
class PluginRegistrar(Protocol):
    """Where a plugin registers an object holding per-agent state (its hooks then fire)."""

    def register(self, plugin: object, name: str) -> None: ...


@runtime_checkable
class Announcements(Protocol):
    """The events a plugin may announce to every other plugin."""

    def policy_changed(self, *, kind, policy) -> None:
        """``meshagent_policy_changed``: a policy was put in force or withdrawn."""


@runtime_checkable
class LocalEndpoints(Protocol):
    """This node's endpoints, as a source plugin (Kubernetes pod labels) may use them."""

    endpoints: "Mapping[int, Endpoint]"
    restored: asyncio.Event  # set once the endpoints of an earlier run are back

    async def refresh_labels(self, namespace: str, pod_name: str) -> None:
        """Ask the label sources again for a pod's labels (its identity may change)."""


@runtime_checkable
class AgentView(Protocol):
    """The running agent, as plugins may use it.

    ``kvstore`` and ``node_keys`` are set before any slot provider other than the kvstore
    backend is built; ``endpoints`` once every provider is built (before any controller
    starts).
    """

    config: "Config"
    cluster: "ClusterInfo"
    plugins: PluginRegistrar
    hooks: Announcements
    metrics: "CollectorRegistry"
    tables: "Tables"  # nodes, identities, ipcache and services of every cluster
    kvstore: "KVStore"  # the local cluster's store
    node_keys: "NodeKeys"  # this node's keys on its lease (identity references go there)
    endpoints: "LocalEndpoints | None"
    flow_events: "FlowEventSink"  # where a datapath reports its flow events
