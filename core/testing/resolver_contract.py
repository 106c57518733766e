"""The policy-resolver contract suite: the verdicts every resolver must give.

Subclass :class:`PolicyResolverContract` in your plugin's tests and say how to load your
resolver::

    from meshagent.testing.resolver_contract import PolicyResolverContract

    class TestMyResolver(PolicyResolverContract):
        agent_args = ("--plugins", "memory,mine", "--policy-resolver", "mine")
        # or, for a plugin that is not installed: its module, registered by name
        extra_plugins = (("mine", my_plugin_module),)

Every case of :mod:`meshagent.testing.policy_cases` then runs against a real agent (memory
kvstore) through the contract only: identities arrive as table events, endpoints as
``meshagent_endpoint_changed`` (after the core's datapath feed took them, as the endpoint
manager does), policies through the core's repository (``import_policies`` and ``store``),
which hands them to the resolver (``apply``), as every source's do. The agent's datapath is a
recorder fed by the core exactly as the eBPF datapath is (``snapshot()`` into ``reconcile``,
then ``changes()`` folded into batches), and the verdict is read from what it recorded the way
the kernel reads its map (exact identity or any; deny wins). So every case also checks that
the change stream continues the snapshot: nothing lost, nothing applied twice.
Load no other datapath plugin in ``agent_args``.
"""

import asyncio
import ipaddress
import itertools
import time
import uuid
from collections.abc import Sequence

import attrs
import pytest

from meshagent import hookimpl
from meshagent.events import ChangeKind
from meshagent.model.endpoint import Endpoint
from meshagent.policy.contract import MapState, PolicyResolver, Verdict
from meshagent.policy.resolver import EGRESS, INGRESS, decide
from meshagent.testing.policy_cases import (
    CASES,
    EGRESS_CASES,
    FQDN_CASES,
    IDS,
    SEED,
    TCP,
    cnp,
)

CIDR_BASE = (1 << 24) + 0xF000  # the table's CIDR and FQDN identities, clear of the agent's own
SETTLE_TIMEOUT = 5.0
STILL_POLLS = 5  # 100 ms without a change: settled


class RecordingDatapath:
    """Meets the datapath contract; keeps each endpoint's map state as it was handed over."""

    def __init__(self):
        self.state: dict[int, MapState] = {}
        self.endpoints: set[int] = set()  # the ids it holds
        self.problems: list[str] = []

    @hookimpl
    def meshagent_register_datapath(self, registry):
        registry.register("contract-recorder", lambda agent: self)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def apply(self, batch) -> None:
        self.endpoints |= {endpoint.id for endpoint in batch.added}
        for endpoint_id, changes in batch.policy.items():
            if endpoint_id not in self.endpoints:
                self.problems.append(f"entries for endpoint {endpoint_id}, which the datapath"
                                     " does not hold")
            state = self.state.setdefault(endpoint_id, {})
            for change in changes:
                if change.kind is ChangeKind.DELETE:
                    if state.pop(change.key, None) is None:
                        self.problems.append(f"endpoint {endpoint_id}: delete of {change.key},"
                                             " which it does not hold")
                else:
                    state[change.key] = change.verdict
        for endpoint in batch.removed:
            self.endpoints.discard(endpoint.id)
            self.state.pop(endpoint.id, None)

    async def reconcile(self, policies, ipcache) -> None:
        if set(policies) - self.endpoints:
            self.problems.append(f"reconciled entries of endpoints it does not hold:"
                                 f" {sorted(set(policies) - self.endpoints)}")
        self.state = {ep: dict(state) for ep, state in policies.items()}


class ResolverHarness:
    """One agent per ``--policy-default-local-cluster`` value, fed the table's identities."""

    def __init__(self, agent_factory, agent_args: Sequence[str],
                 extra_plugins: Sequence[tuple[str, object]] = ()):
        self.agent_factory = agent_factory
        self.agent_args = list(agent_args)
        self.extra_plugins = list(extra_plugins)
        self.agents: dict[bool, object] = {}
        self.datapaths: dict[bool, RecordingDatapath] = {}
        self.ids: dict[str, int] = {}
        self._endpoint_ids = itertools.count(1)

    async def agent(self, default_local_cluster: bool = True):
        if default_local_cluster not in self.agents:
            datapath = self.datapaths[default_local_cluster] = RecordingDatapath()
            running = await self.agent_factory([
                *self.agent_args, "--cluster-name", "cluster1", "--cluster-id", "101",
                "--node-name", "node1", "--memory-store", f"contract-{uuid.uuid4().hex[:8]}",
                f"--policy-default-local-cluster={str(default_local_cluster).lower()}",
                "--enable-node-selector-labels=true"],  # the table has fromNodes/toNodes
                extra_plugins=[("contract-datapath", datapath), *self.extra_plugins])
            await _until(running.agent.datapath_synced.is_set, "the datapath's first sync")
            for index, (name, identity) in enumerate(sorted(IDS.items())):
                if identity.id < 256:
                    self.ids[name] = identity.id  # reserved: every resolver knows them
                    continue
                if any(label.startswith(("cidr:", "fqdn:")) for label in identity.labels):
                    identity = attrs.evolve(identity, id=CIDR_BASE + index)
                self.ids[name] = identity.id
                running.agent.tables.identities.upsert(identity.id, identity)
            self.agents[default_local_cluster] = running
        return self.agents[default_local_cluster]

    async def resolver(self, default_local_cluster: bool = True) -> PolicyResolver:
        return (await self.agent(default_local_cluster)).agent.policy_resolver

    async def enforce(self, text: str, default_local_cluster: bool = True) -> None:
        """Make ``text`` the only policies in force."""
        repository = (await self.agent(default_local_cluster)).agent.policy_repository
        for policy in repository.policies():
            await repository.delete(policy.kind, policy.namespace, policy.name)
        wanted = await repository.import_policies(text, "contract") if text else []
        await repository.store(wanted)
        keys = {p.key for p in wanted}
        await _until(lambda: {p.key for p in repository.policies()} == keys,
                     f"policies in force: {sorted(keys)}")

    async def endpoint_state(self, labels: frozenset[str], namespace: str,
                             default_local_cluster: bool = True) -> tuple[int, MapState]:
        """A new local endpoint with these labels, and its map state once it settled."""
        running = await self.agent(default_local_cluster)
        datapath = self.datapaths[default_local_cluster]
        endpoint_id = next(self._endpoint_ids)
        endpoint = Endpoint(endpoint_id, namespace, labels,
                            ipaddress.IPv4Address("10.1.0.0") + endpoint_id, 0)
        await add_endpoint(running.agent, endpoint)
        state = await _settled(datapath, endpoint_id)
        assert not datapath.problems, datapath.problems
        return endpoint_id, state

    async def remove_endpoint(self, endpoint_id: int, default_local_cluster: bool = True):
        running = await self.agent(default_local_cluster)
        await remove_endpoint(running.agent, Endpoint(
            endpoint_id, "default", frozenset(), ipaddress.IPv4Address("10.1.0.0"), 0))

    async def verdict(self, text: str, peer: str, port: int, proto: int, *,
                      direction: str = INGRESS, endpoint: frozenset = IDS["db"].labels,
                      namespace: str = "default", default_local_cluster: bool = True) -> str:
        await self.enforce(text, default_local_cluster)
        endpoint_id, state = await self.endpoint_state(endpoint, namespace,
                                                       default_local_cluster)
        await self.remove_endpoint(endpoint_id, default_local_cluster)
        return decide(state, direction, self.ids[peer], proto, port).value


async def add_endpoint(agent, endpoint: Endpoint) -> None:
    """What the endpoint manager does with a new endpoint, minus the pod's network: the
    datapath feed takes it (the datapath holds it), then every plugin hears of it."""
    await agent.datapath_feed.endpoint_added(endpoint)
    agent.hooks.endpoint_changed(kind=ChangeKind.UPSERT, endpoint=endpoint)


async def remove_endpoint(agent, endpoint: Endpoint) -> None:
    await agent.datapath_feed.endpoint_removed(endpoint)
    agent.hooks.endpoint_changed(kind=ChangeKind.DELETE, endpoint=endpoint)


async def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"the resolver did not get to: {what}"
        await asyncio.sleep(0.01)


async def _settled(datapath: RecordingDatapath, endpoint_id: int) -> MapState:
    """The endpoint's state in the datapath once it held still for a while (an endpoint whose
    state is empty never gets an update: after the wait it counts as empty)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last, still = None, 0
    while still < STILL_POLLS:
        assert time.monotonic() < deadline, f"endpoint {endpoint_id} never settled: {last}"
        await asyncio.sleep(0.02)
        state = dict(datapath.state.get(endpoint_id, {}))
        still = still + 1 if state == last else 0
        last = state
    return last


class PolicyResolverContract:
    """Every case of the policy-semantics table, through a resolver's contract."""

    agent_args: Sequence[str] = ("--plugins", "memory")
    #: plugin objects registered beside the datapath recorder: (name, module or object)
    extra_plugins: Sequence[tuple[str, object]] = ()

    @pytest.fixture
    async def harness(self, agent_factory):
        return ResolverHarness(agent_factory, self.agent_args, self.extra_plugins)

    @pytest.mark.parametrize("name, text, peer, port, proto, expected", CASES,
                             ids=[c[0] for c in CASES])
    async def test_ingress_verdicts(self, harness, name, text, peer, port, proto, expected):
        flat = text.startswith("FLAT:")
        got = await harness.verdict(text.removeprefix("FLAT:"), peer, port, proto,
                                    default_local_cluster=not flat)
        assert got == expected, name

    @pytest.mark.parametrize("name, spec, peer, port, expected", EGRESS_CASES,
                             ids=[c[0] for c in EGRESS_CASES])
    async def test_egress_verdicts(self, harness, name, spec, peer, port, expected):
        text = cnp("endpointSelector: {matchLabels: {app: employee}}\n" + spec)
        got = await harness.verdict(text, peer, port, TCP, direction=EGRESS,
                                    endpoint=IDS["employee"].labels)
        assert got == expected, name

    @pytest.mark.parametrize("name, spec, peer, port, proto, expected", FQDN_CASES,
                             ids=[c[0] for c in FQDN_CASES])
    async def test_dns_aware_egress_verdicts(self, harness, name, spec, peer, port, proto,
                                             expected):
        text = cnp("endpointSelector: {matchLabels: {app: employee}}\n" + spec)
        got = await harness.verdict(text, peer, port, proto, direction=EGRESS,
                                    endpoint=IDS["employee"].labels)
        assert got == expected, name

    async def test_a_fresh_snapshot_equals_what_the_changes_built(self, harness):
        """The recorder was reconciled from ``snapshot()`` and fed ``changes()`` through a
        policy change; a snapshot taken now must hold exactly what it holds."""
        await harness.enforce("")
        endpoint_id, _ = await harness.endpoint_state(IDS["db"].labels, "default")
        await harness.enforce(SEED)
        datapath = harness.datapaths[True]
        await _until(lambda: decide(datapath.state.get(endpoint_id, {}), INGRESS,
                                    harness.ids["stranger"], TCP, 6379) is Verdict.DENY,
                     "the stranger denied once the seed policy is in force")
        await _settled(datapath, endpoint_id)
        resolver = await harness.resolver()
        assert datapath.state[endpoint_id] == resolver.snapshot()[endpoint_id]
        assert not datapath.problems, datapath.problems
        assert decide(datapath.state[endpoint_id], INGRESS, harness.ids["employee-c2"], TCP,
                      6379) is Verdict.ALLOW
