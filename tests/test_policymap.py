"""The policy map's prefix layout, without a kernel: a longest-prefix lookup in the entries
written for a group gives the resolver's verdict for every packet, and a range costs at most 30
prefixes per protocol."""

from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent.plugins.ebpf.policymap import (
    ALLOW, DENY, group_entries, key_blocks, lookup, port_prefixes,
)
from meshagent.policy.resolver import MapKey, Verdict, judge


@given(st.integers(1, 65535).flatmap(lambda a: st.tuples(st.just(a), st.integers(a, 65535))))
def test_port_prefixes_cover_a_range_exactly_and_few(bounds):
    first, last = bounds
    prefixes = port_prefixes(first, last)
    assert len(prefixes) <= 30
    covered = []
    for start, bits in prefixes:
        size = 1 << (16 - bits)
        assert start % size == 0  # aligned: a real prefix
        covered.append((start, start + size - 1))
    covered.sort()
    assert covered[0][0] == first and covered[-1][1] == last
    assert all(a[1] + 1 == b[0] for a, b in zip(covered, covered[1:]))


RANGES = st.sampled_from([(0, 0), (80, 80), (4096, 8191), (8080, 8080), (1, 65535),
                          (1024, 65535), (30000, 32767), (65535, 65535)])
KEYS = st.lists(st.tuples(st.sampled_from([0, 6, 17, 132]), RANGES | st.integers(1, 65535).map(
    lambda p: (p, p)), st.sampled_from([ALLOW, DENY])), max_size=6)
PROBE_PORTS = [0, 1, 79, 80, 81, 1023, 1024, 4095, 4096, 8080, 8191, 8192, 29999, 30000, 32767,
               32768, 65534, 65535]


@settings(max_examples=300)
@given(KEYS, st.lists(st.integers(0, 65535), max_size=5))
def test_the_longest_prefix_gives_the_resolvers_verdict(keys, extra_ports):
    verdicts = {MapKey("ingress", 0, proto, start, end): Verdict(verdict)
                for proto, (start, end), verdict in keys}
    # the resolver keeps one verdict per key (deny if any rule denies it): so do we
    entries = group_entries((k.protocol, k.port, k.end_port, v.value) for k, v in verdicts.items())
    for proto in (1, 6, 17, 132, 47):
        for port in PROBE_PORTS + extra_ports:
            port = port if proto in (6, 17, 132) else 0  # no ports: the datapath reads 0
            expected, why = judge(verdicts, "ingress", 0, proto, port)
            found = lookup(entries, proto, port)
            assert (found or DENY) == expected.value, (proto, port, entries)
            assert (found is None) == (why == "denied by default")


def test_a_range_over_any_protocol_is_one_per_port_protocol():
    assert len(key_blocks(0, 4096, 8191)) == 3  # TCP, UDP, SCTP: ports mean nothing elsewhere
    assert len(key_blocks(6, 1, 65535)) == 16
    assert key_blocks(0, 0, 0)[0].bits == 0 and key_blocks(6, 0, 0)[0].bits == 8


def test_an_allow_inside_a_denied_range_stays_denied():
    entries = group_entries([(0, 0, 0, ALLOW), (6, 4096, 8191, DENY), (6, 8080, 8080, ALLOW)])
    assert [lookup(entries, 6, p) for p in (4095, 4096, 8080, 8191, 8192)] == \
        [ALLOW, DENY, DENY, DENY, ALLOW]
    assert len(entries) == 2  # the 8080 allow adds nothing the deny's prefix does not say
