"""What nftables interval maps can hold: disjoint ranges.

An nftables interval map refuses overlapping elements, so the two longest-prefix structures of
the eBPF datapath become partitions here:

- the ipcache: prefixes, nested as CIDR identities and pod /32s are, become disjoint address
  ranges, each with the identity of the longest prefix holding it (:func:`flatten_prefixes`);
- one policy group's keys (protocol, port range, allow or deny; overlapping) become disjoint
  (protocol range, port range) segments, each with the verdict of every key covering it, deny
  beating redirect beating allow, and the prefix length of the entry Cilium's LPM policy map would find there
  (0 any protocol, 8 a protocol, 9-24 a port block), which names the policy match type as
  Cilium 1.17+ does (:func:`policy_segments`).
"""

import ipaddress
from collections.abc import Iterable

ANY_PROTOCOL = 0
#: A key with ports but protocol ANY covers the protocols that carry ports (as Cilium).
PORT_PROTOCOLS = (6, 17, 132)
#: The protocols looked up with a port in the ported maps: those with ports, and ICMP and
#: ICMPv6, whose port is the type (a packet that shows no type is looked up without one)
TYPED_PROTOCOLS = PORT_PROTOCOLS + (1, 58)
ALLOW, DENY, REDIRECT = "allow", "deny", "redirect"
RANK = {ALLOW: 0, REDIRECT: 1, DENY: 2}  # where keys overlap: deny > redirect > allow

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: (first address, last address, identity), addresses as integers
Range = tuple[int, int, int]
#: (first protocol, last protocol, first port, last port, verdict, deciding prefix length)
Segment = tuple[int, int, int, int, str, int]


def flatten_prefixes(rows: Iterable[tuple[Network, int]]) -> list[Range]:
    """Disjoint ranges giving every address the identity of its longest prefix; addresses no
    prefix holds are left out. Adjacent ranges of one identity are merged. Prefixes of one
    family only."""
    prefixes = sorted(((int(n.network_address), n.prefixlen, int(n.broadcast_address), ident)
                       for n, ident in rows))
    bounds = sorted({p[0] for p in prefixes} | {p[2] + 1 for p in prefixes})
    out: list[Range] = []
    stack: list[tuple[int, int]] = []  # (last address, identity), most specific on top
    position = 0
    for n, point in enumerate(bounds):
        while stack and stack[-1][0] < point:
            stack.pop()
        while position < len(prefixes) and prefixes[position][0] == point:
            _, _, last, identity = prefixes[position]
            stack.append((last, identity))
            position += 1
        if not stack or n + 1 == len(bounds):
            continue
        last = bounds[n + 1] - 1
        identity = stack[-1][1]
        if out and out[-1][1] + 1 == point and out[-1][2] == identity:
            out[-1] = (out[-1][0], last, identity)
        else:
            out.append((point, last, identity))
    return out


def policy_segments(keys: Iterable[tuple[int, int, int, str]]) -> list[Segment]:
    """One group's keys ``(protocol, port, end_port, verdict)`` — protocol 0: any, port 0:
    any — as disjoint segments over (protocol 0-255, port 0-65535), each with the verdict of
    every key covering it (deny > redirect > allow) and the prefix length of the entry that decides
    it in Cilium's policy map (:func:`port_blocks`; the longest of the keys of that verdict);
    what no key covers is left out. A packet of a protocol without ports is looked up with
    port 0."""
    keys = list(keys)
    named = {p for p, _, _, _ in keys if p != ANY_PROTOCOL}
    if any(p == ANY_PROTOCOL and port for p, port, _, _ in keys):
        named.update(PORT_PROTOCOLS)
    rows: list[tuple[int, int]] = []  # protocol ranges: each named one alone, and the gaps
    start = 0
    for protocol in sorted(named):
        if start < protocol:
            rows.append((start, protocol - 1))
        rows.append((protocol, protocol))
        start = protocol + 1
    if start <= 255:
        rows.append((start, 255))
    out: list[Segment] = []
    for first, last in rows:
        single = first if first == last and first in named else None
        covering = []
        for protocol, port, end, verdict in keys:
            if protocol == ANY_PROTOCOL and not port:
                covering.append((0, 65535, verdict, 0))
            elif protocol == ANY_PROTOCOL:
                if single in PORT_PROTOCOLS:
                    covering += [(a, b, verdict, bits) for a, b, bits in port_blocks(port, end)]
            elif protocol == single:
                covering += [(a, b, verdict, bits) for a, b, bits in port_blocks(port, end)] \
                    if port else [(0, 65535, verdict, 8)]
        for low, high, verdict, prefix in _port_segments(covering):
            out.append((first, last, low, high, verdict, prefix))
    return out


def port_blocks(first: int, last: int) -> list[tuple[int, int, int]]:
    """``[(first, last, prefix length)]``: the aligned power-of-two port blocks a key's range
    is cut into in Cilium's policy map (an LPM trie over protocol 8 bits and port 16 bits),
    the fewest that cover it exactly."""
    last = max(first, last)
    out = []
    while first <= last:
        size = first & -first if first else 1 << 16  # the alignment of ``first``
        while first + size - 1 > last:
            size >>= 1
        out.append((first, first + size - 1, 8 + 17 - size.bit_length()))
        first += size
    return out


def _port_segments(ranges: list[tuple[int, int, str, int]]) -> list[tuple[int, int, str, int]]:
    """Overlapping port ranges with verdicts and prefix lengths as disjoint ones, deny
    beating redirect beating allow (with the longest prefix of that verdict), adjacent equal
    ones merged."""
    bounds = sorted({r[0] for r in ranges} | {r[1] + 1 for r in ranges})
    out: list[tuple[int, int, str, int]] = []
    for low, following in zip(bounds, bounds[1:], strict=False):
        here = [(v, bits) for first, last, v, bits in ranges if first <= low <= last]
        if not here:
            continue
        verdict = max((v for v, _ in here), key=RANK.__getitem__)
        prefix = max(bits for v, bits in here if v == verdict)
        if out and out[-1][1] + 1 == low and out[-1][2:] == (verdict, prefix):
            out[-1] = (out[-1][0], following - 1, verdict, prefix)
        else:
            out.append((low, following - 1, verdict, prefix))
    return out
