"""The datapath's one door: the feed folds raw change streams into batches of net changes
(each key once) and is the datapath's only caller. Checked here against a recording datapath;
the real ones run the same streams in tests/test_datapath_differential.py and
tests/test_nftables_datapath.py (the contract suite's raw streams)."""

import asyncio
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent.datapath import DatapathBatch
from meshagent.datapath.feed import BatchFeed, DatapathFeed
from meshagent.datapath.progress import PolicyProgress
from meshagent.events import ChangeKind
from meshagent.model.endpoint import Endpoint
from meshagent.model.ipcache import IPCache, IPCacheEntry
from meshagent.model.service import Frontend, MergedService, Service
from meshagent.policy.contract import MapChange, MapKey, Verdict

UPSERT, DELETE = ChangeKind.UPSERT, ChangeKind.DELETE
PREFIX = ipaddress.ip_network("10.2.0.5/32")


class Recorder:
    """Meets the datapath contract; keeps every call, and may refuse the next batch."""

    def __init__(self):
        self.calls: list = []
        self.refuse: Exception | None = None

    async def start(self):
        pass

    async def stop(self):
        pass

    async def apply(self, batch: DatapathBatch):
        self.calls.append(("apply", batch))
        if self.refuse is not None:
            raise self.refuse

    async def reconcile(self, policies, ipcache):
        self.calls.append(("reconcile", dict(policies), list(ipcache)))

    @property
    def batches(self) -> list[DatapathBatch]:
        return [call[1] for call in self.calls if call[0] == "apply"]


def endpoint(n: int) -> Endpoint:
    return Endpoint(n, "default", frozenset(), ipaddress.IPv4Address(f"10.1.0.{n}"), 1000 + n,
                    ifindex=100 + n)


def entry(identity: int, prefix=PREFIX) -> IPCacheEntry:
    return IPCacheEntry(prefix, identity, "cluster1")


def key(port: int) -> MapKey:
    return MapKey("ingress", 0, 6, port, port)


def put(port: int, verdict: Verdict = Verdict.ALLOW) -> MapChange:
    return MapChange(UPSERT, key(port), verdict)


def drop(port: int) -> MapChange:
    return MapChange(DELETE, key(port), None)


async def fed(*steps) -> tuple[BatchFeed, Recorder]:
    """A feed holding endpoint 1 with the policy key of port 80, then ``steps`` fed and
    flushed."""
    recorder = Recorder()
    feed = BatchFeed(recorder)
    await _flush(feed, [lambda f: f.endpoint_added(endpoint(1))])
    await feed.reconcile({1: {key(80): Verdict.ALLOW}}, [entry(1001)], ())
    await feed.flush()
    recorder.calls.clear()
    await _flush(feed, steps)
    return feed, recorder


async def _flush(feed: BatchFeed, steps) -> None:
    waiters = [future for step in steps if (future := step(feed)) is not None]
    await feed.flush()
    await asyncio.gather(*waiters)


# -- the rule per key ------------------------------------------------------------------------------

async def test_an_address_deleted_and_reused_is_one_upsert_of_the_new_entry():
    _, recorder = await fed(lambda f: f.ipcache_changed(DELETE, entry(1001)),
                            lambda f: f.ipcache_changed(UPSERT, entry(1002)))
    (batch,) = recorder.batches
    assert batch.ipcache_upserts == (entry(1002),) and batch.ipcache_deletes == ()


async def test_an_ownership_hand_over_is_an_upsert_of_the_last_owner():
    _, recorder = await fed(lambda f: f.ipcache_changed(UPSERT, entry(1002)),
                            lambda f: f.ipcache_changed(UPSERT, entry(1003)))
    (batch,) = recorder.batches
    assert batch.ipcache_upserts == (entry(1003),) and batch.ipcache_deletes == ()


async def test_an_address_upserted_then_deleted_is_deleted():
    """The datapath may hold the prefix from before the stream: it is deleted either way."""
    other = ipaddress.ip_network("10.2.0.6/32")
    _, recorder = await fed(lambda f: f.ipcache_changed(UPSERT, entry(1002)),
                            lambda f: f.ipcache_changed(DELETE, entry(1002)),
                            lambda f: f.ipcache_changed(UPSERT, entry(7, other)),
                            lambda f: f.ipcache_changed(DELETE, entry(7, other)))
    (batch,) = recorder.batches
    assert batch.ipcache_upserts == ()
    assert set(batch.ipcache_deletes) == {entry(1002), entry(7, other)}


async def test_a_policy_key_takes_its_last_change_and_deletes_only_what_is_held():
    _, recorder = await fed(
        lambda f: f.policy_changed({1: [drop(80), put(80, Verdict.DENY)]}),  # held: changed
        lambda f: f.policy_changed({1: [put(443), drop(443)]}),  # never held: nothing
        lambda f: f.policy_changed({1: [put(22), put(22, Verdict.DENY)]}))
    (batch,) = recorder.batches
    assert sorted(batch.policy[1], key=lambda c: c.key) == [put(22, Verdict.DENY),
                                                            put(80, Verdict.DENY)]
    _, recorder = await fed(lambda f: f.policy_changed({1: [put(80, Verdict.DENY), drop(80)]}))
    assert recorder.batches[0].policy == {1: (drop(80),)}  # held before: deleted


async def test_an_endpoint_added_and_removed_before_it_was_handed_over_is_nothing():
    _, recorder = await fed(lambda f: f.endpoint_added(endpoint(2)),
                            lambda f: f.policy_changed({2: [put(80)]}),
                            lambda f: f.endpoint_removed(endpoint(2)))
    assert all(b.empty for b in recorder.batches)


async def test_an_endpoint_removed_while_its_policy_changes_are_pending_takes_them_along():
    feed, recorder = await fed(lambda f: f.policy_changed({1: [put(443)]}),
                               lambda f: f.endpoint_removed(endpoint(1)),
                               lambda f: f.policy_changed({1: [put(22)]}))  # stale: too late
    (batch,) = recorder.batches
    assert batch.removed == (endpoint(1),) and batch.policy == {}
    assert feed.endpoints == {} and feed.policy_keys == {}
    await _flush(feed, [lambda f: f.policy_changed({1: [put(8080)]})])
    assert len(recorder.batches) == 1  # nothing: the datapath holds no endpoint 1


async def test_an_endpoint_removed_and_added_again_is_two_batches_in_order():
    """A new pod under a reused id: the old one leaves, with its entries, first."""
    _, recorder = await fed(lambda f: f.endpoint_removed(endpoint(1)),
                            lambda f: f.endpoint_added(endpoint(1)),
                            lambda f: f.policy_changed({1: [put(22)]}))
    first, second = recorder.batches
    assert (first.removed, first.added, first.policy) == ((endpoint(1),), (), {})
    assert (second.added, second.policy) == ((endpoint(1),), {1: (put(22),)})


async def test_entries_of_an_endpoint_the_datapath_does_not_hold_are_dropped():
    _, recorder = await fed(lambda f: f.policy_changed({7: [put(80)], 1: [put(22)]}))
    assert recorder.batches[0].policy == {1: (put(22),)}


async def test_an_endpoint_gets_its_entries_in_the_batch_that_adds_it_after_it():
    _, recorder = await fed(lambda f: f.policy_changed({2: [put(80)]}),  # not added yet: none
                            lambda f: f.endpoint_added(endpoint(2)),
                            lambda f: f.policy_changed({2: [put(22)]}))
    (batch,) = recorder.batches
    assert batch.added == (endpoint(2),) and batch.policy == {2: (put(22),)}


async def test_services_are_the_whole_latest_set_and_follow_every_reconcile():
    one = MergedService(Service("default", "a", "cluster1", (
        Frontend(ipaddress.IPv4Address("10.96.0.1"), 80),)), (), 0)
    two = MergedService(Service("default", "b", "cluster1"), (), 0)
    feed, recorder = await fed(lambda f: f.services_changed([one]),
                               lambda f: f.services_changed([one, two]))
    assert [b.services for b in recorder.batches] == [(one, two)]
    await feed.reconcile({}, [], [two])
    await feed.flush()
    assert recorder.calls[-1] == ("apply", DatapathBatch(services=(two,), proxy_port=0))


async def test_the_proxy_port_is_the_latest_and_follows_every_reconcile():
    feed, recorder = await fed(lambda f: f.proxy_port_changed(4001),
                               lambda f: f.proxy_port_changed(4002))
    assert [b.proxy_port for b in recorder.batches] == [4002]
    await _flush(feed, [lambda f: f.ipcache_changed(UPSERT, entry(1002))])
    assert recorder.batches[-1].proxy_port is None  # unchanged
    await feed.reconcile({}, [], [])
    await feed.flush()
    assert recorder.calls[-1] == ("apply", DatapathBatch(services=(), proxy_port=4002))


async def test_a_proxy_port_before_the_first_reconcile_waits_for_it():
    recorder = Recorder()
    feed = BatchFeed(recorder)
    feed.proxy_port_changed(4001)
    await _flush(feed, [lambda f: f.endpoint_added(endpoint(1))])
    assert recorder.batches == [DatapathBatch(added=(endpoint(1),))]  # endpoints only
    await feed.reconcile({}, [], [])
    await feed.flush()
    assert recorder.batches[-1].proxy_port == 4001


async def test_a_refused_batch_fails_its_waiters_and_its_endpoints_count_as_held():
    feed, recorder = await fed()
    recorder.refuse = RuntimeError("the datapath refused")
    waiter = feed.endpoint_added(endpoint(2))
    with pytest.raises(RuntimeError, match="refused"):
        await feed.flush()
    with pytest.raises(RuntimeError, match="refused"):
        await waiter
    recorder.refuse = None
    await _flush(feed, [lambda f: f.endpoint_removed(endpoint(2))])  # may be half there
    assert recorder.batches[-1].removed == (endpoint(2),)


# -- net changes, checked against the raw streams they fold ----------------------------------------

STREAMS = st.lists(st.tuples(st.integers(0, 3), st.sampled_from((UPSERT, DELETE)),
                             st.integers(1, 3)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(held=st.dictionaries(st.integers(0, 3), st.integers(1, 3), max_size=4),
       stream=STREAMS)
def test_each_key_once_and_the_net_change_of_any_raw_stream(held, stream):
    """Any raw stream over a few keys (an ipcache prefix and a policy key each) folds into a
    batch that names each key once and, applied to what the datapath held, leaves what the
    stream applied in order would."""
    async def run():
        recorder = Recorder()
        feed = BatchFeed(recorder)
        await _flush(feed, [lambda f: f.endpoint_added(endpoint(1))])
        prefixes = [ipaddress.ip_network(f"10.2.0.{n}/32") for n in range(4)]
        await feed.reconcile({1: {key(n): _verdict(v) for n, v in held.items()}},
                             [entry(v, prefixes[n]) for n, v in held.items()], ())
        await feed.flush()
        recorder.calls.clear()
        ipcache = {n: v for n, v in held.items()}
        policy = dict(ipcache)
        for n, kind, v in stream:
            feed.ipcache_changed(kind, entry(v, prefixes[n]))
            feed.policy_changed({1: [MapChange(kind, key(n), _verdict(v) if kind is UPSERT
                                               else None)]})
            if kind is UPSERT:
                ipcache[n] = policy[n] = v
            else:
                ipcache.pop(n, None)
                policy.pop(n, None)
        await feed.flush()
        got_ipcache = dict(held)
        got_policy = {n: 1 if v == 1 else 2 for n, v in held.items()}
        for batch in recorder.batches:
            names = [e.key for e in batch.ipcache_upserts + batch.ipcache_deletes]
            assert len(names) == len(set(names))
            changes = batch.policy.get(1, ())
            assert len({c.key for c in changes}) == len(changes)
            for e in batch.ipcache_upserts:
                got_ipcache[prefixes.index(e.prefix)] = e.identity
            for e in batch.ipcache_deletes:
                got_ipcache.pop(prefixes.index(e.prefix), None)
            for c in changes:
                assert c.kind is UPSERT or c.key.port in got_policy  # deletes what it holds
                if c.kind is UPSERT:
                    got_policy[c.key.port] = 1 if c.verdict is Verdict.ALLOW else 2
                else:
                    del got_policy[c.key.port]
        assert got_ipcache == ipcache
        assert got_policy == {n: 1 if v == 1 else 2 for n, v in policy.items()}
    asyncio.run(run())


def _verdict(value: int) -> Verdict:
    return Verdict.ALLOW if value == 1 else Verdict.DENY


# -- the component: endpoints only until the agent is synced, then everything ---------------------

class Resolver:
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.revision = 0

    def snapshot(self):
        return {1: {key(80): Verdict.ALLOW}, 5: {key(80): Verdict.ALLOW}}  # 5: nobody added it

    async def changes(self):
        return await self.queue.get()


class Handle:
    def ready(self):
        pass


class Component:
    """The feed as the agent registers it, over a recorder, a resolver and an ipcache."""

    def __init__(self):
        self.recorder, self.resolver = Recorder(), Resolver()
        self.table = IPCache("cluster1",
                             lambda kind, e: self.feed.meshagent_ipcache_changes([(kind, e)]))
        self.ready, self.started, self.synced = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.feed = DatapathFeed(self.recorder, self.resolver, self.table,
                                 agent_ready=self.ready, remotes_ready=lambda: True,
                                 sync_timeout=0, started=self.started, synced=self.synced,
                                 progress=PolicyProgress())


async def test_until_the_sync_only_endpoints_pass_then_the_full_state_then_batches():
    c = Component()
    feed, recorder, resolver, table = c.feed, c.recorder, c.resolver, c.table
    ready, started, synced = c.ready, c.started, c.synced
    service = MergedService(Service("default", "a", "cluster1"), (), 0)
    sync = asyncio.create_task(feed._sync(resolver, Handle()))
    started.set()
    added = feed.endpoint_added(endpoint(1))
    table.upsert(PREFIX, entry(1001))  # before the sync: in the full state, not a batch
    feed.services_changed([service])
    await added  # answered once the datapath holds it, before the agent is synced
    assert recorder.calls == [("apply", DatapathBatch(added=(endpoint(1),)))]
    ready.set()
    await asyncio.wait_for(synced.wait(), 5)
    reconciled = ("reconcile", {1: {key(80): Verdict.ALLOW}}, [entry(1001)])  # not 5
    assert recorder.calls[1] == reconciled
    table.upsert(PREFIX, entry(1002))
    resolver.queue.put_nowait({1: [put(22)]})
    for _ in range(100):
        if len(recorder.batches) >= 2 and recorder.batches[-1].policy:
            break
        await asyncio.sleep(0.01)
    after = [call[1] for call in recorder.calls[2:]]
    assert after[0].services == (service,)  # the first batch after the full state
    assert {e for b in after for e in b.ipcache_upserts} == {entry(1002)}
    assert [b.policy for b in after if b.policy] == [{1: (put(22),)}]
    sync.cancel()


async def test_set_proxy_port_reaches_the_datapath_after_the_sync_and_in_the_next_batch():
    c = Component()
    feed, recorder, resolver = c.feed, c.recorder, c.resolver
    with pytest.raises(ValueError, match="not a port number"):
        feed.set_proxy_port(65536)
    feed.set_proxy_port(4001)  # before the sync: kept for the batch after the full state
    c.ready.set()
    c.started.set()
    sync = asyncio.create_task(feed._sync(resolver, Handle()))
    await asyncio.wait_for(c.synced.wait(), 5)
    for _ in range(100):
        if recorder.batches:
            break
        await asyncio.sleep(0.01)
    assert recorder.batches[0].proxy_port == 4001
    feed.set_proxy_port(0)  # the proxy stopped
    for _ in range(100):
        if len(recorder.batches) > 1:
            break
        await asyncio.sleep(0.01)
    assert recorder.batches[-1].proxy_port == 0
    sync.cancel()


async def test_a_refused_batch_starts_the_feed_again_from_a_fresh_reconcile():
    c = Component()
    feed, recorder, resolver, table = c.feed, c.recorder, c.resolver, c.table
    ready, started, synced = c.ready, c.started, c.synced
    ready.set()
    started.set()
    sync = asyncio.create_task(feed._sync(resolver, Handle()))
    await asyncio.wait_for(synced.wait(), 5)
    recorder.refuse = RuntimeError("the datapath refused")
    table.upsert(PREFIX, entry(1001))
    with pytest.raises(ExceptionGroup) as failed:
        await asyncio.wait_for(sync, 5)  # the controller fails: the agent runs it again
    assert failed.group_contains(RuntimeError, match="refused")
    recorder.refuse = None
    recorder.calls.clear()
    table.upsert(PREFIX, entry(1002))  # while it was down: in the fresh full state
    again = asyncio.create_task(feed._sync(resolver, Handle()))
    for _ in range(100):
        if recorder.calls:
            break
        await asyncio.sleep(0.01)
    assert recorder.calls[0] == ("reconcile", {}, [entry(1002)])
    again.cancel()


async def test_applied_returns_once_the_ipcache_change_and_the_map_changes_it_caused_are_in():
    """What the DNS proxy waits for before a pod gets an answer: an ipcache upsert, and the
    map changes a resolver queues as it hears of the new identity, both applied."""
    c = Component()
    feed, recorder, resolver, table = c.feed, c.recorder, c.resolver, c.table
    slow = asyncio.Event()
    applying = recorder.apply

    async def apply_slowly(batch):  # a datapath taking its time over each batch
        await slow.wait()
        await applying(batch)
    recorder.apply = apply_slowly
    c.ready.set()
    c.started.set()
    feed.endpoint_added(endpoint(1))
    sync = asyncio.create_task(feed._sync(resolver, Handle()))
    slow.set()
    await asyncio.wait_for(c.synced.wait(), 5)
    slow.clear()
    table.upsert(PREFIX, entry(1003))
    resolver.queue.put_nowait({1: [put(443)]})  # the resolver's answer to the identity
    waiting = asyncio.create_task(feed.applied())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the datapath has not applied it yet
    slow.set()
    await asyncio.wait_for(waiting, 5)
    applied = recorder.batches
    assert entry(1003) in {e for b in applied for e in b.ipcache_upserts}
    assert put(443) in [c for b in applied for c in b.policy.get(1, ())]
    sync.cancel()
