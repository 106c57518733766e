"""CIDR identities: every prefix a rule names becomes a node-local identity and an ipcache row.

That is how the datapath tells a CIDR's addresses apart from the rest of the world (and an
``except`` apart from its CIDR): by the longest ipcache prefix an address falls in. As in
Cilium, these identities are local to the node (``LOCAL_IDENTITY_FLAG``) and labelled
``cidr:<prefix>`` and ``reserved:world`` (``reserved:world-ipv6`` for an IPv6 prefix, as in
Cilium's dual-stack clusters). The core numbers them here for whichever resolver is loaded
(the policy repository asks, from the rules it holds); the test scenarios number them the same
way.
"""

from meshagent.model.identity import Identity, world_identity
from meshagent.model.ipcache import POLICY_SOURCE, IPCacheEntry
from meshagent.model.net import Network, family_order
from meshagent.model.table import Tables

LOCAL_IDENTITY_FLAG = 1 << 24


def cidr_identity(number: int, prefix: Network, cluster: str) -> Identity:
    return Identity(number, frozenset({f"cidr:{prefix}", world_identity(prefix.version).label}),
                    cluster)


def local_identity_numbers(tables: Tables) -> set[int]:
    """The node-local identity numbers in use (CIDR and FQDN identities share the range)."""
    return {number for number in tables.identities if number & LOCAL_IDENTITY_FLAG}


def free_local_identity(taken: set[int]) -> int:
    """The lowest node-local identity number not in ``taken``."""
    return next(n for n in range(LOCAL_IDENTITY_FLAG | 1, LOCAL_IDENTITY_FLAG << 1)
                if n not in taken)


class CIDRIdentities:
    """The node-local identity of each prefix wanted, numbered once and kept while wanted."""

    def __init__(self, cluster: str):
        self.cluster = cluster
        self.identities: dict[Network, Identity] = {}

    def want(self, wanted: set[Network], taken_elsewhere: set[int] = frozenset()
             ) -> tuple[list[tuple[Network, Identity]], list[tuple[Network, Identity]]]:
        """Make the prefixes held ``wanted``: (those added, those removed), each with its
        identity, in a stable order (IPv4 first); new numbers avoid ``taken_elsewhere``."""
        removed = [(prefix, self.identities.pop(prefix))
                   for prefix in sorted(set(self.identities) - wanted, key=family_order)]
        taken = {i.id for i in self.identities.values()} | set(taken_elsewhere)
        added = []
        for prefix in sorted(wanted - set(self.identities), key=family_order):
            number = free_local_identity(taken)
            taken.add(number)
            self.identities[prefix] = identity = cidr_identity(number, prefix, self.cluster)
            added.append((prefix, identity))
        return added, removed

    def apply_to(self, tables: Tables, wanted: set[Network]) -> None:
        """:meth:`want`, and the agent's tables follow: the identities, and each prefix in the
        ipcache under the policies' source (this node's own, never a cluster's)."""
        added, removed = self.want(wanted, local_identity_numbers(tables))
        for prefix, identity in removed:
            tables.ipcache.delete(prefix, POLICY_SOURCE)
            tables.identities.delete(identity.id)
        for prefix, identity in added:
            tables.identities.upsert(identity.id, identity)
            tables.ipcache.upsert(prefix, IPCacheEntry(prefix, identity.id, self.cluster),
                                  POLICY_SOURCE)
