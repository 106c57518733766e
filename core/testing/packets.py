"""Synthetic Ethernet frames for datapath tests, and the parse every datapath must agree with.

:class:`Packet` describes a frame by its fields (so a failing case reads as what it is) and
:meth:`Packet.frame` builds the bytes: IPv4 with options or IPv6 with extension headers (the
family follows the addresses), TCP/UDP/SCTP/ICMP/ICMPv6, first and later fragments, truncated
and malformed headers, and frames of other ethertypes. :func:`parse` reads bytes back the way
docs/datapath.md says a datapath reads them.
"""

import ipaddress
import struct

import attrs

ETH_IPV4, ETH_ARP, ETH_IPV6 = 0x0800, 0x0806, 0x86DD
ETH_EXPERIMENTAL = 0x88B5  # IEEE's local experimental ethertype: neither IP nor ARP
TCP, UDP, SCTP, ICMP, ICMPV6 = 6, 17, 132, 1, 58
#: IPv6 extension headers a datapath walks to reach the transport header (RFC 8200 order
#: aside), and how many it walks at most (Cilium's IPV6_MAX_HEADERS): more is malformed.
HOP_BY_HOP, ROUTING, FRAGMENT, AUTH, DEST_OPTIONS = 0, 43, 44, 51, 60
EXTENSION_HEADERS = (HOP_BY_HOP, ROUTING, FRAGMENT, AUTH, DEST_OPTIONS)
IPV6_MAX_HEADERS = 4
#: ICMPv6 neighbour discovery (hop limit 255) and MLD (hop limit 1): the link's own control
#: messages, passed like ARP while they stay on the link.
ND_TYPES = frozenset(range(133, 138))
MLD_TYPES = frozenset({130, 131, 132, 143})
#: The transport header a packet of these protocols must carry whole (a first fragment too):
#: every byte up to and including TCP's flags, UDP's and SCTP's common header (RFC 1858).
TRANSPORT_HEADER = {TCP: 20, UDP: 8, SCTP: 12}
SYN, ACK = 0x02, 0x10
#: ICMP echo request and reply per protocol: the one ICMP exchange tracked as a connection
#: (Cilium's conntrack), so a reply passes as a reply
ECHO_REQUEST, ECHO_REPLY = {ICMP: 8, ICMPV6: 128}, {ICMP: 0, ICMPV6: 129}
DEST_UNREACH, FRAG_NEEDED = 3, 4  # ICMPv4 "fragmentation needed": it always passes


def icmp_ports(protocol: int, icmp_type: int) -> tuple[int, int]:
    """The (source, destination) "ports" an ICMP or ICMPv6 message is judged and tracked
    under: the destination is its type, which policy matches as a port (Cilium's
    bpf/lib/policy.h); the source is the type of its echo partner for an echo request or
    reply, else 0. So an echo reply is the reverse of its request, and a message of another
    type is no reply of anything."""
    partner = {ECHO_REQUEST[protocol]: ECHO_REPLY[protocol],
               ECHO_REPLY[protocol]: ECHO_REQUEST[protocol]}.get(icmp_type, 0)
    return partner, icmp_type
MORE_FRAGMENTS = 0x2000


@attrs.frozen
class Packet:
    src: str
    dst: str
    protocol: int = TCP
    sport: int = 0
    dport: int = 0
    tcp_flags: int = SYN
    payload: int = 0  # bytes after the transport header (after the IP header for a later fragment)
    ip_id: int = 0
    more_fragments: bool = False
    frag_offset: int = 0  # bytes, a multiple of 8; > 0: a later fragment (no transport header)
    transport_bytes: int | None = None  # of the transport header present; None: all of it
    ihl: int = 5
    version: int | None = None  # the IP header's version field; None: the family's
    length_excess: int = 0  # the IP length field claims this many bytes more than there are
    ethertype: int | None = None  # None: the family's; another one: 40 zero bytes follow
    ext_headers: tuple[int, ...] = ()  # IPv6: extension headers before the transport
    hop_limit: int = 64  # IPv6
    icmp_type: int | None = None  # ICMP(v6): None is an echo request
    icmp_code: int = 0
    truncate: int = 0  # IPv6: bytes cut off the end before the payload length is written

    @property
    def family(self) -> int:
        return 6 if ":" in self.src else 4

    def reply(self) -> "Packet":
        """The same flow, the other way: for ICMP and ICMPv6 an echo reply to an echo request
        (with its identifier) and the other way round, a message of another type as it is."""
        if self.protocol in (ICMP, ICMPV6):
            request, reply = ECHO_REQUEST[self.protocol], ECHO_REPLY[self.protocol]
            kind = request if self.icmp_type is None else self.icmp_type
            kind = {request: reply, reply: request}.get(kind, kind)
            return attrs.evolve(self, src=self.dst, dst=self.src, icmp_type=kind)
        return attrs.evolve(self, src=self.dst, dst=self.src, sport=self.dport,
                            dport=self.sport, tcp_flags=SYN | ACK if self.tcp_flags == SYN
                            else self.tcp_flags)

    def frame(self) -> bytes:
        own = ETH_IPV6 if self.family == 6 else ETH_IPV4
        ethertype = own if self.ethertype is None else self.ethertype
        eth = bytes.fromhex("020000000001020000000002") + struct.pack("!H", ethertype)
        if ethertype == ETH_ARP and self.family == 4:
            return eth + struct.pack("!HHBBH", 1, ETH_IPV4, 6, 4, 1) + bytes(6) + \
                ipaddress.IPv4Address(self.src).packed + bytes(6) + \
                ipaddress.IPv4Address(self.dst).packed
        if ethertype != own:
            return eth + bytes(40)
        if self.family == 6:
            return eth + self._ipv6()
        body = self._after_ip()
        options = b"\x01" * (self.ihl * 4 - 20) if self.ihl > 5 else b""
        total = 20 + len(options) + len(body) + self.length_excess
        flags = (MORE_FRAGMENTS if self.more_fragments else 0) | (self.frag_offset // 8)
        version = 4 if self.version is None else self.version
        header = struct.pack("!BBHHHBBH4s4s", (version << 4) | (self.ihl & 0xF), 0,
                             total & 0xFFFF, self.ip_id, flags, 64, self.protocol, 0,
                             ipaddress.IPv4Address(self.src).packed,
                             ipaddress.IPv4Address(self.dst).packed) + options
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        return eth + header + body

    def _ipv6(self) -> bytes:
        """The IPv6 header, its extension headers (a fragment header last, for a fragment)
        and what follows them."""
        chain = list(self.ext_headers)
        fragment = self.more_fragments or self.frag_offset > 0
        if fragment:
            chain.append(FRAGMENT)
        body = self._after_ip()
        headers = b""
        for n, kind in enumerate(chain):
            following = chain[n + 1] if n + 1 < len(chain) else self.protocol
            if kind == FRAGMENT:
                field = self.frag_offset & 0xFFF8 | (1 if self.more_fragments else 0)
                headers += struct.pack("!BBHI", following, 0, field, self.ip_id)
            elif kind == AUTH:  # length in 4-byte units, minus 2
                headers += struct.pack("!BB", following, 2) + bytes(14)
            else:  # length in 8-byte units, minus 1; PadN options
                headers += struct.pack("!BB", following, 0) + b"\x01\x04" + bytes(4)
        payload = (headers + body)[:max(0, len(headers) + len(body) - self.truncate)]
        version = 6 if self.version is None else self.version
        first = chain[0] if chain else self.protocol
        return struct.pack("!IHBB16s16s", version << 28, (len(payload) + self.length_excess)
                           & 0xFFFF, first, self.hop_limit,
                           ipaddress.IPv6Address(self.src).packed,
                           ipaddress.IPv6Address(self.dst).packed) + payload

    def _after_ip(self) -> bytes:
        """The transport header (cut to ``transport_bytes``) and payload; a later fragment's
        payload only."""
        body = bytes(self.payload)
        if self.frag_offset:
            return body
        transport = self._transport(len(body))
        if self.transport_bytes is not None:
            return transport[:self.transport_bytes]
        return transport + body

    def _transport(self, payload: int) -> bytes:
        if self.protocol == TCP:
            return struct.pack("!HHIIBBHHH", self.sport, self.dport, 1, 0, 5 << 4,
                               self.tcp_flags, 65535, 0, 0)
        if self.protocol == UDP:
            return struct.pack("!HHHH", self.sport, self.dport, 8 + payload, 0)
        if self.protocol == SCTP:
            return struct.pack("!HHII", self.sport, self.dport, 1, 0)
        if self.protocol in (ICMP, ICMPV6):
            echo = 8 if self.protocol == ICMP else 128
            kind = echo if self.icmp_type is None else self.icmp_type
            return struct.pack("!BBHHH", kind, self.icmp_code, 0, self.sport, 1)
        return b""


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


ARP, NOT_IP, MALFORMED, PARSED = "arp", "not-ip", "malformed", "parsed"
FRAG_NONE, FRAG_FIRST, FRAG_LATER = "none", "first", "later"


@attrs.frozen
class Parsed:
    """What a datapath reads off a frame (docs/datapath.md, "Parsing")."""

    outcome: str  # ARP, NOT_IP (another ethertype), MALFORMED or PARSED
    family: int = 4
    src: str = ""
    dst: str = ""
    protocol: int = 0
    sport: int = 0
    dport: int = 0
    fragment: str = FRAG_NONE
    ip_id: int = 0
    frag_offset: int = 0
    transport_short: bool = False  # a first fragment without its whole transport header
    hop_limit: int = 0  # IPv6
    icmp_type: int | None = None  # ICMP or ICMPv6, when the packet holds it
    icmp_code: int | None = None  # likewise
    tcp_flags: int = 0  # TCP's flag bits, when the packet holds the TCP header

    @property
    def frag_needed(self) -> bool:
        """ICMPv4 fragmentation needed (destination unreachable, code 4): it passes without
        policy, as Cilium's ALLOW_ICMP_FRAG_NEEDED lets it (path MTU discovery)."""
        return self.family == 4 and self.protocol == ICMP and \
            self.icmp_type == DEST_UNREACH and self.icmp_code == FRAG_NEEDED

    def link_control(self, leaving: bool) -> bool:
        """An ICMPv6 message of the link itself: neighbour discovery with hop limit 255 or
        MLD with hop limit 1 (never routed), whole, and when leaving the pod addressed within
        the link (link-local, or link-scope multicast). It passes as ARP does."""
        if self.family != 6 or self.protocol != ICMPV6 or self.icmp_type is None \
                or self.fragment != FRAG_NONE:
            return False
        if not ((self.icmp_type in ND_TYPES and self.hop_limit == 255)
                or (self.icmp_type in MLD_TYPES and self.hop_limit == 1)):
            return False
        dst = ipaddress.IPv6Address(self.dst)
        return not leaving or dst.is_link_local or \
            dst in ipaddress.IPv6Network("ff02::/16")


#: How a datapath walks IPv6 extension headers to the transport header: the one place two
#: datapaths may read a packet differently, so each declares its walk and is tested against
#: the model under it (docs/datapath.md, "Parsing"). "cilium": Cilium's ipv6_hdrlen(), the
#: eBPF datapath; "kernel": the kernel's ipv6_find_hdr() as nf_tables calls it.
CILIUM_WALK, KERNEL_WALK = "cilium", "kernel"


def parse(frame: bytes, walk: str = CILIUM_WALK) -> Parsed:
    if len(frame) < 14:
        return Parsed(MALFORMED)
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETH_ARP:
        return Parsed(ARP)
    if ethertype == ETH_IPV6:
        return _parse_ipv6(frame[14:], walk)
    if ethertype != ETH_IPV4:
        return Parsed(NOT_IP)
    ip = frame[14:]
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[0] & 0xF < 5:
        return Parsed(MALFORMED)
    hlen, total = (ip[0] & 0xF) * 4, struct.unpack_from("!H", ip, 2)[0]
    if total < hlen or total > len(ip) or hlen > len(ip):
        return Parsed(MALFORMED)
    ip_id, flags = struct.unpack_from("!HH", ip, 4)
    protocol = ip[9]
    src, dst = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
    offset = (flags & 0x1FFF) * 8
    fragment = FRAG_LATER if offset else (FRAG_FIRST if flags & MORE_FRAGMENTS else FRAG_NONE)
    common = dict(src=src, dst=dst, protocol=protocol, fragment=fragment, ip_id=ip_id,
                  frag_offset=offset)
    if fragment == FRAG_LATER:
        return Parsed(PARSED, **common)
    return _with_ports(ip, hlen, total - hlen, common)


def _with_ports(ip: bytes, offset: int, available: int, common: dict) -> Parsed:
    """The parse of a packet whose transport header starts at ``offset`` with ``available``
    bytes: its ports when its protocol has them; a short header is malformed, or marked so
    in a first fragment."""
    need = TRANSPORT_HEADER.get(common["protocol"], 0)
    if common["protocol"] in ECHO_REQUEST and available >= 1 and \
            (common["protocol"] == ICMP) == (common.get("family", 4) == 4):
        kind = ip[offset]
        code = ip[offset + 1] if available >= 2 else None
        sport, dport = icmp_ports(common["protocol"], kind)
        return Parsed(PARSED, sport=sport, dport=dport, icmp_type=kind, icmp_code=code,
                      **common)
    if not need:
        return Parsed(PARSED, **common)
    if available < need:
        if common["fragment"] == FRAG_FIRST:
            return Parsed(PARSED, transport_short=True, **common)
        return Parsed(MALFORMED)
    sport, dport = struct.unpack_from("!HH", ip, offset)
    flags = ip[offset + 13] if common["protocol"] == TCP else 0
    return Parsed(PARSED, sport=sport, dport=dport, tcp_flags=flags, **common)


def _parse_ipv6(ip: bytes, walk: str) -> Parsed:
    """Extension headers are walked to the transport header as ``walk`` says; a fragment
    header sets the fragment fields (its 32-bit identification is ``ip_id``)."""
    if len(ip) < 40 or ip[0] >> 4 != 6:
        return Parsed(MALFORMED)
    payload = struct.unpack_from("!H", ip, 4)[0]
    if payload > len(ip) - 40:
        return Parsed(MALFORMED)
    end = 40 + payload
    walked = (_walk_cilium if walk == CILIUM_WALK else _walk_kernel)(ip, end)
    if walked is None:
        return Parsed(MALFORMED)
    following, offset, fragment, ip_id, frag_offset = walked
    common = dict(family=6, src=str(ipaddress.IPv6Address(ip[8:24])),
                  dst=str(ipaddress.IPv6Address(ip[24:40])), protocol=following,
                  fragment=fragment, ip_id=ip_id, frag_offset=frag_offset, hop_limit=ip[7])
    if fragment == FRAG_LATER:
        return Parsed(PARSED, **common)
    return _with_ports(ip, offset, end - offset, common)


def _fragment_fields(header: bytes) -> tuple[str, int, int]:
    field, ip_id = struct.unpack_from("!HI", header, 2)
    frag_offset = field & 0xFFF8
    return (FRAG_LATER if frag_offset else (FRAG_FIRST if field & 1 else FRAG_NONE),
            ip_id, frag_offset)


def _walk_cilium(ip: bytes, end: int):
    """Up to IPV6_MAX_HEADERS headers, each read whole (8 bytes at least), AH included; more
    headers, or a chain cut short or running past the payload, is malformed (None).
    ``(protocol, transport offset, fragment, identification, fragment offset)``."""
    offset, following = 40, ip[6]
    fragment, ip_id, frag_offset = FRAG_NONE, 0, 0
    for _ in range(IPV6_MAX_HEADERS):
        if following not in EXTENSION_HEADERS:
            break
        if offset + 8 > end:
            return None
        header = ip[offset:offset + 8]
        if following == FRAGMENT:
            fragment, ip_id, frag_offset = _fragment_fields(header)
            offset += 8
        elif following == AUTH:
            offset += (header[1] + 2) * 4
        else:
            offset += (header[1] + 1) * 8
        following = header[0]
    if following in EXTENSION_HEADERS or offset > end:
        return None
    return following, offset, fragment, ip_id, frag_offset


def _walk_kernel(ip: bytes, end: int):
    """The kernel's ipv6_find_hdr(target -1, IP6_FH_F_AUTH) and what nf_tables reads of a
    fragment header: every header, each needing its first two bytes (a fragment header all
    eight); a later fragment ends the walk and must be followed by a protocol; a chain running
    past the payload leaves no transport header. AH ends the walk: the nftables datapath
    drops it as malformed rather than judge a packet by a header it cannot see past. The
    first fragment header found sets the fragment fields."""
    offset, following = 40, ip[6]
    fragment, ip_id, frag_offset, seen = FRAG_NONE, 0, 0, False
    while following in EXTENSION_HEADERS:
        if following == AUTH:
            return None
        if offset + (8 if following == FRAGMENT else 2) > end:
            return None
        header = ip[offset:offset + 8]
        if following == FRAGMENT:
            fields = _fragment_fields(header)
            if not seen:
                fragment, ip_id, frag_offset, seen = *fields, True
            if fields[0] == FRAG_LATER:
                if header[0] in EXTENSION_HEADERS:
                    return None
                return header[0], offset + 8, fragment, ip_id, frag_offset
            offset += 8
        else:
            offset += (header[1] + 1) * 8
        following = header[0]
    return following, min(offset, end), fragment, ip_id, frag_offset
