"""Names seen → identities (Cilium 1.16+'s ``pkg/fqdn/namemanager``).

Every address some local endpoint looked up (or still connects to) whose name one or more
``toFQDNs`` selectors match gets a node-local identity labelled ``fqdn:<selector>`` for each
of them, plus the world label of its family, and a /32 or /128 ipcache entry under the
source :data:`~meshagent.model.ipcache.FQDN_SOURCE`: this node's own, ranked below every
cluster's entries (a pod or node address keeps its identity) and never published. Addresses
matched by the same selectors share one identity. An address no selector matches gets
nothing (it stays the world, or whatever else the ipcache says).
"""

from collections.abc import Callable

from meshagent.fqdn.cache import CacheEntry, EndpointNames
from meshagent.fqdn.contract import FQDNSelector
from meshagent.identity.cidr import free_local_identity, local_identity_numbers
from meshagent.model.identity import Identity, world_identity
from meshagent.model.ipcache import FQDN_SOURCE, IPCacheEntry, host_key
from meshagent.model.net import Address
from meshagent.model.table import Tables


class NameManager:
    """The endpoints' names and the identities they give their addresses."""

    def __init__(self, cluster: str, tables: Tables, max_ips: int, grace: float):
        self.cluster = cluster
        self.tables = tables
        self.max_ips = max_ips  # --tofqdns-endpoint-max-ip-per-hostname
        self.grace = grace  # --tofqdns-idle-connection-grace-period
        self.endpoints: dict[int, EndpointNames] = {}
        self.selectors: frozenset[FQDNSelector] = frozenset()
        self.labels: dict[Address, frozenset[str]] = {}  # the fqdn labels each address has
        self._identities: dict[tuple[frozenset[str], int], Identity] = {}  # (labels, family)
        self._keys: dict[int, tuple[frozenset[str], int]] = {}  # identity -> its key above
        self._users: dict[int, int] = {}  # identity -> addresses with it

    # -- inputs ---------------------------------------------------------------------------------

    def observe(self, endpoint_id: int, entry: CacheEntry) -> bool:
        """An answer the endpoint got; True if some address's identity changed."""
        names = self.endpoints.setdefault(endpoint_id, EndpointNames())
        names.cache.update(entry)
        for ip in entry.ips:  # looked up again: no longer held by its connection alone
            zombie = names.zombies.get(ip)
            if zombie is not None:
                zombie.names.discard(entry.name)
                if not zombie.names:
                    del names.zombies[ip]
        return self._relabel(set(entry.ips))

    def set_selectors(self, selectors: frozenset[FQDNSelector]) -> bool:
        """The ``toFQDNs`` selectors in force now: known addresses gain and lose labels."""
        if selectors == self.selectors:
            return False
        self.selectors = selectors
        return self._relabel(self._held())

    def collect(self, now: float, connected: Callable[[int], set[Address] | None]) -> bool:
        """Cilium's DNS garbage collection: expire lookups, keep addresses in use
        (``connected(endpoint)``: its live connections' remote addresses, None: unknown)."""
        before = self._held()
        for endpoint_id, names in self.endpoints.items():
            names.collect(now, self.max_ips, self.grace, connected(endpoint_id))
        return self._relabel(before)

    def forget_endpoint(self, endpoint_id: int) -> bool:
        names = self.endpoints.pop(endpoint_id, None)
        if names is None:
            return False
        return self._relabel({ip for _, ip in names.pairs()})

    def clean(self, endpoint_id: int | None, match: Callable[[str], bool]) -> bool:
        """``fqdn cache clean``: forget the names ``match`` accepts (of one endpoint, or
        all), lookups and zombies both."""
        touched = set()
        for eid, names in self.endpoints.items():
            if endpoint_id is not None and eid != endpoint_id:
                continue
            touched.update(ip for _, ip in names.cache.forget(match))
            for ip, zombie in list(names.zombies.items()):
                if any(match(n) for n in zombie.names):
                    del names.zombies[ip]
                    touched.add(ip)
        return self._relabel(touched)

    def restore(self, endpoints: dict[int, EndpointNames]) -> None:
        self.endpoints = endpoints
        self._relabel(self._held())

    # -- labels and identities ------------------------------------------------------------------

    def _held(self) -> set[Address]:
        return {ip for names in self.endpoints.values() for _, ip in names.pairs()} | set(
            self.labels)

    def names_of(self, ip: Address) -> set[str]:
        return {name for names in self.endpoints.values() for name, held in names.pairs()
                if held == ip}

    def _relabel(self, ips: set[Address]) -> bool:
        """Give each of ``ips`` the labels its names earn now; True if any changed."""
        changed = False
        by_ip: dict[Address, set[str]] = {ip: set() for ip in ips}
        for names in self.endpoints.values():
            for name, ip in names.pairs():
                if ip in by_ip:
                    by_ip[ip].add(name)
        for ip, names in by_ip.items():
            labels = frozenset(s.label for s in self.selectors if any(s.matches(n) for n in names))
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
