"""Is a kvstore answering? Asked with a cheap read every few seconds.

A hung server (stopped, or partitioned away behind a route that drops packets) keeps its TCP
connection open and its watches silent: a client that only waits for events would report it
healthy forever. Asking through the kvstore contract works the same for every backend.
"""

import asyncio
import time

import attrs

from meshagent.kvstore import KVStore, KVStoreUnavailable

PROBE_INTERVAL = 3.0  # seconds between probes of a store that answers
PROBE_INTERVAL_FAILING = 1.0  # ... of one that does not: its return is noticed within a second
PROBE_TIMEOUT = 3.0
SILENCE_LIMIT = 9.0  # a watched store silent this long is given up and connected to again


class KVStoreSilent(KVStoreUnavailable):
    """A store connected to has not answered for ``SILENCE_LIMIT`` seconds."""


@attrs.define
class Liveness:
    """When a store last answered, and why it has not since."""

    key: str  # what to read: any key; only the answer matters
    last_answer: float = attrs.field(factory=time.monotonic)
    failing: bool = False
    last_error: str = ""

    def silence(self) -> float:
        """Seconds since the store last answered, while it is not answering (else 0)."""
        return time.monotonic() - self.last_answer if self.failing else 0.0

    def describe(self) -> str:
        return f"no answer for {self.silence():.0f}s ({self.last_error})"

    def answered(self) -> None:
        """The store proved alive another way (a connection, a listing)."""
        self.last_answer = time.monotonic()
        self.failing = False
        self.last_error = ""

    async def probe(self, store: KVStore) -> bool:
        """Ask once; True when the store answered in time."""
        try:
            await asyncio.wait_for(store.get(self.key), PROBE_TIMEOUT)
        except asyncio.TimeoutError:
            self.no_answer(f"timed out after {PROBE_TIMEOUT:.0f}s")
            return False
        except Exception as exc:  # noqa: BLE001 - any failure of a store means no answer
            self.no_answer(str(exc) or type(exc).__name__)
            return False
        self.answered()
        return True

    def no_answer(self, error: str) -> None:
        """The store failed to answer (a probe, a connection attempt)."""
        self.failing = True
        self.last_error = error

    async def watch(self, store: KVStore) -> None:
        """Probe ``store`` until it has been silent ``SILENCE_LIMIT`` seconds, then raise.

        Run beside a sync: the raise tears the sync down, so the connection is made again
        instead of waiting on a server that will never speak.
        """
        self.answered()
        while True:
            await asyncio.sleep(PROBE_INTERVAL if not self.failing else PROBE_INTERVAL_FAILING)
            if not await self.probe(store) and self.silence() >= SILENCE_LIMIT:
                raise KVStoreSilent(self.describe())
