"""Errors the agent and the CLI turn into exit codes and one-line messages."""


class MeshagentError(Exception):
    """Base class: anything meshagent raises on purpose."""

    exit_code = 1


class UsageError(MeshagentError):
    """The command line, environment or config dir asked for something invalid (exit 2).

    Raised before any side effect, so a user can fix the invocation and run again.
    """

    exit_code = 2


class PluginError(MeshagentError):
    """A plugin could not be found, loaded or registered, or a provider slot is unusable."""

    exit_code = 2


class AgentNotRunning(MeshagentError):
    """The CLI found no agent listening on the API socket."""
