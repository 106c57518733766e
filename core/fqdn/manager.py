"""The agent's DNS-aware egress, registered as plugin ``core.fqdn``: the proxy, the names it
saw and the identities they give (docs/dns.md).

The agent builds it when the policy resolver implements
:class:`~meshagent.fqdn.contract.ResolvesDNS` and a datapath is loaded, and hands it what it
uses: the resolver's DNS side, the tables (identities and ipcache go in), a way to wait for the
datapath (:meth:`meshagent.datapath.feed.DatapathFeed.applied`), one to tell the datapath the
proxy's port, and where to report. It reads and writes nothing of the kvstore: a remote
cluster's FQDN state is never imported, and this node's never leaves it.
"""

import asyncio
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import attrs
import dns.message
import dns.rcode
import dns.rdatatype

from meshagent import hookimpl
from meshagent.events import ChangeKind
from meshagent.fqdn.cache import CacheEntry, EndpointNames, rfc3339_millis
from meshagent.fqdn.contract import FQDNSelector, ResolvesDNS
from meshagent.fqdn.names import NameManager
from meshagent.fqdn.proxy import REJECT_CODES, DNSProxy, NotReady, ProxyOptions, Request
from meshagent.fqdn.record import DNSRecord
from meshagent.fqdn import matchpattern
from meshagent.model.endpoint import Endpoint
from meshagent.model.identity import world_identity
from meshagent.model.ipcache import IPCacheEntry
from meshagent.model.net import Address
from meshagent.model.table import Tables
from meshagent.runtime.controller import Controller, ControllerHandle
from meshagent.runtime.status import Health, StatusSection

log = logging.getLogger(__name__)

HISTORY_FILE = "dns-history.json"  # the endpoints' names (Cilium keeps them per endpoint)
PORT_FILE = "dns-proxy-port"  # the port, re-used after a restart if free
SERVERS_KEPT = 4096  # server identities remembered between ipcache changes


@attrs.frozen
class FQDNOptions:
    proxy: ProxyOptions
    min_ttl: int = 0
    max_ips_per_hostname: int = 1000
    idle_grace: float = 0.0
    response_max_delay: float = 0.1
    gc_interval: float = 60.0

    @classmethod
    def from_config(cls, config) -> "FQDNOptions":
        return cls(ProxyOptions(
            port=config.get("tofqdns-proxy-port"),
            reject_rcode=REJECT_CODES[config.get("tofqdns-dns-reject-response-code")],
            concurrency_limit=config.get("dnsproxy-concurrency-limit")),
            min_ttl=config.get("tofqdns-min-ttl"),
            max_ips_per_hostname=config.get("tofqdns-endpoint-max-ip-per-hostname"),
            idle_grace=config.get("tofqdns-idle-connection-grace-period"),
            response_max_delay=config.get("tofqdns-proxy-response-max-delay"),
            gc_interval=config.get("tofqdns-gc-interval"))


@attrs.frozen
class Answer:
    """What a response says for the name cache (Cilium's ExtractMsgDetails)."""

    ips: tuple[Address, ...]
    ttl: int  # the lowest of the A, AAAA and CNAME records of the chain
    cnames: tuple[str, ...]
    rrtypes: tuple[str, ...]


def read_answer(qname: str, response: dns.message.Message) -> Answer:
    """The addresses of ``qname``'s chain (its CNAMEs followed) and the chain's lowest TTL."""
    chain, cnames, ips, ttls, types = {qname}, [], [], [], []
    for rrset in response.answer:
        owner = rrset.name.to_text().lower()
        types.append(dns.rdatatype.to_text(rrset.rdtype))
        if owner not in chain:
            continue
        if rrset.rdtype == dns.rdatatype.CNAME:
            for rdata in rrset:
                target = rdata.target.to_text().lower()
                chain.add(target)
                cnames.append(target)
            ttls.append(rrset.ttl)
        elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            ips.extend(ipaddress.ip_address(rdata.address) for rdata in rrset)
            ttls.append(rrset.ttl)
    return Answer(tuple(dict.fromkeys(ips)), min(ttls) if ttls else 0, tuple(cnames),
                  tuple(types))


class FQDN:
    """The proxy's gate (:class:`meshagent.fqdn.proxy.Gate`), the name manager, their
    persistence, controllers, status and API routes."""

    def __init__(self, cluster: str, tables: Tables, resolver: ResolvesDNS,
                 options: FQDNOptions, state_dir: Path, *,
                 datapath_applied: Callable[[], Awaitable[None]],
                 set_proxy_port: Callable[[int], None],
                 publish: Callable[[DNSRecord], None],
                 connections: Callable[[], Awaitable[Mapping[int, frozenset[Address]]]]
                 | None = None,
                 ready: Callable[[], bool] = lambda: True,
                 endpoints_restored: asyncio.Event | None = None,
                 clock: Callable[[], float] = time.time):
        self.tables = tables
        self.resolver = resolver
        self.options = options
        self.state_dir = state_dir
        self.datapath_applied = datapath_applied
        self.set_proxy_port = set_proxy_port
        self.publish = publish
        # the datapath's live connections (ReportsConnections.connected_peers), None: unknown
        self.connections = connections
        self.ready = ready  # the agent listed its policies: the rules are known
        # the endpoints of the run before are back: until then a collection would take their
        # restored names for those of pods that are gone
        self.endpoints_restored = endpoints_restored
        self.clock = clock
        self.names = NameManager(cluster, tables, options.max_ips_per_hostname,
                                 options.idle_grace)
        self.proxy = DNSProxy(self, options.proxy)
        self.endpoints: dict[int, Endpoint] = {}
        self.by_ip: dict[Address, int] = {}
        self._server_identities: dict[Address, int] = {}
        self._revision = -1  # the resolver revision the selectors are from
        self._dirty = asyncio.Event()  # the names changed: save them
        self.timeouts = 0  # answers released before the datapath applied them
        self.restore()

    # -- restart --------------------------------------------------------------------------------

    def restore(self) -> None:
        """The names saved before a restart, less what expired (before the datapath's first
        full state, so what was allowed stays allowed)."""
        path = self.state_dir / HISTORY_FILE
        try:
            doc = json.loads(path.read_text())
            now = self.clock()
            endpoints = {int(eid): EndpointNames.from_json(saved, now)
                         for eid, saved in doc["endpoints"].items()}
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("DNS names in %s not restored: %s", path, exc)
            return
        self.names.restore(endpoints)
        self.refresh_selectors()
        log.info("restored the DNS names of %d endpoint(s)", len(endpoints))

    def save(self) -> None:
        doc = {"endpoints": {str(eid): names.to_json()
                             for eid, names in sorted(self.names.endpoints.items())}}
        path = self.state_dir / HISTORY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)

    def _changed(self) -> None:
        self._dirty.set()

    # -- the gate -------------------------------------------------------------------------------

    def endpoint(self, ip: Address) -> int | None:
        return self.by_ip.get(ip)

    def allowed(self, endpoint: int, request: Request) -> bool:
        rules = self.resolver.dns_rules(endpoint)
        if not rules and not self.ready():
            raise NotReady  # after a start, before the policies are listed: ask again later
        server_ip, port = request.server
        identity = self.identity_of(server_ip)
        name = request.qname
        return any(rule.port == port and rule.protocol in (request.protocol, "ANY")
                   and rule.allows(identity, name) for rule in rules)

    async def answered(self, endpoint: int, request: Request,
                       response: dns.message.Message) -> None:
        if response.rcode() != dns.rcode.NOERROR:
            return
        answer = read_answer(request.qname, response)
        if not answer.ips:
            return
        self.refresh_selectors()
        entry = CacheEntry(request.qname, request.received,
                           max(answer.ttl, self.options.min_ttl), answer.ips)
        self.names.observe(endpoint, entry)
        self._changed()
        if not any(ip in self.names.labels for ip in answer.ips):
            return  # no selector wants these addresses: nothing for the datapath
        try:
            async with asyncio.timeout(self.options.response_max_delay):
                await self.datapath_applied()
        except TimeoutError:
            self.timeouts += 1
            log.warning("Timed out waiting for datapath updates of FQDN IP information;"
                        " returning response. Consider increasing"
                        " --tofqdns-proxy-response-max-delay if this keeps happening.")
        except Exception as exc:  # the datapath failed the batch: the pod gets its answer
            log.error("datapath update for %s failed: %s", request.qname, exc)

    def record(self, endpoint: int | None, request: Request,
               response: dns.message.Message | None, verdict: str, info: str) -> None:
        ep = self.endpoints.get(endpoint) if endpoint is not None else None
        qtypes = tuple(dns.rdatatype.to_text(q.rdtype) for q in request.message.question)
        fields = {}
        if response is not None:
            answer = read_answer(request.qname, response)
            fields = {"rcode": response.rcode(), "ips": tuple(str(ip) for ip in answer.ips),
                      "ttl": answer.ttl, "cnames": answer.cnames, "rrtypes": answer.rrtypes}
        elif verdict == "Denied":
            fields = {"rcode": self.options.proxy.reject_rcode}
        self.publish(DNSRecord(
            "Response" if response is not None else "Request", verdict, info,
            request.protocol, ep.id if ep else 0, ep.identity if ep else 0,
            tuple(sorted(ep.labels)) if ep else (), str(request.client[0]),
            request.client[1], self.identity_of(request.server[0])
            if request.server[0] is not None else 0,
            str(request.server[0]), request.server[1], request.qname, qtypes, **fields))

    def names_of(self, endpoint_id: int, ip: str) -> tuple[str, ...]:
        """The names the endpoint looked up and got ``ip`` for, without the final dot:
        a flow's ``destination_names`` (Hubble's DNSGetter.GetNamesOf)."""
        names = self.names.endpoints.get(endpoint_id)
        if names is None or not names.cache.by_ip:
            return ()
        found = names.cache.by_ip.get(ipaddress.ip_address(ip))
        return tuple(sorted(n.removesuffix(".") for n in found)) if found else ()

    def identity_of(self, ip: Address) -> int:
        """The server's identity by the ipcache's longest prefix; the world when none.
        Remembered until the ipcache changes (a few servers answer every question)."""
        known = self._server_identities.get(ip)
        if known is None:
            if len(self._server_identities) >= SERVERS_KEPT:  # a pod asking everywhere
                self._server_identities.clear()
            known = self._server_identities[ip] = self._longest_prefix(ip)
        return known

    @hookimpl
    def meshagent_ipcache_changes(self, changes):
        self._server_identities.clear()

    def _longest_prefix(self, ip: Address) -> int:
        bits = ip.max_prefixlen
        packed = int(ip)
        for length in range(bits, -1, -1):
            network = (packed >> (bits - length)) << (bits - length)
            key = bytes((length,)) + network.to_bytes(bits // 8, "big")
            entry: IPCacheEntry | None = self.tables.ipcache.get(key)
            if entry is not None:
                return entry.identity
        return int(world_identity(ip.version))

    # -- selectors, endpoints, GC ---------------------------------------------------------------

    def refresh_selectors(self) -> None:
        """The resolver's toFQDNs selectors, when its revision moved."""
        revision = self.resolver.revision
        if revision != self._revision:
            self._revision = revision
            self.names.set_selectors(frozenset(self.resolver.fqdn_selectors()))

    async def collect(self) -> None:
        """One garbage collection (Cilium's dns-garbage-collector-job): an address whose
        lookups expired stays while the datapath reports a connection of the endpoint to it."""
        peers = await self.connections() if self.connections is not None else None
        self.refresh_selectors()
        for endpoint_id in [e for e in self.names.endpoints if e not in self.endpoints]:
            self.names.forget_endpoint(endpoint_id)  # its pod is gone
        self.names.collect(self.clock(), lambda endpoint: None if peers is None
                           else peers.get(endpoint, frozenset()))
        self._changed()

    @hookimpl
    def meshagent_endpoint_changed(self, kind, endpoint):
        old = self.endpoints.pop(endpoint.id, None)
        for ip in old.addresses if old else ():
            self.by_ip.pop(ip, None)
        if kind is ChangeKind.UPSERT:
            self.endpoints[endpoint.id] = endpoint
            for ip in endpoint.addresses:
                self.by_ip[ip] = endpoint.id
        elif self.names.forget_endpoint(endpoint.id) or old is not None:
            self._changed()

    @hookimpl
    def meshagent_policy_changed(self, kind, policy):
        self.refresh_selectors()

    @hookimpl
    def meshagent_controllers(self):
        return [Controller("dns-proxy", self._serve),
                Controller("dns-garbage-collector", self._gc),
                Controller("dns-history-writer", self._writer)]

    async def _serve(self, handle: ControllerHandle) -> None:
        port_file = self.state_dir / PORT_FILE
        wanted = self.options.proxy.port
        if not wanted:
            try:
                wanted = int(port_file.read_text())
            except (OSError, ValueError):
                wanted = 0
        proxy = self.proxy
        try:
            proxy.options = attrs.evolve(self.options.proxy, port=wanted)
            await proxy.start()
        except OSError:
            if self.options.proxy.port or not wanted:
                raise
            proxy.options = self.options.proxy  # the old port is taken: any
            await proxy.start()
        try:
            port_file.parent.mkdir(parents=True, exist_ok=True)
            port_file.write_text(str(proxy.port))
            self.set_proxy_port(proxy.port)
            log.info("DNS proxy listening on port %d (UDP, TCP)", proxy.port)
            handle.ready()
            await asyncio.Event().wait()
        finally:
            await proxy.stop()

    async def _gc(self, handle: ControllerHandle) -> None:
        handle.ready()
        if self.endpoints_restored is not None:
            await self.endpoints_restored.wait()
        while True:
            await asyncio.sleep(self.options.gc_interval)
            await self.collect()

    async def _writer(self, handle: ControllerHandle) -> None:
        handle.ready()
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                await asyncio.to_thread(self.save)
                await asyncio.sleep(0.2)  # a burst of answers is one write
        finally:
            if self._dirty.is_set():
                self.save()

    # -- what users see -------------------------------------------------------------------------

    def lookups(self, endpoint: int | None = None, pattern: str = "", source: str = ""
                ) -> list[dict]:
        """The cache as ``cilium fqdn cache list`` shows it (models.DNSLookup rows)."""
        match = _matcher(pattern)
        rows = []
        for eid, names in sorted(self.names.endpoints.items()):
            if endpoint is not None and eid != endpoint:
                continue
            if source in ("", "lookup"):
                for entry in names.cache.entries():
                    if match(entry.name):
                        ips = sorted((ip for ip, e in names.cache.names[entry.name].items()
                                      if e is entry), key=lambda a: (a.version, a))
                        rows.append({"endpoint-id": eid, "source": "lookup",
                                     "fqdn": entry.name, "ttl": entry.ttl,
                                     "lookup-time": rfc3339_millis(entry.lookup_time),
                                     "expiration-time": rfc3339_millis(
                                         entry.expiration_time),
                                     "ips": [str(ip) for ip in ips]})
            if source in ("", "connection"):
                for zombie in names.zombies.values():
                    for name in sorted(zombie.names):
                        if match(name):
                            rows.append({"endpoint-id": eid, "source": "connection",
                                         "fqdn": name, "ttl": 0,
                                         "lookup-time": "0001-01-01T00:00:00.000Z",
                                         "expiration-time": "0001-01-01T00:00:00.000Z",
                                         "ips": [str(zombie.ip)]})
        return rows

    def clean(self, endpoint: int | None = None, pattern: str = "") -> None:
        """``fqdn cache clean``: the addresses go at once, allowed no more."""
        self.names.clean(endpoint, _matcher(pattern))
        self._changed()

    @hookimpl
    def meshagent_status(self, verbose: bool):
        proxy = self.proxy
        if not proxy.port:
            return StatusSection("DNS proxy", Health.WARNING, "not listening yet")
        names = {name for n in self.names.endpoints.values() for name, _ in n.pairs()}
        stats = proxy.stats
        families = "/".join("IPv6" if f == socket.AF_INET6 else "IPv4" for f in proxy.families)
        return StatusSection(
            "DNS proxy", Health.OK,
            f"port {proxy.port} (UDP, TCP; {families}), {len(names)} names cached,"
            f" {len(self.names.labels)} addresses selected",
            details=[f"{key}: {value}" for key, value in stats.items()]
            + [f"answers released before the datapath applied them: {self.timeouts}"])


def _matcher(pattern: str) -> Callable[[str], bool]:
    """Names a ``--matchpattern`` selects (every name without one); ValueError with
    Cilium's text for a bad pattern."""
    if not pattern:
        return lambda name: True
    matchpattern.validate(pattern)
    selector = FQDNSelector(match_pattern=pattern)
    return selector.matches
