"""The name cache on a fake clock: TTLs and --tofqdns-min-ttl, the garbage collection (expiry,
live connections, the idle grace period, the per-name limit), endpoints going away, and the
identities addresses get (shared per selector set, one per family, clear of CIDR identities).
Answers come through the manager as the proxy hands them over (dnspython messages)."""

import ipaddress

import dns.message
import dns.rcode
import dns.rrset

from meshagent.events import ChangeKind
from meshagent.fqdn.contract import FQDNSelector
from meshagent.fqdn.manager import FQDN, FQDNOptions
from meshagent.fqdn.proxy import ProxyOptions, Request
from meshagent.identity.cidr import LOCAL_IDENTITY_FLAG, CIDRIdentities
from meshagent.model.endpoint import Endpoint
from meshagent.model.ipcache import IPCache, host_key
from meshagent.model.table import Table, Tables

EP = 3
POD = ipaddress.ip_address("10.1.0.3")
SERVER = (ipaddress.ip_address("192.0.2.53"), 53)
PATTERN = FQDNSelector(match_pattern="*.example.com")
NAME = FQDNSelector(match_name="a.example.com")


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


class Resolver:
    def __init__(self, selectors=()):
        self.revision = 1
        self.selectors = frozenset(selectors)

    def dns_rules(self, endpoint_id):
        return ()

    def fqdn_selectors(self):
        return self.selectors


def make(tmp_path, connections=None, selectors=(PATTERN,), **options):
    clock = Clock()
    tables = Tables(nodes=Table("node", lambda *a: None),
                    identities=Table("identity", lambda *a: None),
                    ipcache=IPCache("c1", notify_many=lambda batch: None),
                    services=Table("service", lambda *a: None))

    async def applied():
        pass
    fqdn = FQDN("c1", tables, Resolver(selectors), FQDNOptions(ProxyOptions(), **options),
                tmp_path, datapath_applied=applied, set_proxy_port=lambda port: None,
                publish=lambda record: None, connections=connections, clock=clock)
    fqdn.meshagent_endpoint_changed(ChangeKind.UPSERT, Endpoint(
        EP, "default", frozenset(), POD, 1000))
    return fqdn, clock


async def answer(fqdn, clock, name, kind, ips, ttl):
    query = dns.message.make_query(name, kind)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text_list(name, ttl, "IN", kind, ips))
    request = Request((POD, 40000), SERVER, "UDP", query, clock())
    await fqdn.answered(EP, request, response)


def identity_of(fqdn, ip):
    entry = fqdn.tables.ipcache.get(host_key(ipaddress.ip_address(ip)))
    return None if entry is None else fqdn.tables.identities.get(entry.identity)


async def test_an_address_goes_at_the_first_collection_after_its_ttl(tmp_path):
    fqdn, clock = make(tmp_path)
    await answer(fqdn, clock, "a.example.com.", "A", ["203.0.113.1"], 30)
    assert identity_of(fqdn, "203.0.113.1") is not None
    clock.now += 29
    await fqdn.collect()
    assert identity_of(fqdn, "203.0.113.1") is not None
    clock.now += 2
    await fqdn.collect()
    assert identity_of(fqdn, "203.0.113.1") is None
    assert fqdn.lookups() == []
    assert not [i for i in fqdn.tables.identities.values() if i.id & LOCAL_IDENTITY_FLAG]


async def test_min_ttl_stretches_short_answers(tmp_path):
    fqdn, clock = make(tmp_path, min_ttl=300)
    await answer(fqdn, clock, "a.example.com.", "A", ["203.0.113.1"], 5)
    assert fqdn.lookups()[0]["ttl"] == 300
    clock.now += 200
    await fqdn.collect()
    assert identity_of(fqdn, "203.0.113.1") is not None


async def test_a_live_connection_keeps_its_address_as_a_connection_entry(tmp_path):
    live = {EP: frozenset({ipaddress.ip_address("203.0.113.1")})}

    async def connected_peers():  # as a datapath's ReportsConnections answers
        return dict(live)
    fqdn, clock = make(tmp_path, connections=connected_peers)
    await answer(fqdn, clock, "a.example.com.", "A", ["203.0.113.1", "203.0.113.2"], 30)
    clock.now += 60
    await fqdn.collect()
    assert identity_of(fqdn, "203.0.113.1") is not None  # connected
    assert identity_of(fqdn, "203.0.113.2") is None  # idle
    [row] = fqdn.lookups()
    assert (row["source"], row["ips"], row["ttl"]) == ("connection", ["203.0.113.1"], 0)
    assert row["expiration-time"] == "0001-01-01T00:00:00.000Z"
    assert fqdn.lookups(source="lookup") == []
    live.clear()  # the connection ended
    clock.now += 200
    await fqdn.collect()
    assert identity_of(fqdn, "203.0.113.1") is None


async def test_idle_grace_period_keeps_an_address_a_while(tmp_path):
    async def none():
        return {}
    fqdn, clock = make(tmp_path, connections=none, idle_grace=30)
    await answer(fqdn, clock, "a.example.com.", "A", ["203.0.113.1"], 10)
    clock.now += 11
    await fqdn.collect()
    assert identity_of(fqdn, "203.0.113.1") is not None
    clock.now += 30
    await fqdn.collect()
    assert identity_of(fqdn, "203.0.113.1") is None


async def test_the_earliest_expiring_addresses_go_over_the_per_name_limit(tmp_path):
    fqdn, clock = make(tmp_path, max_ips_per_hostname=2)
    await answer(fqdn, clock, "a.example.com.", "A", ["203.0.113.1", "203.0.113.2"], 30)
    clock.now += 5
    await answer(fqdn, clock, "a.example.com.", "A", ["203.0.113.3"], 30)
    await fqdn.collect()
    kept = {ip for row in fqdn.lookups() for ip in row["ips"]}
    assert len(kept) == 2 and "203.0.113.3" in kept


async def test_a_gone_endpoint_takes_its_names_along(tmp_path):
    fqdn, clock = make(tmp_path)
    await answer(fqdn, clock, "a.example.com.", "A", ["203.0.113.1"], 30)
    fqdn.meshagent_endpoint_changed(ChangeKind.DELETE, fqdn.endpoints[EP])
    assert identity_of(fqdn, "203.0.113.1") is None and fqdn.lookups() == []


async def test_identities_are_per_selector_set_and_family(tmp_path):
    fqdn, clock = make(tmp_path, selectors=(PATTERN, NAME))
    await answer(fqdn, clock, "a.example.com.", "A", ["203.0.113.1"], 30)
    await answer(fqdn, clock, "b.example.com.", "A", ["203.0.113.2", "203.0.113.3"], 30)
    await answer(fqdn, clock, "c.example.com.", "AAAA", ["2001:db8::1"], 30)
    a, b, b2, c = (identity_of(fqdn, ip) for ip in ("203.0.113.1", "203.0.113.2",
                                                  "203.0.113.3", "2001:db8::1"))
    assert a.labels == {"fqdn:*.example.com", "fqdn:a.example.com", "reserved:world"}
    assert b == b2 and b.labels == {"fqdn:*.example.com", "reserved:world"}
    assert c.labels == {"fqdn:*.example.com", "reserved:world-ipv6"}
    assert len({a.id, b.id, c.id}) == 3


async def test_fqdn_and_cidr_identities_never_share_a_number(tmp_path):
    fqdn, clock = make(tmp_path)
    cidrs = CIDRIdentities("c1")
    cidrs.apply_to(fqdn.tables, {ipaddress.ip_network("198.51.100.0/24")})
    await answer(fqdn, clock, "a.example.com.", "A", ["203.0.113.1"], 30)
    cidrs.apply_to(fqdn.tables, {ipaddress.ip_network("198.51.100.0/24"),
                                 ipaddress.ip_network("198.51.101.0/24")})
    numbers = [i.id for i in fqdn.tables.identities.values()]
    assert len(numbers) == len(set(numbers)) == 3


async def test_nothing_for_errors_or_empty_answers(tmp_path):
    fqdn, clock = make(tmp_path)
    query = dns.message.make_query("a.example.com.", "A")
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.NXDOMAIN)
    await fqdn.answered(EP, Request((POD, 1), SERVER, "UDP", query, clock()), response)
    assert fqdn.lookups() == []


async def test_remembered_name_labels_are_bounded_and_stay_right(tmp_path, monkeypatch):
    from meshagent.fqdn import names
    monkeypatch.setattr(names, "NAME_LABELS_KEPT", 2)
    fqdn, clock = make(tmp_path)
    for i in range(5):
        await answer(fqdn, clock, f"n{i}.example.com.", "A", [f"203.0.113.{i}"], 30)
    assert len(fqdn.names._name_labels) <= 2
    assert all(identity_of(fqdn, f"203.0.113.{i}") is not None for i in range(5))
    clock.now += 31
    await fqdn.collect()
    assert not [i for i in fqdn.tables.identities.values() if i.id & LOCAL_IDENTITY_FLAG]


async def test_an_answer_waits_for_the_datapath_at_most_the_max_delay(tmp_path):
    import asyncio
    import time as wall
    fqdn, clock = make(tmp_path, response_max_delay=0.2)
    stuck = asyncio.Event()

    async def never():  # a datapath that does not get to it
        await stuck.wait()
    fqdn.datapath_applied = never
    started = wall.monotonic()
    await answer(fqdn, clock, "a.example.com.", "A", ["203.0.113.1"], 30)
    waited = wall.monotonic() - started
    assert 0.2 <= waited < 1.0 and fqdn.timeouts == 1
    # an answer no selector wants does not wait at all
    started = wall.monotonic()
    await answer(fqdn, clock, "elsewhere.org.", "A", ["198.51.100.1"], 30)
    assert wall.monotonic() - started < 0.1 and fqdn.timeouts == 1
