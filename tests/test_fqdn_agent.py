"""The DNS proxy in a running agent: built when the resolver offers DNS rules and a datapath
is loaded, its port handed to the feed, its names listed and cleaned by ``meshagent fqdn
cache``, kept across a restart and in force before the datapath's first full state."""

import asyncio
import ipaddress
import json
import subprocess
import time

from meshagent import hookimpl
from meshagent.events import ChangeKind
from meshagent.fqdn.cache import CacheEntry
from meshagent.fqdn.contract import FQDNSelector
from meshagent.model.endpoint import Endpoint
from meshagent.model.ipcache import IPCacheEntry, host_key
from meshagent.policy.default import DefaultResolver
from tests.conftest import MESHAGENT, clean_env, run_cli

SELECTOR = FQDNSelector(match_name="allowed.example.com")
ADDRESS = ipaddress.ip_address("203.0.113.10")


class DNSResolver(DefaultResolver):
    """The default resolver plus a stand-in DNS side (ResolvesDNS): every endpoint may ask
    anything; one toFQDNs selector."""

    def dns_rules(self, endpoint_id):
        return ()

    def fqdn_selectors(self):
        return frozenset({SELECTOR})


class Providers:
    """Plugin ``dnstest``: that resolver, and a datapath that keeps what it is handed."""

    def __init__(self):
        self.reconciled_ipcache = None
        self.proxy_ports = []

    @hookimpl
    def meshagent_register_policy_resolver(self, registry):
        def build(agent):
            resolver = DNSResolver(agent.cluster.name, agent.tables, agent.hooks.policy_changed,
                                   default_local_cluster=True)
            agent.plugins.register(resolver, name="policy.dnstest")
            return resolver
        registry.register("dnstest", build)

    @hookimpl
    def meshagent_register_datapath(self, registry):
        registry.register("dnstest", lambda agent: self)

    async def start(self):
        pass

    async def stop(self):
        pass

    async def reconcile(self, policies, ipcache):
        self.reconciled_ipcache = {e.address: e.identity for e in ipcache}

    async def apply(self, batch):
        if batch.proxy_port is not None:
            self.proxy_ports.append(batch.proxy_port)


def args(state):
    return ["--plugins", "memory", "--policy-resolver", "dnstest", "--datapath", "dnstest",
            "--state-dir", str(state), "--datapath-sync-timeout", "0"]


async def test_cache_list_clean_status_and_restart(agent_factory, short_tmp):
    providers = Providers()
    running = await agent_factory(args(short_tmp / "state"),
                                  extra_plugins=[("dnstest", providers)])
    agent = running.agent
    assert agent.fqdn is not None and agent.fqdn.proxy.port
    endpoint = Endpoint(12, "default", frozenset({"k8s:app=client"}),
                        ipaddress.IPv4Address("10.1.0.12"), 4321)
    agent.hooks.endpoint_changed(kind=ChangeKind.UPSERT, endpoint=endpoint)
    fqdn = agent.fqdn
    fqdn.refresh_selectors()
    fqdn.names.observe(12, CacheEntry("allowed.example.com.", time.time(), 300, (ADDRESS,)))
    fqdn.names.observe(12, CacheEntry("other.example.com.", time.time(), 300,
                                      (ipaddress.ip_address("203.0.113.20"),)))
    fqdn._changed()
    entry = agent.tables.ipcache.get(host_key(ADDRESS))
    assert entry is not None
    # the node's own: never published (no other node or cluster imports it)
    await asyncio.sleep(0.2)
    published = await agent.kvstore.list_prefix("cilium/state/")
    assert not [kv for kv in published.items if "203.0.113.10" in kv.key
                or b"203.0.113.10" in kv.value]
    assert not [kv for kv in published.items if str(entry.identity) in kv.key]
    env = clean_env(MESHAGENT_SOCKET_PATH=str(running.socket_path))

    # a server's identity follows the ipcache (the proxy remembers it between changes)
    server = ipaddress.ip_address("192.0.2.53")
    assert fqdn.identity_of(server) == 2
    agent.tables.ipcache.upsert(host_key(server), IPCacheEntry(host_key(server), 777,
                                                               agent.cluster.name))
    assert fqdn.identity_of(server) == 777

    listed = await asyncio.to_thread(run_cli, "fqdn", "cache", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["Endpoint", "Source", "FQDN", "TTL", "ExpirationTime", "IPs"]
    assert lines[1].split()[:4] == ["12", "lookup", "allowed.example.com.", "300"]
    assert lines[1].split()[5] == "203.0.113.10"
    as_json = await asyncio.to_thread(run_cli, "fqdn", "cache", "list", "-p", "other.example.*",
                                      "-o", "json", env=env)
    [row] = json.loads(as_json.stdout)
    assert set(row) == {"endpoint-id", "source", "fqdn", "ttl", "lookup-time",
                        "expiration-time", "ips"}
    assert row["fqdn"] == "other.example.com." and row["source"] == "lookup"
    bad = await asyncio.to_thread(run_cli, "fqdn", "cache", "list", "-p", "a b", env=env)
    assert bad.returncode != 0 and "Invalid characters in MatchPattern" in bad.stderr

    status = await asyncio.to_thread(run_cli, "status", env=env)
    assert f"port {fqdn.proxy.port}" in status.stdout and "2 names cached" in status.stdout

    # a restart keeps the names, in force before the datapath's first full state
    fqdn.save()
    await running.stop()
    again = Providers()
    running = await agent_factory(args(short_tmp / "state"),
                                  extra_plugins=[("dnstest", again)])
    agent = running.agent
    await asyncio.wait_for(agent.datapath_synced.wait(), 10)
    restored = agent.tables.ipcache.get(host_key(ADDRESS))
    assert restored is not None
    assert again.reconciled_ipcache.get(ADDRESS) == restored.identity
    assert agent.fqdn.proxy.port == fqdn.proxy.port  # the port it had, free again
    for _ in range(50):  # handed to the datapath
        if again.proxy_ports:
            break
        await asyncio.sleep(0.05)
    assert again.proxy_ports[-1] == agent.fqdn.proxy.port

    env = clean_env(MESHAGENT_SOCKET_PATH=str(running.socket_path))
    refused = await asyncio.to_thread(
        subprocess.run, [MESHAGENT, "fqdn", "cache", "clean"], input="n\n",
        capture_output=True, text=True, env=env, timeout=30)
    assert "Following cache entries are going to be deleted:" in refused.stdout
    assert agent.fqdn.lookups()  # said no
    cleaned = await asyncio.to_thread(run_cli, "fqdn", "cache", "clean", "-f", "-p",
                                      "allowed.example.com", env=env)
    assert cleaned.stdout.strip() == "FQDN proxy cache cleared"
    assert {r["fqdn"] for r in agent.fqdn.lookups()} == {"other.example.com."}
    assert agent.tables.ipcache.get(host_key(ADDRESS)) is None  # allowed no more


async def test_no_proxy_without_dns_rules_or_when_disabled(agent_factory, short_tmp):
    running = await agent_factory(["--plugins", "memory"])
    assert running.agent.fqdn is None
    section = [s for s in running.agent.status().sections if s.name == "DNS proxy"]
    assert section and "no datapath" in section[0].summary
    disabled = await agent_factory(args(short_tmp / "s2") + ["--enable-dns-proxy", "false"],
                                   extra_plugins=[("dnstest", Providers())])
    assert disabled.agent.fqdn is None
