"""meshagent's own DNS-aware documents (tests/policy_corpus/fqdn/): each one's first line says
what the parser must do with it — ``# expect: accepted`` or ``# expect: error: <the error
after the document's name>``. An accepted one carries ``# verdict: <peer> <port>/<protocol>
<verdict>`` lines: what the resolver gives the table's employee endpoint (egress) toward that
peer of :data:`meshagent.testing.policy_cases.IDS` (``fqdn-*`` peers are addresses the DNS
proxy labelled for a selector)."""

from pathlib import Path

import pytest

import corpus
from corpus import assert_refused, expectation

from meshagent.model.identity import Identity
from meshagent.policy.api import PROTOCOLS
from meshagent.policy.resolver import EGRESS, decide
from meshagent.testing.policy_cases import IDS

CORPUS = Path(__file__).parent / "policy_corpus" / "fqdn"
DOCUMENTS = sorted(CORPUS.glob("*.yaml"))
PEERS = {**IDS, "fqdn-deep": Identity((1 << 24) + 5, frozenset({"fqdn:**.example.com",
                                                                "reserved:world"}))}


def verdict_lines(path: Path) -> list[tuple[str, int, str, str]]:
    """``# verdict: <peer> <port>/<protocol> <verdict>`` lines."""
    return [(peer, int(port.split("/")[0]), port.split("/")[1], verdict)
            for peer, port, verdict in corpus.verdict_lines(path)]


def test_the_corpus_has_documents_of_both_kinds():
    kinds = {expectation(p) == "accepted" for p in DOCUMENTS}
    assert kinds == {True, False} and len(DOCUMENTS) >= 15


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.stem)
def test_each_document_is_parsed_and_resolved_as_it_says(path):
    expected = expectation(path)
    if expected != "accepted":
        assert_refused(path, expected)
        return
    resolver = corpus.resolve(path, PEERS.values(), IDS["employee"].labels)
    wanted = verdict_lines(path)
    assert wanted, f"{path.name}: an accepted document says what it resolves to"
    got = [(peer, port, protocol, decide(resolver.verdicts(1), EGRESS, PEERS[peer].id,
                                         PROTOCOLS[protocol], port).value)
           for peer, port, protocol, _ in wanted]
    assert got == wanted
