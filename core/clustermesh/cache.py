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

from meshagent.kvstore import keys as kvkeys

STATE, CACHE = "cilium/state/", "cilium/cache/"


class CacheLayout:
    """The cache keys of one kind (given by its state prefix) of one remote cluster. Its
    prefixes are worked out once: an agent reading the cache maps every key it sees."""

    def __init__(self, state_prefix: str, cluster: str):
        self.state_prefix = state_prefix  # e.g. kvkeys.IDENTITIES
        self.cluster = cluster
        kind, version, *_ = state_prefix[len(STATE):].split("/")
        self._state_base = f"{STATE}{kind}/{version}/"
        # the part of the state prefix past <kind>/v1/: "" when keys name their cluster
        # there (nodes, services, ipcache), "id/" for identities
        self._after_version = state_prefix[len(self._state_base):]
        #: ``cilium/cache/<kind>/v1/C/``: everything of this kind of this cluster
        self.base = f"{CACHE}{kind}/{version}/{cluster}/"
        #: what an agent watches: the state prefix's counterpart (``.../C/id/`` for identities)
        self.prefix = self.base + self._after_version
        self.canary = kvkeys.synced_key(cluster, f"{CACHE}{kind}/{version}/")

    def to_cache(self, state_key: str) -> str:
        """A state key of the cluster as its cache key; ValueError if it is not one."""
        if not state_key.startswith(self.state_prefix):
            raise ValueError(f"key {state_key!r} is not under {self.state_prefix}")
        tail = state_key[len(self._state_base):]
        if self._after_version:
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
        if self._after_version:
            return self._state_base + tail
        if self.state_prefix == kvkeys.IPCACHE:  # Cilium's address space, not the cluster
            return kvkeys.ipcache_key(tail)
        return f"{self._state_base}{self.cluster}/{tail}"
