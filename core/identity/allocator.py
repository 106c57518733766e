"""The default identity allocator: cluster-wide identities in the kvstore, in Cilium's layout.

``cilium/state/identities/v1/id/<id>`` holds a label set; each node using it keeps
``cilium/state/identities/v1/value/<labels>/<node>`` = id on its (the publisher's) lease.

Allocation takes no lock. Every label set has one probe chain, the same on every agent: the id
its label text hashes to, then the next ones (linear probing, wrapping in the cluster's range).
An allocator walks the chain and takes the first id that holds the labels or is free, claiming a
free one with create-if-absent. Why that is correct:

- Two label sets never share an id: an id key is only ever written by create-if-absent.
- Agents agree: while nothing is deleted, ids only go from free to taken, so every walk of one
  chain stops at the same id (a walker that loses the create reads the winner's labels).
- Only deletions could split them: a hole in front of a label set's id would make the next
  walker create a second id for the same labels. So the collector never deletes an id lying in
  front of another id in that id's chain (it is "pinned"), and it announces every deletion round
  in a gate key (:data:`~meshagent.kvstore.keys.IDENTITY_GC`: ``running`` on the collector's
  lease while it deletes, ``idle`` otherwise). An allocation reads the gate before its walk and
  again after its value key is written, and starts over unless both reads saw the same ``idle``
  (same mod_revision). A round that starts after the second read lists the store after the
  allocation wrote it: it sees the value key (the id is used) and the id (what is in front of it
  is pinned). A round that ended before the first read cannot touch what the walk reads. Until
  an allocation returns, its value key may name an id a round deleted; the retry overwrites it.
- The collector deletes an id only if no value key names it, it was seen unused (same
  mod_revision) at the previous run and again after its round began, and it is not pinned.
  Rounds exclude each other (the gate is set with compare-and-swap). A collector that dies
  mid-round leaves the gate to the round's short lease; a missing gate is not ``idle``, and the
  allocator that writes ``idle`` again gives it a new mod_revision, so that round is never
  mistaken for none. Like any lease-based lock, this assumes a collector does not stall past
  the lease's TTL between its last keepalive and a delete.

Batching changes none of this. Each step of a walk is one create-if-absent of one id key; the
steps (and value key puts) that this agent's walks reach in one loop turn go out together
(:class:`~meshagent.kvstore.batch.Coalescer`), as ``create_many`` (etcd: one Txn of nested
Txns, each "create if absent, else read") and ``put_many``. Every id key is still only written
by a create-if-absent, each one decided on its own; a lost create returns the id as it was when
the create failed, which is what the get after it used to read (now with no gap in between). An
allocation reads the gate again only once ``put_many`` has returned, so after its value key is
written. Walks of different label sets probing one id in the same turn go in successive batches
(a batch takes each key once).
"""

import asyncio
import hashlib
import itertools
import logging
from collections.abc import Iterator

from meshagent import hookimpl
from meshagent.errors import MeshagentError
from meshagent.kvstore import KeyValue, KVStore, Lease, NodeKeys
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstore.batch import Coalescer
from meshagent.kvstore.lock import keep_alive
from meshagent.model.cluster import ClusterInfo
from meshagent.model.identity import Identity, ReservedIdentity, format_labels
from meshagent.model.table import Table
from meshagent.runtime.controller import ControllerHandle

log = logging.getLogger(__name__)

RESERVED_BY_LABEL = {r.label: r for r in ReservedIdentity}
IDLE = b"idle"
MAX_GATE_WAIT = 0.5  # seconds between reads of a gate that is not idle
ROUND_TTL = 15.0  # the lease of a deletion round's gate


class IdentityExhausted(MeshagentError):
    """No free identity left in this cluster's range."""


def reserved_identity(labels: frozenset[str]) -> Identity | None:
    """The reserved identity a single ``reserved:<name>`` label stands for, if it is one."""
    if len(labels) == 1:
        (label,) = labels
        if label in RESERVED_BY_LABEL:
            return Identity(int(RESERVED_BY_LABEL[label]), labels)
    return None


def chain_start(text: str, allowed: range) -> int:
    """Where a label set's probe chain starts: a hash every agent (and version) computes alike."""
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") % len(allowed)


def chain(text: str, allowed: range) -> Iterator[int]:
    """The ids a label set may get, in the order every agent tries them."""
    start = chain_start(text, allowed)
    for i in range(len(allowed)):
        yield allowed[(start + i) % len(allowed)]


def pinned_ids(identities: dict[int, str], allowed: range) -> set[int]:
    """The ids lying in front of another id (by number, its label text) in that id's chain."""
    # count the chains covering each position: +1 where one starts, -1 where it reaches its
    # id; a chain that wraps covers the range's end and then its start up to its id
    size = len(allowed)
    changes = [0] * (size + 1)
    for number, text in identities.items():
        start, end = chain_start(text, allowed), allowed.index(number)
        changes[start] += 1
        changes[end] -= 1
        if start > end:
            changes[size] -= 1
            changes[0] += 1
    return {allowed[i] for i, depth in enumerate(itertools.accumulate(changes[:size])) if depth}


class GCGate:
    """The collector's gate key as this agent reads it; one read serves every allocation
    waiting for one when it starts."""

    def __init__(self, store: KVStore):
        self.store = store
        self.last: KeyValue | None = None  # the gate at the last read, if it was there
        self._read_once = False
        self._current: asyncio.Task | None = None
        self._next: asyncio.Task | None = None
        self._writing: asyncio.Task | None = None

    async def read(self) -> KeyValue | None:
        """The gate as read by a get that started after this call."""
        if self._next is None:
            self._next = asyncio.create_task(self._read_after(self._current))
        return await asyncio.shield(self._next)

    async def _read_after(self, previous: asyncio.Task | None) -> KeyValue | None:
        if previous is not None:
            await asyncio.wait([previous])  # one get at a time; callers meanwhile join ours
        self._current, self._next = self._next, None
        self.last = await self.store.get(kvkeys.IDENTITY_GC)
        self._read_once = True
        return self.last

    async def idle(self) -> KeyValue:
        """The gate, idle: waits out a deletion round, writes ``idle`` if the gate is missing."""
        gate = self.last if self._read_once else await self.read()
        delay = 0.01
        while gate is None or gate.value != IDLE:
            if gate is None:
                # one create for all the callers that found none, which all go on at once
                if self._writing is None or self._writing.done():
                    self._writing = asyncio.create_task(self._write_idle())
                await asyncio.shield(self._writing)
                # any read will do for the first one: the second one tells whether it changed
                if self.last is not None:
                    gate = self.last
                    continue
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_GATE_WAIT)
            gate = await self.read()
        return gate

    async def _write_idle(self) -> None:
        """Write the missing gate (if it is still missing) and read it."""
        await self.store.create(kvkeys.IDENTITY_GC, IDLE)
        await self.read()

    async def unchanged(self, before: KeyValue) -> bool:
        """Whether the gate, read now, is still ``before``: no round began or ended since."""
        gate = await self.read()
        return gate is not None and gate.mod_revision == before.mod_revision


class KVStoreIdentityAllocator:
    """Meets :class:`meshagent.identity.IdentityAllocator`; registered as ``kvstore``."""

    def __init__(self, store: KVStore, publisher: NodeKeys, identities: Table,
                 cluster: ClusterInfo, node_name: str, gc_interval: float):
        self.store = store
        self.publisher = publisher  # our references go on its lease, and away through it
        self.identities = identities  # every identity the agent knows, by number
        self.cluster = cluster
        self.node_name = node_name
        self.gc_interval = gc_interval
        self.gate = GCGate(store)
        self.refs: dict[frozenset[str], list] = {}  # labels -> [identity, local users]
        self._allocating: dict[frozenset[str], list] = {}  # labels -> [asyncio.Lock, callers]
        self._unused_seen: dict[int, int] = {}  # id -> mod_revision when first seen unused
        # the requests of concurrent allocations, one batch per loop turn
        self._creates = Coalescer(self._create_batch)
        self._puts = Coalescer(self._put_batch)

    def _value_key(self, labels_text: str) -> str:
        return f"{kvkeys.IDENTITY_VALUES}{labels_text}/{self.node_name}"

    async def allocate(self, labels: frozenset[str]) -> Identity:
        if reserved := reserved_identity(labels):
            return reserved
        if labels in self.refs:
            self.refs[labels][1] += 1
            return self.refs[labels][0]
        # one walk per label set at a time here: local callers wait for the first one's result
        entry = self._allocating.setdefault(labels, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                if labels not in self.refs:
                    self.refs[labels] = [await self._allocate(labels), 0]
                self.refs[labels][1] += 1
                return self.refs[labels][0]
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._allocating[labels]

    async def _allocate(self, labels: frozenset[str]) -> Identity:
        await self.publisher.wait_published()  # our value keys go on the agent's lease
        text = format_labels(labels)
        key = self._value_key(text)
        while True:
            before = await self.gate.idle()
            number = await self._walk(text)
            value = str(number).encode()
            await self._puts.submit((key, value))
            self.publisher.adopt(key, value)
            if await self.gate.unchanged(before):
                return Identity(number, labels, self.cluster.name)
            log.debug("a collection round overlapped allocating %s: again", text)

    async def _walk(self, text: str) -> int:
        """The first id of the chain that holds these labels or that we create for them."""
        value = text.encode()
        for number in chain(text, self.cluster.identity_range()):
            # create-if-absent, or the id as it is: one nested op of a shared batch
            current = await self._creates.submit((kvkeys.identity_key(number), value))
            if current is None:
                log.debug("allocated identity %d for %s", number, text)
                return number
            if current.value == value:
                return number
        allowed = self.cluster.identity_range()
        raise IdentityExhausted(f"no free identity in {allowed.start}..{allowed.stop - 1}")

    async def _create_batch(self, items: list[tuple[str, bytes]]) -> list[KeyValue | None]:
        """One create_many for the creates of every walk that reached this step together;
        walks of different label sets probing one id go in a following one."""
        results: list[KeyValue | None] = [None] * len(items)
        todo = list(range(len(items)))
        while todo:
            batch, seen, later = [], set(), []
            for i in todo:
                (later if items[i][0] in seen else batch).append(i)
                seen.add(items[i][0])
            answers = await self.store.create_many([items[i] for i in batch])
            for i, answer in zip(batch, answers, strict=True):
                results[i] = answer
            todo = later
        return results

    async def _put_batch(self, items: list[tuple[str, bytes]]) -> list[int]:
        """One put_many for the value keys of every allocation that got here together (each
        label set is walked once at a time here, so their keys are distinct)."""
        revision = await self.store.put_many(items, lease=self.publisher.lease)
        return [revision] * len(items)

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
        unused = await self._collectable()
        due = {n: kv for n, kv in unused.items() if self._unused_seen.get(n) == kv.mod_revision}
        deleted = []
        if due and (began := await self._begin_round()) is not None:
            gate, lease = began
            keeper = asyncio.create_task(keep_alive(store, lease, ROUND_TTL), name="identity-gc")
            try:
                still = await self._collectable()  # listed after the round began
                for number, item in due.items():
                    if keeper.done():
                        break  # the round's lease, and the gate with it, is gone: stop
                    if number in still and still[number].mod_revision == item.mod_revision \
                            and await store.delete_if(item.key, mod_revision=item.mod_revision):
                        deleted.append(number)
            finally:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
                try:
                    await store.update_if(kvkeys.IDENTITY_GC, IDLE,
                                          mod_revision=gate.mod_revision)
                finally:  # the round's lease goes even when the gate cannot be reopened
                    await store.revoke(lease)
        self._unused_seen = {n: kv.mod_revision for n, kv in unused.items() if n not in deleted}
        if deleted:
            log.info("garbage-collected %d unused identities", len(deleted))
        return deleted

    async def _collectable(self) -> dict[int, KeyValue]:
        """This cluster's identities no value key names and no other identity pins."""
        store = self.store
        used = {int(item.value) for item in (await store.list_prefix(kvkeys.IDENTITY_VALUES)).items
                if item.value.isdigit()}
        allowed = self.cluster.identity_range()
        ours = {}
        for item in (await store.list_prefix(kvkeys.IDENTITIES)).items:
            number = item.key.rsplit("/", 1)[-1]
            if number.isdigit() and int(number) in allowed:
                ours[int(number)] = item
        pinned = pinned_ids({n: item.value.decode(errors="replace") for n, item in ours.items()},
                            allowed)
        return {n: item for n, item in ours.items() if n not in used and n not in pinned}

    async def _begin_round(self) -> tuple[KeyValue, Lease] | None:
        """Set the gate to ``running`` on a short lease of the round's own, so a collector that
        dies mid-round holds allocations up for ROUND_TTL at most; None if another round runs."""
        store = self.store
        gate = await store.get(kvkeys.IDENTITY_GC)
        if gate is not None and gate.value != IDLE:
            return None
        running = f"running {self.node_name}".encode()
        lease = await store.grant_lease(ROUND_TTL)
        if gate is None:
            began = await store.create(kvkeys.IDENTITY_GC, running, lease=lease)
        else:
            began = await store.update_if(kvkeys.IDENTITY_GC, running,
                                          mod_revision=gate.mod_revision, lease=lease)
        gate = await store.get(kvkeys.IDENTITY_GC) if began else None
        if gate is None or gate.value != running:  # began, but the lease went already
            await store.revoke(lease)
            return None
        return gate, lease

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
        agent.kvstore, agent.node_keys, agent.tables.identities, agent.cluster,
        agent.config.node_name, agent.config.get("identity-gc-interval")))
