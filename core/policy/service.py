"""The default policy-resolver provider: the cluster's policies in, the datapath's maps out.

Policies live in the local cluster's kvstore (``meshagent/policies/v1/<kind>/<ns>/<name>``, the
original document as JSON), so every agent of the cluster enforces the same set; remote clusters
never see them. Plugins can feed more (Kubernetes CRDs) through ``meshagent_policy_source``.
Identities and endpoints arrive through the agent's events; the resolver's map changes are
handed over through the contract (``snapshot``, ``changes``) for the core to feed the datapath.
"""

import asyncio
import ipaddress
import logging
from collections.abc import Callable

import attrs

from meshagent import hookimpl
from meshagent.events import ChangeKind, PolicyChange
from meshagent.kvstore import KVStore
from meshagent.kvstore import keys as kvkeys
from meshagent.kvstore.follow import follow_prefix
from meshagent.model.identity import Identity, world_identity
from meshagent.model.ipcache import POLICY_SOURCE, IPCacheEntry
from meshagent.model.net import Network, family_order
from meshagent.model.table import Tables
from meshagent.policy.api import Policy, PolicyError
from meshagent.policy.cidr import cidr_identity, free_local_identity, policy_cidrs
from meshagent.policy.contract import ChangeQueue, EndpointChanges, MapChange, MapState
from meshagent.policy.resolver import EGRESS, INGRESS, PolicyEndpoint, Resolver, Trace, trace
from meshagent.policy.worker import LARGE_POLICY, PolicyParser, collections_held, rule_count
from meshagent.runtime.controller import Controller, ControllerHandle
from meshagent.runtime.status import Health, StatusSection

log = logging.getLogger(__name__)



@attrs.frozen
class PolicyUpdate:
    """What a policy source yields: an imported policy, or the key of a deleted one."""

    kind: ChangeKind
    policy: Policy | None = None
    key: tuple[str, str, str] | None = None


def policy_key(policy: Policy) -> str:
    return kvkeys.policy_key(policy.kind, policy.namespace, policy.name)


class PolicyService:
    def __init__(self, store: KVStore, cluster: str, tables: Tables,
                 policy_changed: Callable[..., None], *, default_local_cluster: bool):
        self.kvstore = store
        self.cluster = cluster
        self.tables = tables  # CIDR identities go in, sources are looked up by IP
        self.policy_changed = policy_changed  # tells the plugins (meshagent_policy_changed)
        self.resolver = Resolver(cluster, default_local_cluster=default_local_cluster,
                                 on_change=self._changed)
        self.pending = ChangeQueue()
        self.kv_keys: dict[str, tuple[str, str, str]] = {}  # kvstore key -> policy key
        self.rejected: dict[str, str] = {}  # kvstore key -> why its document was refused
        self.cidr_identities: dict[Network, Identity] = {}
        self.parser = PolicyParser()

    # -- the PolicyResolver contract ------------------------------------------------------------

    async def import_policies(self, text: str, source: str) -> list[Policy]:
        """Validate (raises PolicyError); storing them is :meth:`store`'s job. Parsed in the
        policy worker process: a big import neither stalls the agent nor can exhaust it."""
        return await self.parser.parse_text(text, source)

    async def store(self, policies: list[Policy]) -> None:
        for policy in policies:
            await self.kvstore.put(policy_key(policy), policy.document_json.encode())

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        key = kvkeys.policy_key(kind, namespace, name)
        return await self.kvstore.delete(key)

    def policies(self) -> list[Policy]:
        return sorted(self.resolver.policies.values(), key=lambda p: p.key)

    @property
    def revision(self) -> int:
        return self.resolver.revision

    # -- inputs ---------------------------------------------------------------------------------

    async def apply(self, update: PolicyUpdate) -> None:
        """Put a policy change in force without holding the loop: the policy's contributions
        and selectors are prepared a chunk at a time, then the endpoints recomputed one by
        one (status keeps answering during a 10,000-rule import)."""
        large = update.policy is not None and rule_count(update.policy) >= LARGE_POLICY
        with collections_held(large):
            await self._apply(update)

    async def _apply(self, update: PolicyUpdate) -> None:
        if update.kind is ChangeKind.UPSERT:
            policy = update.policy
            for _ in self.resolver.prepare(policy):
                await asyncio.sleep(0)
            self._refresh_cidr_identities(extra=policy)
            revision = self.resolver.stage_policy(policy)
            await self._catch_up()
            self.policy_changed(kind=ChangeKind.UPSERT, policy=PolicyChange(
                policy.name, policy.namespace, revision))
        else:
            old = self.resolver.policies.get(update.key)
            revision = self.resolver.stage_delete(update.key)
            await self._catch_up()
            self._refresh_cidr_identities()
            if old is not None:
                self.policy_changed(kind=ChangeKind.DELETE, policy=PolicyChange(
                    old.name, old.namespace, revision))

    async def _catch_up(self) -> None:
        while self.resolver.recompute_pending(1):
            await asyncio.sleep(0)
        for _ in self.resolver.forget_unused():
            await asyncio.sleep(0)

    def _refresh_cidr_identities(self, extra: Policy | None = None) -> None:
        """Every CIDR (and except) in the policies gets a node-local identity and an ipcache
        prefix, so the datapath can tell those destinations apart from the rest of the world."""
        wanted = policy_cidrs(list(self.resolver.policies.values()) + ([extra] if extra else []))
        tables, cluster = self.tables, self.cluster
        for prefix in sorted(set(self.cidr_identities) - wanted, key=family_order):
            identity = self.cidr_identities.pop(prefix)
            tables.ipcache.delete(prefix, POLICY_SOURCE)
            tables.identities.delete(identity.id)
        taken = {i.id for i in self.cidr_identities.values()}
        for prefix in sorted(wanted - set(self.cidr_identities), key=family_order):
            number = free_local_identity(taken)
            taken.add(number)
            identity = cidr_identity(number, prefix, cluster)
            self.cidr_identities[prefix] = identity
            tables.identities.upsert(number, identity)
            tables.ipcache.upsert(prefix, IPCacheEntry(prefix, number, cluster), POLICY_SOURCE)

    @hookimpl
    def meshagent_identity_changed(self, kind, identity):
        if kind is ChangeKind.UPSERT:
            self.resolver.add_identity(identity)
        else:
            self.resolver.remove_identity(identity.id)

    @hookimpl
    def meshagent_endpoint_changed(self, kind, endpoint):
        if kind is ChangeKind.UPSERT:
            self.resolver.set_endpoint(PolicyEndpoint(endpoint.id, endpoint.namespace,
                                                      endpoint.labels))
        else:
            self.resolver.remove_endpoint(endpoint.id)
            self.pending.drop(endpoint.id)

    # -- outputs --------------------------------------------------------------------------------

    def _changed(self, endpoint_id: int, changes: list[MapChange]) -> None:
        self.pending.add(endpoint_id, changes)

    def snapshot(self) -> dict[int, MapState]:
        self.pending.clear()
        handed = self.resolver.handed
        return {ep: dict(handed.get(ep, {})) for ep in self.resolver.endpoints}

    async def changes(self) -> EndpointChanges:
        return await self.pending.take()

    async def _sync_kvstore(self, handle: ControllerHandle) -> None:
        """List then watch the cluster's policies; a bad document is refused, not fatal."""
        await follow_prefix(self.kvstore, kvkeys.POLICIES, self._apply_stored,
                            lambda: list(self.kv_keys), handle.ready)

    async def _apply_stored(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.rejected.pop(key, None)
            if key in self.kv_keys:
                await self.apply(PolicyUpdate(ChangeKind.DELETE, key=self.kv_keys.pop(key)))
            return
        try:
            policy = await self.parser.parse_stored(value, key)
        except PolicyError as exc:
            self.rejected[key] = str(exc)
            log.error("refusing stored policy %s: %s (the last good version stays)", key, exc)
            return
        self.rejected.pop(key, None)
        self.kv_keys[key] = policy.key
        await self.apply(PolicyUpdate(ChangeKind.UPSERT, policy))

    async def _run_source(self, source, handle: ControllerHandle) -> None:
        handle.ready()
        async for update in source:
            await self.apply(update)

    async def close(self) -> None:
        await self.parser.close()

    @hookimpl
    def meshagent_controllers(self, agent):
        controllers = [Controller("policy-sync", self._sync_kvstore)]
        for plugin, source in agent.hooks.policy_sources(agent):
            controllers.append(Controller(f"policy-source-{plugin}",
                                          lambda h, s=source: self._run_source(s, h)))
        return controllers

    # -- visibility -----------------------------------------------------------------------------

    @hookimpl
    def meshagent_status(self, verbose):
        r = self.resolver
        enforced = sum(1 for s in r.endpoints.values() if s.enforced[INGRESS] or s.enforced[EGRESS])
        summary = (f"revision {r.revision}, {len(r.policies)} policies,"
                   f" {enforced}/{len(r.endpoints)} endpoints enforcing")
        details = [f"{p.display}" for p in self.policies()]
        details += [f"refused {key}: {why}" for key, why in sorted(self.rejected.items())]
        return StatusSection("Policy", Health.WARNING if self.rejected else Health.OK, summary,
                             details=details)

    def trace(self, dst_endpoint: int, port: int, protocol: str = "TCP",
              src_identity: int | None = None, src_labels: list[str] | None = None,
              src_ip: str | None = None) -> dict:
        """Explain the verdict for a source talking to a local endpoint."""
        from meshagent.policy.api import PROTOCOLS
        if dst_endpoint not in self.resolver.endpoints:
            raise PolicyError(f"no local endpoint {dst_endpoint}")
        source = self._source_identity(src_identity, src_labels, src_ip)
        proto = PROTOCOLS.get(protocol.upper())
        if proto is None:
            raise PolicyError(f"unknown protocol {protocol!r}")
        result: Trace = trace(self.resolver, dst_endpoint, INGRESS, source, proto, port)
        return {"source": {"identity": source.id, "cluster": source.cluster or "(reserved)",
                           "labels": sorted(source.labels)},
                "destination": {"endpoint": dst_endpoint,
                                "labels": sorted(self.resolver.endpoints[dst_endpoint]
                                                 .endpoint.labels)},
                "port": port, "protocol": protocol.upper(),
                "verdict": result.verdict.value, "reason": result.reason,
                "enforced": result.enforced, "matched": list(result.matched),
                "selecting_policies": list(result.selecting)}

    def _source_identity(self, identity_id, labels, ip) -> Identity:
        if identity_id is not None:
            found = self.resolver.cache.identities.get(int(identity_id))
            if found is None:
                raise PolicyError(f"identity {identity_id} is not known to this agent")
            return found[0]
        if labels is not None:
            wanted = frozenset(labels)
            for identity, _ in self.resolver.cache.identities.values():
                if identity.labels == wanted:
                    return identity
            return Identity(0, wanted, "")  # not allocated yet: judge the labels as given
        if ip is not None:
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                raise PolicyError(f"src_ip {ip!r} is not an IPv4 or IPv6 address") from None
            best = None
            for entry in self.tables.ipcache.values():
                if entry.version == address.version and (
                        best is None or entry.prefixlen > best.prefixlen) and (
                        address in entry.prefix):
                    best = entry
            # an address no entry covers is the world of its family
            number = best.identity if best else int(world_identity(address.version))
            found = self.resolver.cache.identities.get(number)
            return found[0] if found else Identity(number, frozenset(), "")
        raise PolicyError("give the source as src_identity, src_labels or src_ip")


def build_default(agent) -> PolicyService:
    """The default resolver for an agent (a :class:`meshagent.hooks.view.AgentView`),
    registered for the events it follows (plugin ``policy.default``). A resolver that wraps it
    (contrib's meshagent-guardrails) builds it this way too."""
    service = PolicyService(agent.kvstore, agent.cluster.name, agent.tables,
                            agent.hooks.policy_changed,
                            default_local_cluster=agent.config.get("policy-default-local-cluster"))
    agent.plugins.register(service, name="policy.default")
    return service


@hookimpl
def meshagent_register_policy_resolver(registry):
    """This module is registered as plugin ``core.policy``: the default resolver."""
    registry.register("default", build_default)
