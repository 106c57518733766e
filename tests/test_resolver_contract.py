"""The default policy resolver, and one that does not wrap it, pass the resolver contract
suite (every case of the policy table through the contract, fed to a datapath by the core)."""

import standalone_resolver

from meshagent.testing.resolver_contract import PolicyResolverContract


class TestDefaultResolver(PolicyResolverContract):
    agent_args = ("--plugins", "memory")


class TestAResolverThatDoesNotWrapTheDefault(PolicyResolverContract):
    """Its rules come from the core's repository, as every source's do."""

    agent_args = ("--plugins", "memory", "--policy-resolver", "standalone")
    extra_plugins = (("standalone", standalone_resolver),)
