"""Synthetic Ethernet frames for datapath tests, and the parse every datapath must agree with.

:class:`Packet` describes a frame by its fields (so a failing case reads as what it is) and
:meth:`Packet.frame` builds the bytes: IPv4 with options, TCP/UDP/SCTP/ICMP, first and later
fragments, truncated and malformed headers, and a few non-IPv4 frames. :func:`parse` reads
bytes back the way docs/datapath.md says a datapath reads them.
"""

import ipaddress
import struct

import attrs

ETH_IPV4, ETH_ARP, ETH_IPV6 = 0x0800, 0x0806, 0x86DD
TCP, UDP, SCTP, ICMP = 6, 17, 132, 1
#: The transport header a packet of these protocols must carry whole (a first fragment too):
#: every byte up to and including TCP's flags, UDP's and SCTP's common header (RFC 1858).
TRANSPORT_HEADER = {TCP: 20, UDP: 8, SCTP: 12}
SYN, ACK = 0x02, 0x10
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
    version: int = 4
    length_excess: int = 0  # the IPv4 total length claims this many bytes more than there are
    ethertype: int = ETH_IPV4

    def reply(self) -> "Packet":
        """The same flow, the other way."""
        return attrs.evolve(self, src=self.dst, dst=self.src, sport=self.dport,
                            dport=self.sport, tcp_flags=SYN | ACK if self.tcp_flags == SYN
                            else self.tcp_flags)

    def frame(self) -> bytes:
        eth = bytes.fromhex("020000000001020000000002") + struct.pack("!H", self.ethertype)
        if self.ethertype == ETH_ARP:
            return eth + struct.pack("!HHBBH", 1, ETH_IPV4, 6, 4, 1) + bytes(6) + \
                ipaddress.IPv4Address(self.src).packed + bytes(6) + \
                ipaddress.IPv4Address(self.dst).packed
        if self.ethertype != ETH_IPV4:
            return eth + bytes(40)
        body = bytes(self.payload)
        if self.frag_offset == 0:
            transport = self._transport(len(body))
            if self.transport_bytes is not None:
                transport = transport[:self.transport_bytes]
                body = b""
            body = transport + body
        options = b"\x01" * (self.ihl * 4 - 20) if self.ihl > 5 else b""
        total = 20 + len(options) + len(body) + self.length_excess
        flags = (MORE_FRAGMENTS if self.more_fragments else 0) | (self.frag_offset // 8)
        header = struct.pack("!BBHHHBBH4s4s", (self.version << 4) | (self.ihl & 0xF), 0,
                             total & 0xFFFF, self.ip_id, flags, 64, self.protocol, 0,
                             ipaddress.IPv4Address(self.src).packed,
                             ipaddress.IPv4Address(self.dst).packed) + options
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        return eth + header + body

    def _transport(self, payload: int) -> bytes:
        if self.protocol == TCP:
            return struct.pack("!HHIIBBHHH", self.sport, self.dport, 1, 0, 5 << 4,
                               self.tcp_flags, 65535, 0, 0)
        if self.protocol == UDP:
            return struct.pack("!HHHH", self.sport, self.dport, 8 + payload, 0)
        if self.protocol == SCTP:
            return struct.pack("!HHII", self.sport, self.dport, 1, 0)
        if self.protocol == ICMP:
            return struct.pack("!BBHHH", 8, 0, 0, self.sport, 1)
        return b""


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


ARP, NOT_IPV4, MALFORMED, PARSED = "arp", "not-ipv4", "malformed", "parsed"
FRAG_NONE, FRAG_FIRST, FRAG_LATER = "none", "first", "later"


@attrs.frozen
class Parsed:
    """What a datapath reads off a frame (docs/datapath.md, "Parsing")."""

    outcome: str  # ARP, NOT_IPV4 (another ethertype), MALFORMED or PARSED
    src: str = ""
    dst: str = ""
    protocol: int = 0
    sport: int = 0
    dport: int = 0
    fragment: str = FRAG_NONE
    ip_id: int = 0
    frag_offset: int = 0
    transport_short: bool = False  # a first fragment without its whole transport header


def parse(frame: bytes) -> Parsed:
    if len(frame) < 14:
        return Parsed(MALFORMED)
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETH_ARP:
        return Parsed(ARP)
    if ethertype != ETH_IPV4:
        return Parsed(NOT_IPV4)
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
    need = TRANSPORT_HEADER.get(protocol, 0)
    if fragment == FRAG_LATER or not need:
        return Parsed(PARSED, **common)
    if total - hlen < need:
        if fragment == FRAG_FIRST:
            return Parsed(PARSED, transport_short=True, **common)
        return Parsed(MALFORMED)
    sport, dport = struct.unpack_from("!HH", ip, hlen)
    return Parsed(PARSED, sport=sport, dport=dport, **common)
