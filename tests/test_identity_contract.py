"""The default identity allocator passes the identity-allocator contract suite (on the memory
store; tests/test_identity_allocation.py covers it on a real etcd)."""

from meshagent.testing.identity_contract import IdentityAllocatorContract


class TestKVStoreAllocator(IdentityAllocatorContract):
    agent_args = ("--plugins", "memory")
