"""The policy repository apart from the resolver: revisions returned once applied here, and a
resolver written for 0.1's slot (which held the rules itself) still loading, through its
deprecation shim."""

import asyncio
import logging

import meshagent
from conftest import run_cli
from test_policy_semantics import SEED

from meshagent.policy.api import parse_policies
from meshagent.policy.repository import LegacyResolverShim

ARGS = ["--plugins", "memory", "--cluster-name", "cluster1", "--cluster-id", "101",
        "--memory-store", "repo"]


class OldStyleResolver:
    """0.1's contract: it validates, stores and lists the rules itself."""

    def __init__(self):
        self.stored = []
        self.revision = 0

    async def import_policies(self, text, source):
        return parse_policies(text, source)

    async def store(self, policies):
        self.stored += policies
        self.revision += 1

    async def delete(self, kind, namespace, name):
        return False

    def policies(self):
        return list(self.stored)

    def trace(self, dst_endpoint, port, protocol="TCP", **source):
        return {"verdict": "allow"}

    def snapshot(self):
        return {}

    async def changes(self):
        await asyncio.Event().wait()

    async def close(self):
        pass


class OldStylePlugin:
    @meshagent.hookimpl
    def meshagent_register_policy_resolver(self, registry):
        registry.register("old", lambda agent: OldStyleResolver())


async def test_a_01_resolver_loads_through_the_shim_with_a_deprecation_warning(
        agent_factory, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    running = await agent_factory([*ARGS, "--policy-resolver", "old"],
                                  extra_plugins=[("old", OldStylePlugin())])
    assert isinstance(running.agent.policy_resolver, LegacyResolverShim)
    assert "written for meshagent 0.1's policy-resolver slot" in caplog.text
    seed = tmp_path / "seed.yaml"
    seed.write_text(SEED)
    result = await asyncio.to_thread(run_cli, "policy", "import", str(seed), "--socket-path",
                                     str(running.socket_path))
    assert result.returncode == 0, result.stderr
    # it is its own repository, as in 0.1
    assert [p.name for p in running.agent.policy_resolver.legacy.stored] == [
        "clustermesh-ingress-l4-policy"]
    assert running.agent.policy_repository is running.agent.policy_resolver


async def test_an_import_returns_the_revision_it_made_once_applied_here(agent_factory, tmp_path):
    running = await agent_factory(ARGS)
    repository = running.agent.policy_repository
    policies = parse_policies(SEED, "seed")
    assert await repository.store(policies) == 1
    assert repository.policies() == policies  # applied before store returned
    assert running.agent.policy_resolver.revision == 1  # and handed to the resolver
    assert await repository.store(policies) == 2  # the same again: a new revision
    assert await repository.delete("CiliumNetworkPolicy", "default",
                                   "clustermesh-ingress-l4-policy") == 3
    assert repository.policies() == []
    assert await repository.delete("CiliumNetworkPolicy", "default", "nope") is None


async def test_policy_wait_returns_once_every_endpoint_enforces_the_revision(agent_factory,
                                                                              tmp_path):
    """Endpoints record the revision their datapath state reflects; ``policy import --wait``
    and ``policy wait REV`` return once every local endpoint has reached it."""
    import ipaddress

    from meshagent.model.endpoint import Endpoint
    from meshagent.testing.resolver_contract import RecordingDatapath, add_endpoint
    from test_policy_semantics import IDS
    datapath = RecordingDatapath()
    running = await agent_factory(ARGS, extra_plugins=[("recording", datapath)])
    for identity in IDS.values():
        if 256 <= identity.id < (1 << 24):
            running.agent.tables.identities.upsert(identity.id, identity)
    socket = str(running.socket_path)
    db = Endpoint(7, "default", IDS["db"].labels, ipaddress.ip_address("10.1.1.7"), IDS["db"].id)
    await add_endpoint(running.agent, db)  # as the endpoint manager does
    seed = tmp_path / "seed.yaml"
    seed.write_text(SEED)
    result = await asyncio.to_thread(run_cli, "policy", "import", str(seed), "--wait",
                                     "--socket-path", socket)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [
        "revision 1", "revision 1 enforced on every local endpoint"]
    assert running.agent.policy_progress.revisions == {7: 1}
    # already in the datapath when --wait returned: the seed's two employees, port 6379 only
    ingress = {k for k in datapath.state[7] if k.direction == "ingress"}
    assert {k.identity for k in ingress} == {IDS["employee"].id, IDS["employee-c2"].id}
    waited = await asyncio.to_thread(run_cli, "policy", "wait", "1", "--socket-path", socket)
    assert waited.returncode == 0, waited.stderr
    late = await asyncio.to_thread(run_cli, "policy", "wait", "5", "--timeout", "0.5",
                                   "--socket-path", socket)
    assert late.returncode == 1
    assert "policy revision 5 not enforced within 0.5s on 1 endpoint(s): 7 (at 1)" in late.stderr
    listed = await asyncio.to_thread(run_cli, "endpoint", "list", "--socket-path", socket)
    assert "POLICY REV" in listed.stdout
