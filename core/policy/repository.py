"""The policy repository: the cluster's rules from every source, numbered by revision.

Policies live in the local cluster's kvstore (``meshagent/policies/v1/<kind>/<ns>/<name>``, the
original document as JSON), so every agent of the cluster enforces the same set; remote clusters
never see them. Source plugins (Kubernetes CRDs) feed more through ``meshagent_policy_source``.
Every change, whatever its source, bumps the revision by one and is handed, in order, to the
loaded resolver (:meth:`meshagent.policy.PolicyResolver.apply`) — so a resolver receives every
source's rules whether or not it wraps the default one.

A policy naming Services (``toServices``) reaches the resolver translated into the peers those
Services stand for (:mod:`meshagent.policy.services`), and again, with a new revision, whenever
that translation changes with the cluster's Services; ``policies()`` keeps it as written.

``store`` and ``delete`` go through the kvstore and return once the change has come back by
watch and been applied here, with the revision it made (``meshagent policy import`` prints it;
``meshagent policy wait`` waits for it to be enforced).
"""

import asyncio
import logging
from collections.abc import Callable

from meshagent import hookimpl
from meshagent.events import ChangeKind
from meshagent.identity.cidr import CIDRIdentities
from meshagent.kvstore import KVStore
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstore.follow import follow_prefix
from meshagent.model.service import Service
from meshagent.model.table import Tables
from meshagent.policy.api import Policy, PolicyError
from meshagent.policy.contract import (
    LegacyPolicyResolver,
    PolicyKey,
    PolicyResolver,
    PolicyUpdate,
)
from meshagent.policy.cidr import policy_cidrs
from meshagent.policy.services import names_any, names_services, translate
from meshagent.policy.worker import PolicyParser
from meshagent.runtime.controller import Controller, ControllerHandle
from meshagent.runtime.status import Health, StatusSection

log = logging.getLogger(__name__)

#: How long ``store``/``delete`` wait for their change to come back from the kvstore.
APPLY_TIMEOUT = 30.0


def policy_key(policy: Policy) -> str:
    return kvkeys.policy_key(policy.kind, policy.namespace, policy.name)


class Repository:
    """Meets :class:`meshagent.policy.PolicyRepository`; registered as plugin
    ``core.policy-repository`` (its controllers follow the kvstore and every source)."""

    def __init__(self, store: KVStore, resolver: PolicyResolver,
                 sources: Callable[[], list[tuple[str, object]]], tables: Tables, cluster: str,
                 *, node_selector_labels: bool = False):
        self.kvstore = store
        self.node_selector_labels = node_selector_labels  # fromNodes/toNodes allowed
        self.resolver = resolver
        self.tables = tables  # CIDR identities of the rules go in, for any resolver
        self.cidr_identities = CIDRIdentities(cluster)
        self.sources = sources  # (plugin, async iterable of PolicyUpdate) of source plugins
        self.parser = PolicyParser()
        self.rules: dict[PolicyKey, Policy] = {}
        self.translated: dict[PolicyKey, Policy] = {}  # as the resolver has them
        self.naming_services: set[PolicyKey] = set()  # the policies with toServices items
        # the cluster's services by (namespace, name), as toServices sees them
        self.services: dict[tuple[str, str], Service] = {}
        self._changed_services: list[Service] = []  # old and new versions, not re-translated yet
        self._services_wake = asyncio.Event()
        self.revision = 0
        self.kv_keys: dict[str, PolicyKey] = {}  # kvstore key -> policy key
        self.rejected: dict[str, str] = {}  # kvstore key -> why its document was refused
        self._lock = asyncio.Lock()  # one change at a time, in order, to the resolver
        # kvstore key -> (the value it must have come back with, None: gone; the future)
        self._awaited: dict[str, list[tuple[bytes | None, asyncio.Future]]] = {}

    # -- the PolicyRepository contract ----------------------------------------------------------

    async def import_policies(self, text: str, source: str) -> list[Policy]:
        """Validate (raises PolicyError); storing them is :meth:`store`'s job. Parsed in the
        policy worker process: a big import neither stalls the agent nor can exhaust it."""
        policies = await self.parser.parse_text(text, source)
        for policy in policies:
            policy.check_node_peers(self.node_selector_labels)
        return policies

    async def store(self, policies: list[Policy]) -> int:
        waits = []
        for policy in policies:
            key, value = policy_key(policy), policy.document_json.encode()
            waits.append((key, self._await(key, value)))
            await self.kvstore.put(key, value)
        await self._applied(waits)
        return self.revision

    async def delete(self, kind: str, namespace: str | None, name: str) -> int | None:
        key = kvkeys.policy_key(kind, namespace, name)
        wait = self._await(key, None)
        if not await self.kvstore.delete(key):
            self._forget(key, wait)
            return None
        await self._applied([(key, wait)])
        return self.revision

    def policies(self) -> list[Policy]:
        return sorted(self.rules.values(), key=lambda p: p.key)

    # -- waiting for our own writes to come back ------------------------------------------------

    def _await(self, key: str, value: bytes | None) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._awaited.setdefault(key, []).append((value, future))
        return future

    def _forget(self, key: str, future: asyncio.Future) -> None:
        waiting = [w for w in self._awaited.get(key, []) if w[1] is not future]
        if waiting:
            self._awaited[key] = waiting
        else:
            self._awaited.pop(key, None)

    def _arrived(self, key: str, value: bytes | None, refused: str = "") -> None:
        """``key`` came back with ``value`` (None: deleted) and was applied (or refused)."""
        waiting = self._awaited.pop(key, [])
        kept = []
        for wanted, future in waiting:
            if future.done():
                continue
            if wanted != value:
                kept.append((wanted, future))
            elif refused:
                future.set_exception(PolicyError(refused))
            else:
                future.set_result(None)
        if kept:
            self._awaited[key] = kept

    async def _applied(self, waits: list[tuple[str, asyncio.Future]]) -> None:
        try:
            async with asyncio.timeout(APPLY_TIMEOUT):
                await asyncio.gather(*(future for _, future in waits))
        except TimeoutError:
            for key, future in waits:  # nobody waits for them any more
                self._forget(key, future)
            raise PolicyError(f"stored, but not applied on this node within {APPLY_TIMEOUT:.0f}s"
                              " (is the kvstore answering? see meshagent status)") from None

    # -- inputs ---------------------------------------------------------------------------------

    async def apply(self, update: PolicyUpdate) -> int:
        """One change from any source: the rules, the revision, then the resolver, in order.
        A delete of a policy that is not there changes nothing."""
        async with self._lock:
            key = update.policy_key
            if update.kind is ChangeKind.DELETE and key not in self.rules:
                return self.revision
            if update.kind is ChangeKind.UPSERT:
                self.rules[key] = update.policy
                if names_services(update.policy):
                    self.naming_services.add(key)
                else:
                    self.naming_services.discard(key)
                await self._put(key, translate(update.policy, self.services.values()))
            else:
                del self.rules[key]
                self.naming_services.discard(key)
                await self._put(key, None)
            return self.revision

    async def _put(self, key: PolicyKey, translated: Policy | None) -> None:
        """Hand the resolver a policy as translated (None: deleted), with a new revision."""
        old = self.translated.pop(key, None)
        if translated is not None:
            self.translated[key] = translated
        # the new rules' CIDRs exist before they are resolved; the old version's stay
        # until it is out of force
        self._cidr_identities([old] if old is not None else [])
        self.revision += 1
        update = PolicyUpdate(ChangeKind.UPSERT, translated) if translated is not None else \
            PolicyUpdate(ChangeKind.DELETE, key=key)
        await self.resolver.apply(update, self.revision)
        self._cidr_identities([])

    def services_changed(self, services: list[Service]) -> None:
        """The cluster's Services are now ``services``: the policies naming one that changed
        are translated again (controller ``policy-services``)."""
        new = {(s.namespace, s.name): s for s in services}
        old = self.services
        self._changed_services += [s for k, s in old.items() if new.get(k) != s]
        self._changed_services += [s for k, s in new.items() if old.get(k) != s]
        self.services = new
        if self._changed_services:
            self._services_wake.set()

    async def _follow_services(self, handle: ControllerHandle) -> None:
        """Controller: re-translate the policies whose ``toServices`` items select a Service
        that changed (its old or new version); only those whose translation differs reach
        the resolver again."""
        handle.ready()
        while True:
            await self._services_wake.wait()
            self._services_wake.clear()
            changed, self._changed_services = self._changed_services, []
            async with self._lock:
                for key in sorted(self.naming_services):
                    policy = self.rules[key]
                    if not names_any(policy, changed):
                        continue
                    translated = translate(policy, self.services.values())
                    if translated != self.translated.get(key):
                        await self._put(key, translated)
                    await asyncio.sleep(0)  # many such policies do not hold the loop

    def _cidr_identities(self, also: list[Policy]) -> None:
        """Every CIDR (and except) of the rules (and of ``also``) gets a node-local identity
        and an ipcache prefix, so the datapath can tell those destinations apart from the rest
        of the world; any resolver sees them as identity events."""
        self.cidr_identities.apply_to(self.tables,
                                      policy_cidrs([*self.translated.values(), *also]))

    async def _sync_kvstore(self, handle: ControllerHandle) -> None:
        """List then watch the cluster's policies; a bad document is refused, not fatal."""
        await follow_prefix(self.kvstore, kvkeys.POLICIES, self._apply_stored,
                            lambda: list(self.kv_keys), handle.ready)

    async def _apply_stored(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.rejected.pop(key, None)
            if key in self.kv_keys:
                await self.apply(PolicyUpdate(ChangeKind.DELETE, key=self.kv_keys.pop(key)))
            self._arrived(key, None)
            return
        try:
            policy = await self.parser.parse_stored(value, key)
            policy.check_node_peers(self.node_selector_labels)
        except PolicyError as exc:
            self.rejected[key] = str(exc)
            log.error("refusing stored policy %s: %s (the last good version stays)", key, exc)
            self._arrived(key, value, refused=str(exc))
            return
        self.rejected.pop(key, None)
        self.kv_keys[key] = policy.key
        await self.apply(PolicyUpdate(ChangeKind.UPSERT, policy))
        self._arrived(key, value)

    async def _run_source(self, source, handle: ControllerHandle) -> None:
        handle.ready()
        async for update in source:
            if update.kind is ChangeKind.UPSERT:
                try:
                    update.policy.check_node_peers(self.node_selector_labels)
                except PolicyError as exc:
                    log.error("refusing %s: %s", update.policy.display, exc)
                    continue
            await self.apply(update)

    async def close(self) -> None:
        await self.parser.close()

    @hookimpl
    def meshagent_controllers(self):
        controllers = [Controller("policy-sync", self._sync_kvstore),
                       Controller("policy-services", self._follow_services)]
        for plugin, source in self.sources():
            controllers.append(Controller(f"policy-source-{plugin}",
                                          lambda h, s=source: self._run_source(s, h)))
        return controllers

    # -- visibility -----------------------------------------------------------------------------

    @hookimpl
    def meshagent_status(self, verbose):
        enforcing, endpoints = self.resolver.enforcing()
        summary = (f"revision {self.revision}, {len(self.rules)} policies,"
                   f" {enforcing}/{endpoints} endpoints enforcing")
        details = [p.display for p in self.policies()]
        details += [f"refused {key}: {why}" for key, why in sorted(self.rejected.items())]
        return StatusSection("Policy", Health.WARNING if self.rejected else Health.OK, summary,
                             details=details)


class LegacyResolverShim:
    """A resolver written for meshagent 0.1's slot, which holds the rules itself: it stays its
    own repository (its ``import_policies``, ``store``, ``delete``, ``policies``), and source
    plugins reach it only if it consumes them itself, as in 0.1. Loaded for one release with a
    deprecation warning; removed in 0.3 (docs/writing-plugins.md)."""

    def __init__(self, legacy: LegacyPolicyResolver, name: str):
        self.legacy = legacy
        log.warning("policy resolver %r is written for meshagent 0.1's policy-resolver slot"
                    " (it holds the rules itself): loaded through a shim, deprecated, removed in"
                    " 0.3; see docs/writing-plugins.md, 'Policy resolvers'", name)

    # as the repository
    async def import_policies(self, text: str, source: str) -> list[Policy]:
        return await self.legacy.import_policies(text, source)

    async def store(self, policies: list[Policy]) -> int:
        await self.legacy.store(policies)
        return self.legacy.revision

    async def delete(self, kind: str, namespace: str | None, name: str) -> int | None:
        return self.legacy.revision if await self.legacy.delete(kind, namespace, name) else None

    def policies(self) -> list[Policy]:
        return self.legacy.policies()

    # as the resolver
    async def apply(self, update: PolicyUpdate, revision: int) -> None:
        """Never called: a legacy resolver is its own repository."""

    @property
    def revision(self) -> int:
        return self.legacy.revision

    def enforcing(self) -> tuple[int, int]:
        return 0, 0  # 0.1's contract does not say

    def trace(self, dst_endpoint: int, port: int, protocol: str = "TCP", **source) -> dict:
        return self.legacy.trace(dst_endpoint, port, protocol, **source)

    def snapshot(self):
        return self.legacy.snapshot()

    async def changes(self):
        return await self.legacy.changes()

    async def close(self) -> None:
        await self.legacy.close()


def adapt_resolver(built: object, name: str) -> "LegacyResolverShim | None":
    """A resolver of 0.1's contract, shimmed; None for any other (the slot's check judges
    it: a resolver of today's contract passes)."""
    if isinstance(built, LegacyPolicyResolver) and not isinstance(built, PolicyResolver):
        return LegacyResolverShim(built, name)
    return None
