"""Controllers: the agent's long-running jobs, each restarted with backoff when it fails.

A controller's ``run`` gets a handle; it calls ``handle.ready()`` once its initial work is done
(a list complete, a connection up). The agent is ready when every controller is. Failures are
counted and shown in ``meshagent status`` so a user can see which job is stuck and why.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import attrs

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


class ControllerHandle:
    """What a running controller uses to report progress."""

    def __init__(self, state: "ControllerState", on_ready: Callable[[], None]):
        self._state = state
        self._on_ready = on_ready

    def ready(self) -> None:
        """The initial work is done; also clears the failure streak after a recovery."""
        self._state.consecutive_failures = 0
        if not self._state.ready:
            self._state.ready = True
            self._state.ready_at = time.time()
            self._on_ready()


@attrs.define
class Controller:
    """A named coroutine function run for the agent's lifetime."""

    name: str
    run: Callable[[ControllerHandle], Awaitable[None]]


@attrs.define
class ControllerState:
    name: str
    plugin: str
    ready: bool = False
    ready_at: float | None = None
    running: bool = False
    done: bool = False
    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_error_at: float | None = None

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures == 0


class ControllerManager:
    """Runs controllers as tasks it keeps; cancels them all at shutdown, waiting a bounded time.

    Not a TaskGroup: leaving a TaskGroup waits for every task, and a controller that ignores
    cancellation must not keep the agent from exiting after ``--shutdown-timeout``.
    """

    def __init__(self) -> None:
        self.states: dict[str, ControllerState] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._all_ready = asyncio.Event()
        self._retry = asyncio.Event()  # set (and replaced) by retry_now

    def start(self, controller: Controller, plugin: str) -> None:
        if controller.name in self.states:
            raise ValueError(f"controller {controller.name!r} started twice")
        state = ControllerState(controller.name, plugin)
        self.states[controller.name] = state
        self._all_ready.clear()
        self._tasks[controller.name] = asyncio.create_task(
            self._supervise(controller, state), name=f"controller:{controller.name}"
        )

    async def _supervise(self, controller: Controller, state: ControllerState) -> None:
        backoff = BACKOFF_START
        handle = ControllerHandle(state, self._check_ready)
        while True:
            state.running = True
            state.runs += 1
            started = time.monotonic()
            try:
                await controller.run(handle)
            except asyncio.CancelledError:
                state.running = False
                raise
            except Exception as exc:
                state.failures += 1
                state.consecutive_failures += 1
                state.last_error = f"{type(exc).__name__}: {exc}"
                state.last_error_at = time.time()
                log.warning("controller %s failed (%d in a row), retrying in %.1fs: %s",
                            controller.name, state.consecutive_failures, backoff, state.last_error,
                            exc_info=log.isEnabledFor(logging.DEBUG))
                state.running = False
                if time.monotonic() - started > BACKOFF_MAX:
                    backoff = BACKOFF_START  # it had been working: retry soon
                woken = await self._wait_backoff(backoff)
                backoff = BACKOFF_START if woken else min(backoff * 2, BACKOFF_MAX)
                continue
            # A controller that returns has finished its job; that counts as ready.
            state.running = False
            state.done = True
            handle.ready()
            return

    async def _wait_backoff(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if :meth:`retry_now` is called; True if it was."""
        retry = self._retry
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(retry.wait(), seconds)
        return retry.is_set()

    def retry_now(self) -> None:
        """What failing controllers waited for is back (the kvstore answers again): every
        controller sleeping in its backoff runs again now instead of at its next tick."""
        retry, self._retry = self._retry, asyncio.Event()
        retry.set()

    def _check_ready(self) -> None:
        if all(s.ready for s in self.states.values()):
            self._all_ready.set()

    async def wait_ready(self) -> None:
        """Return once every controller started so far has reported ready."""
        self._check_ready()
        await self._all_ready.wait()

    @property
    def all_ready(self) -> bool:
        return all(s.ready for s in self.states.values())

    async def stop(self, timeout: float) -> None:
        """Cancel every controller and wait up to ``timeout`` for them to finish."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                log.warning("%s did not stop within %.1fs; abandoning it", task.get_name(), timeout)
