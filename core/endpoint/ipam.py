"""Host-scope IPAM: pod addresses from this node's ``--pod-cidr``.

The allocations are not stored separately: they are the addresses of the endpoints, which are
persisted, so after a restart the pool is rebuilt by claiming each restored endpoint's address.
"""


from meshagent.errors import MeshagentError
from meshagent.model.net import Address, Network


class IPAMError(MeshagentError):
    """No address can be given (none configured, pool exhausted, address taken)."""




class HostScopeIPAM:
    """Addresses of both families: each endpoint gets one of every family configured."""

    def __init__(self, cidrs: tuple[Network, ...]):
        self.cidrs = cidrs
        self.owners: dict[Address, str] = {}

    def has_family(self, version: int) -> bool:
        return any(c.version == version for c in self.cidrs)

    def allocate(self, owner: str, version: int = 4) -> Address:
        if not self.cidrs:
            raise IPAMError("no pod CIDR configured: start the agent with --pod-cidr")
        cidrs = [c for c in self.cidrs if c.version == version]
        if not cidrs:
            raise IPAMError(f"no IPv{version} pod CIDR configured (--pod-cidr)")
        for address in (a for cidr in cidrs for a in _usable(cidr)):
            if address not in self.owners:
                self.owners[address] = owner
                return address
        raise IPAMError(f"pod CIDR {', '.join(map(str, cidrs))} is exhausted"
                        f" ({len(self.owners)} addresses in use)")

    def claim(self, address: Address, owner: str) -> None:
        """Take a specific address back (restoring an endpoint after a restart)."""
        if not any(address in cidr for cidr in self.cidrs):
            raise IPAMError(f"{address} is outside the pod CIDR {', '.join(map(str, self.cidrs))}")
        holder = self.owners.get(address)
        if holder not in (None, owner):
            raise IPAMError(f"{address} is already used by {holder}")
        self.owners[address] = owner

    def release(self, address: Address) -> None:
        self.owners.pop(address, None)

    def status_line(self) -> str:
        size = sum(_usable_count(c) for c in self.cidrs)
        return f"{len(self.owners)}/{size} allocated from {', '.join(map(str, self.cidrs))}"


def _usable(cidr: Network):
    """The addresses a pod may get: not the network (nor IPv4's broadcast) address."""
    return cidr.hosts() if cidr.prefixlen < cidr.max_prefixlen - 1 else iter(cidr)


def _usable_count(cidr: Network) -> int:
    """How many addresses ``hosts()`` yields, without walking a /64."""
    if cidr.prefixlen >= cidr.max_prefixlen - 1:
        return cidr.num_addresses
    return cidr.num_addresses - (2 if cidr.version == 4 else 1)
