"""The default policy resolver: the repository's rules and the agent's identities in, the
datapath's map state out (:class:`meshagent.policy.PolicyResolver`).

The rules come from the core's repository (:mod:`meshagent.policy.repository`), one change at
a time; identities and endpoints through the agent's events. Each change is put in force
incrementally without holding the loop; the resulting map changes are handed over through the
contract (``snapshot``, ``changes``) for the core to feed the datapath.
"""

import asyncio
import ipaddress
import logging
from collections.abc import Callable

from meshagent import hookimpl
from meshagent.events import ChangeKind, PolicyChange
from meshagent.fqdn.contract import DNSRule, FQDNSelector
from meshagent.model.identity import Identity, world_identity
from meshagent.model.table import Tables
from meshagent.policy.api import PolicyError
from meshagent.policy.contract import (
    ChangeQueue,
    EndpointChanges,
    MapChange,
    MapState,
    PolicyKey,
    PolicyUpdate,
    Verdict,
)
from meshagent.policy.resolver import (
    EGRESS,
    INGRESS,
    PolicyEndpoint,
    Resolver,
    Trace,
    deciding_policies,
    dns_rules,
    fqdn_selectors,
    trace,
)
from meshagent.policy.worker import LARGE_POLICY, collections_held, rule_count

log = logging.getLogger(__name__)



class DefaultResolver:
    def __init__(self, cluster: str, tables: Tables, policy_changed: Callable[..., None], *,
                 default_local_cluster: bool):
        self.cluster = cluster
        self.tables = tables  # CIDR identities go in, sources are looked up by IP
        self.policy_changed = policy_changed  # tells the plugins (meshagent_policy_changed)
        self.resolver = Resolver(cluster, default_local_cluster=default_local_cluster,
                                 on_change=self._changed)
        self.pending = ChangeQueue()
        self.revision = 0  # the repository's, once a change's map changes are all queued
        # what the DNS proxy asked, until rules, identities or endpoints change
        self._dns_rules: dict[int, tuple[DNSRule, ...]] = {}
        self._fqdn_selectors: frozenset[FQDNSelector] | None = None

    # -- the PolicyResolver contract ------------------------------------------------------------

    async def apply(self, update: PolicyUpdate, revision: int) -> None:
        """Put a policy change in force without holding the loop: the policy's contributions
        and selectors are prepared a chunk at a time, then the endpoints recomputed one by
        one (status keeps answering during a 10,000-rule import)."""
        large = update.policy is not None and rule_count(update.policy) >= LARGE_POLICY
        with collections_held(large):
            await self._apply(update, revision)
        self._dns_changed(selectors=True)
        self.revision = revision
        self.pending.touch()  # the revision grew, with or without map changes

    async def _apply(self, update: PolicyUpdate, revision: int) -> None:
        if update.kind is ChangeKind.UPSERT:
            policy = update.policy
            for _ in self.resolver.prepare(policy):
                await asyncio.sleep(0)
            self.resolver.stage_policy(policy)
            await self._catch_up()
            self.policy_changed(kind=ChangeKind.UPSERT, policy=PolicyChange(
                policy.name, policy.namespace, revision))
        else:
            old = self.resolver.policies.get(update.key)
            self.resolver.stage_delete(update.key)
            await self._catch_up()
            if old is not None:
                self.policy_changed(kind=ChangeKind.DELETE, policy=PolicyChange(
                    old.name, old.namespace, revision))

    def enforcing(self) -> tuple[int, int]:
        r = self.resolver
        return (sum(1 for s in r.endpoints.values() if s.enforced[INGRESS] or s.enforced[EGRESS]),
                len(r.endpoints))

    def enforced(self, endpoint_id: int) -> tuple[bool, bool] | None:
        """:class:`meshagent.policy.ReportsEnforcement`: the endpoint's enforced directions."""
        state = self.resolver.endpoints.get(endpoint_id)
        return None if state is None else (state.enforced[INGRESS], state.enforced[EGRESS])

    async def _catch_up(self) -> None:
        while self.resolver.recompute_pending(1):
            await asyncio.sleep(0)
        for _ in self.resolver.forget_unused():
            await asyncio.sleep(0)

    # -- ResolvesDNS (meshagent.fqdn.contract): what the DNS proxy enforces ---------------------

    def dns_rules(self, endpoint_id: int) -> tuple[DNSRule, ...]:
        """The endpoint's DNS rules, made once until something changes (asked per query)."""
        rules = self._dns_rules.get(endpoint_id)
        if rules is None:
            rules = self._dns_rules[endpoint_id] = dns_rules(self.resolver, endpoint_id)
        return rules

    def fqdn_selectors(self) -> frozenset[FQDNSelector]:
        """The same object until the rules change."""
        if self._fqdn_selectors is None:
            self._fqdn_selectors = fqdn_selectors(self.resolver)
        return self._fqdn_selectors

    def _dns_changed(self, selectors: bool = False) -> None:
        self._dns_rules.clear()
        if selectors:
            self._fqdn_selectors = None

    @hookimpl
    def meshagent_identity_changed(self, kind, identity):
        self._dns_changed()  # a rule's servers may have changed
        if kind is ChangeKind.UPSERT:
            self.resolver.add_identity(identity)
        else:
            self.resolver.remove_identity(identity.id)

    @hookimpl
    def meshagent_endpoint_changed(self, kind, endpoint):
        self._dns_changed()
        if kind is ChangeKind.UPSERT:
            self.resolver.set_endpoint(PolicyEndpoint(endpoint.id, endpoint.namespace,
                                                      endpoint.labels))
            self.pending.touch()  # its state may be empty: the feed learns of it anyway
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

    async def close(self) -> None:
        """Nothing runs besides the agent."""

    def trace(self, dst_endpoint: int | None = None, port: int = 0, protocol: str = "TCP",
              src_identity: int | None = None, src_labels: list[str] | None = None,
              src_ip: str | None = None, src_endpoint: int | None = None,
              dst_identity: int | None = None, dst_labels: list[str] | None = None,
              dst_ip: str | None = None) -> dict:
        """Explain the verdict for a peer talking to a local endpoint (``dst_endpoint`` and
        the source as ``src_*``: ingress), or for a local endpoint talking to a peer
        (``src_endpoint`` and the destination as ``dst_*``: egress, where DNS rules and
        ``toFQDNs`` are)."""
        from meshagent.policy.api import PROTOCOLS
        egress = src_endpoint is not None
        if egress == (dst_endpoint is not None):
            raise PolicyError("give dst_endpoint and a source (ingress), or src_endpoint and a"
                              " destination (egress)")
        local = src_endpoint if egress else dst_endpoint
        if local not in self.resolver.endpoints:
            raise PolicyError(f"no local endpoint {local}")
        peer = self._peer_identity("dst", dst_identity, dst_labels, dst_ip) if egress else \
            self._peer_identity("src", src_identity, src_labels, src_ip)
        names = {name.upper(): name for name in PROTOCOLS}
        if protocol.upper() not in names:
            raise PolicyError(f"unknown protocol {protocol!r}")
        protocol = names[protocol.upper()]  # ICMPv6 as Cilium spells it
        proto = PROTOCOLS[protocol]
        result: Trace = trace(self.resolver, local, EGRESS if egress else INGRESS, peer, proto,
                              port)
        remote = {"identity": peer.id, "cluster": peer.cluster or "(reserved)",
                  "labels": sorted(peer.labels)}
        endpoint = {"endpoint": local,
                    "labels": sorted(self.resolver.endpoints[local].endpoint.labels)}
        return {"source": endpoint if egress else remote,
                "destination": remote if egress else endpoint,
                "direction": EGRESS if egress else INGRESS,
                "port": port, "protocol": protocol,
                "verdict": result.verdict.value, "reason": result.reason,
                "enforced": result.enforced, "matched": list(result.matched),
                "selecting_policies": list(result.selecting)}

    def deciding_policies(self, endpoint_id: int, direction: str, identity: int,
                          protocol: int, port: int, verdict: Verdict, match: int
                          ) -> tuple[PolicyKey, ...]:
        """:class:`meshagent.policy.contract.AttributesVerdicts`: from the rules in force."""
        return deciding_policies(self.resolver, endpoint_id, direction, identity, protocol,
                                 port, verdict, match)

    def _peer_identity(self, side: str, identity_id, labels, ip) -> Identity:
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
                raise PolicyError(f"{side}_ip {ip!r} is not an IPv4 or IPv6 address") from None
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
        raise PolicyError(f"give the {'source' if side == 'src' else 'destination'} as"
                          f" {side}_identity, {side}_labels or {side}_ip")


def build_default(agent) -> DefaultResolver:
    """The default resolver for an agent (a :class:`meshagent.hooks.view.AgentView`),
    registered for the events it follows (plugin ``policy.default``). A resolver that wraps it
    (contrib's meshagent-guardrails) builds it this way too."""
    resolver = DefaultResolver(agent.cluster.name, agent.tables, agent.hooks.policy_changed,
                               default_local_cluster=agent.config.get(
                                   "policy-default-local-cluster"))
    agent.plugins.register(resolver, name="policy.default")
    return resolver


@hookimpl
def meshagent_register_policy_resolver(registry):
    """This module is registered as plugin ``core.policy``: the default resolver."""
    registry.register("default", build_default)
