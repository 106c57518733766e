"""A third-party policy resolver that does not wrap the default one: it computes its map state
with meshagent's resolution engine on its own, from what the repository hands it
(``apply``) and the agent's events. The tests load it as plugin ``standalone``
(``--policy-resolver standalone``) to show that every source's rules reach any resolver."""

import meshagent
from meshagent.plugin import (
    ChangeKind,
    ChangeQueue,
    EndpointChanges,
    MapState,
    PolicyUpdate,
)
from meshagent.policy.resolver import EGRESS, INGRESS, PolicyEndpoint, Resolver, trace


class StandaloneResolver:
    def __init__(self, cluster: str, default_local_cluster: bool):
        self.pending = ChangeQueue()
        self.engine = Resolver(cluster, default_local_cluster=default_local_cluster,
                               on_change=self.pending.add)
        self.revision = 0
        self.received: list[PolicyUpdate] = []  # every change the repository handed over

    async def apply(self, update: PolicyUpdate, revision: int) -> None:
        self.received.append(update)
        if update.kind is ChangeKind.UPSERT:
            self.engine.upsert_policy(update.policy)
        else:
            self.engine.delete_policy(update.key)
        self.revision = revision
        self.pending.touch()

    def enforcing(self) -> tuple[int, int]:
        states = self.engine.endpoints.values()
        return (sum(1 for s in states if s.enforced[INGRESS] or s.enforced[EGRESS]),
                len(self.engine.endpoints))

    def trace(self, dst_endpoint: int, port: int, protocol: str = "TCP", **source) -> dict:
        identity = self.engine.cache.identities[int(source["src_identity"])][0]
        result = trace(self.engine, dst_endpoint, INGRESS, identity, 6, port)
        return {"verdict": result.verdict.value, "reason": result.reason}

    def snapshot(self) -> dict[int, MapState]:
        self.pending.clear()
        return {ep: dict(self.engine.handed.get(ep, {})) for ep in self.engine.endpoints}

    async def changes(self) -> EndpointChanges:
        return await self.pending.take()

    async def close(self) -> None:
        pass

    @meshagent.hookimpl
    def meshagent_identity_changed(self, kind, identity):
        if kind is ChangeKind.UPSERT:
            self.engine.add_identity(identity)
        else:
            self.engine.remove_identity(identity.id)

    @meshagent.hookimpl
    def meshagent_endpoint_changed(self, kind, endpoint):
        if kind is ChangeKind.UPSERT:
            self.engine.set_endpoint(PolicyEndpoint(endpoint.id, endpoint.namespace,
                                                    endpoint.labels))
            self.pending.touch()
        else:
            self.engine.remove_endpoint(endpoint.id)
            self.pending.drop(endpoint.id)


def build(agent) -> StandaloneResolver:
    resolver = StandaloneResolver(agent.cluster.name,
                                  agent.config.get("policy-default-local-cluster"))
    agent.plugins.register(resolver, name="standalone.resolver")
    return resolver


@meshagent.hookimpl
def meshagent_register_policy_resolver(registry):
    registry.register("standalone", build)
