"""Reading meshagent's older ipcache layout while a cluster is upgraded.

meshagent before 0.2 published an address under its cluster's name,
``cilium/state/ip/v1/<cluster>/<ip>``; Cilium and meshagent 0.2 publish it under the address
space ``default``. Until every agent of a cluster runs 0.2, an address may be under either key
or both: the ``default`` key wins, the older one counts only while no ``default`` key holds its
address. Readers see every address under its ``default`` key. To be removed in 0.3
(docs/cilium.md, "Upgrading").
"""

from collections.abc import Callable

from meshagent.kvstore import keys as kvkeys

Apply = Callable[[str, bytes | None], None]


class LegacyIPCache:
    """Wraps an ipcache follower's ``apply``: older-layout keys of ``cluster`` are passed on as
    their ``default`` key, unless that key holds the address itself. ``present(key)``: whether
    the follower holds ``key`` (one of its ``default`` keys)."""

    def __init__(self, cluster: str, apply: Apply, present: Callable[[str], bool]):
        self.prefix = kvkeys.legacy_ipcache_key(cluster, "")
        self._apply = apply
        self._present = present
        # default key -> [the older key's value, whether the default key holds one itself]
        self._pairs: dict[str, list] = {}

    def apply(self, key: str, value: bytes | None) -> None:
        if not key.startswith(self.prefix):
            pair = self._pairs.get(key)
            if pair is None:
                return self._apply(key, value)
            pair[1] = value is not None
            return self._apply(key, value if value is not None else pair[0])
        default = kvkeys.ipcache_key(key[len(self.prefix):])
        pair = self._pairs.get(default)
        if value is None:
            if pair is not None:
                del self._pairs[default]
                if not pair[1]:
                    self._apply(default, None)
            return None
        if pair is None:
            pair = self._pairs[default] = [value, self._present(default)]
        pair[0] = value
        if not pair[1]:
            self._apply(default, value)
        return None

    def keys(self) -> list[str]:
        """The older-layout keys held (a listing reports those it does not return deleted)."""
        start = len(kvkeys.ipcache_key(""))
        return [self.prefix + key[start:] for key in self._pairs]

    def clear(self) -> None:
        self._pairs.clear()
