"""KVStoreMesh's cache layout: where a remote cluster's state lives in the local kvstore.

Cilium's layout, so a cache written by either side is read by the other: a remote cluster
``C``'s ``cilium/state/<kind>/v1/...`` is copied, values unchanged, under
``cilium/cache/<kind>/v1/C/...`` of the local kvstore. Keys that name the cluster after
``<kind>/v1/`` (nodes, services, ipcache) keep the rest of the key; identity keys get the
cluster inserted (``cilium/cache/identities/v1/C/id/N``). Each kind gets a sync canary
``cilium/synced/C/cilium/cache/<kind>/v1`` once its first listing is copied, and the remote's
``cilium/cluster-config/C`` is copied with the ``cached`` capability, which tells agents to
read ``C`` from the cache.
"""

import attrs

from meshagent.kvstore import keys as kvkeys

STATE, CACHE = "cilium/state/", "cilium/cache/"


def _kind_path(state_prefix: str) -> str:
    """``<kind>/v1/`` of a state prefix such as ``cilium/state/identities/v1/id/``."""
    kind, version = state_prefix[len(STATE):].split("/")[:2]
    return f"{kind}/{version}/"


def _names_cluster(state_prefix: str) -> bool:
    """Whether the kind's keys name their cluster right after ``<kind>/v1/``."""
    return state_prefix[len(STATE) + len(_kind_path(state_prefix)):] == ""


@attrs.frozen
class CacheLayout:
    """The cache keys of one kind (given by its state prefix) of one remote cluster."""

    state_prefix: str  # e.g. kvkeys.IDENTITIES
    cluster: str

    @property
    def base(self) -> str:
        """``cilium/cache/<kind>/v1/C/``: everything of this kind of this cluster."""
        return f"{CACHE}{_kind_path(self.state_prefix)}{self.cluster}/"

    @property
    def prefix(self) -> str:
        """What an agent watches: the state prefix's counterpart (``.../C/id/`` for
        identities)."""
        if _names_cluster(self.state_prefix):
            return self.base
        return self.base + self.state_prefix[len(STATE) + len(_kind_path(self.state_prefix)):]

    @property
    def canary(self) -> str:
        return kvkeys.synced_key(self.cluster, f"{CACHE}{_kind_path(self.state_prefix)}")

    def to_cache(self, state_key: str) -> str:
        """A state key of the cluster as its cache key; ValueError if it is not one."""
        state_base = STATE + _kind_path(self.state_prefix)
        if not state_key.startswith(self.state_prefix):
            raise ValueError(f"key {state_key!r} is not under {self.state_prefix}")
        tail = state_key[len(state_base):]
        if not _names_cluster(self.state_prefix):
            return self.base + tail
        own, _, rest = tail.partition("/")
        if own == kvkeys.IPCACHE_ADDRESS_SPACE and self.state_prefix == kvkeys.IPCACHE:
            own = self.cluster  # Cilium's ipcache keys name the address space instead
        if own != self.cluster or not rest:
            raise ValueError(f"key {state_key!r} does not name cluster {self.cluster!r}")
        return self.base + rest

    def to_state(self, cache_key: str) -> str:
        """The state key a cache key stands for: what an agent decodes and checks."""
        if not cache_key.startswith(self.base):
            raise ValueError(f"key {cache_key!r} is not under {self.base}")
        tail = cache_key[len(self.base):]
        state_base = STATE + _kind_path(self.state_prefix)
        if not _names_cluster(self.state_prefix):
            return state_base + tail
        return f"{state_base}{self.cluster}/{tail}"
