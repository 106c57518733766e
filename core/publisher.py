"""Publishing this node's state to the local cluster's kvstore, in Cilium's layout.

The node key, IP→identity entries of local endpoints and services live on the agent's lease,
kept alive while the agent runs and revoked on a clean shutdown (so they vanish at once instead
of after the TTL). The cluster config and the sync canaries are written once the initial state
is up, so peers know the cluster's id and that its listing is complete.
"""

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from meshagent import kvkeys
from meshagent.controller import ControllerHandle
from meshagent.ipcache import IPCacheEntry, ipcache_to_json
from meshagent.kvstore import KVStore, KVStoreError, Lease, LeaseExpired
from meshagent.node import Node, node_to_json
from meshagent.service import Service, service_to_json

if TYPE_CHECKING:
    from meshagent.agent import Agent

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 60.0
REVOKE_TIMEOUT = 2.0


class Publisher:
    """What this agent owns in the local kvstore, and the lease that owns it."""

    def __init__(self, agent: "Agent", lease_ttl: float):
        self.agent = agent
        self.cluster = agent.cluster
        self.lease_ttl = lease_ttl
        self.lease: Lease | None = None
        self.published = asyncio.Event()  # set once the initial state is in the kvstore
        self.wanted: dict[str, bytes] = {}  # key -> value on the lease
        self._store: KVStore | None = None
        self._pending: set[str] = set()  # keys whose kvstore copy is out of date
        self._wake = asyncio.Event()

    def node(self) -> Node:
        config = self.agent.config
        return Node(config.node_name, self.cluster.name, self.cluster.id,
                    config.get("node-ip") or None, tuple(config.get("pod-cidr")))

    # -- what to publish (called by endpoints and services as they change) -------------------------

    def upsert_ipcache(self, entry: IPCacheEntry) -> None:
        self._want(kvkeys.ipcache_key(self.cluster.name, entry.key_ip), ipcache_to_json(entry))

    def delete_ipcache(self, entry: IPCacheEntry) -> None:
        self._unwant(kvkeys.ipcache_key(self.cluster.name, entry.key_ip))

    def upsert_service(self, service: Service) -> None:
        self._want(kvkeys.service_key(self.cluster.name, service.namespace, service.name),
                   service_to_json(service))

    def delete_service(self, service: Service) -> None:
        self._unwant(kvkeys.service_key(self.cluster.name, service.namespace, service.name))

    def adopt(self, key: str, value: bytes) -> None:
        """A key its owner already wrote on our lease: put it back if the lease is renewed."""
        self.wanted[key] = value

    def forget(self, key: str) -> None:
        """A key its owner deletes itself."""
        self.wanted.pop(key, None)
        self._pending.discard(key)

    def _want(self, key: str, value: bytes) -> None:
        self.wanted[key] = value
        self._pending.add(key)
        self._wake.set()

    def _unwant(self, key: str) -> None:
        self.wanted.pop(key, None)
        self._pending.add(key)
        self._wake.set()

    # -- the controller ------------------------------------------------------------------------

    async def run(self, handle: ControllerHandle) -> None:
        """Publish everything, then keep the lease alive and apply changes as they come."""
        store = self._store = self.agent.kvstore
        await self._ensure_lease(store)
        node_key = kvkeys.node_key(self.cluster.name, self.agent.config.node_name)
        self.wanted[node_key] = node_to_json(self.node())
        for key, value in list(self.wanted.items()):
            await store.put(key, value, lease=self.lease)
        self._pending.clear()
        await store.put(kvkeys.cluster_config_key(self.cluster.name), json.dumps(
            {"id": self.cluster.id, "capabilities": {
                "syncedCanaries": True,
                "maxConnectedClusters": self.cluster.max_connected_clusters}}).encode())
        for prefix in (kvkeys.NODES, kvkeys.IPCACHE, kvkeys.SERVICES):
            await store.put(kvkeys.synced_key(self.cluster.name, prefix),
                            str(int(time.time())).encode())
        self.published.set()
        handle.ready()
        log.info("published node %s of cluster %s (id %d) to the kvstore",
                 self.agent.config.node_name, self.cluster.name, self.cluster.id)
        next_keepalive = time.monotonic() + self.lease.ttl / 3
        next_heartbeat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_heartbeat:
                await store.put(kvkeys.HEARTBEAT, str(int(time.time())).encode())
                next_heartbeat = now + HEARTBEAT_INTERVAL
            if now >= next_keepalive:
                await self._keepalive(store)
                next_keepalive = now + self.lease.ttl / 3
            await self._flush(store)
            self._wake.clear()
            timeout = max(0.0, min(next_keepalive, next_heartbeat) - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _ensure_lease(self, store: KVStore) -> None:
        if self.lease is not None:
            try:
                await store.keepalive(self.lease)
                return
            except LeaseExpired:
                log.warning("the agent's kvstore lease expired; publishing again on a new one")
        self.lease = await store.grant_lease(self.lease_ttl)

    async def _keepalive(self, store: KVStore) -> None:
        try:
            await store.keepalive(self.lease)
        except LeaseExpired:
            # Our keys went with it: take a new lease and put everything back.
            self.lease = await store.grant_lease(self.lease_ttl)
            self._pending.update(self.wanted)

    async def _flush(self, store: KVStore) -> None:
        while self._pending:
            key = self._pending.pop()
            try:
                if key in self.wanted:
                    await store.put(key, self.wanted[key], lease=self.lease)
                else:
                    await store.delete(key)
            except BaseException:
                self._pending.add(key)  # retried after the controller restarts
                raise

    async def close(self) -> None:
        """Clean shutdown: revoke the lease so this node's keys disappear now."""
        if self.lease is None or self._store is None:
            return
        try:
            await asyncio.wait_for(self._store.revoke(self.lease), REVOKE_TIMEOUT)
            log.info("revoked the agent's kvstore lease")
        except (KVStoreError, asyncio.TimeoutError) as exc:
            log.warning("could not revoke the kvstore lease (%s); keys expire with it", exc)
        self.lease = None
