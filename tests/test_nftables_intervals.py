"""The nftables datapath's partitions equal the longest-prefix and deny-beats-allow lookups they
replace, on random inputs (brute force as the oracle)."""

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent.plugins.nftables.intervals import (
    ALLOW,
    DENY,
    PORT_PROTOCOLS,
    flatten_prefixes,
    policy_segments,
)
from meshagent.policy.contract import MapKey
from meshagent.testing.datapath_model import key_prefix

prefixes = st.builds(lambda a, n: ipaddress.IPv4Network((a, n), strict=False),
                     st.integers(0, 2**32 - 1).map(lambda a: a & 0x00FFFFFF | 0x0A000000),
                     st.sampled_from((8, 16, 24, 25, 30, 31, 32)))


@settings(max_examples=300, deadline=None)
@given(rows=st.dictionaries(prefixes, st.integers(1, 5), max_size=12),
       probes=st.lists(st.integers(0x0A000000, 0x0AFFFFFF), min_size=20, max_size=20))
def test_flattened_ipcache_gives_every_address_its_longest_prefix(rows, probes):
    ranges = flatten_prefixes(rows.items())
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # disjoint
    edges = [r[0] for r in ranges] + [r[1] for r in ranges] + [r[1] + 1 for r in ranges]
    for address in probes + edges:
        best = max((n for n in rows if ipaddress.IPv4Address(address) in n),
                   key=lambda n: n.prefixlen, default=None)
        got = next((r[2] for r in ranges if r[0] <= address <= r[1]), None)
        assert got == (rows[best] if best is not None else None), hex(address)


keys = st.lists(st.tuples(st.sampled_from((0, 6, 17, 132, 1)),
                          st.sampled_from((0, 1, 53, 80, 4096, 8080, 65535)),
                          st.sampled_from((0, 80, 1023, 8191, 65535)),
                          st.sampled_from((ALLOW, DENY))), max_size=6)


def oracle(group, protocol: int, port: int) -> tuple[str, int] | None:
    """The verdict, and the longest prefix length of the keys of that verdict that match (the
    entry Cilium's policy map finds; the model's :func:`key_prefix`)."""
    matched = []
    for p, first, end, verdict in group:
        last = max(end, first)
        key = MapKey("ingress", 0, p, first, last)
        if p == 0 and not first:
            matched.append((verdict, key_prefix(key, port)))
        elif p == 0 and protocol in PORT_PROTOCOLS and first <= port <= last:
            matched.append((verdict, key_prefix(key, port)))
        elif p != 0 and p == protocol and (not first or first <= port <= last):
            matched.append((verdict, key_prefix(key, port)))
    if not matched:
        return None
    verdict = DENY if any(v == DENY for v, _ in matched) else ALLOW
    return verdict, max(bits for v, bits in matched if v == verdict)


@settings(max_examples=300, deadline=None)
@given(group=keys, probes=st.lists(st.tuples(st.sampled_from((0, 1, 6, 17, 47, 132, 255)),
                                             st.integers(0, 65535)), min_size=30, max_size=30))
def test_policy_segments_give_every_packet_its_groups_verdict_and_match(group, probes):
    segments = policy_segments(group)
    for a in segments:  # disjoint in two dimensions
        for b in segments:
            if a is not b:
                assert a[1] < b[0] or b[1] < a[0] or a[3] < b[2] or b[3] < a[2]
    edges = [(s[0], s[2]) for s in segments] + [(s[1], s[3]) for s in segments]
    for protocol, port in probes + edges + [(6, 80), (17, 53), (1, 0)]:
        got = next((s[4:] for s in segments
                    if s[0] <= protocol <= s[1] and s[2] <= port <= s[3]), None)
        assert got == oracle(group, protocol, port), (protocol, port, segments)
