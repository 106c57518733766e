"""Publishing this node's state to the local cluster's kvstore, in Cilium's layout.

The node key, IP→identity entries of local endpoints and the node's identity references live
on the agent's lease, kept alive while the agent runs and revoked on a clean shutdown (so they
vanish at once instead of after the TTL). The cluster config and the sync canaries are written once the initial state
is up, so peers know the cluster's id and that its listing is complete.
"""

import asyncio
import ipaddress
import logging
import time
from collections.abc import Mapping

import attrs

from meshagent import hookimpl
from meshagent.kvstore import KVStore, KVStoreError, Lease, LeaseExpired
from meshagent.kvstore import keys as kvkeys
from meshagent.model.cluster import ClusterConfig, ClusterInfo
from meshagent.model.ipcache import IPCacheEntry, ipcache_to_json
from meshagent.model.node import Node, node_labels, node_to_json
from meshagent.runtime.controller import Controller, ControllerHandle

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 60.0
REVOKE_TIMEOUT = 2.0


class Publisher:
    """What this agent owns in the local kvstore, and the lease that owns it.

    ``wanted`` is the source of truth. Each (re)start of the controller reconciles the store to
    it: keys on our lease that are no longer wanted are deleted (a pod deleted while the store
    was unreachable), wanted keys are put back. Once the endpoints are restored, keys an
    earlier run of this node left on its own lease are swept as well.
    """

    def __init__(self, store: KVStore, cluster: ClusterInfo, node: Node, lease_ttl: float):
        self.store = store
        self.cluster = cluster
        self.node = node  # this node as published: name, addresses, pod CIDRs
        self.lease_ttl = lease_ttl
        self.lease: Lease | None = None
        self.published = asyncio.Event()  # set once the initial state is in the kvstore
        self.wanted: dict[str, bytes] = {}  # key -> value on the lease
        self._pending: set[str] = set()  # keys whose kvstore copy is out of date
        self._in_flight: str | None = None
        self._written: set[str] = set()  # keys we put and have not deleted since
        self._wake = asyncio.Event()
        self._sweep_earlier_run = False  # set once the endpoints are restored
        self._swept = False

    # -- what to publish (called by endpoints and the identity allocator as they change) ------

    def upsert_ipcache(self, entry: IPCacheEntry) -> None:
        self.want(kvkeys.ipcache_key(entry.key_ip), ipcache_to_json(entry))

    def delete_ipcache(self, entry: IPCacheEntry) -> None:
        self.unwant(kvkeys.ipcache_key(entry.key_ip))

    def want(self, key: str, value: bytes) -> None:
        """Keep ``key`` = ``value`` on the lease; written soon, and again whenever it is lost."""
        self.wanted[key] = value
        self._pending.add(key)
        self._wake.set()

    def unwant(self, key: str) -> None:
        """Delete ``key``: now if the store answers, else as soon as it does again."""
        self.wanted.pop(key, None)
        self._pending.add(key)
        self._wake.set()

    def adopt(self, key: str, value: bytes) -> None:
        """A key its owner just put on our lease itself: keep it there from now on."""
        self.wanted[key] = value
        self._written.add(key)
        if key in self._pending or key == self._in_flight:
            self._wake.set()  # a delete of it may land after the owner's put: put it again
            self._pending.add(key)

    async def wait_published(self) -> None:
        await self.published.wait()

    def set_node_labels(self, labels: Mapping[str, str]) -> None:
        """This node's labels as a source knows them (the Kubernetes Node's): published with
        the node from now on, in place of ``--local-node-labels``."""
        node = attrs.evolve(self.node, labels=node_labels(dict(labels)))
        if node == self.node:
            return
        self.node = node
        if self._node_key() in self.wanted:  # else run() publishes it with the rest
            self.want(self._node_key(), node_to_json(node))

    def endpoints_restored(self) -> None:
        """Every endpoint of an earlier run is back in ``wanted``: what that run left on the
        store and nobody wants any more can go."""
        self._sweep_earlier_run = True
        self._wake.set()

    # -- the controller ------------------------------------------------------------------------

    @hookimpl
    def meshagent_controllers(self):
        return [Controller("kvstore-publish", self.run)]

    async def run(self, handle: ControllerHandle) -> None:
        """Reconcile the store to what we want, then keep the lease alive and apply changes."""
        store = self.store
        await self._ensure_lease(store)
        self.wanted[self._node_key()] = node_to_json(self.node)
        await self._reconcile(store)
        await store.put(kvkeys.cluster_config_key(self.cluster.name), ClusterConfig(
            self.cluster.id, synced_canaries=True,
            max_connected_clusters=self.cluster.max_connected_clusters).to_json())
        for prefix in kvkeys.STORES:  # after the initial state, as Cilium's sync stores do
            await store.put(kvkeys.synced_key(self.cluster.name, prefix), kvkeys.rfc3339_now())
        if not self.published.is_set():
            self.published.set()
            log.info("published node %s of cluster %s (id %d) to the kvstore",
                     self.node.name, self.cluster.name, self.cluster.id)
        handle.ready()
        next_keepalive = time.monotonic() + self.lease.ttl / 3
        next_heartbeat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_heartbeat:
                await store.put(kvkeys.HEARTBEAT, kvkeys.rfc3339_now())
                next_heartbeat = now + HEARTBEAT_INTERVAL
            if now >= next_keepalive:
                await self._keepalive(store)
                next_keepalive = now + self.lease.ttl / 3
            if self._sweep_earlier_run and not self._swept:
                await self._reconcile(store)
            await self._flush(store)
            self._wake.clear()
            timeout = max(0.0, min(next_keepalive, next_heartbeat) - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _node_key(self) -> str:
        return kvkeys.node_key(self.cluster.name, self.node.name)

    def _named_ours(self, key: str) -> bool:
        """A key this node owns by its name, on whichever lease: the node key, its identity
        references, IP entries of addresses in its pod CIDRs."""
        if key == self._node_key():
            return True
        if key.startswith(kvkeys.IDENTITY_VALUES):
            return key.endswith("/" + self.node.name)
        try:
            address = ipaddress.ip_address(key.removeprefix(kvkeys.ipcache_key("")).removeprefix(
                kvkeys.legacy_ipcache_key(self.cluster.name, "")))
        except ValueError:
            return False
        return any(address in cidr for cidr in self.node.pod_cidrs)

    async def _reconcile(self, store: KVStore) -> None:
        """Make the store hold what we want: delete what we wrote and nobody wants any more,
        put every wanted key. Changes made meanwhile are queued as usual and flushed after."""
        sweep = self._sweep_earlier_run
        self._pending.clear()
        stale = self._written - self.wanted.keys()
        if sweep and not self._swept:
            # (and what meshagent before 0.2 published under the cluster's name)
            for prefix in (kvkeys.ipcache_key(""), kvkeys.legacy_ipcache_key(self.cluster.name, ""),
                           kvkeys.IDENTITY_VALUES):
                stale.update(kv.key for kv in (await store.list_prefix(prefix)).items
                             if kv.lease != self.lease.id and self._named_ours(kv.key))
        for key in sorted(stale):
            if key not in self.wanted:
                await store.delete(key)
                self._written.discard(key)
                log.info("withdrew %s from the kvstore: no longer wanted", key)
        for key, value in list(self.wanted.items()):
            if self.wanted.get(key) == value:
                self._written.add(key)
                await store.put(key, value, lease=self.lease)
        self._swept = sweep

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
            key = self._in_flight = self._pending.pop()
            try:
                if key in self.wanted:
                    self._written.add(key)
                    await store.put(key, self.wanted[key], lease=self.lease)
                else:
                    await store.delete(key)
                    self._written.discard(key)
            except BaseException:
                self._pending.add(key)  # the controller's next run reconciles everything
                raise
            finally:
                self._in_flight = None

    async def close(self) -> None:
        """Clean shutdown: revoke the lease so this node's keys disappear now."""
        if self.lease is None:  # never ran: nothing of ours is in the store
            return
        try:
            await asyncio.wait_for(self.store.revoke(self.lease), REVOKE_TIMEOUT)
            log.info("revoked the agent's kvstore lease")
        except (KVStoreError, asyncio.TimeoutError) as exc:
            log.warning("could not revoke the kvstore lease (%s); keys expire with it", exc)
        self.lease = None
