"""Node identities: with ``--enable-node-selector-labels``, every other node's address stands
for the identity of its labels, so that ``fromNodes``/``toNodes`` selectors can select it.

As in Cilium (``nodeIdentityLabels`` in pkg/node/manager/manager.go): a node's identity carries
``reserved:remote-node``, its cluster (``k8s:io.cilium.k8s.policy.cluster``) and each of its
labels with source ``node``; every distinct label set gets one node-local identity in Cilium's
remote-node scope (``IdentityScopeRemoteNode``, ``2 << 24``), shared by the nodes with those
labels and released with the last of them. This node itself is left alone (Cilium gives it
the host identity; ``fromNodes`` never selects it).
"""

import attrs

from meshagent import hookimpl
from meshagent.events import ChangeKind
from meshagent.model.identity import CLUSTER_LABEL, Identity, ReservedIdentity
from meshagent.model.ipcache import NODE_SOURCE, IPCacheEntry, host_key
from meshagent.model.node import Node
from meshagent.model.table import Tables

REMOTE_NODE_SCOPE = 2 << 24


def node_identity_labels(node: Node) -> frozenset[str]:
    return frozenset({ReservedIdentity.REMOTE_NODE.label, f"k8s:{CLUSTER_LABEL}={node.cluster}"}
                     | {f"node:{key}={value}" if value else f"node:{key}"
                        for key, value in node.labels})


@attrs.define
class _Held:
    identity: Identity
    nodes: set[tuple[str, str]]


class NodeIdentities:
    """Follows the node table (local and remote clusters); registered as plugin
    ``core.node-identities``. The identities go in the identity table, each node address in
    the ipcache under :data:`NODE_SOURCE`."""

    def __init__(self, tables: Tables, local_cluster: str, local_node: str):
        self.tables = tables
        self.local = (local_cluster, local_node)
        self.by_labels: dict[frozenset[str], _Held] = {}
        self.nodes: dict[tuple[str, str], tuple[frozenset[str], tuple]] = {}  # -> labels, keys

    @hookimpl
    def meshagent_node_changed(self, kind, node):
        name = (node.cluster, node.name)
        if name == self.local:
            return
        old_labels, old_keys = self.nodes.pop(name, (None, ()))
        keys: tuple = ()
        if kind is not ChangeKind.DELETE:
            labels = node_identity_labels(node)
            identity = self._hold(labels, name)
            keys = tuple(host_key(a) for a in (node.ipv4, node.ipv6) if a is not None)
            for key in keys:
                self.tables.ipcache.upsert(key, IPCacheEntry(key, identity.id, self.local[0]),
                                           NODE_SOURCE)
            self.nodes[name] = (labels, keys)
        for key in set(old_keys) - set(keys):
            self.tables.ipcache.delete(key, NODE_SOURCE)
        if old_labels is not None and self.nodes.get(name, (None,))[0] != old_labels:
            self._release(old_labels, name)

    def _hold(self, labels: frozenset[str], name: tuple[str, str]) -> Identity:
        """The identity of ``labels``, numbered when it is new; held for node ``name``. Like a
        CIDR identity it is this node's own (its cluster is the local one), whatever cluster
        the nodes are in."""
        held = self.by_labels.get(labels)
        if held is None:
            taken = {h.identity.id for h in self.by_labels.values()}
            number = next(n for n in range(REMOTE_NODE_SCOPE | 1, REMOTE_NODE_SCOPE << 1)
                          if n not in taken)
            held = self.by_labels[labels] = _Held(Identity(number, labels, self.local[0]), set())
            self.tables.identities.upsert(number, held.identity)
        held.nodes.add(name)
        return held.identity

    def _release(self, labels: frozenset[str], name: tuple[str, str]) -> None:
        held = self.by_labels[labels]
        held.nodes.discard(name)
        if not held.nodes:
            del self.by_labels[labels]
            self.tables.identities.delete(held.identity.id)
