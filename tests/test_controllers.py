"""Controllers: readiness, restart with backoff, and failures visible in status."""

import asyncio

import meshagent
from meshagent.plugins.memory.store import shared_store
from meshagent.runtime.controller import Controller, ControllerManager


async def test_failing_controller_is_retried_until_it_succeeds():
    attempts = []

    async def flaky(handle):
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) < 3:
            raise ConnectionError(f"attempt {len(attempts)} failed")
        handle.ready()
        await asyncio.sleep(3600)

    manager = ControllerManager()
    manager.start(Controller("flaky", flaky), "test")
    await asyncio.wait_for(manager.wait_ready(), 5)
    state = manager.states["flaky"]
    assert state.failures == 2 and state.consecutive_failures == 0 and state.healthy
    assert state.last_error == "ConnectionError: attempt 2 failed"
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[1] > gaps[0] * 1.5  # backoff grows
    await manager.stop(1)
    assert manager.states["flaky"].running is False


async def test_controller_that_returns_counts_as_ready_and_done():
    async def once(handle):
        return None

    manager = ControllerManager()
    manager.start(Controller("once", once), "test")
    await asyncio.wait_for(manager.wait_ready(), 1)
    assert manager.states["once"].done and manager.all_ready


class Broken:
    @meshagent.hookimpl
    def meshagent_controllers(self):
        async def broken(handle):
            raise RuntimeError("cannot reach the frobnicator")
        return [Controller("frobnicate", broken)]


async def test_failing_controller_shows_in_status_and_keeps_agent_unready(agent_factory):
    running = await agent_factory(extra_plugins=[("broken", Broken())], wait_ready=False)
    await asyncio.sleep(0.3)
    status = await running.client.request("GET", "/status", params={"verbose": "1"})
    controllers = next(s for s in status["sections"] if s["name"] == "Controllers")
    assert controllers["health"] == "Warning"
    assert "failing: frobnicate: RuntimeError: cannot reach the frobnicator" in controllers["summary"]
    assert any(d.startswith("frobnicate [broken]: starting, ") for d in controllers["details"])
    assert status["ready"] is False
    health = await running.client.request("GET", "/healthz", ok=(503,))
    assert health == {"ready": False}


async def test_kvstore_outage_at_start_is_retried_and_reported(agent_factory):
    store = shared_store("outage")
    store.set_available(False)
    running = await agent_factory(["--plugins", "memory", "--memory-store", "outage"],
                                  wait_ready=False)
    await asyncio.sleep(0.2)
    status = await running.client.request("GET", "/status")
    kvstore = next(s for s in status["sections"] if s["name"] == "KVStore")
    assert kvstore["health"] == "Failure" and "unavailable" in kvstore["summary"]
    assert status["ready"] is False
    store.set_available(True)
    async with asyncio.timeout(5):
        while not running.agent.ready:
            await asyncio.sleep(0.05)
    status = await running.client.request("GET", "/status")
    kvstore = next(s for s in status["sections"] if s["name"] == "KVStore")
    assert kvstore["health"] == "Ok"
    assert running.agent.controllers.states["kvstore-connect"].failures >= 1


async def test_retry_now_wakes_a_controller_sleeping_in_a_long_backoff(monkeypatch):
    """A controller that waits for the kvstore must not sit out its backoff once it is back."""
    monkeypatch.setattr("meshagent.runtime.controller.BACKOFF_START", 60.0)
    attempts = []

    async def needs_the_store(handle):
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) == 1:
            raise ConnectionError("kvstore unavailable")
        handle.ready()
        await asyncio.sleep(3600)

    manager = ControllerManager()
    manager.start(Controller("publish", needs_the_store), "test")
    async with asyncio.timeout(1):
        while not attempts:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert len(attempts) == 1  # sleeping its 60 s backoff
    manager.retry_now()
    await asyncio.wait_for(manager.wait_ready(), 1)
    assert len(attempts) == 2 and attempts[1] - attempts[0] < 1
    await manager.stop(1)
