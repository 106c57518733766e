"""What the policy side and the DNS proxy exchange.

The resolver knows, per endpoint, which DNS questions it may ask of which servers (the
``rules: dns`` of its egress port rules) and which ``toFQDNs`` selectors are in force; the DNS
proxy asks it (:class:`ResolvesDNS`, an optional capability of a
:class:`meshagent.policy.contract.PolicyResolver`) and gives every answered address an identity
labelled ``fqdn:<selector>`` for each selector that matches the name, which those selectors'
peers then select (Cilium 1.16+, ``pkg/fqdn/namemanager``).
"""

import functools
import re
from typing import Protocol, runtime_checkable

import attrs

from meshagent.fqdn import matchpattern

#: Cilium's label source for a toFQDNs selector's identity label (``labels.LabelSourceFQDN``).
FQDN_SOURCE = "fqdn"


@attrs.frozen(cache_hash=True)
class FQDNSelector:
    """A ``toFQDNs`` item, or a ``rules: dns`` item (which may carry both fields: either one
    matching allows the question)."""

    match_name: str = ""
    match_pattern: str = ""

    @property
    def label(self) -> str:
        """The identity label of the addresses it selects: ``fqdn:<matchName or
        matchPattern>`` (Cilium's ``FQDNSelector.IdentityLabel``, value empty)."""
        return f"{FQDN_SOURCE}:{self.match_name or self.match_pattern}"

    def matches(self, name: str) -> bool:
        """Whether it selects ``name`` (any case, with or without the final dot)."""
        name = matchpattern.fqdn(name)
        return any(regex.match(name) for regex in _regexes(self))

    def __str__(self) -> str:
        return f"MatchName: {self.match_name}, MatchPattern: {self.match_pattern}"


@functools.lru_cache(maxsize=4096)
def _regexes(selector: FQDNSelector) -> tuple[re.Pattern, ...]:
    out = []
    if selector.match_name:
        out.append(re.compile(matchpattern.name_regex(selector.match_name)))
    if selector.match_pattern:
        out.append(re.compile(matchpattern.to_regex(
            matchpattern.sanitize(selector.match_pattern))))
    return tuple(out)


@attrs.frozen
class DNSRule:
    """One endpoint may ask questions matching ``patterns`` of the servers ``servers`` (their
    identities; None: any server) on ``port``/``protocol`` (``UDP``, ``TCP`` or ``ANY``):
    Cilium's per (port, protocol, server selector) DNS regexes."""

    port: int
    protocol: str
    servers: frozenset[int] | None
    patterns: tuple[FQDNSelector, ...]

    def allows(self, server_identity: int, name: str) -> bool:
        return (self.servers is None or server_identity in self.servers) and \
            any(p.matches(name) for p in self.patterns)


@runtime_checkable
class ResolvesDNS(Protocol):
    """Optional for a resolver: what the DNS proxy enforces. Without it there is no DNS-aware
    egress (the agent says so and refuses no policy for it: the resolver parsed them)."""

    @property
    def revision(self) -> int:
        """The repository revision the answers below reflect. :meth:`dns_rules` also follows
        identities and endpoints between two revisions (a rule's servers are identities), so
        ask again rather than keep its answer: it is cheap, made once until something
        changes."""

    def dns_rules(self, endpoint_id: int) -> tuple[DNSRule, ...]:
        """The DNS rules of a local endpoint's egress policy now; empty when it has none
        (its DNS is then not redirected to the proxy)."""

    def fqdn_selectors(self) -> frozenset[FQDNSelector]:
        """Every ``toFQDNs`` selector of the policies in force, whichever endpoints they
        select; it changes only with :attr:`revision`."""
