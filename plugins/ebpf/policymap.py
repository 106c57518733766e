"""The policy map's longest-prefix layout: resolver map keys in, LPM trie entries out.

The kernel looks a packet up twice, once with the peer's identity and once with identity 0
(any peer), each a longest-prefix match over (protocol, destination port) inside the group of
entries of one (endpoint, direction, identity). A port range becomes the few aligned port
prefixes that cover it exactly (at most 30 for 16 bits), never one entry per port.

Deny must beat allow whatever the specificity: an allow on port 8080 inside a denied range
4096-8191 must still be denied; and a redirect (to the DNS proxy) beats an allow the same way,
as a deny beats it. So every prefix written carries the strongest verdict of *all* keys of its
group that cover it (deny > redirect > allow): the longest prefix a packet matches is then
inside every key that covers the packet, and its verdict is the packet's.

Flow events name the match type by the prefix length of the entry that decided (Cilium 1.17+,
where an allow under a deny of its group is left out, so a denied packet finds the longest
deny covering it). A prefix is left out when a packet in it would find the same verdict and
the same such length in its nearest ancestor; every prefix written is then one that its own
verdict's keys own, and its value stores its own length.
"""

from collections.abc import Iterable

import attrs

ANY_PROTOCOL = 0
#: A rule with ports but protocol ANY: the protocols that carry ports (as Cilium expands it).
PORT_PROTOCOLS = (6, 17, 132)
PROTOCOL_BITS, PORT_BITS = 8, 16
ALLOW, DENY, REDIRECT = "allow", "deny", "redirect"
#: which verdict wins where keys of one group overlap
RANK = {ALLOW: 0, REDIRECT: 1, DENY: 2}


@attrs.frozen(order=True)
class Block:
    """One LPM entry inside a group: ``bits`` leading bits of (protocol, port) count.

    bits 0: any protocol; 8: this protocol, any port; 8+k: the ports sharing the k leading
    bits of ``port`` (``port`` has the other bits zero).
    """

    bits: int
    protocol: int
    port: int

    @property
    def first_port(self) -> int:
        return self.port

    @property
    def last_port(self) -> int:
        if self.bits <= PROTOCOL_BITS:
            return 65535
        return self.port | ((1 << (PROTOCOL_BITS + PORT_BITS - self.bits)) - 1)

    def contains(self, other: "Block") -> bool:
        if self.bits > other.bits:
            return False
        if self.bits == 0:
            return True
        return (self.protocol == other.protocol and self.first_port <= other.first_port
                and other.last_port <= self.last_port)

    def describe(self) -> str:
        if self.bits == 0:
            return "any protocol"
        ports = "any port" if self.bits == PROTOCOL_BITS else (
            str(self.port) if self.first_port == self.last_port
            else f"{self.first_port}-{self.last_port}")
        return f"{self.protocol}/{ports}"


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """``[(port, bits)]``: the fewest aligned prefixes covering exactly ``first..last``."""
    if not 0 <= first <= last <= 65535:
        raise ValueError(f"bad port range {first}-{last}")
    out = []
    while first <= last:
        size = first & -first if first else 1 << PORT_BITS  # the alignment of ``first``
        while first + size - 1 > last:
            size >>= 1
        out.append((first, PORT_BITS - size.bit_length() + 1))
        first += size
    return out


def key_blocks(protocol: int, port: int, end_port: int) -> list[Block]:
    """The blocks of one resolver key (``port`` 0: any port; ``protocol`` 0: any)."""
    if port == 0:
        if protocol == ANY_PROTOCOL:
            return [Block(0, 0, 0)]
        return [Block(PROTOCOL_BITS, protocol, 0)]
    protocols = PORT_PROTOCOLS if protocol == ANY_PROTOCOL else (protocol,)
    return [Block(PROTOCOL_BITS + bits, proto, start)
            for proto in protocols for start, bits in port_prefixes(port, end_port)]


def group_entries(keys: Iterable[tuple[int, int, int, str]]) -> dict[Block, str]:
    """``{Block: "allow"|"deny"}`` for one group's ``(protocol, port, end_port, verdict)``
    keys, such that the longest block containing a packet gives its verdict."""
    owners: dict[Block, set[str]] = {}
    for protocol, port, end, verdict in keys:
        for block in key_blocks(protocol, port, end):
            owners.setdefault(block, set()).add(verdict)
    # A key covers a block exactly when one of its own blocks is the block or an ancestor of
    # it (its blocks are the maximal aligned ones), so only ancestors need looking at.
    # What a packet in the block must find: the verdict, and the prefix length of the entry
    # Cilium would hold there (the longest of the keys with that verdict: an allow under a deny
    # is left out), which names the match type.
    found: dict[Block, tuple[str, int]] = {}
    written: dict[Block, str] = {}
    for block in sorted(owners):  # shortest first: ancestors are decided before descendants
        covering = [(verdict, ancestor.bits) for ancestor in ancestors(block)
                    if ancestor in owners for verdict in owners[ancestor]]
        verdict = max((v for v, _ in covering), key=RANK.__getitem__)
        found[block] = (verdict, max(bits for v, bits in covering if v == verdict))
        nearest = [a for a in ancestors(block)[:-1] if a in owners]
        if not nearest or found[nearest[-1]] != found[block]:
            written[block] = verdict
    return written


def ancestors(block: Block) -> list[Block]:
    """The blocks containing ``block``, itself included, shortest first."""
    out = [Block(0, 0, 0)]
    if block.bits >= PROTOCOL_BITS:
        out.append(Block(PROTOCOL_BITS, block.protocol, 0))
    for bits in range(PROTOCOL_BITS + 1, block.bits + 1):
        mask = ~((1 << (PROTOCOL_BITS + PORT_BITS - bits)) - 1) & 0xFFFF
        out.append(Block(bits, block.protocol, block.port & mask))
    return out


# -- changing what is written without a moment of too much allowed ---------------------------------

#: A group's keys by (protocol, port, end_port): its verdicts as the resolver gives them.
Keys = dict[tuple[int, int, int], str]


def safe_stages(old: Keys, new: Keys) -> list[Keys]:
    """The key sets one group passes through from ``old`` to ``new``.

    The kernel combines two groups per packet (the peer's identity and any identity), so a
    change applied group after group could, for a moment, pair one group's new allow with the
    other's old lack of a deny. Every group of an endpoint therefore steps through the same
    three stages together: old plus new's denies (tighter than old), then without the allows
    and redirects new drops (tighter than both), then new. No packet that both old and new
    deny is allowed on the way (tests/test_policymap.py simulates it write by write). A key
    that allows in one state and redirects in the other redirects in the middle stage.
    """
    tighter = dict(old)
    tighter.update({k: DENY for k, v in new.items() if v == DENY})
    both = {k: DENY for k in old.keys() | new.keys() if DENY in (old.get(k), new.get(k))}
    both.update({k: max(old[k], new[k], key=RANK.__getitem__)
                 for k in old.keys() & new.keys() if DENY not in (old[k], new[k])})
    return [tighter, both, new]


def ordered_writes(before: dict[Block, str], after: dict[Block, str]
                   ) -> list[tuple[Block, str | None]]:
    """The writes (verdict, or None to delete) that take one group's entries from ``before``
    to ``after`` so that at every step each packet meets its verdict of before or of after:
    new and changed entries longest prefix first, then stale ones shortest prefix first."""
    puts = sorted(((b, v) for b, v in after.items() if before.get(b) != v),
                  key=lambda item: -item[0].bits)
    deletes = sorted((b for b in before if b not in after), key=lambda b: b.bits)
    return puts + [(b, None) for b in deletes]


def block_key(block: Block) -> tuple[int, int, int]:
    """An entry read back from the map as the key that writes exactly it: entries of a group
    never put an allow under a deny, so reading them as keys gives the same verdicts."""
    if block.bits == 0:
        return (ANY_PROTOCOL, 0, 0)
    if block.bits == PROTOCOL_BITS:
        return (block.protocol, 0, 0)
    return (block.protocol, block.first_port, block.last_port)


def longest(entries: dict[Block, str], protocol: int, port: int) -> Block | None:
    """The entry the kernel finds in one group for a packet (the longest containing block)."""
    point = Block(PROTOCOL_BITS + PORT_BITS, protocol, port)
    best = None
    for block in entries:
        if block.contains(point) and (best is None or block.bits > best.bits):
            best = block
    return best


def lookup(entries: dict[Block, str], protocol: int, port: int) -> str | None:
    """The verdict the kernel finds in one group for a packet."""
    best = longest(entries, protocol, port)
    return None if best is None else entries[best]
