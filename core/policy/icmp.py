"""ICMP rules (``icmps``): Cilium's type names and how a rule becomes a port entry.

Cilium (pkg/policy/api/icmp.go) turns each ``fields`` entry into a port entry whose protocol is
ICMP or ICMPv6 and whose port is the type, and its datapath looks the type up as the port
(bpf/lib/policy.h): an ICMP rule is a port rule. The name tables are icmp.go's, per family.
"""

IPV4, IPV6 = "IPv4", "IPv6"
FAMILIES = (IPV4, IPV6)
#: the protocol name (meshagent.policy.api.PROTOCOLS) of each family's rules
PROTOCOL = {IPV4: "ICMP", IPV6: "ICMPv6"}
MAX_FIELDS = 40  # icmp.go: +kubebuilder:validation:MaxItems=40

#: icmp.go's icmpIpv4TypeNameToCode
IPV4_TYPES = {
    "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
    "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11,
    "ParameterProblem": 12, "Timestamp": 13, "TimestampReply": 14, "Photuris": 40,
    "ExtendedEchoRequest": 42, "ExtendedEchoReply": 43,
}
#: icmp.go's icmpIpv6TypeNameToCode
IPV6_TYPES = {
    "DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
    "EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130,
    "MulticastListenerReport": 131, "MulticastListenerDone": 132, "RouterSolicitation": 133,
    "RouterAdvertisement": 134, "NeighborSolicitation": 135, "NeighborAdvertisement": 136,
    "RedirectMessage": 137, "RouterRenumbering": 138, "ICMPNodeInformationQuery": 139,
    "ICMPNodeInformationResponse": 140, "InverseNeighborDiscoverySolicitation": 141,
    "InverseNeighborDiscoveryAdvertisement": 142, "HomeAgentAddressDiscoveryRequest": 144,
    "HomeAgentAddressDiscoveryReply": 145, "MobilePrefixSolicitation": 146,
    "MobilePrefixAdvertisement": 147, "DuplicateAddressRequestCodeSuffix": 157,
    "DuplicateAddressConfirmationCodeSuffix": 158, "ExtendedEchoRequest": 160,
    "ExtendedEchoReply": 161,
}
TYPES = {IPV4: IPV4_TYPES, IPV6: IPV6_TYPES}

#: ICMP numbers: the protocols, echo request and reply per family, and the ICMPv4 message
#: that always passes (fragmentation needed: destination unreachable, code 4)
ICMP, ICMPV6 = 1, 58
ECHO_REQUEST = {ICMP: 8, ICMPV6: 128}
ECHO_REPLY = {ICMP: 0, ICMPV6: 129}
DEST_UNREACH, FRAG_NEEDED = 3, 4
