"""The kvstore contract: behaviour every kvstore backend must show, as a reusable test class.

A backend's tests subclass :class:`KVStoreContract` and provide one fixture::

    class TestMyStore(KVStoreContract):
        @pytest.fixture
        async def new_client(self):
            # every client reaches the same store; all are closed afterwards
            async with client_factory(lambda: MyStore(...)) as make:
                yield make

Each test uses keys under a fresh prefix, so a shared real server is fine. ``lease_ttl`` may be
overridden where the server has a minimum TTL (etcd rounds short leases up, Consul refuses
under 10 s). A backend without history (Consul: a watch sees the state, not each change) sets
``watch_keeps_every_change = False``: changes may then arrive coalesced, and the ordering test
checks what a coalescing watch must still get right — revisions in order, the final state.
"""

import asyncio
import contextlib
import uuid

import pytest

from meshagent.kvstore import EventType, KVStore, KVStoreUnavailable, LeaseExpired, WatchEvent


async def next_events(watch, count: int, timeout: float = 5.0) -> list[WatchEvent]:
    """The next ``count`` events of an open watch iterator, or fail after ``timeout``."""
    events = []
    async def take():
        async for event in watch:
            events.append(event)
            if len(events) == count:
                return
    await asyncio.wait_for(take(), timeout)
    return events


async def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return await predicate()


@contextlib.asynccontextmanager
async def client_factory(make_client):
    """``async with client_factory(lambda: MyStore(...)) as make:`` — ``await make()`` returns a
    connected client; every client made is closed on exit. For ``new_client`` fixtures."""
    clients = []

    async def make():
        client = make_client()
        await client.connect()
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.close()


class KVStoreContract:
    lease_ttl = 1.0
    watch_keeps_every_change = True

    @pytest.fixture
    async def new_client(self):
        pytest.fail("a KVStoreContract subclass must provide the new_client fixture")

    @pytest.fixture
    async def kv(self, new_client) -> KVStore:
        return await new_client()

    @pytest.fixture
    def prefix(self) -> str:
        return f"contract/{uuid.uuid4().hex[:12]}/"

    # -- get / put / delete -------------------------------------------------------------------

    async def test_conforms_to_protocol(self, kv):
        assert isinstance(kv, KVStore)

    async def test_put_get_roundtrip(self, kv, prefix):
        revision = await kv.put(prefix + "a", b"one")
        got = await kv.get(prefix + "a")
        assert got.key == prefix + "a" and got.value == b"one"
        assert got.mod_revision == revision and got.create_revision == revision
        assert await kv.get(prefix + "missing") is None

    async def test_overwrite_keeps_create_revision(self, kv, prefix):
        first = await kv.put(prefix + "a", b"one")
        second = await kv.put(prefix + "a", b"two")
        got = await kv.get(prefix + "a")
        assert second > first
        assert (got.value, got.create_revision, got.mod_revision) == (b"two", first, second)

    async def test_delete(self, kv, prefix):
        await kv.put(prefix + "a", b"one")
        assert await kv.delete(prefix + "a") is True
        assert await kv.get(prefix + "a") is None
        assert await kv.delete(prefix + "a") is False

    async def test_binary_values(self, kv, prefix):
        value = bytes(range(256))
        await kv.put(prefix + "bin", value)
        assert (await kv.get(prefix + "bin")).value == value

    async def test_clients_share_the_store(self, new_client, prefix):
        a, b = await new_client(), await new_client()
        await a.put(prefix + "shared", b"x")
        assert (await b.get(prefix + "shared")).value == b"x"

    # -- compare-and-swap -----------------------------------------------------------------------

    async def test_create_only_if_absent(self, kv, prefix):
        assert await kv.create(prefix + "c", b"first") is True
        assert await kv.create(prefix + "c", b"second") is False
        assert (await kv.get(prefix + "c")).value == b"first"

    async def test_update_if_revision_matches(self, kv, prefix):
        await kv.put(prefix + "c", b"v1")
        seen = await kv.get(prefix + "c")
        assert await kv.update_if(prefix + "c", b"v2", mod_revision=seen.mod_revision) is True
        # the revision moved on: a writer holding the old one loses
        assert await kv.update_if(prefix + "c", b"v3", mod_revision=seen.mod_revision) is False
        assert (await kv.get(prefix + "c")).value == b"v2"
        assert await kv.update_if(prefix + "absent", b"x", mod_revision=seen.mod_revision) is False

    async def test_delete_if_revision_matches(self, kv, prefix):
        await kv.put(prefix + "d", b"v1")
        seen = await kv.get(prefix + "d")
        await kv.put(prefix + "d", b"v2")
        assert await kv.delete_if(prefix + "d", mod_revision=seen.mod_revision) is False
        current = await kv.get(prefix + "d")
        assert await kv.delete_if(prefix + "d", mod_revision=current.mod_revision) is True
        assert await kv.get(prefix + "d") is None

    async def test_concurrent_create_has_one_winner(self, new_client, prefix):
        clients = [await new_client() for _ in range(3)]
        results = await asyncio.gather(*(
            c.create(prefix + "race", str(i).encode()) for i, c in enumerate(clients * 4)))
        assert results.count(True) == 1

    # -- batches --------------------------------------------------------------------------------

    async def test_create_many_writes_only_the_absent_keys(self, kv, prefix):
        await kv.put(prefix + "b", b"old-b")
        await kv.put(prefix + "d", b"old-d")
        before = {k: await kv.get(prefix + k) for k in "bd"}
        results = await kv.create_many([(prefix + k, f"new-{k}".encode()) for k in "abcde"])
        assert results == [None, before["b"], None, before["d"], None]
        values = {k: (await kv.get(prefix + k)).value for k in "abcde"}
        assert values == {"a": b"new-a", "b": b"old-b", "c": b"new-c", "d": b"old-d",
                          "e": b"new-e"}
        assert await kv.create_many([]) == []

    async def test_create_many_beyond_one_round_trip(self, kv, prefix):
        count = 300  # more than etcd's 128 ops in one txn
        await kv.put_many([(f"{prefix}{i:04}", b"taken") for i in range(0, count, 7)])
        results = await kv.create_many([(f"{prefix}{i:04}", b"mine") for i in range(count)])
        assert [i for i, r in enumerate(results) if r is not None] == list(range(0, count, 7))
        assert all(r.value == b"taken" and r.key == f"{prefix}{i:04}"
                   for i, r in enumerate(results) if r is not None)
        listing = await kv.list_prefix(prefix)
        assert len(listing.items) == count
        taken = len(range(0, count, 7))
        assert sum(item.value == b"mine" for item in listing.items) == count - taken

    async def test_create_many_concurrent_has_one_winner_per_key(self, new_client, prefix):
        clients = [await new_client() for _ in range(3)]
        keys = [f"{prefix}race{i}" for i in range(20)]
        results = await asyncio.gather(*(
            c.create_many([(k, str(n).encode()) for k in keys]) for n, c in enumerate(clients)))
        for i, key in enumerate(keys):
            created = [n for n, r in enumerate(results) if r[i] is None]
            assert len(created) == 1
            winner = str(created[0]).encode()
            assert all(r[i].value == winner for r in results if r[i] is not None)
            assert (await clients[0].get(key)).value == winner

    async def test_create_many_and_put_many_take_distinct_keys(self, kv, prefix):
        with pytest.raises(ValueError):
            await kv.create_many([(prefix + "a", b"1"), (prefix + "a", b"2")])
        with pytest.raises(ValueError):
            await kv.put_many([(prefix + "a", b"1"), (prefix + "a", b"2")])
        assert await kv.get(prefix + "a") is None

    async def test_put_many(self, kv, prefix):
        await kv.put(prefix + "0001", b"old")
        revision = await kv.put_many([(f"{prefix}{i:04}", str(i).encode()) for i in range(200)])
        listing = await kv.list_prefix(prefix)
        assert [item.value for item in listing.items] == [str(i).encode() for i in range(200)]
        assert revision == max(item.mod_revision for item in listing.items)
        assert await kv.put_many([]) == 0

    async def test_batches_on_a_lease(self, kv, prefix):
        lease = await kv.grant_lease(self.lease_ttl)
        await kv.put(prefix + "kept", b"no lease")
        await kv.create_many([(prefix + "c1", b"x"), (prefix + "kept", b"y")], lease=lease)
        await kv.put_many([(prefix + "p1", b"x"), (prefix + "p2", b"x")], lease=lease)
        assert (await kv.get(prefix + "c1")).lease == lease.id
        assert (await kv.get(prefix + "kept")).lease is None
        await kv.revoke(lease)
        assert await wait_until(lambda: _absent(kv, prefix + "p2"), 5.0)
        remaining = [item.key for item in (await kv.list_prefix(prefix)).items]
        assert remaining == [prefix + "kept"]
        with pytest.raises(LeaseExpired):
            await kv.create_many([(prefix + "late", b"x")], lease=lease)
        with pytest.raises(LeaseExpired):
            await kv.put_many([(prefix + "late", b"x")], lease=lease)
        assert await kv.get(prefix + "late") is None

    # -- prefix list ----------------------------------------------------------------------------

    async def test_list_prefix(self, kv, prefix):
        for name in ("b", "a", "sub/c"):
            await kv.put(prefix + name, name.encode())
        await kv.put(prefix.rstrip("/") + "-sibling", b"not mine")
        listing = await kv.list_prefix(prefix)
        assert sorted(item.key for item in listing.items) == [prefix + "a", prefix + "b",
                                                             prefix + "sub/c"]
        assert listing.revision >= max(item.mod_revision for item in listing.items)
        assert (await kv.list_prefix(prefix + "nothing/")).items == []

    async def test_list_pages(self, kv, prefix):
        for name in ("e", "b", "a", "sub/c", "d"):
            await kv.put(prefix + name, name.encode())
        await kv.put(prefix.rstrip("/") + "-sibling", b"not mine")
        whole = await kv.list_prefix(prefix)
        pages = []
        async for page in kv.list_pages(prefix, page_size=2):
            if not pages:  # later writes are not in the pages after the first
                await kv.put(prefix + "c", b"late")
            pages.append(page)
        assert [[item.key for item in page.items] for page in pages] == [
            [prefix + "a", prefix + "b"], [prefix + "d", prefix + "e"], [prefix + "sub/c"]]
        assert {page.revision for page in pages} == {whole.revision}
        empty = [page async for page in kv.list_pages(prefix + "nothing/")]
        assert len(empty) == 1 and empty[0].items == []

    async def test_delete_prefix(self, kv, prefix):
        for name in ("a", "b", "c/d"):
            await kv.put(prefix + name, b"x")
        await kv.put(prefix.rstrip("/") + "-sibling", b"kept")
        assert await kv.delete_prefix(prefix) == 3
        assert (await kv.list_prefix(prefix)).items == []
        assert await kv.get(prefix.rstrip("/") + "-sibling") is not None

    # -- watch ----------------------------------------------------------------------------------

    async def test_watch_sees_puts_and_deletes_in_order(self, kv, new_client, prefix):
        start = (await kv.list_prefix(prefix)).revision
        watch = kv.watch(prefix, after_revision=start)
        writer = await new_client()
        if not self.watch_keeps_every_change:
            await self._coalescing_watch(watch, writer, prefix)
            return
        consumer = asyncio.create_task(next_events(watch, 3))
        await asyncio.sleep(0.2)
        r1 = await writer.put(prefix + "w", b"1")
        await writer.put(prefix.rstrip("/") + "-other", b"not watched")
        r2 = await writer.put(prefix + "w", b"2")
        assert await writer.delete(prefix + "w") is True
        events = await consumer
        assert [(e.type, e.key, e.value) for e in events] == [
            (EventType.PUT, prefix + "w", b"1"),
            (EventType.PUT, prefix + "w", b"2"),
            (EventType.DELETE, prefix + "w", None),
        ]
        assert (events[0].revision, events[1].revision) == (r1, r2) and events[2].revision > r2
        await watch.aclose()

    async def _coalescing_watch(self, watch, writer, prefix):
        seen = []

        async def until_deleted():
            async for event in watch:
                seen.append(event)
                if event.type is EventType.DELETE:
                    return
        consumer = asyncio.create_task(until_deleted())
        await asyncio.sleep(0.2)
        await writer.put(prefix + "w", b"1")
        await writer.put(prefix.rstrip("/") + "-other", b"not watched")
        await writer.put(prefix + "w", b"2")
        assert await writer.delete(prefix + "w") is True
        await asyncio.wait_for(consumer, 15)
        assert all(e.key == prefix + "w" for e in seen)
        assert [e.revision for e in seen] == sorted(e.revision for e in seen)
        assert seen[-1].type is EventType.DELETE
        assert all(e.value in (b"1", b"2") for e in seen[:-1])
        await watch.aclose()

    async def test_watch_from_revision_replays_history(self, kv, prefix):
        listing = await kv.list_prefix(prefix)
        await kv.put(prefix + "x", b"1")
        await kv.put(prefix + "y", b"2")
        watch = kv.watch(prefix, after_revision=listing.revision)
        events = await next_events(watch, 2)
        assert [(e.key, e.value) for e in events] == [(prefix + "x", b"1"), (prefix + "y", b"2")]
        await watch.aclose()

    async def test_list_then_watch_misses_nothing(self, kv, new_client, prefix):
        writer = await new_client()
        for i in range(5):
            await writer.put(prefix + f"k{i}", b"before")
        listing = await kv.list_prefix(prefix)
        for i in range(5, 8):
            await writer.put(prefix + f"k{i}", b"after")
        watch = kv.watch(prefix, after_revision=listing.revision)
        events = await next_events(watch, 3)
        seen = {item.key for item in listing.items} | {e.key for e in events}
        assert seen == {prefix + f"k{i}" for i in range(8)}
        await watch.aclose()

    async def test_watch_resumes_from_last_revision(self, kv, prefix):
        start = (await kv.list_prefix(prefix)).revision
        await kv.put(prefix + "a", b"1")
        watch = kv.watch(prefix, after_revision=start)
        (first,) = await next_events(watch, 1)
        await watch.aclose()
        await kv.put(prefix + "b", b"2")  # happens while nobody watches
        resumed = kv.watch(prefix, after_revision=first.revision)
        (second,) = await next_events(resumed, 1)
        assert (second.key, second.value) == (prefix + "b", b"2")
        await resumed.aclose()

    # -- leases ---------------------------------------------------------------------------------

    async def test_lease_expiry_deletes_keys(self, kv, prefix):
        lease = await kv.grant_lease(self.lease_ttl)
        await kv.put(prefix + "leased", b"x", lease=lease)
        await kv.put(prefix + "kept", b"x")
        assert await kv.get(prefix + "leased") is not None
        assert await wait_until(lambda: _absent(kv, prefix + "leased"), self.lease_ttl + 5)
        assert await kv.get(prefix + "kept") is not None
        with pytest.raises(LeaseExpired):
            await kv.keepalive(lease)

    async def test_keepalive_keeps_keys(self, kv, prefix):
        lease = await kv.grant_lease(self.lease_ttl)
        await kv.put(prefix + "alive", b"x", lease=lease)
        for _ in range(4):
            await asyncio.sleep(self.lease_ttl / 2)
            await kv.keepalive(lease)
            assert await kv.get(prefix + "alive") is not None

    async def test_revoke_deletes_keys_and_notifies_watchers(self, kv, prefix):
        lease = await kv.grant_lease(30)
        await kv.put(prefix + "r", b"x", lease=lease)
        start = (await kv.list_prefix(prefix)).revision
        watch = kv.watch(prefix, after_revision=start)
        await kv.revoke(lease)
        assert await kv.get(prefix + "r") is None
        (event,) = await next_events(watch, 1)
        assert (event.type, event.key) == (EventType.DELETE, prefix + "r")
        await watch.aclose()

    async def test_put_on_expired_lease_fails(self, kv, prefix):
        lease = await kv.grant_lease(30)
        await kv.revoke(lease)
        with pytest.raises(LeaseExpired):
            await kv.put(prefix + "late", b"x", lease=lease)

    # -- locks ----------------------------------------------------------------------------------

    async def test_lock_excludes_other_clients(self, new_client, prefix):
        clients = [await new_client() for _ in range(3)]
        holders, overlaps = [], []

        async def critical(client, i):
            async with client.lock(prefix + "mutex"):
                holders.append(i)
                if len(holders) > 1:
                    overlaps.append(tuple(holders))
                await asyncio.sleep(0.05)
                holders.remove(i)

        await asyncio.wait_for(
            asyncio.gather(*(critical(c, i) for i, c in enumerate(clients * 2))), 30)
        assert overlaps == []

    async def test_lock_is_released_on_error(self, kv, prefix):
        with pytest.raises(RuntimeError):
            async with kv.lock(prefix + "mutex"):
                raise RuntimeError("boom")
        async with asyncio.timeout(5):
            async with kv.lock(prefix + "mutex"):
                pass

    # -- lifecycle ------------------------------------------------------------------------------

    async def test_status_reports_connected(self, kv):
        status = kv.status()
        assert status.connected is True and status.summary

    async def test_closed_client_is_unavailable(self, new_client, prefix):
        client = await new_client()
        await client.close()
        with pytest.raises(KVStoreUnavailable):
            await client.get(prefix + "a")
        assert client.status().connected is False


async def _absent(kv, key) -> bool:
    return await kv.get(key) is None
