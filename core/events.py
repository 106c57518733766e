"""What the agent tells its plugins when its view of the world changes."""

import enum

import attrs


class ChangeKind(enum.Enum):
    """Whether an object was added or changed (upsert) or went away (delete)."""

    UPSERT = "upsert"
    DELETE = "delete"


@attrs.frozen
class PolicyChange:
    """A policy document that was imported or deleted, and the repository revision after it."""

    name: str
    namespace: str | None  # None for a clusterwide policy
    revision: int
