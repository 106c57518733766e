"""meshagent: a node agent that does what a Cilium agent does with ClusterMesh enabled.

Plugins implement hooks with :data:`hookimpl`; the hook specifications live in
:mod:`meshagent.hooks.specs`.
"""

from typing import Any

PROJECT = "meshagent"


def __getattr__(name: str) -> Any:
    """``hookimpl`` (the marker for hook implementations: ``@meshagent.hookimpl``) and
    ``__version__``, made on first use: pluggy and importlib.metadata would cost every CLI
    call ~25 ms otherwise, and ``meshagent status`` needs neither."""
    if name == "hookimpl":
        import pluggy
        marker = globals()["hookimpl"] = pluggy.HookimplMarker(PROJECT)
        return marker
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(PROJECT)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"

__all__ = ["hookimpl", "__version__", "PROJECT"]
