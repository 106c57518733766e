"""The default policy resolver passes the resolver contract suite (every case of the policy
table through the contract, fed to a datapath by the core)."""

from meshagent.testing.resolver_contract import PolicyResolverContract


class TestDefaultResolver(PolicyResolverContract):
    agent_args = ("--plugins", "memory")
