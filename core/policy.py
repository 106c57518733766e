"""The policy resolver slot's contract: policy documents in, per-endpoint verdicts out."""

from collections.abc import Iterable
from typing import Protocol, runtime_checkable


@runtime_checkable
class PolicyResolver(Protocol):
    """Holds the imported policies and resolves them per endpoint (slot ``policy-resolver``).

    The resolver learns identities and endpoints from the agent's events and hands only the
    changed verdicts to the datapath.
    """

    def import_policies(self, text: str, source: str) -> int:
        """Validate and import one or many YAML/JSON documents; returns the new revision.

        Raises :class:`meshagent.errors.UsageError` naming the document, field path and
        problem; on error nothing of ``text`` is imported.
        """

    def delete_policy(self, name: str, namespace: str | None) -> int:
        """Remove one policy document; returns the new revision."""

    def policies(self) -> Iterable[object]:
        """The imported policy documents."""

    @property
    def revision(self) -> int:
        """Increases with every import or delete."""
