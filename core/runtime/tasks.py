"""Running coroutines side by side where the first failure is the one that matters."""

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any


async def run_together(coroutines: Mapping[str, Coroutine[Any, Any, Any]]) -> None:
    """Run them as named tasks until every one returns. The first to raise cancels the others
    and its own exception is raised, not an ExceptionGroup: they share one cause (a store that
    went away), and the first error is the one that says it."""
    try:
        async with asyncio.TaskGroup() as tasks:
            for name, coroutine in coroutines.items():
                tasks.create_task(coroutine, name=name)
    except ExceptionGroup as group:
        raise group.exceptions[0] from None
