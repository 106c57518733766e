"""Policy: CiliumNetworkPolicy in, per-endpoint verdicts out.

``api`` validates documents into attrs classes, ``selector`` matches peers to identities,
``resolver`` computes each endpoint's map state incrementally, ``service`` is the default
provider of the slot below (policies stored in the cluster's kvstore).
"""

from typing import Protocol, runtime_checkable


@runtime_checkable
class PolicyResolver(Protocol):
    """Holds the cluster's policies and resolves them per endpoint (slot ``policy-resolver``).

    It learns identities and endpoints from the agent's events and hands only the changed map
    entries to the datapath slot (``update_policy``).
    """

    async def import_policies(self, text: str, source: str) -> list:
        """Validate YAML/JSON documents into policies; raises
        :class:`meshagent.policy.api.PolicyError` naming document, field path and problem, or
        the input limit it exceeds (docs/policy.md)."""

    async def store(self, policies: list) -> None:
        """Make the policies the cluster's (every agent of it enforces them)."""

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """Remove one policy from the cluster; False if there was none."""

    def policies(self) -> list:
        """The policies in force."""

    @property
    def revision(self) -> int:
        """Grows with every change of the policies in force."""

    def trace(self, dst_endpoint: int, port: int, protocol: str = "TCP", **source) -> dict:
        """Explain the verdict for a source (identity, labels or IP) reaching an endpoint."""

    async def close(self) -> None:
        """Stop what it runs besides the agent (its parser process)."""
