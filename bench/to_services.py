"""What a Service change costs a ``toServices`` policy: translating it again, and the resolver
recomputing the endpoints it selects — against recomputing every endpoint, as a policy change
did before toServices.

1,000 endpoints, 100 of them selected by a policy naming a Service without a selector (each
backend a generated /32 with its CIDR identity), 100 other policies; the Service gains and
loses a backend. The median of ``--repeat`` changes each way.

    .venv/bin/python bench/to_services.py [--endpoints N] [--selected N] [--backends N] [--json FILE]
"""

import argparse
import ipaddress
import statistics
import time

from common import machine, report

from meshagent.identity.cidr import CIDRIdentities
from meshagent.model.service import Backend, Frontend, Service
from meshagent.policy import resolver as resolver_module
from meshagent.policy.api import parse_policies
from meshagent.policy.cidr import policy_cidrs
from meshagent.policy.resolver import PolicyEndpoint, Resolver
from meshagent.policy.services import translate

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-db, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toServices: [{k8sService: {serviceName: db}}]
    toPorts: [{ports: [{port: "6379", protocol: TCP}]}]
"""


def service(backends: int) -> Service:
    return Service("default", "db", "c1", (Frontend(ipaddress.ip_address("10.96.0.10"), 6379),),
                   tuple(Backend(ipaddress.ip_address(f"10.1.{i // 250}.{i % 250 + 1}"), 6379,
                                 "c1") for i in range(backends)))


def world(args) -> tuple[Resolver, CIDRIdentities]:
    resolver = Resolver("c1")
    for i in range(args.endpoints):
        app = "client" if i < args.selected else f"a{i % 100}"
        resolver.set_endpoint(PolicyEndpoint(i, "default", frozenset({
            f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=default"})))
    for policy in parse_policies("\n---\n".join(
            f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
            f"metadata: {{name: o{i}, namespace: default}}\nspec:\n"
            f"  endpointSelector: {{matchLabels: {{app: a{i}}}}}\n"
            f"  ingress: [{{fromEndpoints: [{{matchLabels: {{app: client}}}}]}}]\n"
            for i in range(100))):
        resolver.upsert_policy(policy)
    return resolver, CIDRIdentities("c1")


def change(resolver: Resolver, cidrs: CIDRIdentities, backends: int) -> tuple[float, float, int]:
    """(seconds translating, seconds resolving, endpoints recomputed) for one Service change,
    as the agent does it: the new CIDR identities in, the policy, the old identities out."""
    (policy,) = parse_policies(POLICY)
    start = time.perf_counter()
    translated = translate(policy, [service(backends)])
    translating = time.perf_counter() - start
    added, removed = cidrs.want(policy_cidrs([translated]))
    for _, identity in added:
        resolver.add_identity(identity)
    start = time.perf_counter()
    resolver.stage_policy(translated)
    recomputed = len(resolver.dirty)
    while resolver.recompute_pending(len(resolver.dirty)):
        pass
    resolving = time.perf_counter() - start
    for _, identity in removed:
        resolver.remove_identity(identity.id)
    return translating, resolving, recomputed


def measure(args, every_endpoint: bool) -> dict:
    if every_endpoint:  # as before: a new version of a policy recomputed every endpoint
        resolver_module._same_subjects = lambda old, new: False
    resolver, cidrs = world(args)
    change(resolver, cidrs, args.backends)
    runs = [change(resolver, cidrs, args.backends + (n % 2 == 0)) for n in range(args.repeat)]
    return {"translate_ms": round(statistics.median(r[0] for r in runs) * 1000, 2),
            "resolve_ms": round(statistics.median(r[1] for r in runs) * 1000, 1),
            "endpoints_recomputed": runs[-1][2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoints", type=int, default=1_000)
    parser.add_argument("--selected", type=int, default=100)
    parser.add_argument("--backends", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = {"machine": machine(), "endpoints": args.endpoints, "selected": args.selected,
              "backends": args.backends, "selected_only": measure(args, False),
              "every_endpoint": measure(args, True)}
    report(result, args.json)


if __name__ == "__main__":
    main()
