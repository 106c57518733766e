"""meshagent-guardrails: the resolver contract suite, and the deny list on top of it."""

import pytest

from meshagent.errors import UsageError
from meshagent.policy import Verdict
from meshagent.policy.resolver import INGRESS, decide
from meshagent.testing.policy_cases import IDS, SEED, TCP
from meshagent.testing.resolver_contract import PolicyResolverContract, ResolverHarness
from meshagent_guardrails import load_deny_file

GUARDRAILS = ("--plugins", "memory,guardrails", "--policy-resolver", "guardrails")


class TestGuardrailsMeetsTheResolverContract(PolicyResolverContract):
    """With no deny rule, every verdict is the default resolver's."""

    agent_args = GUARDRAILS


@pytest.fixture
def deny_file(tmp_path):
    path = tmp_path / "deny.yaml"
    path.write_text("deny:\n- matchLabels: {app: employee, io.kubernetes.pod.namespace:"
                    " istio-space}\n- matchLabels: {k8s:app: stranger}\n")
    return path


async def test_denied_peers_are_denied_whatever_the_policy_allows(agent_factory, deny_file):
    harness = ResolverHarness(agent_factory, (*GUARDRAILS, "--guardrails-deny-file",
                                              str(deny_file)))
    resolver = await harness.resolver()
    await harness.enforce(SEED)
    endpoint_id, state = await harness.endpoint_state(IDS["db"].labels, "default")
    verdict = {peer: decide(state, INGRESS, harness.ids[peer], TCP, 6379)
               for peer in ("employee", "employee-c2", "stranger")}
    # the seed allows both employees; the deny list takes cluster2's (istio-space) away
    assert verdict == {"employee": Verdict.ALLOW, "employee-c2": Verdict.DENY,
                       "stranger": Verdict.DENY}
    await harness.enforce("")  # no policy at all: allowed by default, but not these
    _, state = await harness.endpoint_state(IDS["db"].labels, "default")
    assert decide(state, INGRESS, harness.ids["employee"], TCP, 6379) is Verdict.ALLOW
    assert decide(state, INGRESS, harness.ids["employee-c2"], TCP, 6379) is Verdict.DENY
    traced = resolver.trace(endpoint_id + 1, 6379, "TCP",
                            src_identity=harness.ids["employee-c2"])
    assert traced["verdict"] == "deny" and "denied by guardrails" in traced["reason"]
    assert "; was: allowed: no policy enforces ingress" in traced["reason"]
    status = await (await harness.agent()).client.request("GET", "/status")
    section = next(s for s in status["sections"] if s["name"] == "Guardrails")
    assert section["summary"] == "2 deny rules, 2 identities denied"


@pytest.mark.parametrize("text, problem", [
    ("deny: [1]", "deny[0]: expected {matchLabels"),
    ("deny:\n- matchLabels: {app: [x]}\n", "must be a string"),
    ("allow: []\n", "expected a mapping with one key, 'deny'"),
    ("deny: [", "not YAML"),
])
def test_a_bad_deny_file_is_refused_naming_the_problem(tmp_path, text, problem):
    path = tmp_path / "deny.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=problem.replace("[", r"\[").replace("{", r"\{")):
        load_deny_file(path)
