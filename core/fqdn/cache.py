"""The names an endpoint looked up, with their addresses and TTLs (Cilium's ``pkg/fqdn/cache.go``).

Each endpoint has a :class:`DNSCache` of its lookups and a list of :class:`Zombie`s: addresses
whose lookup expired but which a live connection of the endpoint still uses (Cilium's
``DNSZombieMappings``, listed as source ``connection``). An address stays selectable by the
``toFQDNs`` selectors of its names while some endpoint's cache or zombie holds it; the
garbage collector (:meth:`EndpointNames.collect`) is what lets it go.

The JSON of a lookup is Cilium's ``cacheEntry`` (``fqdn``, ``lookup-time``,
``expiration-time``, ``ttl``, ``ips``), so ``meshagent fqdn cache list -o json`` reads as
``cilium fqdn cache list -o json`` does.
"""

import datetime
import ipaddress
from collections.abc import Iterable

import attrs

from meshagent.model.net import Address

#: An alive zombie is kept this long after its connection was last seen (Cilium re-inserts
#: alive zombies with TTL 2 * DNSGCJobInterval).
ZOMBIE_ALIVE_TTL = 120.0


def rfc3339(stamp: float) -> str:
    """Go's time.Time JSON form (RFC 3339 with nanoseconds, UTC ``Z``)."""
    moment = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339_millis(stamp: float) -> str:
    """go-openapi's strfmt.DateTime (what Cilium's API models carry): milliseconds."""
    moment = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_rfc3339(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@attrs.frozen
class CacheEntry:
    """One answer: ``name`` (lower case, final dot) resolved to ``ips`` at ``lookup_time``,
    valid for ``ttl`` seconds (after ``--tofqdns-min-ttl``)."""

    name: str
    lookup_time: float
    ttl: int
    ips: tuple[Address, ...]

    @property
    def expiration_time(self) -> float:
        return self.lookup_time + self.ttl

    def to_json(self) -> dict:
        """Cilium's cacheEntry."""
        return {"fqdn": self.name, "lookup-time": rfc3339(self.lookup_time),
                "expiration-time": rfc3339(self.expiration_time), "ttl": self.ttl,
                "ips": [str(ip) for ip in self.ips]}

    @classmethod
    def from_json(cls, doc: dict) -> "CacheEntry":
        """ValueError (or KeyError, TypeError) on a malformed entry."""
        return cls(str(doc["fqdn"]), parse_rfc3339(doc["lookup-time"]), int(doc["ttl"]),
                   tuple(ipaddress.ip_address(ip) for ip in doc["ips"]))


@attrs.define
class Zombie:
    """An address whose lookups expired, kept while a connection of the endpoint uses it
    (Cilium's DNSZombieMapping: ``names``, ``ip``, ``alive-at``, ``delete-pending-at``)."""

    names: set[str]
    ip: Address
    alive_at: float
    delete_pending_at: float

    def to_json(self) -> dict:
        return {"names": sorted(self.names), "ip": str(self.ip),
                "alive-at": rfc3339(self.alive_at),
                "delete-pending-at": rfc3339(self.delete_pending_at)}

    @classmethod
    def from_json(cls, doc: dict) -> "Zombie":
        return cls(set(doc["names"]), ipaddress.ip_address(doc["ip"]),
                   parse_rfc3339(doc["alive-at"]), parse_rfc3339(doc["delete-pending-at"]))


class DNSCache:
    """Per name, per address, the lookup that keeps it longest (Cilium keeps the
    latest-expiring entry of each address)."""

    def __init__(self) -> None:
        self.names: dict[str, dict[Address, CacheEntry]] = {}
        self.by_ip: dict[Address, set[str]] = {}  # the other way round (Cilium's LookupIP)

    def update(self, entry: CacheEntry) -> bool:
        """Take an answer; True if some address of the name now expires later (or is new)."""
        held = self.names.setdefault(entry.name, {})
        changed = False
        for ip in entry.ips:
            old = held.get(ip)
            if old is None or old.expiration_time < entry.expiration_time:
                held[ip] = entry
                changed = changed or old is None or old.expiration_time != entry.expiration_time
            self.by_ip.setdefault(ip, set()).add(entry.name)
        return changed

    def _unindex(self, name: str, ip: Address) -> None:
        names = self.by_ip.get(ip)
        if names is not None:
            names.discard(name)
            if not names:
                del self.by_ip[ip]

    def entries(self) -> list[CacheEntry]:
        """Each lookup still holding some address, once, oldest first."""
        seen: dict[int, CacheEntry] = {}
        for held in self.names.values():
            for entry in held.values():
                seen.setdefault(id(entry), entry)
        return sorted(seen.values(), key=lambda e: (e.lookup_time, e.name))

    def ips(self, name: str) -> set[Address]:
        return set(self.names.get(name, ()))

    def expire(self, now: float, max_ips: int) -> list[tuple[str, Address]]:
        """Remove what expired by ``now`` and, beyond ``max_ips`` addresses of a name, the
        earliest-expiring ones; return the (name, address) pairs removed."""
        removed = []
        for name in list(self.names):
            held = self.names[name]
            by_expiry = sorted(held.items(), key=lambda item: item[1].expiration_time,
                               reverse=True)
            for rank, (ip, entry) in enumerate(by_expiry):
                if entry.expiration_time <= now or rank >= max_ips:
                    del held[ip]
                    self._unindex(name, ip)
                    removed.append((name, ip))
            if not held:
                del self.names[name]
        return removed

    def forget(self, match) -> list[tuple[str, Address]]:
        """Remove every name ``match(name)`` accepts; the pairs removed."""
        removed = [(name, ip) for name in list(self.names) if match(name)
                   for ip in self.names.pop(name)]
        for name, ip in removed:
            self._unindex(name, ip)
        return removed


class EndpointNames:
    """One endpoint's lookups and zombies."""

    def __init__(self) -> None:
        self.cache = DNSCache()
        self.zombies: dict[Address, Zombie] = {}

    def holds(self, name: str, ip: Address) -> bool:
        zombie = self.zombies.get(ip)
        return ip in self.cache.names.get(name, ()) or (zombie is not None
                                                         and name in zombie.names)

    def pairs(self) -> set[tuple[str, Address]]:
        """Every (name, address) the endpoint holds, by lookup or by connection."""
        held = {(name, ip) for name, ips in self.cache.names.items() for ip in ips}
        held.update((name, z.ip) for z in self.zombies.values() for name in z.names)
        return held

    def collect(self, now: float, max_ips: int, grace: float, connected: Iterable[Address] | None
                ) -> None:
        """The garbage collection: expired lookups become zombies; a zombie lives while a
        connection uses its address (``connected``; None: the datapath cannot tell, so
        nothing counts as connected) or until ``grace`` seconds after its lookup expired."""
        connected = set(connected or ())
        for name, ip in self.cache.expire(now, max_ips):
            zombie = self.zombies.get(ip)
            if zombie is None:
                self.zombies[ip] = Zombie({name}, ip, 0.0, now + grace)
            else:
                zombie.names.add(name)
        for ip, zombie in list(self.zombies.items()):
            if ip in connected:
                zombie.alive_at = now
                zombie.delete_pending_at = max(zombie.delete_pending_at, now + ZOMBIE_ALIVE_TTL)
            elif zombie.delete_pending_at <= now:
                del self.zombies[ip]

    def to_json(self) -> dict:
        return {"DNSHistory": [e.to_json() for e in self.cache.entries()],
                "DNSZombies": [z.to_json() for z in self.zombies.values()]}

    @classmethod
    def from_json(cls, doc: dict, now: float) -> "EndpointNames":
        """Restored as saved, less what expired by ``now`` (Cilium restores no expired
        data)."""
        names = cls()
        for raw in doc.get("DNSHistory") or ():
            entry = CacheEntry.from_json(raw)
            if entry.expiration_time > now:
                names.cache.update(entry)
        for raw in doc.get("DNSZombies") or ():
            zombie = Zombie.from_json(raw)
            if zombie.delete_pending_at > now:
                names.zombies[zombie.ip] = zombie
        return names
