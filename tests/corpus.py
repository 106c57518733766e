"""The policy corpus (``tests/policy_corpus/<feature>/``): our own documents, each saying on its
first line what the parser must do with it — ``# expect: accepted`` or ``# expect: error:
<the error after the document's name>``."""

from pathlib import Path

import pytest

from meshagent.policy.api import PolicyError, parse_policies
from meshagent.policy.resolver import PolicyEndpoint, Resolver

CORPUS = Path(__file__).parent / "policy_corpus"


def documents(feature: str) -> list[Path]:
    return sorted((CORPUS / feature).glob("*.yaml"))


def expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must say # expect:"
    return first.removeprefix("# expect: ")


def assert_refused(path: Path, expected: str) -> None:
    """The document is refused with exactly the error its first line names."""
    with pytest.raises(PolicyError) as caught:
        parse_policies(path.read_text(), path.name)
    assert str(caught.value).endswith(f"): {expected.removeprefix('error: ')}")


def verdict_lines(path: Path) -> list[list[str]]:
    """The words of each ``# verdict: ...`` line: what an accepted document resolves to."""
    return [line.removeprefix("# verdict: ").split() for line in path.read_text().splitlines()
            if line.startswith("# verdict: ")]


def resolve(path: Path, identities, endpoint_labels) -> Resolver:
    """A resolver holding ``identities``, the document's policies and endpoint 1 with
    ``endpoint_labels`` in namespace default."""
    resolver = Resolver("cluster1")
    for identity in identities:
        resolver.add_identity(identity)
    for policy in parse_policies(path.read_text(), path.name):
        resolver.upsert_policy(policy)
    resolver.set_endpoint(PolicyEndpoint(1, "default", endpoint_labels))
    return resolver
