"""The prefixes rules name, each of which gets a node-local CIDR identity
(:mod:`meshagent.identity.cidr`)."""

import ipaddress
from collections.abc import Iterable

from meshagent.policy.api import Network, Policy

WORLD_PREFIXES = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def policy_cidrs(policies: Iterable[Policy]) -> set[Network]:
    """Every CIDR and except the policies name, but 0.0.0.0/0 and ::/0 (the world identities
    themselves)."""
    wanted = set()
    for policy in policies:
        for rule in policy.rules:
            for item in rule.ingress + rule.ingress_deny + rule.egress + rule.egress_deny:
                for cidr in item.cidrs or ():
                    wanted.add(cidr.cidr)
                    wanted.update(cidr.excepts)
    wanted.difference_update(WORLD_PREFIXES)
    return wanted
