"""Policy resolution benchmark: full resolution vs one incremental identity add, side by side.

10,000 identities (in two clusters), 1,000 policies, 100 local endpoints. Reports the time of a
full resolution (every endpoint computed from scratch) and of adding one identity that several
selectors match, and their ratio. Goal: incremental ≤ 10 ms.

    .venv/bin/python bench/policy.py [--identities N] [--policies N] [--endpoints N] [--json FILE]
"""

import argparse
import platform
import random
import statistics
import time

from common import report

from meshagent.identity import Identity
from meshagent.policy.api import parse_policies
from meshagent.policy.resolver import PolicyEndpoint, Resolver

APPS = [f"app{i}" for i in range(200)]
NAMESPACES = [f"ns{i}" for i in range(10)]


def labels(app: str, ns: str, cluster: str) -> frozenset[str]:
    return frozenset({f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={ns}",
                      f"k8s:io.cilium.k8s.policy.cluster={cluster}", f"k8s:tier=t{sum(map(ord, app)) % 5}"})


def make_identities(n: int, rng: random.Random) -> list[Identity]:
    out = []
    for i in range(n):
        cluster, cid = ("cluster1", 101) if i % 2 == 0 else ("cluster2", 102)
        out.append(Identity((cid << 16) + 256 + i // 2,
                            labels(rng.choice(APPS), rng.choice(NAMESPACES), cluster), cluster))
    return out


def make_policies(n: int, rng: random.Random) -> str:
    docs = []
    for i in range(n):
        ns = rng.choice(NAMESPACES)
        peer = rng.choice(APPS)
        cluster = rng.choice(["", "        io.cilium.k8s.policy.cluster: cluster2\n"])
        docs.append(f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: p{i}, namespace: {ns}}}
spec:
  endpointSelector: {{matchLabels: {{app: {rng.choice(APPS)}}}}}
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: {peer}
{cluster}    toPorts: [{{ports: [{{port: "{rng.randint(1, 9000)}", protocol: TCP}}]}}]
  - fromEndpoints: [{{matchExpressions: [{{key: tier, operator: In, values: [t{i % 5}]}}]}}]
""")
    return "---\n".join(docs)


def measure(args) -> dict:
    rng = random.Random(7)
    identities = make_identities(args.identities, rng)
    policies = parse_policies(make_policies(args.policies, rng))
    endpoints = [PolicyEndpoint(i + 1, rng.choice(NAMESPACES),
                                labels(rng.choice(APPS), "x", "cluster1")) for i in
                 range(args.endpoints)]
    endpoints = [PolicyEndpoint(e.id, e.namespace, frozenset(
        {label for label in e.labels if "namespace" not in label}
        | {f"k8s:io.kubernetes.pod.namespace={e.namespace}"})) for e in endpoints]

    resolver = Resolver("cluster1")
    for identity in identities:
        resolver.add_identity(identity)
    for policy in policies:
        resolver.upsert_policy(policy)
    start = time.perf_counter()
    for endpoint in endpoints:
        resolver.set_endpoint(endpoint)
    full = time.perf_counter() - start

    increments = []
    for i in range(args.repeat):
        newcomer = Identity((101 << 16) + 60000 + i, labels(rng.choice(APPS),
                                                            rng.choice(NAMESPACES), "cluster1"),
                            "cluster1")
        start = time.perf_counter()
        resolver.add_identity(newcomer)
        increments.append(time.perf_counter() - start)
    keys = sum(len(resolver.verdicts(e.id)) for e in endpoints)
    inc = statistics.median(increments)
    return {
        "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
        "identities": args.identities, "policies": args.policies, "endpoints": args.endpoints,
        "map_entries": keys, "full_resolution_s": round(full, 4),
        "incremental_add_ms_median": round(inc * 1000, 3),
        "incremental_add_ms_max": round(max(increments) * 1000, 3),
        "full_over_incremental": round(full / inc, 1),
        "goal_incremental_le_10ms": inc <= 0.010,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=10_000)
    parser.add_argument("--policies", type=int, default=1_000)
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = measure(args)
    report(result, args.json, "\n".join(f"{key:28} {value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
