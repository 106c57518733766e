"""``toServices``: a rule naming Services, translated into the peers those Services stand for.

Cilium's newest translation (``pkg/policy/k8s/service.go``, ``processRule``), done by the
repository before a policy reaches the resolver, and again whenever the Services it names
change:

- a Service with a pod selector adds that selector, with the Service's namespace
  (``k8s:io.kubernetes.pod.namespace``), to the item's ``toEndpoints``;
- a Service without one adds each backend address as a /32 (/128) to the item's ``toCIDRSet``.

The Services are this cluster's (applied ones and those of source plugins): a remote cluster's
ClusterService is never a target by itself (docs/policy.md, "toServices").
"""

import ipaddress
from collections.abc import Iterable

import attrs

from meshagent.model.endpoint import NAMESPACE_LABEL
from meshagent.model.service import Service
from meshagent.policy.api import (
    CIDRRule,
    EndpointSelector,
    PeerRule,
    Policy,
    Requirement,
    ServiceRef,
)
from meshagent.policy.selector import compile_selector, compiled_matches


def names_services(policy: Policy) -> bool:
    """Whether a rule of ``policy`` has a ``toServices`` item."""
    return any(item.services is not None for rule in policy.rules
               for item in rule.egress + rule.egress_deny)


def names_any(policy: Policy, services: Iterable[Service]) -> bool:
    """Whether a ``toServices`` item of ``policy`` selects one of ``services``: the policies
    a change of those Services may concern (Cilium's ``cnpMatchesService``)."""
    refs = [ref for rule in policy.rules for item in rule.egress + rule.egress_deny
            for ref in item.services or ()]
    return any(selects(ref, service) for service in services for ref in refs)


def selects(ref: ServiceRef, service: Service) -> bool:
    """Cilium's ``serviceRefMatches``/``serviceSelectorMatches``: the namespace ("" any),
    then the name or the selector on the Service's labels (of any source)."""
    if ref.namespace and ref.namespace != service.namespace:
        return False
    if ref.name is not None:
        return ref.name == service.name
    if ref.selector is None:  # an empty item, as Cilium reads it: no Service
        return False
    index: dict[str, list[tuple[str, str]]] = {}
    for key, value in service.labels:
        index.setdefault(key, []).append(("k8s", value))
    return compiled_matches(compile_selector(ref.selector), index)


def translate(policy: Policy, services: Iterable[Service]) -> Policy:
    """``policy`` with every ``toServices`` item's generated selectors and CIDRs added (the
    policy itself when it names no Service)."""
    if not names_services(policy):
        return policy
    ordered = sorted(services, key=lambda s: (s.namespace, s.name))
    rules = tuple(attrs.evolve(rule, egress=tuple(_item(i, ordered) for i in rule.egress),
                               egress_deny=tuple(_item(i, ordered) for i in rule.egress_deny))
                  for rule in policy.rules)
    return attrs.evolve(policy, rules=rules)


def _item(item: PeerRule, services: list[Service]) -> PeerRule:
    if item.services is None:
        return item
    endpoints: list[EndpointSelector] = []
    cidrs: list[CIDRRule] = []
    for service in services:
        if not any(selects(ref, service) for ref in item.services):
            continue
        if service.selector:
            selector = EndpointSelector(tuple(sorted(
                [Requirement(key, "In", frozenset({value})) for key, value in service.selector]
                + [Requirement(f"k8s:{NAMESPACE_LABEL}", "In", frozenset({service.namespace}))],
                key=lambda r: (r.key, r.operator))))
            if selector not in endpoints:
                endpoints.append(selector)
        else:
            for backend in service.backends:
                rule = CIDRRule(ipaddress.ip_network(backend.ip))
                if rule not in cidrs:
                    cidrs.append(rule)
    return attrs.evolve(item, endpoints=tuple(endpoints) if endpoints else None,
                        cidrs=tuple(cidrs) if cidrs else None)
