"""The policy map's prefix layout, without a kernel: a longest-prefix lookup in the entries
written for a group gives the resolver's verdict for every packet, and a range costs at most 30
prefixes per protocol."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshagent.datapath.events import (
    MATCH_L3_L4,
    MATCH_L3_PROTO,
    MATCH_L4_ONLY,
    MATCH_NONE,
    MATCH_PROTO_ONLY,
    match_of,
)
from meshagent.plugins.ebpf.policymap import (
    ALLOW,
    DENY,
    group_entries,
    key_blocks,
    longest,
    lookup,
    ordered_writes,
    port_prefixes,
    safe_stages,
)
from meshagent.policy.resolver import MapKey, Verdict, judge
from meshagent.testing.datapath_model import match_type


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


@settings(max_examples=300, deadline=None)
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


# -- a change, write by write --------------------------------------------------------------------

GROUP_KEYS = st.dictionaries(
    st.tuples(st.sampled_from([0, 6, 17]), RANGES).map(
        lambda t: (t[0], t[1][0], t[1][1])), st.sampled_from([ALLOW, DENY]), max_size=4)


def combined(groups: dict, proto: int, port: int) -> str | None:
    """The kernel's two lookups (the peer's identity, any identity): deny wins, then allow."""
    found = {lookup(entries, proto, port) for entries in groups.values()}
    return DENY if DENY in found else (ALLOW if ALLOW in found else None)


@settings(max_examples=400, deadline=None)
@given(GROUP_KEYS, GROUP_KEYS, GROUP_KEYS, GROUP_KEYS)
# a stale deny removed before the stale allow above it would open port 80 for a moment
@example({}, {(6, 0, 0): ALLOW, (6, 80, 80): DENY}, {}, {(0, 0, 0): DENY})
# one group's new allow landing before the other's new deny
@example({}, {}, {(6, 80, 80): ALLOW}, {(6, 80, 80): DENY})
def test_no_write_of_a_change_allows_what_before_and_after_both_deny(old_id, old_any, new_id,
                                                                      new_any):
    """Applied as the datapath applies it (every group through the same stages; within a group
    longest prefixes written first, stale ones removed shortest first), no state in between
    allows a packet that the state before and the state after both refuse."""
    old, new = {"id": old_id, "any": old_any}, {"id": new_id, "any": new_any}

    def entries(keys: dict) -> dict:
        return group_entries((p, s, e, v) for (p, s, e), v in keys.items())
    before = {g: entries(k) for g, k in old.items()}
    after = {g: entries(k) for g, k in new.items()}
    current = {g: dict(e) for g, e in before.items()}
    points = [(proto, port if proto != 1 else 0) for proto in (1, 6, 17, 132)
              for port in PROBE_PORTS]

    def check(where: str) -> None:
        for proto, port in points:
            if combined(current, proto, port) == ALLOW:
                assert ALLOW in (combined(before, proto, port), combined(after, proto, port)), \
                    (where, proto, port, current)
    stages = {g: safe_stages(old[g], new[g]) for g in old}
    for index in range(3):
        for group in sorted(stages):
            for block, verdict in ordered_writes(current[group], entries(stages[group][index])):
                if verdict is None:
                    del current[group][block]
                else:
                    current[group][block] = verdict
                check(f"stage {index} group {group}")
    assert current == after


def test_one_stage_at_a_time_is_what_makes_it_safe():
    """The counter-example the stages exist for: a new allow in one group lands before the
    new deny in the other."""
    old = {"id": {}, "any": {}}
    new = {"id": {(6, 22, 22): ALLOW}, "any": {(6, 22, 22): DENY}}
    naive = {"id": group_entries([(6, 22, 22, ALLOW)]), "any": {}}  # "id" written first
    assert combined(naive, 6, 22) == ALLOW
    staged = {g: group_entries((p, s, e, v) for (p, s, e), v in safe_stages(old[g], new[g])[0]
                               .items()) for g in old}
    assert combined(staged, 6, 22) == DENY


# -- the match type the kernel reports -------------------------------------------------------------


def kernel_match(groups: dict, protocol: int, port: int) -> int:
    """bpf/lib/policy.h's choice, in Python: each entry stores its own prefix length."""
    found = {}
    for name, entries in groups.items():
        block = longest(entries, protocol, port)
        found[name] = None if block is None else (entries[block], block.bits)
    mine, anyone = found["id"], found["any"]
    if mine and (mine[0] == DENY or not anyone or anyone[0] == ALLOW and anyone[1] <= mine[1]):
        return match_of(True, mine[1])
    return MATCH_NONE if anyone is None else match_of(False, anyone[1])


@settings(max_examples=400, deadline=None)
@given(GROUP_KEYS, GROUP_KEYS)
# the five cases where Cilium 1.17+ differs from "the peer's identity first, L3 before L4"
@example({(0, 0, 0): ALLOW, (6, 80, 80): ALLOW}, {})
@example({(0, 0, 0): ALLOW}, {(6, 80, 80): ALLOW})
@example({}, {(6, 80, 80): ALLOW, (0, 0, 0): ALLOW})
@example({(6, 0, 0): ALLOW}, {})
@example({}, {(6, 0, 0): ALLOW})
@example({(0, 0, 0): DENY, (6, 0, 0): ALLOW}, {})  # an allow under a deny names the deny
def test_the_entries_written_report_the_models_match_type(id_keys, any_keys):
    peer = 1000
    groups = {name: group_entries((p, s, e, v) for (p, s, e), v in keys.items())
              for name, keys in (("id", id_keys), ("any", any_keys))}
    verdicts = {MapKey("ingress", identity, p, s, e): Verdict(v)
                for identity, keys in ((peer, id_keys), (0, any_keys))
                for (p, s, e), v in keys.items()}
    for proto in (1, 6, 17, 132):
        for port in PROBE_PORTS:
            port = port if proto != 1 else 0
            assert kernel_match(groups, proto, port) == \
                match_type(verdicts, "ingress", peer, proto, port), (proto, port, groups)


def test_the_five_cases_where_cilium_differs_from_the_old_rule():
    """Cilium 1.17+ bpf/lib/policy.h: the longer prefix decides, any identity only when
    strictly longer; a protocol without a port is L3-Proto or Proto-Only."""
    def match(id_keys: dict, any_keys: dict) -> int:
        groups = {"id": group_entries((p, s, e, v) for (p, s, e), v in id_keys.items()),
                  "any": group_entries((p, s, e, v) for (p, s, e), v in any_keys.items())}
        return kernel_match(groups, 6, 80)
    assert match({(0, 0, 0): ALLOW, (6, 80, 80): ALLOW}, {}) == MATCH_L3_L4
    assert match({(0, 0, 0): ALLOW}, {(6, 80, 80): ALLOW}) == MATCH_L4_ONLY
    assert match({}, {(6, 80, 80): ALLOW, (0, 0, 0): ALLOW}) == MATCH_L4_ONLY
    assert match({(6, 0, 0): ALLOW}, {}) == MATCH_L3_PROTO
    assert match({}, {(6, 0, 0): ALLOW}) == MATCH_PROTO_ONLY
    assert match({(6, 80, 80): ALLOW}, {(6, 80, 80): ALLOW}) == MATCH_L3_L4  # a tie: the peer's
