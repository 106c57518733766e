"""follow_prefix's listing: every key applied page by page, cyclic GC paused only while a page
is applied, and left as the caller had it whatever the apply does."""

import asyncio
import gc

import pytest

from meshagent.kvstore.follow import Position, follow_prefix


async def listed(store, apply) -> Position:
    """Run follow_prefix until its first listing is applied; the position it reached."""
    position = Position()
    done = asyncio.Event()
    task = asyncio.create_task(follow_prefix(store, "p/", apply, lambda: [], done.set, position))
    waiter = asyncio.create_task(done.wait())
    await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    task.cancel()
    results = await asyncio.gather(task, return_exceptions=True)
    if isinstance(results[0], Exception):
        raise results[0]
    return position


async def test_a_listing_applies_every_page_with_collection_paused(memory_kvstore):
    for i in range(25):
        await memory_kvstore.put(f"p/{i:02}", str(i).encode())
    seen, collecting = {}, set()

    def apply(key, value):
        seen[key] = value
        collecting.add(gc.isenabled())
    original = memory_kvstore.list_pages
    memory_kvstore.list_pages = lambda prefix: original(prefix, page_size=10)  # three pages
    assert gc.isenabled()
    position = await listed(memory_kvstore, apply)
    assert seen == {f"p/{i:02}": str(i).encode() for i in range(25)}
    assert collecting == {False}
    assert gc.isenabled()
    assert position.revision is not None


async def test_collection_is_left_as_it_was_when_the_apply_raises(memory_kvstore):
    await memory_kvstore.put("p/a", b"1")

    def apply(key, value):
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError):
        await listed(memory_kvstore, apply)
    assert gc.isenabled()
    gc.disable()
    try:
        await listed(memory_kvstore, lambda key, value: None)
        assert not gc.isenabled()  # the caller's choice stays
    finally:
        gc.enable()
