"""After a restart, the DNS garbage collector leaves the restored names alone until the
endpoints of the run before are back: before that, every endpoint looks gone."""

import asyncio
import ipaddress
import time
import types

from test_dns_proxy import StandInResolver, tables

from meshagent.events import ChangeKind
from meshagent.fqdn.cache import CacheEntry
from meshagent.fqdn.contract import FQDNSelector
from meshagent.fqdn.manager import FQDN, FQDNOptions
from meshagent.fqdn.proxy import ProxyOptions
from meshagent.model.endpoint import Endpoint

ENDPOINT = 12
SELECTOR = FQDNSelector(match_name="allowed.example.com")
ADDRESS = ipaddress.ip_address("203.0.113.10")


def fqdn(state, resolver, restored=None) -> FQDN:
    return FQDN("c1", tables(), resolver, FQDNOptions(ProxyOptions(), gc_interval=0.01), state,
                datapath_applied=None, set_proxy_port=lambda port: None,
                publish=lambda record: None, endpoints_restored=restored)


def endpoint() -> Endpoint:
    return Endpoint(ENDPOINT, "default", frozenset({"k8s:app=client"}),
                    ipaddress.IPv4Address("10.1.0.12"), 4321)


async def collecting(manager: FQDN):
    """The manager's garbage collector running, as the agent runs it."""
    return asyncio.create_task(manager._gc(types.SimpleNamespace(ready=lambda: None)))


async def test_restored_names_outlive_collections_until_the_endpoints_are_back(tmp_path):
    resolver = StandInResolver()
    resolver.set(selectors=[SELECTOR])
    before = fqdn(tmp_path, resolver)
    before.meshagent_endpoint_changed(ChangeKind.UPSERT, endpoint())
    before.names.observe(ENDPOINT, CacheEntry("allowed.example.com.", time.time(), 300,
                                              (ADDRESS,)))
    before.save()

    for comes_back in (True, False):
        restored = asyncio.Event()
        after = fqdn(tmp_path, resolver, restored)
        gc = await collecting(after)
        try:
            await asyncio.sleep(0.1)  # ten collections' time: none ran
            assert [r["fqdn"] for r in after.lookups()] == ["allowed.example.com."]
            if comes_back:
                after.meshagent_endpoint_changed(ChangeKind.UPSERT, endpoint())
            restored.set()
            await asyncio.sleep(0.1)
            # kept while its endpoint is back; an endpoint that did not come back is gone
            assert bool(after.lookups()) is comes_back
        finally:
            gc.cancel()
