"""Policy resolution benchmark: full resolution vs one incremental identity add, side by side;
and the eBPF policy map's size for policies with port ranges.

10,000 identities (in two clusters), 1,000 policies, 100 local endpoints. Reports the time of a
full resolution cold (a fresh interpreter, an empty resolver given every identity, policy and
endpoint: nothing is cached from an import; the median of three), of the endpoints alone once
the rest is in, and of adding one identity that several selectors match. Goals: cold ≤ 100 ms,
incremental ≤ 1 ms. Then 1,000 policies whose rules
allow and deny port ranges (1 to 30,000 ports wide, over TCP, UDP or any protocol): the entries
the ebpf plugin writes (port prefixes, deny folded in) against one entry per port.

    .venv/bin/python bench/policy.py [--identities N] [--policies N] [--endpoints N] [--json FILE]
"""

import argparse
import platform
import random
import statistics
import subprocess
import sys
import time

from common import report

from meshagent.model.identity import Identity
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


def world(args) -> tuple[list[Identity], list, list[PolicyEndpoint]]:
    """The identities, parsed policies and endpoints of a run (the same for every seed 7)."""
    rng = random.Random(7)
    identities = make_identities(args.identities, rng)
    policies = parse_policies(make_policies(args.policies, rng))
    endpoints = [PolicyEndpoint(i + 1, rng.choice(NAMESPACES),
                                labels(rng.choice(APPS), "x", "cluster1")) for i in
                 range(args.endpoints)]
    endpoints = [PolicyEndpoint(e.id, e.namespace, frozenset(
        {label for label in e.labels if "namespace" not in label}
        | {f"k8s:io.kubernetes.pod.namespace={e.namespace}"})) for e in endpoints]
    return identities, policies, endpoints


def resolve_all(identities, policies, endpoints) -> tuple[Resolver, float, float]:
    """A fresh resolver fed everything: the resolver, the seconds from its creation until every
    endpoint is resolved, and the seconds of the endpoints alone (after the import)."""
    start = time.perf_counter()
    resolver = Resolver("cluster1")
    for identity in identities:
        resolver.add_identity(identity)
    for policy in policies:
        resolver.upsert_policy(policy)
    imported = time.perf_counter()
    for endpoint in endpoints:
        resolver.set_endpoint(endpoint)
    done = time.perf_counter()
    return resolver, done - start, done - imported


def cold(args, runs: int = 3) -> list[float]:
    """Full resolution cold: each in a fresh interpreter (nothing cached by an earlier
    resolver or import), from an empty resolver to every endpoint resolved."""
    command = [sys.executable, __file__, "--cold-once", "--identities", str(args.identities),
               "--policies", str(args.policies), "--endpoints", str(args.endpoints)]
    return [float(subprocess.run(command, check=True, capture_output=True,
                                 text=True).stdout.split()[-1]) for _ in range(runs)]


def measure(args) -> dict:
    rng = random.Random(8)
    identities, policies, endpoints = world(args)
    resolver, _, full = resolve_all(identities, policies, endpoints)
    colds = cold(args)

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
        "map_entries": keys,
        # cold: a fresh interpreter, an empty resolver, every identity, policy and endpoint
        "full_resolution_cold_s": round(statistics.median(colds), 4),
        "full_resolution_cold_each_s": [round(c, 4) for c in colds],
        # the endpoints alone, once identities and policies are in (what was measured before)
        "full_resolution_s": round(full, 4),
        "incremental_add_ms_median": round(inc * 1000, 3),
        "incremental_add_ms_max": round(max(increments) * 1000, 3),
        "full_over_incremental": round(statistics.median(colds) / inc, 1),
        "goal_cold_le_100ms": statistics.median(colds) <= 0.100,
        "goal_incremental_le_1ms": inc <= 0.001,
        "goal_incremental_le_10ms": inc <= 0.010,
    }


def make_range_policies(n: int, rng: random.Random) -> str:
    widths = (1, 10, 100, 1000, 4096, 30000)
    docs = []
    for i in range(n):
        def ports() -> str:
            start = rng.randint(1, 60000)
            end = min(65535, start + rng.choice(widths) - 1)
            protocol = rng.choice(["TCP", "UDP", "ANY"])
            return f"{{port: '{start}', endPort: {end}, protocol: {protocol}}}"
        docs.append(f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: r{i}, namespace: {rng.choice(NAMESPACES)}}}
spec:
  endpointSelector: {{matchLabels: {{app: {rng.choice(APPS)}}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: {rng.choice(APPS)}}}}}]
    toPorts: [{{ports: [{ports()}, {ports()}]}}]
  ingressDeny:
  - fromEndpoints: [{{matchExpressions: [{{key: tier, operator: In, values: [t{i % 5}]}}]}}]
    toPorts: [{{ports: [{ports()}]}}]
  egress:
  - toEntities: [world]
    toPorts: [{{ports: [{ports()}]}}]
""")
    return "---\n".join(docs)


def measure_ranges(args) -> dict:
    """What the ebpf plugin writes for policies with ranges, against one entry per port."""
    from meshagent.plugins.ebpf.datapath import entries_for, group_of
    from meshagent.plugins.ebpf.policymap import key_blocks
    rng = random.Random(11)
    identities = make_identities(args.identities, rng)
    policies = parse_policies(make_range_policies(args.policies, rng))
    resolver = Resolver("cluster1")
    for identity in identities:
        resolver.add_identity(identity)
    for policy in policies:
        resolver.upsert_policy(policy)
    for i in range(args.endpoints):
        ns = rng.choice(NAMESPACES)
        resolver.set_endpoint(PolicyEndpoint(i + 1, ns, labels(rng.choice(APPS), ns, "cluster1")))
    groups: dict = {}
    for endpoint_id in resolver.endpoints:
        for key, verdict in resolver.verdicts(endpoint_id).items():
            groups.setdefault(group_of(endpoint_id, key), {})[key] = verdict
    start = time.perf_counter()
    written = sum(len(entries_for(keys)) for keys in groups.values())
    seconds = time.perf_counter() - start
    keys = [k for g in groups.values() for k in g]
    per_port = sum((k.end_port - k.port + 1 if k.port else 1) * (3 if k.protocol == 0 and k.port
                                                                  else 1) for k in keys)
    return {"policies": args.policies, "resolver_keys": len(keys),
            "map_entries_prefixes": written, "map_entries_one_per_port": per_port,
            "per_port_over_prefixes": round(per_port / max(written, 1), 1),
            "max_prefixes_per_key": max(len(key_blocks(k.protocol, k.port, k.end_port))
                                        for k in keys),
            "seconds_to_compute": round(seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=10_000)
    parser.add_argument("--policies", type=int, default=1_000)
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--cold-once", action="store_true",
                        help="print the seconds of one cold full resolution, and nothing else")
    args = parser.parse_args()
    if args.cold_once:
        print(resolve_all(*world(args))[1])
        return
    result = measure(args)
    result["ranges"] = measure_ranges(args)
    report(result, args.json, "\n".join(f"{key:28} {value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
