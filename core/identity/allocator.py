"""The default identity allocator: cluster-wide identities in the kvstore, Cilium's way.

``cilium/state/identities/v1/id/<id>`` holds a label set; each node using it keeps
``cilium/state/identities/v1/value/<labels>/<node>`` on its lease. Creating an identity happens
under a kvstore lock per label set, so agents allocating the same labels at the same time agree
on one id; the id itself is claimed with create-if-absent, so two label sets never share one.
Identities no node uses any more are garbage-collected after a grace period.
"""

import asyncio
import logging
import random

from meshagent import hookimpl
from meshagent.errors import MeshagentError
from meshagent.kvstore import KVStore
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstore.publisher import Publisher
from meshagent.model.cluster import ClusterInfo
from meshagent.model.identity import Identity, ReservedIdentity, format_labels
from meshagent.model.table import Table
from meshagent.runtime.controller import ControllerHandle

log = logging.getLogger(__name__)

RESERVED_BY_LABEL = {r.label: r for r in ReservedIdentity}
MAX_ATTEMPTS = 64


class IdentityExhausted(MeshagentError):
    """No free identity left in this cluster's range."""


def reserved_identity(labels: frozenset[str]) -> Identity | None:
    """The reserved identity a single ``reserved:<name>`` label stands for, if it is one."""
    if len(labels) == 1:
        (label,) = labels
        if label in RESERVED_BY_LABEL:
            return Identity(int(RESERVED_BY_LABEL[label]), labels)
    return None


class KVStoreIdentityAllocator:
    """Meets :class:`meshagent.identity.IdentityAllocator`; registered as ``kvstore``."""

    def __init__(self, store: KVStore, publisher: Publisher, identities: Table,
                 cluster: ClusterInfo, node_name: str, gc_interval: float):
        self.store = store
        self.publisher = publisher  # our references go on its lease, and away through it
        self.identities = identities  # every identity the agent knows, by number
        self.cluster = cluster
        self.node_name = node_name
        self.gc_interval = gc_interval
        self.refs: dict[frozenset[str], list] = {}  # labels -> [identity, local users]
        # labels -> the id this agent last used for them: found again even before the
        # identity table heard of it (a release and a new allocate can beat the watch)
        self._used: dict[str, int] = {}
        self._unused_seen: dict[int, int] = {}  # id -> mod_revision when first seen unused

    def _value_key(self, labels_text: str) -> str:
        return f"{kvkeys.IDENTITY_VALUES}{labels_text}/{self.node_name}"

    async def allocate(self, labels: frozenset[str]) -> Identity:
        if reserved := reserved_identity(labels):
            return reserved
        if labels in self.refs:
            self.refs[labels][1] += 1
            return self.refs[labels][0]
        await self.publisher.published.wait()  # our value keys go on the agent's lease
        store = self.store
        text = format_labels(labels)
        async with store.lock(kvkeys.IDENTITY_LOCKS + text):
            if labels in self.refs:  # another local caller finished while we waited
                self.refs[labels][1] += 1
                return self.refs[labels][0]
            number = await self._existing(text, labels) or await self._create(text)
            self._used[text] = number
            key, value = self._value_key(text), str(number).encode()
            await store.put(key, value, lease=self.publisher.lease)
            self.publisher.adopt(key, value)
        identity = Identity(number, labels, self.cluster.name)
        self.refs[labels] = [identity, 1]
        return identity

    async def _existing(self, text: str, labels: frozenset[str]) -> int | None:
        """An id some node already uses for these labels, or an unused one not yet collected."""
        store = self.store
        for item in (await store.list_prefix(f"{kvkeys.IDENTITY_VALUES}{text}/")).items:
            if item.value.isdigit():
                number = int(item.value)
                current = await store.get(kvkeys.identity_key(number))
                if current is not None and current.value.decode() == text:
                    return number
        candidates = [i.id for i in self.identities.values()
                      if i.labels == labels and i.cluster == self.cluster.name]
        if text in self._used:
            candidates.append(self._used[text])
        for number in candidates:
            current = await store.get(kvkeys.identity_key(number))
            if current is not None and current.value.decode() == text:
                return number
        return None

    async def _create(self, text: str) -> int:
        store = self.store
        allowed = self.cluster.identity_range()
        taken = {i.id for i in self.identities.values()}
        for _ in range(MAX_ATTEMPTS):
            number = random.randrange(allowed.start, allowed.stop)
            if number in taken:
                continue
            if await store.create(kvkeys.identity_key(number), text.encode()):
                log.debug("allocated identity %d for %s", number, text)
                return number
            taken.add(number)  # someone else's: try another
        raise IdentityExhausted(f"no free identity found in {allowed.start}..{allowed.stop - 1}"
                                f" after {MAX_ATTEMPTS} tries")

    async def release(self, identity: Identity) -> bool:
        if identity.reserved or identity.labels not in self.refs:
            return False
        entry = self.refs[identity.labels]
        entry[1] -= 1
        if entry[1] > 0:
            return False
        del self.refs[identity.labels]
        # deleted by the publisher: now, or when the store answers again if it does not now
        self.publisher.unwant(self._value_key(format_labels(identity.labels)))
        return True

    def lookup(self, identity_id: int) -> Identity | None:
        if identity_id < 256:
            try:
                reserved = ReservedIdentity(identity_id)
            except ValueError:
                return None
            return Identity(identity_id, frozenset({reserved.label}))
        return self.identities.get(identity_id)

    async def close(self) -> None:
        """Nothing to do: our value keys go with the agent's lease."""

    # -- garbage collection -------------------------------------------------------------------

    async def collect_garbage(self) -> list[int]:
        """Delete identities of this cluster that no node used at this run and the last one."""
        store = self.store
        used = set()
        for item in (await store.list_prefix(kvkeys.IDENTITY_VALUES)).items:
            if item.value.isdigit():
                used.add(int(item.value))
        allowed = self.cluster.identity_range()
        unused_now = {}
        for item in (await store.list_prefix(kvkeys.IDENTITIES)).items:
            number = item.key.rsplit("/", 1)[-1]
            if number.isdigit() and int(number) in allowed and int(number) not in used:
                unused_now[int(number)] = item
        deleted = []
        for number, item in unused_now.items():
            if self._unused_seen.get(number) != item.mod_revision:
                continue  # first time seen unused (or changed since): wait one more round
            async with store.lock(kvkeys.IDENTITY_LOCKS + item.value.decode()):
                still_unused = not (await store.list_prefix(
                    f"{kvkeys.IDENTITY_VALUES}{item.value.decode()}/")).items
                if still_unused and await store.delete_if(item.key,
                                                          mod_revision=item.mod_revision):
                    deleted.append(number)
        self._unused_seen = {n: item.mod_revision for n, item in unused_now.items()
                             if n not in deleted}
        if deleted:
            log.info("garbage-collected %d unused identities", len(deleted))
        return deleted

    async def run_gc(self, handle: ControllerHandle) -> None:
        """Controller: collect every ``--identity-gc-interval`` seconds."""
        interval = self.gc_interval
        handle.ready()
        while True:
            await asyncio.sleep(interval)
            await self.collect_garbage()


@hookimpl
def meshagent_register_identity_allocator(registry):
    """This module is registered as plugin ``core.identity``: the default allocator."""
    registry.register("kvstore", lambda agent: KVStoreIdentityAllocator(
        agent.kvstore, agent.publisher, agent.tables.identities, agent.cluster,
        agent.config.node_name, agent.config.get("identity-gc-interval")))
