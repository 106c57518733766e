"""Addresses and networks of either IP family: one name for each, used everywhere."""

import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def family_order(value: Address | Network) -> tuple[int, Address | Network]:
    """A sort key: IPv4 before IPv6 (values of two families do not compare)."""
    return value.version, value
