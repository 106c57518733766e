"""Test helpers for meshagent and its plugins: the kvstore contract suite and pytest fixtures.

Installed as the pytest plugin ``meshagent`` (entry point ``pytest11``), so a third-party
plugin's tests get the fixtures without a conftest.
"""

import asyncio
import time


async def eventually(predicate, timeout: float = 5.0, what: str = "condition",
                     interval: float = 0.02) -> None:
    """Wait until ``predicate()`` is true, or fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(interval)
