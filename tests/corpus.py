"""The policy corpus (``tests/policy_corpus/<feature>/``): our own documents, each saying on its
first line what the parser must do with it — ``# expect: accepted`` or ``# expect: error:
<the error after the document's name>``."""

from pathlib import Path

import pytest

from meshagent.policy.api import PolicyError, parse_policies

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
