"""The DNS proxy on a real network: a pod's dig, TPROXYed by nftables to the proxy, a real
DNS server behind it (meshagent_dev.dnsnet). The policy side is a stand-in resolver meeting
:class:`meshagent.fqdn.contract.ResolvesDNS` (and, in the last test, the default resolver);
the tables are the agent's."""

import asyncio
import ipaddress
import json
import os
import socket

import attrs
import pytest

from meshagent.events import ChangeKind
from meshagent.fqdn.contract import DNSRule, FQDNSelector, ResolvesDNS
from meshagent.fqdn.manager import FQDN, FQDNOptions
from meshagent.fqdn.proxy import REJECT_CODES, ProxyOptions
from meshagent.identity.cidr import LOCAL_IDENTITY_FLAG
from meshagent.model.endpoint import Endpoint
from meshagent.model.ipcache import FQDN_SOURCE, IPCache, host_key
from meshagent.model.table import Table, Tables
from meshagent_dev import dnsnet
from meshagent_dev.dnsnet import POD4, POD6, SERVER4, SERVER6, addresses, dig, status_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

ENDPOINT = 7
ALLOWED = FQDNSelector(match_name="allowed.example.com")
PATTERN = FQDNSelector(match_pattern="*.example.com")


class StandInResolver:
    """DNS rules and toFQDNs selectors as a test sets them (ResolvesDNS)."""

    def __init__(self):
        self.revision = 1
        self.rules: dict[int, tuple[DNSRule, ...]] = {}
        self.selectors: frozenset[FQDNSelector] = frozenset()

    def dns_rules(self, endpoint_id):
        return self.rules.get(endpoint_id, ())

    def fqdn_selectors(self):
        return self.selectors

    def set(self, rules=None, selectors=None):
        if rules is not None:
            self.rules = rules
        if selectors is not None:
            self.selectors = frozenset(selectors)
        self.revision += 1


def tables(identity_listeners=()) -> Tables:
    """The agent's tables; identity changes go to each of ``identity_listeners``."""
    def identity_changed(kind, identity):
        for listener in identity_listeners:
            listener(kind, identity)
    return Tables(nodes=Table("node", lambda *a: None),
                  identities=Table("identity", identity_changed),
                  ipcache=IPCache("c1", notify_many=lambda batch: None),
                  services=Table("service", lambda *a: None))


class World:
    def __init__(self, fqdn, resolver, tables, records, applied, pod, server_log, listeners):
        self.identity_listeners = listeners
        self.fqdn, self.resolver, self.tables = fqdn, resolver, tables
        self.records, self.applied, self.pod, self.server_log = (
            records, applied, pod, server_log)


@pytest.fixture
async def world(tmp_path):
    port = dnsnet.free_port()
    with dnsnet.dns_network(port) as (_host, pod, server):
        async with dnsnet.dns_server(server) as server_log:
            resolver = StandInResolver()
            assert isinstance(resolver, ResolvesDNS)
            listeners = []
            t = tables(listeners)
            records, applied, ports = [], [], []

            async def datapath_applied():
                # what the datapath would be handed: the ipcache as it is now
                applied.append({e.address: e.identity for e in t.ipcache.values()})

            fqdn = FQDN("c1", t, resolver, FQDNOptions(ProxyOptions(port=port,
                        forward_timeout=1.0), gc_interval=3600),
                        tmp_path, datapath_applied=datapath_applied,
                        set_proxy_port=ports.append, publish=records.append)
            fqdn.meshagent_endpoint_changed(ChangeKind.UPSERT, Endpoint(
                ENDPOINT, "default", frozenset({"k8s:app=client"}),
                ipaddress.IPv4Address(POD4), 1234, ipv6=ipaddress.IPv6Address(POD6)))
            await fqdn.proxy.start()
            try:
                yield World(fqdn, resolver, t, records, applied, pod, server_log, listeners)
            finally:
                await fqdn.proxy.stop()


def allow(resolver, *patterns, protocol="ANY", servers=None):
    resolver.set(rules={ENDPOINT: (DNSRule(53, protocol, servers, tuple(patterns)),)})


async def test_allowed_query_is_forwarded_to_the_server_the_pod_asked(world):
    allow(world.resolver, PATTERN)
    out = await dig(world.pod, SERVER4, "allowed.example.com")
    assert status_of(out) == "NOERROR"
    assert addresses(out) == ["203.0.113.10"]
    # the server saw the proxy (an address of the host), with a different message id
    proto, client, query_id, name = world.server_log[-1]
    assert (proto, name) == ("UDP", "allowed.example.com.")
    assert client != POD4
    # the server saw another message ID than the pod's (random), and the pod got its own
    pod_id = int(out.split(" id: ")[1].split()[0])
    assert query_id != pod_id


async def test_refused_query_gets_REFUSED_and_never_reaches_the_server(world):
    allow(world.resolver, ALLOWED)
    out = await dig(world.pod, SERVER4, "other.example.com")
    assert status_of(out) == "REFUSED"
    assert not [q for q in world.server_log if q[3] == "other.example.com."]
    denied = [r for r in world.records if r.verdict == "Denied"]
    assert denied and denied[0].query == "other.example.com." and denied[0].qtypes == ("A",)
    assert denied[0].endpoint == ENDPOINT and denied[0].rcode == 5


async def test_name_error_reject_code(world):
    world.fqdn.proxy.options = ProxyOptions(port=world.fqdn.proxy.port,
                                            reject_rcode=REJECT_CODES["nameError"])
    allow(world.resolver, ALLOWED)
    assert status_of(await dig(world.pod, SERVER4, "other.example.com")) == "NXDOMAIN"


async def test_tcp_and_ipv6_keep_their_protocol_and_family(world):
    allow(world.resolver, PATTERN)
    out = await dig(world.pod, SERVER6, "six.example.com", "AAAA", "+tcp")
    assert status_of(out) == "NOERROR" and addresses(out) == ["2001:db8::10"]
    assert world.server_log[-1][0] == "TCP"
    assert ipaddress.ip_address(world.server_log[-1][1]).version == 6
    out = await dig(world.pod, SERVER6, "six.example.com", "AAAA")  # UDP, from [server]:53
    assert status_of(out) == "NOERROR" and addresses(out) == ["2001:db8::10"]
    assert world.server_log[-1][0] == "UDP"


async def test_rules_are_per_protocol_port_and_server_identity(world):
    allow(world.resolver, PATTERN, protocol="TCP")
    assert status_of(await dig(world.pod, SERVER4, "allowed.example.com")) == "REFUSED"
    assert status_of(await dig(world.pod, SERVER4, "allowed.example.com", "+tcp")) == "NOERROR"
    allow(world.resolver, PATTERN, servers=frozenset({4242}))  # not the world's
    assert status_of(await dig(world.pod, SERVER4, "allowed.example.com")) == "REFUSED"
    allow(world.resolver, PATTERN, servers=frozenset({2}))  # the world (unknown server)
    assert status_of(await dig(world.pod, SERVER4, "allowed.example.com")) == "NOERROR"


async def test_answered_addresses_get_an_fqdn_identity_before_the_pod_sees_them(world):
    allow(world.resolver, PATTERN)
    world.resolver.set(selectors=[ALLOWED])
    out = await dig(world.pod, SERVER4, "allowed.example.com")
    assert addresses(out) == ["203.0.113.10"]
    address = ipaddress.ip_address("203.0.113.10")
    entry = world.tables.ipcache.get(host_key(address))
    assert entry is not None and entry.identity & LOCAL_IDENTITY_FLAG
    assert world.tables.ipcache.claims(host_key(address)).keys() == {FQDN_SOURCE}
    identity = world.tables.identities.get(entry.identity)
    assert identity.labels == {"fqdn:allowed.example.com", "reserved:world"}
    # the datapath was waited for with the entry already in the ipcache
    assert world.applied and world.applied[-1].get(address) == entry.identity
    # a name no selector matches gets nothing
    await dig(world.pod, SERVER4, "other.example.com")
    assert world.tables.ipcache.get(host_key(ipaddress.ip_address("203.0.113.20"))) is None


async def test_cname_chain_and_selectors_added_later_relabel(world):
    allow(world.resolver, PATTERN)
    await dig(world.pod, SERVER4, "alias.example.com")
    address = ipaddress.ip_address("203.0.113.10")
    assert world.tables.ipcache.get(host_key(address)) is None  # no selector yet
    cached = world.fqdn.lookups()
    assert cached[0]["fqdn"] == "alias.example.com." and cached[0]["ttl"] == 20  # lowest TTL
    world.resolver.set(selectors=[FQDNSelector(match_name="alias.example.com"), PATTERN])
    world.fqdn.refresh_selectors()
    identity = world.tables.identities.get(world.tables.ipcache.get(host_key(address)).identity)
    assert identity.labels == {"fqdn:alias.example.com", "fqdn:*.example.com", "reserved:world"}
    world.resolver.set(selectors=[])
    world.fqdn.refresh_selectors()
    assert world.tables.ipcache.get(host_key(address)) is None
    assert not [i for i in world.tables.identities.values() if i.id & LOCAL_IDENTITY_FLAG]


async def test_cluster_entries_win_over_fqdn_ones(world):
    from meshagent.model.ipcache import IPCacheEntry
    allow(world.resolver, PATTERN)
    world.resolver.set(selectors=[PATTERN])
    address = ipaddress.ip_address("203.0.113.10")
    world.tables.ipcache.upsert(host_key(address), IPCacheEntry(host_key(address), 5000, "c2"))
    await dig(world.pod, SERVER4, "allowed.example.com")
    assert world.tables.ipcache.get(host_key(address)).identity == 5000


async def test_unknown_source_and_upstream_errors_get_SERVFAIL_timeouts_nothing(world):
    allow(world.resolver, PATTERN)
    world.fqdn.meshagent_endpoint_changed(ChangeKind.DELETE, world.fqdn.endpoints[ENDPOINT])
    assert status_of(await dig(world.pod, SERVER4, "allowed.example.com")) == "SERVFAIL"
    _endpoint_back(world)
    assert status_of(await dig(world.pod, SERVER4, "slow.example.com")) == "timeout"
    assert world.fqdn.proxy.stats["timeouts"] == 1
    # a server that is not there (connection refused over TCP): SERVFAIL
    assert status_of(await dig(world.pod, "192.0.2.54", "allowed.example.com", "+tcp")) in (
        "SERVFAIL", "timeout")


def _endpoint_back(world):
    world.fqdn.meshagent_endpoint_changed(ChangeKind.UPSERT, Endpoint(
        ENDPOINT, "default", frozenset({"k8s:app=client"}), ipaddress.IPv4Address(POD4), 1234,
        ipv6=ipaddress.IPv6Address(POD6)))


async def test_garbage_never_stops_the_proxy(world):
    allow(world.resolver, PATTERN)
    script = (
        "import socket, os\n"
        f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for n in (0, 1, 2, 12, 13, 512, 4000):\n"
        f"    s.sendto(os.urandom(n), ('{SERVER4}', 53))\n"
        f"t = socket.create_connection(('{SERVER4}', 53), timeout=2)\n"
        "t.sendall(b'\\x00\\x05hello\\xff\\xff' + os.urandom(100)); t.close()\n")
    proc = await asyncio.create_subprocess_exec("ip", "netns", "exec", world.pod, "python3",
                                                "-c", script)
    assert await proc.wait() == 0
    await asyncio.sleep(0.2)
    assert status_of(await dig(world.pod, SERVER4, "allowed.example.com")) == "NOERROR"
    assert world.fqdn.proxy.stats["dropped"] >= 1


async def test_concurrency_limit_answers_SERVFAIL_over_it(world):
    allow(world.resolver, PATTERN)
    world.fqdn.proxy.options = ProxyOptions(port=world.fqdn.proxy.port, concurrency_limit=1,
                                            forward_timeout=1.0)
    slow = asyncio.create_task(dig(world.pod, SERVER4, "slow.example.com"))
    await asyncio.sleep(0.3)
    assert status_of(await dig(world.pod, SERVER4, "allowed.example.com")) == "SERVFAIL"
    await slow


async def test_the_cache_is_saved_and_restored_without_what_expired(world, tmp_path):
    allow(world.resolver, PATTERN)
    world.resolver.set(selectors=[PATTERN])
    await dig(world.pod, SERVER4, "allowed.example.com")
    await dig(world.pod, SERVER4, "many.example.com")
    world.fqdn.save()
    saved = json.loads((tmp_path / "dns-history.json").read_text())
    history = saved["endpoints"][str(ENDPOINT)]["DNSHistory"]
    # Cilium's cacheEntry
    assert set(history[0]) == {"fqdn", "lookup-time", "expiration-time", "ttl", "ips"}
    # another agent on the same state dir, later: restored (selectors from the resolver)
    later = FQDN("c1", tables(), world.resolver, FQDNOptions(ProxyOptions()), tmp_path,
                 datapath_applied=world.fqdn.datapath_applied, set_proxy_port=lambda p: None,
                 publish=lambda r: None)
    assert {r["fqdn"] for r in later.lookups()} == {"allowed.example.com.", "many.example.com."}
    address = ipaddress.ip_address("203.0.113.101")
    assert later.tables.ipcache.get(host_key(address)) is not None
    expired = FQDN("c1", tables(), world.resolver, FQDNOptions(ProxyOptions()), tmp_path,
                   datapath_applied=world.fqdn.datapath_applied, set_proxy_port=lambda p: None,
                   publish=lambda r: None, clock=lambda: world.fqdn.clock() + 31)
    assert expired.lookups() == []
    assert len(expired.tables.ipcache) == 0


async def test_both_families_listen_on_one_port(world):
    families = set(world.fqdn.proxy.families)
    assert socket.AF_INET in families
    assert world.fqdn.proxy.port


REAL_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-aware, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.example.com"}]
  - toFQDNs: [{matchName: allowed.example.com}]
"""


async def test_the_default_resolver_drives_the_proxy_and_allows_the_answered_address(world):
    """The real resolver: its DNS rules decide, its toFQDNs selector labels the answer, and
    its map state allows the answered address's identity (and no other)."""
    from meshagent.policy.api import parse_policies
    from meshagent.policy.contract import PolicyUpdate, Verdict
    from meshagent.policy.default import DefaultResolver
    resolver = DefaultResolver("c1", world.tables, lambda **kw: None,
                               default_local_cluster=True)
    world.identity_listeners.append(resolver.meshagent_identity_changed)
    endpoint = world.fqdn.endpoints[ENDPOINT]
    resolver.meshagent_endpoint_changed(ChangeKind.UPSERT, attrs.evolve(
        endpoint, labels=frozenset({"k8s:app=client", "k8s:io.kubernetes.pod.namespace=default",
                                    "k8s:io.cilium.k8s.policy.cluster=c1"})))
    [policy] = parse_policies(REAL_POLICY)
    await resolver.apply(PolicyUpdate(ChangeKind.UPSERT, policy), 1)
    world.fqdn.resolver = resolver
    world.fqdn.meshagent_policy_changed(ChangeKind.UPSERT, None)

    assert status_of(await dig(world.pod, SERVER4, "elsewhere.org")) == "REFUSED"
    out = await dig(world.pod, SERVER4, "allowed.example.com")
    assert addresses(out) == ["203.0.113.10"]
    await dig(world.pod, SERVER4, "other.example.com")
    allowed = world.tables.ipcache.get(host_key(ipaddress.ip_address("203.0.113.10")))
    assert allowed is not None
    assert world.tables.ipcache.get(host_key(ipaddress.ip_address("203.0.113.20"))) is None
    egress = {key.identity: verdict for key, verdict in resolver.snapshot()[ENDPOINT].items()
              if key.direction == "egress"}
    assert egress.get(allowed.identity) is Verdict.ALLOW
    assert Verdict.ALLOW not in {v for i, v in egress.items() if i not in (allowed.identity,)}


async def test_no_answer_before_the_rules_are_known_after_a_start(world):
    """An agent still listing its policies: no DNS rules yet means no answer (the client
    asks again), not REFUSED; once ready, no rules means REFUSED."""
    ready = []
    world.fqdn.ready = lambda: bool(ready)
    assert status_of(await dig(world.pod, SERVER4, "allowed.example.com")) == "timeout"
    assert world.fqdn.proxy.stats["not_ready"] == 1
    ready.append(True)
    assert status_of(await dig(world.pod, SERVER4, "allowed.example.com")) == "REFUSED"
