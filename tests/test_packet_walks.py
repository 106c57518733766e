"""The two IPv6 extension-header walks the datapath contract knows (meshagent.testing.packets):
Cilium's, which the eBPF datapath does, and the kernel's ipv6_find_hdr(), which the nftables
datapath reads. The model judges each datapath by its own walk, so these are its rules."""

import attrs

from meshagent.testing.packets import (
    AUTH,
    CILIUM_WALK,
    DEST_OPTIONS,
    HOP_BY_HOP,
    KERNEL_WALK,
    MALFORMED,
    PARSED,
    ROUTING,
    TCP,
    Packet,
    parse,
)

SYN = Packet("fd00:1:1::1", "fd00:1:1::2", TCP, 40000, 6379)


def both(packet: Packet) -> tuple:
    def seen(walk):
        p = parse(packet.frame(), walk)
        return (p.outcome, p.protocol, p.dport) if p.outcome == PARSED else (p.outcome,)
    return seen(CILIUM_WALK), seen(KERNEL_WALK)


def test_a_legal_chain_reads_the_same_in_both():
    chain = attrs.evolve(SYN, ext_headers=(HOP_BY_HOP, ROUTING, DEST_OPTIONS))
    assert both(chain) == ((PARSED, TCP, 6379), (PARSED, TCP, 6379))


def test_more_than_four_headers_is_malformed_only_for_cilium():
    five = attrs.evolve(SYN, ext_headers=(DEST_OPTIONS,) * 5)
    assert both(five) == ((MALFORMED,), (PARSED, TCP, 6379))


def test_ah_is_walked_by_cilium_and_malformed_for_the_kernel_walk():
    ah = attrs.evolve(SYN, ext_headers=(HOP_BY_HOP, AUTH))
    assert both(ah) == ((PARSED, TCP, 6379), (MALFORMED,))


def test_a_chain_past_the_payload():
    """Cilium: malformed. The kernel: no transport header; a protocol with ports then has a
    short one (malformed), a protocol without ports is judged as it is."""
    def cut(packet: Packet) -> Packet:  # leave the first header and 2 bytes of the second
        whole = attrs.evolve(packet, ext_headers=(HOP_BY_HOP, DEST_OPTIONS))
        return attrs.evolve(whole, truncate=len(whole.frame()) - 14 - 40 - 10)
    assert both(cut(SYN)) == ((MALFORMED,), (MALFORMED,))
    assert both(cut(attrs.evolve(SYN, protocol=47))) == ((MALFORMED,), (PARSED, 47, 0))


def test_a_later_fragment_followed_by_a_header_is_malformed_for_the_kernel_walk():
    later = attrs.evolve(SYN, protocol=DEST_OPTIONS, frag_offset=1480, payload=16)
    assert both(later)[1] == (MALFORMED,)
    plain = attrs.evolve(SYN, frag_offset=1480, payload=16)
    assert both(plain) == ((PARSED, TCP, 0), (PARSED, TCP, 0))
