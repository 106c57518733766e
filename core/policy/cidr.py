"""CIDR identities: every prefix a rule names becomes a node-local identity and an ipcache row.

That is how the datapath tells a CIDR's addresses apart from the rest of the world (and an
``except`` apart from its CIDR): by the longest ipcache prefix an address falls in. As in
Cilium, these identities are local to the node (``LOCAL_IDENTITY_FLAG``) and labelled
``cidr:<prefix>`` and ``reserved:world`` (``reserved:world-ipv6`` for an IPv6 prefix, as in
Cilium's dual-stack clusters).
"""

import ipaddress
from collections.abc import Iterable

from meshagent.model.identity import Identity, world_identity
from meshagent.policy.api import Network, Policy

LOCAL_IDENTITY_FLAG = 1 << 24
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


def cidr_identity(number: int, prefix: Network, cluster: str) -> Identity:
    return Identity(number, frozenset({f"cidr:{prefix}", world_identity(prefix.version).label}),
                    cluster)


def free_local_identity(taken: set[int]) -> int:
    """The lowest node-local identity number not in ``taken``."""
    return next(n for n in range(LOCAL_IDENTITY_FLAG | 1, LOCAL_IDENTITY_FLAG << 1)
                if n not in taken)
