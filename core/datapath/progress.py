"""Which policy revision each local endpoint's datapath state reflects.

The datapath feed records it as it hands the resolver's changes over (Cilium's per-endpoint
policy revision); ``meshagent policy wait REV`` and ``policy import --wait`` wait on it, and
``meshagent endpoint list`` shows it.
"""

import asyncio
import time
from collections.abc import Iterable

from meshagent.errors import MeshagentError


class PolicyWaitTimeout(MeshagentError):
    """Some endpoint did not reach the revision in time; the message names them."""


class PolicyProgress:
    def __init__(self) -> None:
        # every local endpoint announced -> the revision its datapath state reflects (0: none)
        self.revisions: dict[int, int] = {}
        self._moved = asyncio.Event()

    def announced(self, endpoint_id: int) -> None:
        self.revisions.setdefault(endpoint_id, 0)

    def realized(self, endpoints: Iterable[int], revision: int) -> None:
        """The datapath state of ``endpoints`` now reflects ``revision`` (or a later one)."""
        for endpoint_id in endpoints:
            if endpoint_id in self.revisions and self.revisions[endpoint_id] < revision:
                self.revisions[endpoint_id] = revision
        self._wake()

    def forget(self, endpoint_id: int) -> None:
        """The endpoint is gone: nobody waits for it any more."""
        self.revisions.pop(endpoint_id, None)
        self._wake()

    def _wake(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()

    def behind(self, revision: int) -> dict[int, int]:
        """The endpoints whose state does not reflect ``revision`` yet, with theirs."""
        return {e: r for e, r in self.revisions.items() if r < revision}

    async def wait(self, revision: int, timeout: float) -> None:
        """Until every local endpoint (as they come and go) reflects ``revision``;
        PolicyWaitTimeout naming the laggards after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while behind := self.behind(revision):
            left = deadline - time.monotonic()
            if left <= 0:
                shown = ", ".join(f"{e} (at {r})" for e, r in sorted(behind.items())[:10])
                raise PolicyWaitTimeout(
                    f"policy revision {revision} not enforced within {timeout:g}s on"
                    f" {len(behind)} endpoint(s): {shown}")
            try:
                await asyncio.wait_for(self._moved.wait(), left)
            except TimeoutError:
                pass
