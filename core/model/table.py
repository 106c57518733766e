"""The agent's view of the mesh: one table per kind (nodes, identities, ipcache, services).

Every change goes through a table, and the table tells the plugins through the matching event
hook. Rows carry their origin cluster; a cluster withdrawing a key only removes its own row.
"""

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

import attrs

from meshagent.events import ChangeKind

if TYPE_CHECKING:
    from meshagent.model.ipcache import IPCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Table(Generic[K, V]):
    def __init__(self, kind: str, notify: Callable[[ChangeKind, V], None]):
        self.kind = kind
        self._notify = notify
        self._rows: dict[K, V] = {}
        self._counts: dict[str | None, int] = {}  # rows per cluster: status asks often

    def upsert(self, key: K, value: V) -> bool:
        """Store ``value``; tell observers only if it differs from what was there."""
        old = self._rows.get(key)
        if old == value:
            return False
        if old is not None:
            self._uncount(old)
        self._rows[key] = value
        cluster = getattr(value, "cluster", None)
        self._counts[cluster] = self._counts.get(cluster, 0) + 1
        self._notify(ChangeKind.UPSERT, value)
        return True

    def _uncount(self, value: V) -> None:
        cluster = getattr(value, "cluster", None)
        left = self._counts[cluster] - 1
        if left:
            self._counts[cluster] = left
        else:
            del self._counts[cluster]

    def delete(self, key: K, cluster: str | None = None) -> V | None:
        """Remove the row, but only ``cluster``'s own when a cluster is given."""
        value = self._rows.get(key)
        if value is None or (cluster is not None and getattr(value, "cluster", None) != cluster):
            return None
        del self._rows[key]
        self._uncount(value)
        self._notify(ChangeKind.DELETE, value)
        return value

    def get(self, key: K) -> V | None:
        return self._rows.get(key)

    def values(self) -> list[V]:
        return list(self._rows.values())

    def count(self, cluster: str) -> int:
        return self._counts.get(cluster, 0)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._rows))


@attrs.define
class Tables:
    """The agent's tables, shared by the local and every remote cluster's sync."""

    nodes: Table
    identities: Table
    ipcache: "IPCache"
    services: Table

    def held(self) -> contextlib.AbstractContextManager:
        """Notices of ipcache changes held while a batch of rows is applied (a page of a
        listing), then given to observers in one call (see :meth:`IPCache.held`)."""
        return self.ipcache.held()
