"""Parsing policy documents away from the agent: in a worker process with a memory limit.

Parsing YAML is pure CPU (a 10,000-rule policy takes seconds) and holds the interpreter for
stretches no thread switch breaks, so the agent would not answer ``status`` meanwhile; and a
document that slips past the input limits (meshagent.policy.api) could still cost memory. In a
worker process with an address-space limit, neither reaches the agent: it keeps answering, and
a document that blows the limit kills the worker (started again for the next one), not the
agent. The worker is ``python -m meshagent.policy.worker``; requests and answers are pickles
framed by their length on its stdin and stdout (it is our own child: nothing else writes
there).
"""

import asyncio
import contextlib
import gc
import json
import pickle
import resource
import struct
import sys

import attrs

from meshagent.policy.api import Policy, PolicyError, parse_document, parse_policies

WORKER_MEMORY = 1024 * 1024 * 1024  # bytes of address space the worker may use
_LENGTH = struct.Struct("!I")
LARGE_POLICY = 1000  # rule items: from here on, building it holds Python's full collections
_held = 0


@contextlib.contextmanager
def collections_held(hold: bool):
    """While a large policy is built, hold Python's automatic collections: a full one walks
    every object there is, and with a 10,000-rule policy half-built that is 100+ ms in which
    the agent answers nobody. The long-lived objects made meanwhile are then frozen out of
    later full collections (they go by reference counting when the policy goes)."""
    global _held
    if not hold:
        yield
        return
    _held += 1
    gc.disable()
    try:
        yield
    finally:
        _held -= 1
        if _held == 0:
            gc.freeze()
            gc.enable()


def rule_count(policy: Policy) -> int:
    return sum(len(r.ingress) + len(r.ingress_deny) + len(r.egress) + len(r.egress_deny)
               for r in policy.rules)


CHUNK = 500  # rule items per pickle: what the agent unpacks between two looks at its loop


def _packed(policy: Policy) -> tuple:
    """A policy in pieces the agent can unpack a few at a time: its document as JSON (which
    the agent's C decoder reads at once), and each rule's sections in chunks."""
    rules = []
    for rule in policy.rules:
        sections = {name: [pickle.dumps(items[i:i + CHUNK])
                           for i in range(0, len(items), CHUNK)]
                    for name, items in (("ingress", rule.ingress),
                                        ("ingress_deny", rule.ingress_deny),
                                        ("egress", rule.egress),
                                        ("egress_deny", rule.egress_deny))}
        shell = attrs.evolve(rule, ingress=(), ingress_deny=(), egress=(), egress_deny=())
        rules.append((pickle.dumps(shell), sections))
    return (policy.document_json, policy.kind, policy.name, policy.namespace, rules,
            policy.uid, policy.description)


def _parse_text(text: str, source: str) -> list[tuple]:
    return [_packed(p) for p in parse_policies(text, source)]


def _parse_stored(value: bytes, where: str) -> list[tuple]:
    try:
        document = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{where}: not a JSON policy document: {str(exc)[:200]}") from None
    return [_packed(parse_document(document, where))]


async def _unpacked(packed: tuple) -> Policy:
    """The policy again, unpickled a chunk at a time with the loop free in between."""
    document, kind, name, namespace, parts, uid, description = packed
    chunks = sum(len(c) for _, sections in parts for c in sections.values())
    with collections_held(chunks * CHUNK >= LARGE_POLICY):
        policy = await _unpack(document, kind, name, namespace, parts)
    return attrs.evolve(policy, uid=uid, description=description)


async def _unpack(document, kind, name, namespace, parts) -> Policy:
    rules = []
    for shell, sections in parts:
        fields = {}
        for section, chunks in sections.items():
            items: list = []
            for chunk in chunks:
                items.extend(pickle.loads(chunk))
                await asyncio.sleep(0)
            fields[section] = tuple(items)
        rules.append(attrs.evolve(pickle.loads(shell), **fields))
        if len(rules) % CHUNK == 0:
            await asyncio.sleep(0)
    return Policy(kind, name, namespace, tuple(rules), document)


OPERATIONS = {"text": _parse_text, "stored": _parse_stored}


def serve(memory: int) -> None:
    """The worker's loop: one request at a time until stdin closes."""
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = source.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            return
        operation, args = pickle.loads(source.read(_LENGTH.unpack(head)[0]))
        try:
            answer = ("ok", OPERATIONS[operation](*args))
        except PolicyError as exc:
            answer = ("error", str(exc))
        except (RecursionError, MemoryError) as exc:
            answer = ("error", f"{args[-1]}: too large or too deeply nested to parse"
                               f" ({type(exc).__name__})")
        data = pickle.dumps(answer)
        sink.write(_LENGTH.pack(len(data)) + data)
        sink.flush()


class PolicyParser:
    """One worker process, started on first use and again after it died."""

    def __init__(self, memory: int = WORKER_MEMORY):
        self.memory = memory
        self._child: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def _ask(self, operation: str, *args):
        async with self._lock:
            if self._child is None or self._child.returncode is not None:
                self._child = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "meshagent.policy.worker", str(self.memory),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            child = self._child
            request = pickle.dumps((operation, args))
            try:
                child.stdin.write(_LENGTH.pack(len(request)) + request)
                await child.stdin.drain()
                size = _LENGTH.unpack(await child.stdout.readexactly(_LENGTH.size))[0]
                status, value = pickle.loads(await child.stdout.readexactly(size))
            except (asyncio.IncompleteReadError, ConnectionError):
                await self._reap()
                raise PolicyError(f"{args[-1]}: parsing it exhausted the parser's memory limit"
                                  f" ({self.memory // (1024 * 1024)} MiB)") from None
        if status == "error":
            raise PolicyError(value)
        return value

    async def parse_text(self, text: str, source: str) -> list[Policy]:
        """Every policy of an import (PolicyError names document, field and problem)."""
        return [await _unpacked(p) for p in await self._ask("text", text, source)]

    async def parse_stored(self, value: bytes, where: str) -> Policy:
        """A stored policy document (JSON)."""
        return await _unpacked((await self._ask("stored", value, where))[0])

    async def _reap(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.returncode is None:
            child.kill()
        if child is not None:
            await child.wait()

    async def close(self) -> None:
        if self._child is not None and self._child.returncode is None:
            self._child.stdin.close()
        await self._reap()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
