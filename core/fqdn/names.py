"""Names seen → identities (Cilium 1.16+'s ``pkg/fqdn/namemanager``).

Every address some local endpoint looked up (or still connects to) whose name one or more
``toFQDNs`` selectors match gets a node-local identity labelled ``fqdn:<selector>`` for each
of them, plus the world label of its family, and a /32 or /128 ipcache entry under the
source :data:`~meshagent.model.ipcache.FQDN_SOURCE`: this node's own, ranked below every
cluster's entries (a pod or node address keeps its identity) and never published. Addresses
matched by the same selectors share one identity. An address no selector matches gets
nothing (it stays the world, or whatever else the ipcache says).
"""

import collections
from collections.abc import Callable

from meshagent.fqdn.cache import CacheEntry, EndpointNames
from meshagent.fqdn.contract import FQDNSelector
from meshagent.identity.cidr import free_local_identity, local_identity_numbers
from meshagent.model.identity import Identity, world_identity
from meshagent.model.ipcache import FQDN_SOURCE, IPCacheEntry, host_key
from meshagent.model.net import Address
from meshagent.model.table import Tables


#: Names whose labels are remembered (asked again after that: the same selectors, the same
#: answer), so a pod asking ever new names does not grow the agent.
NAME_LABELS_KEPT = 65536


class NameManager:
    """The endpoints' names and the identities they give their addresses.

    Kept incrementally, so an answer costs the same with ten names cached or a hundred
    thousand: how many endpoints hold each (name, address) pair, each name's labels (the
    selectors matching it, asked once per name and selector set), and per address how many of
    its names carry each label."""

    def __init__(self, cluster: str, tables: Tables, max_ips: int, grace: float):
        self.cluster = cluster
        self.tables = tables
        self.max_ips = max_ips  # --tofqdns-endpoint-max-ip-per-hostname
        self.grace = grace  # --tofqdns-idle-connection-grace-period
        self.endpoints: dict[int, EndpointNames] = {}
        self.selectors: frozenset[FQDNSelector] = frozenset()
        self.labels: dict[Address, frozenset[str]] = {}  # the fqdn labels each address has
        self._holders: dict[Address, dict[str, int]] = {}  # address -> name -> endpoints
        self._counts: dict[Address, collections.Counter] = {}  # address -> label -> names
        self._name_labels: dict[str, frozenset[str]] = {}
        self._identities: dict[tuple[frozenset[str], int], Identity] = {}  # (labels, family)
        self._keys: dict[int, tuple[frozenset[str], int]] = {}  # identity -> its key above
        self._users: dict[int, int] = {}  # identity -> addresses with it

    # -- inputs ---------------------------------------------------------------------------------

    def observe(self, endpoint_id: int, entry: CacheEntry) -> bool:
        """An answer the endpoint got; True if some address's identity changed."""
        names = self.endpoints.setdefault(endpoint_id, EndpointNames())
        new = [ip for ip in entry.ips if not names.holds(entry.name, ip)]
        names.cache.update(entry)
        for ip in entry.ips:  # looked up again: no longer held by its connection alone
            zombie = names.zombies.get(ip)
            if zombie is not None:
                zombie.names.discard(entry.name)
                if not zombie.names:
                    del names.zombies[ip]
        for ip in new:
            self._add(entry.name, ip)
        return self._sync(new)

    def set_selectors(self, selectors: frozenset[FQDNSelector]) -> bool:
        """The ``toFQDNs`` selectors in force now: known addresses gain and lose labels."""
        if selectors == self.selectors:
            return False
        self.selectors = selectors
        self._name_labels = {}
        self._counts = {}
        for ip, names in self._holders.items():
            counts = self._counts[ip] = collections.Counter()
            for name in names:
                counts.update(self._labels_of(name))
        return self._sync(set(self._holders) | set(self.labels))

    def collect(self, now: float, connected: Callable[[int], set[Address] | None]) -> bool:
        """Cilium's DNS garbage collection: expire lookups, keep addresses in use
        (``connected(endpoint)``: its live connections' remote addresses, None: unknown)."""
        touched = set()
        for endpoint_id, names in self.endpoints.items():
            before = names.pairs()
            names.collect(now, self.max_ips, self.grace, connected(endpoint_id))
            touched |= self._drop(before - names.pairs())
        return self._sync(touched)

    def forget_endpoint(self, endpoint_id: int) -> bool:
        names = self.endpoints.pop(endpoint_id, None)
        if names is None:
            return False
        return self._sync(self._drop(names.pairs()))

    def clean(self, endpoint_id: int | None, match: Callable[[str], bool]) -> bool:
        """``fqdn cache clean``: forget the names ``match`` accepts (of one endpoint, or
        all), lookups and zombies both."""
        touched = set()
        for eid, names in self.endpoints.items():
            if endpoint_id is not None and eid != endpoint_id:
                continue
            before = names.pairs()
            names.cache.forget(match)
            for ip, zombie in list(names.zombies.items()):
                if any(match(n) for n in zombie.names):
                    del names.zombies[ip]
            touched |= self._drop(before - names.pairs())
        return self._sync(touched)

    def restore(self, endpoints: dict[int, EndpointNames]) -> None:
        for endpoint_id in list(self.endpoints):
            self.forget_endpoint(endpoint_id)
        self.endpoints = endpoints
        for names in endpoints.values():
            for name, ip in names.pairs():
                self._add(name, ip)
        self._sync(set(self._holders))

    # -- labels and identities ------------------------------------------------------------------

    def _labels_of(self, name: str) -> frozenset[str]:
        labels = self._name_labels.get(name)
        if labels is None:
            if len(self._name_labels) >= NAME_LABELS_KEPT:  # names come and go: start over
                self._name_labels = {}
            labels = self._name_labels[name] = frozenset(
                s.label for s in self.selectors if s.matches(name))
        return labels

    def _add(self, name: str, ip: Address) -> None:
        """One more endpoint holds (name, ip)."""
        holders = self._holders.setdefault(ip, {})
        held = holders.get(name, 0)
        holders[name] = held + 1
        if not held:
            self._counts.setdefault(ip, collections.Counter()).update(self._labels_of(name))

    def _drop(self, pairs: set[tuple[str, Address]]) -> set[Address]:
        """One endpoint fewer holds each pair; the addresses touched."""
        for name, ip in pairs:
            holders = self._holders[ip]
            holders[name] -= 1
            if holders[name]:
                continue
            del holders[name]
            counts = self._counts[ip]
            counts.subtract(self._labels_of(name))
            if not holders:
                del self._holders[ip]
                del self._counts[ip]
        return {ip for _, ip in pairs}

    def _sync(self, ips) -> bool:
        """Give each of ``ips`` the labels its names earn now; True if any changed."""
        changed = False
        for ip in ips:
            counts = self._counts.get(ip)
            labels = frozenset(k for k, n in counts.items() if n > 0) if counts else frozenset()
            if labels != self.labels.get(ip, frozenset()):
                self._assign(ip, labels)
                changed = True
        return changed

    def _assign(self, ip: Address, labels: frozenset[str]) -> None:
        old = self.labels.pop(ip, None)
        key = host_key(ip)
        if labels:
            identity = self._identity(labels, ip.version)
            self.labels[ip] = labels
            self._users[identity.id] += 1
            self.tables.ipcache.upsert(key, IPCacheEntry(key, identity.id, self.cluster),
                                       FQDN_SOURCE)
        else:
            self.tables.ipcache.delete(key, FQDN_SOURCE)
        if old is not None:
            self._release(self._identities[(old, ip.version)])

    def _identity(self, labels: frozenset[str], version: int) -> Identity:
        identity = self._identities.get((labels, version))
        if identity is None:
            number = free_local_identity(local_identity_numbers(self.tables))
            identity = Identity(number, labels | {world_identity(version).label}, self.cluster)
            self._identities[(labels, version)] = identity
            self._keys[number] = (labels, version)
            self._users[number] = 0
            self.tables.identities.upsert(number, identity)
        return identity

    def _release(self, identity: Identity) -> None:
        self._users[identity.id] -= 1
        if not self._users[identity.id]:
            del self._users[identity.id]
            del self._identities[self._keys.pop(identity.id)]
            self.tables.identities.delete(identity.id)

    def identity_of(self, ip: Address) -> int | None:
        labels = self.labels.get(ip)
        return None if labels is None else self._identities[(labels, ip.version)].id
