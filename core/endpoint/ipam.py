"""Host-scope IPAM: pod addresses from this node's ``--pod-cidr``.

The allocations are not stored separately: they are the addresses of the endpoints, which are
persisted, so after a restart the pool is rebuilt by claiming each restored endpoint's address.
"""

import ipaddress

from meshagent.errors import MeshagentError


class IPAMError(MeshagentError):
    """No address can be given (none configured, pool exhausted, address taken)."""


class HostScopeIPAM:
    def __init__(self, cidrs: tuple[ipaddress.IPv4Network, ...]):
        self.cidrs = cidrs
        self.owners: dict[ipaddress.IPv4Address, str] = {}

    def _usable(self):
        for cidr in self.cidrs:
            hosts = cidr.hosts() if cidr.prefixlen < 31 else iter(cidr)
            yield from hosts

    def allocate(self, owner: str) -> ipaddress.IPv4Address:
        if not self.cidrs:
            raise IPAMError("no pod CIDR configured: start the agent with --pod-cidr")
        for address in self._usable():
            if address not in self.owners:
                self.owners[address] = owner
                return address
        raise IPAMError(f"pod CIDR {', '.join(map(str, self.cidrs))} is exhausted"
                        f" ({len(self.owners)} addresses in use)")

    def claim(self, address: ipaddress.IPv4Address, owner: str) -> None:
        """Take a specific address back (restoring an endpoint after a restart)."""
        if not any(address in cidr for cidr in self.cidrs):
            raise IPAMError(f"{address} is outside the pod CIDR {', '.join(map(str, self.cidrs))}")
        holder = self.owners.get(address)
        if holder not in (None, owner):
            raise IPAMError(f"{address} is already used by {holder}")
        self.owners[address] = owner

    def release(self, address: ipaddress.IPv4Address) -> None:
        self.owners.pop(address, None)

    def status_line(self) -> str:
        size = sum(1 for _ in self._usable())
        return f"{len(self.owners)}/{size} allocated from {', '.join(map(str, self.cidrs))}"
